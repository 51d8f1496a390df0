"""Studies from a PACS: QIDO-RS search, WADO-RS retrieval, PHI-free file names, resumable.

`pull` asks a DICOMweb server (dicomweb-client) for the studies that match a query, lists each
study's series and instances, and writes every instance as `<out>/<study>/<instance>.dcm`, where
both names are SHA-256 prefixes of the UIDs (`uid_hash`): no patient name, ID or date reaches a
path. The files are the PACS's DICOM as sent (the manifest build pseudonymises later). Each file
is written to a temporary name and renamed, so a file that exists is complete: an interrupted
pull run again skips the instances it already has.

Credentials come from the environment (`MEDTL_DICOMWEB_TOKEN`, or `MEDTL_DICOMWEB_USER` and
`MEDTL_DICOMWEB_PASSWORD`) or a netrc file, never from the command line; they are never logged or
put in a message, and neither are UIDs (their hashes may appear in debug records).

`store` sends DICOM files back (STOW-RS), e.g. the DICOM SEG objects `medtl predict` writes.

Example:
    >>> result = pull("https://pacs.hospital.example/dicom-web", parse_query("Modality=CR"), Path("pulled"))
    ... # doctest: +SKIP
    >>> result.fetched + result.skipped  # doctest: +SKIP
    240
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from tqdm.auto import tqdm

from medtl.errors import InputError, did_you_mean

logger = logging.getLogger(__name__)

USER_ENV = "MEDTL_DICOMWEB_USER"
PASSWORD_ENV = "MEDTL_DICOMWEB_PASSWORD"
TOKEN_ENV = "MEDTL_DICOMWEB_TOKEN"
#: Hex characters of SHA-256 kept in folder and file names (64 bits: no collision in any archive).
HASH_CHARS = 16
#: Seconds to connect and to wait for an answer.
TIMEOUT = (10.0, 120.0)
#: Tries of each request (dicomweb-client's retry: busy answers and network errors).
RETRIES = 3
_PART_SUFFIX = ".part"
# QIDO-RS attribute tags of the answers (PS3.18 6.7.1.2).
_STUDY_UID, _SERIES_UID, _SOP_UID, _MODALITY = "0020000D", "0020000E", "00080018", "00080060"
# Query parameters that steer paging: pull pages itself.
_CONTROL_KEYS = {"limit", "offset"}
_COMMON_KEYS = ("Modality", "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber", "ModalitiesInStudy",
                "StudyInstanceUID", "PatientID", "BodyPartExamined")
_DATE_RANGE = re.compile(r"^(\d{8})?-?(\d{8})?$")
_QUERY_EXAMPLE = "'Modality=CR&StudyDate=20240101-20241231'"
_CREDENTIALS_HINT = f"set {USER_ENV} and {PASSWORD_ENV} (or {TOKEN_ENV}) or a netrc entry for {{host}}"


@dataclass(frozen=True)
class PullResult:
    """What `pull` did: counts only (no UID, no header value).

    Attributes:
        out: The folder written to.
        studies: Studies that matched the query.
        series: Their series kept (of the queried modalities, when the query names some).
        fetched: Instances retrieved and written by this call.
        skipped: Instances whose file was already complete (an earlier, interrupted pull).
        failed: Instances (or lists) that could not be had, by reason.
    """

    out: Path
    studies: int
    series: int
    fetched: int
    skipped: int
    failed: dict[str, int] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        """Instances and lists that failed, all reasons together."""
        return sum(self.failed.values())


@dataclass(frozen=True)
class StoreResult:
    """What `store` did: counts only.

    Attributes:
        stored: Files the PACS accepted.
        failed: Files it did not accept (or that could not be read), by reason.
    """

    stored: int
    failed: dict[str, int] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        """Files that failed, all reasons together."""
        return sum(self.failed.values())


def parse_query(text: str) -> dict[str, str]:
    """A QIDO-RS query from 'KEY=VALUE&KEY=VALUE' (values may be percent-encoded).

    Keys are DICOM keywords (`Modality`, `StudyDate`, `StudyDescription`, ...) or 8-digit tags.
    `Modality` takes one or more values separated by ',' (`Modality=CR,DX`); dates take
    `YYYYMMDD` or a range `YYYYMMDD-YYYYMMDD` (either end may be left open). Messages name the
    key or the part's position, never a value (a query may hold a patient ID).

    Args:
        text: The query as typed on the command line.

    Returns:
        The query as a dict, in the order given.

    Raises:
        InputError: If a part is not KEY=VALUE, a key is unknown or repeated, or a value is empty
            or not a date where a date is expected.

    Example:
        >>> parse_query("Modality=CR&StudyDate=20240101-20241231")
        {'Modality': 'CR', 'StudyDate': '20240101-20241231'}
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"query must be KEY=VALUE pairs joined by '&', not empty; e.g. {_QUERY_EXAMPLE}")
    query: dict[str, str] = {}
    for number, part in enumerate(text.strip().split("&"), start=1):
        key, equals, value = part.partition("=")
        if not equals:
            raise InputError(f"query part {number} must be KEY=VALUE, not text without '='; "
                             f"join pairs with '&', e.g. {_QUERY_EXAMPLE}")
        key = unquote(key).strip()
        if key in query:
            raise InputError(f"query key {key!r} must appear once, not twice (part {number}); "
                             f"give several modalities as Modality=CR,DX")
        query[key] = unquote(value).strip()
    return check_query(query)


def check_query(query: Mapping[str, str]) -> dict[str, str]:
    """Check a query given as a mapping (see `parse_query`); returns it as a plain dict.

    Raises:
        InputError: If a key is unknown or steers paging, or a value is empty or a malformed date.
    """
    if not isinstance(query, Mapping):
        raise InputError(f"query must be a mapping or a 'KEY=VALUE&...' string, not {type(query).__name__}")
    checked: dict[str, str] = {}
    for key, value in query.items():
        key, value = str(key).strip(), str(value).strip()
        if key.lower() in _CONTROL_KEYS:
            raise InputError(f"query key {key!r} must not be given: pull pages through the results itself; "
                             f"remove it")
        if not (tag_for_keyword(key) is not None or re.fullmatch(r"[0-9A-Fa-f]{8}", key)):
            raise InputError(f"query key {key!r} must be a DICOM keyword or an 8-digit tag, not an unknown name; "
                             f"{did_you_mean(key, _COMMON_KEYS)}")
        if not value:
            raise InputError(f"query key {key!r} must have a value, not an empty one; e.g. {_QUERY_EXAMPLE}")
        if _vr(key) == "DA" and not _is_date_query(value):
            raise InputError(f"query key {key!r} must be a date (8 digits: year, month, day) or a range of two "
                             f"dates joined by '-', not another form; e.g. StudyDate=20240101-20241231")
        checked[key] = value
    return checked


def uid_hash(uid: str) -> str:
    """The first `HASH_CHARS` hex digits of SHA-256 of a UID: names folders and files, never the UID.

    Example:
        >>> uid_hash("1.2.3")
        'c47f5b18b8a430e6'
    """
    return hashlib.sha256(uid.strip().encode("ascii", "replace")).hexdigest()[:HASH_CHARS]


def instance_path(out: Path, study_uid: str, sop_uid: str) -> Path:
    """Where `pull` writes an instance: `<out>/<uid_hash(study)>/<uid_hash(sop)>.dcm`."""
    return Path(out) / uid_hash(study_uid) / f"{uid_hash(sop_uid)}.dcm"


def pull(
    url: str,
    query: Mapping[str, str],
    out: Path,
    *,
    progress: bool = True,
    auth_file: Path | None = None,
) -> PullResult:
    """Copy the studies matching `query` from a DICOMweb server into `out`, skipping what is there.

    Args:
        url: The DICOMweb root, e.g. `https://pacs.hospital.example/dicom-web` (Orthanc:
            `http://HOST:8042/dicom-web`); no user name or password in it.
        query: QIDO-RS study filters (see `parse_query`); `Modality` also keeps only the series of
            those modalities.
        out: Folder to write into (created); instances already there are skipped.
        progress: Show a tqdm progress bar over the instances.
        auth_file: netrc file for the credentials when the environment has none (default
            `~/.netrc`), matched by the URL's host.

    Returns:
        A `PullResult` with counts.

    Raises:
        InputError: Malformed URL or query, refused credentials, unreachable server, or a folder
            that cannot be written. Instances that fail one by one are counted, not raised.
    """
    server = _check_url(url)
    filters = check_query(query)
    out = _prepare(Path(out))
    client, server = _client(url, server, auth_file)
    failed: Counter[str] = Counter()
    with _quiet_libraries():
        studies = _search_studies(client, filters, server)
        work, n_series = _list_instances(client, studies, _modalities(filters), server, failed)
        fetched, skipped = _retrieve(client, work, out, server, failed, progress)
    result = PullResult(out=out, studies=len(studies), series=n_series, fetched=fetched, skipped=skipped,
                        failed=dict(failed))
    logger.info("pull: %d studies, %d series, %d instances fetched, %d already present, %d failed",
                result.studies, result.series, fetched, skipped, result.n_failed)
    return result


def store(url: str, files: Sequence[Path], *, progress: bool = True, auth_file: Path | None = None) -> StoreResult:
    """Send DICOM files to a DICOMweb server (STOW-RS), one request per file.

    Storing again what the PACS already holds is harmless (servers replace or keep an instance with
    the same SOPInstanceUID), so a store that failed part-way is simply run again.

    Args:
        url: The DICOMweb root, as for `pull`.
        files: DICOM files to store (e.g. `OUTPUT/dicom_seg/*.dcm` of `medtl predict`).
        progress: Show a tqdm progress bar over the files.
        auth_file: netrc file for the credentials when the environment has none, as for `pull`.

    Returns:
        A `StoreResult` with counts.

    Raises:
        InputError: Malformed URL, refused credentials or unreachable server. A file the server
            rejects is counted, not raised.
    """
    client, server = _client(url, _check_url(url), auth_file)
    stored, failed = 0, Counter()
    with _quiet_libraries():
        for path in tqdm(list(files), desc="storing to the PACS", unit="file", disable=not progress):
            try:
                dataset = dcmread(path)
            except (OSError, InvalidDicomError):
                failed["not a readable DICOM file"] += 1
                continue
            try:
                _call(client.store_instances, server, "storing an instance", [dataset])
            except _Failed as err:
                failed[err.reason] += 1
                continue
            stored += 1
    logger.info("store: %d instances stored, %d failed", stored, sum(failed.values()))
    return StoreResult(stored, dict(failed))


# ---------------------------------------------------------------------------------------------
# Query and URL


def _vr(key: str) -> str:
    tag = tag_for_keyword(key) if not re.fullmatch(r"[0-9A-Fa-f]{8}", key) else int(key, 16)
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


def _is_date_query(value: str) -> bool:
    match = _DATE_RANGE.fullmatch(value)
    return bool(match and (match.group(1) or match.group(2)) and ("-" in value or not match.group(2)))


def _modalities(filters: Mapping[str, str]) -> tuple[str, ...]:
    """The modalities the query asks for (`Modality`, or tag 00080060), upper case; () for any."""
    for key, value in filters.items():
        if key == "Modality" or key.upper() == _MODALITY:
            return tuple(dict.fromkeys(m.strip().upper() for m in re.split(r"[,\\]", value) if m.strip()))
    return ()


def _study_searches(filters: Mapping[str, str]) -> list[dict[str, str]]:
    """One study search per queried modality (as ModalitiesInStudy): servers differ on value lists."""
    base = {k: v for k, v in filters.items() if not (k == "Modality" or k.upper() == _MODALITY)}
    modalities = _modalities(filters)
    return [{**base, "ModalitiesInStudy": m} for m in modalities] if modalities else [base]


def check_store_url(url: str) -> None:
    """Refuse a URL `store` cannot use (another scheme, credentials in it), before any work is done."""
    _check_url(url)


def _check_url(url: str) -> _Server:
    """The server of a DICOMweb URL; refuses other schemes and credentials in the URL."""
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError("the DICOMweb URL must be http(s)://HOST[:PORT]/PATH, not another form; "
                         "e.g. https://pacs.hospital.example/dicom-web")
    if parts.username or parts.password:
        raise InputError(f"the DICOMweb URL must not carry a user name or password; remove them and "
                         f"{_CREDENTIALS_HINT.format(host=parts.hostname)}")
    try:
        port = parts.port
    except ValueError as err:
        raise InputError(f"the DICOMweb URL's port must be a number from 1 to 65535, not another value; "
                         f"e.g. http://{parts.hostname}:8042/dicom-web") from err
    return _Server(parts.hostname, f"{parts.hostname}:{port}" if port else parts.hostname, False)


# ---------------------------------------------------------------------------------------------
# Credentials


def _client(url: str, server: _Server, auth_file: Path | None):
    """A dicomweb-client client with the credentials, and the server (now knowing whether any were sent)."""
    from dicomweb_client.api import DICOMwebClient

    session, has_credentials = _session(server.host, auth_file)
    server = _Server(server.host, server.address, has_credentials)
    client = DICOMwebClient(url.rstrip("/"), session=session, permissive_uid=True, timeout=TIMEOUT)
    # dicomweb-client retries busy answers (429, 503, 504) and any exception, by default 5 times over
    # ~30 s; 3 tries over ~3 s ride out a hiccup without making a wrong URL wait half a minute.
    client.set_http_retry_params(retry=True, max_attempts=RETRIES, wait_exponential_multiplier=500)
    return client, server


def _session(host: str, auth_file: Path | None) -> tuple[requests.Session, bool]:
    """A requests session carrying the credentials, and whether there were any."""
    session = requests.Session()
    token = os.environ.get(TOKEN_ENV, "").strip()
    user, password = os.environ.get(USER_ENV, ""), os.environ.get(PASSWORD_ENV, "")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
        return session, True
    if user or password:
        if not (user and password):
            missing = PASSWORD_ENV if user else USER_ENV
            raise InputError(f"{USER_ENV} and {PASSWORD_ENV} must be set together, not {missing} missing; "
                             f"set both, or unset both to use a netrc entry for {host}")
        session.auth = (user, password)
        return session, True
    entry = _netrc_entry(host, auth_file)
    if entry is not None:
        session.auth = entry
        return session, True
    return session, False


def _netrc_entry(host: str, auth_file: Path | None) -> tuple[str, str] | None:
    """(login, password) of the netrc entry for `host` (or its `default`), None without one."""
    path = Path(auth_file).expanduser() if auth_file is not None else Path.home() / ".netrc"
    if not path.is_file():
        if auth_file is not None:
            raise InputError(f"the netrc file must exist, not be missing ({path}); check the path")
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except netrc.NetrcParseError as err:
        # The parser's message may quote the file's text (a password): name the line only.
        raise InputError(f"the netrc file {path} must be valid netrc, not unreadable near line {err.lineno} "
                         f"(or readable by other users: chmod 600 it); fix the file") from None
    except OSError as err:
        raise InputError(f"the netrc file {path} must be readable, not {err.strerror}; check its permissions") from None
    if entry is None or not entry[2]:
        return None
    return entry[0] or "", entry[2]


# ---------------------------------------------------------------------------------------------
# Talking to the server


@dataclass(frozen=True)
class _Server:
    """What messages may say about the server: its host (netrc matches it), host:port, and
    whether credentials were sent."""

    host: str
    address: str
    has_credentials: bool


class _Failed(Exception):
    """One request failed in a way that is counted, not raised (its reason is the category)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _call(method, server: _Server, what: str, *args, **kwargs):
    """`method(*args, **kwargs)`; refused credentials and network failures become InputError.

    Other HTTP errors and undecodable answers raise `_Failed` with a category. No message quotes
    the library's text: requests' errors quote the URL, which holds study UIDs.
    """
    try:
        return method(*args, **kwargs)
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else 0
        host = server.host
        if status in (401, 403):
            if server.has_credentials:
                raise InputError(f"the PACS refused the credentials for {host} (HTTP {status}); "
                                 f"{_CREDENTIALS_HINT.format(host=host)}") from None
            raise InputError(f"the PACS at {host} asked for credentials (HTTP {status}) and none were found; "
                             f"{_CREDENTIALS_HINT.format(host=host)}") from None
        raise _Failed(f"HTTP {status} from the PACS while {what}") from None
    except requests.exceptions.SSLError:
        raise InputError(f"the certificate of {server.address} could not be verified; point REQUESTS_CA_BUNDLE at "
                         f"your hospital's CA bundle, or ask the PACS administrators") from None
    except (requests.ConnectionError, requests.Timeout) as err:
        kind = "timed out" if isinstance(err, requests.Timeout) else "connection failed"
        raise InputError(f"could not reach the PACS at {server.address} while {what} ({kind}); check the URL, that the "
                         f"server runs and that this machine may reach it (network access, firewall); run the same "
                         f"command again to continue, files already written are kept") from None
    except (InvalidDicomError, ValueError, KeyError, IndexError, EOFError) as err:
        # dicomweb-client and pydicom parse the answer: a malformed one is this item's failure.
        raise _Failed(f"the PACS's answer could not be read while {what} ({type(err).__name__})") from None


def _search_studies(client, filters: Mapping[str, str], server: _Server) -> list[str]:
    """StudyInstanceUIDs matching the filters, each once, in hash order (stable across runs)."""
    found: dict[str, None] = {}
    for search in _study_searches(filters):
        def page(offset, search=search):
            return client.search_for_studies(search_filters=dict(search), offset=offset)

        try:
            found.update(dict.fromkeys(uid for uid, _ in _items(page, server,
                                                                "searching for studies", _STUDY_UID)))
        except _Failed as err:
            raise InputError(f"the PACS at {server.address} did not answer the study search: {err.reason}; check the "
                             f"DICOMweb URL (it often ends in /dicom-web) and the query") from None
    return sorted(found, key=uid_hash)


def _list_instances(client, studies: list[str], modalities: tuple[str, ...], server: _Server,
                    failed: Counter) -> tuple[list[tuple[str, str, str]], int]:
    """(study, series, instance) UIDs to retrieve, and the number of series kept."""
    work: list[tuple[str, str, str]] = []
    n_series = 0
    for study_uid in studies:
        def series_page(offset, study_uid=study_uid):
            return client.search_for_series(study_uid, offset=offset)

        try:
            series = sorted((uid for uid, item in _items(series_page, server,
                                                         "listing a study's series", _SERIES_UID)
                             if not modalities or (_first(item, _MODALITY) or "").upper() in modalities),
                            key=uid_hash)
        except _Failed as err:
            failed[err.reason] += 1
            continue
        for series_uid in series:
            n_series += 1

            def instance_page(offset, study_uid=study_uid, series_uid=series_uid):
                return client.search_for_instances(study_uid, series_uid, offset=offset)

            try:
                sops = [uid for uid, _ in _items(instance_page, server,
                                                 "listing a series' instances", _SOP_UID)]
            except _Failed as err:
                failed[err.reason] += 1
                continue
            work.extend((study_uid, series_uid, sop) for sop in sorted(sops, key=uid_hash))
        logger.debug("study %s: %d series kept", uid_hash(study_uid), len(series))
    return work, n_series


def _items(search, server: _Server, what: str, tag: str) -> Iterator[tuple[str, Mapping]]:
    """(UID under `tag`, item) of every page of `search(offset)`, each UID once.

    Pages until a page is empty or brings no new UID: dicomweb-client's `get_remaining` waits for
    an empty page, but some servers (Orthanc with a ModalitiesInStudy filter) ignore the offset
    and answer the same page forever.
    """
    seen: set[str] = set()
    offset = None
    while True:
        answer = _call(search, server, what, offset) or []
        new = 0
        for item in answer:
            uid = _first(item, tag)
            if uid is None or uid in seen:
                continue
            seen.add(uid)
            new += 1
            yield uid, item
        if not new:
            return
        offset = (offset or 0) + len(answer)


def _first(item: Mapping, tag: str) -> str | None:
    """The first value of `tag` in a DICOM JSON item, as a string."""
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


# ---------------------------------------------------------------------------------------------
# Retrieving and writing


def _prepare(out: Path) -> Path:
    """Creates `out` and removes the temporary files of a pull that was killed mid-write."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.glob(f"*/*.dcm{_PART_SUFFIX}"):
            leftover.unlink()
    except OSError as err:
        raise InputError(f"out must be a folder this user can write, not {out} ({err.strerror}); "
                         f"choose another folder") from err
    return out


def _retrieve(client, work: list[tuple[str, str, str]], out: Path, server: _Server, failed: Counter,
              progress: bool) -> tuple[int, int]:
    """Retrieves and writes each instance not yet in `out`; returns (fetched, skipped)."""
    fetched = skipped = 0
    for study_uid, series_uid, sop_uid in tqdm(work, desc="pulling instances", unit="file", disable=not progress):
        path = instance_path(out, study_uid, sop_uid)
        if path.is_file():  # written atomically, so complete
            skipped += 1
            continue
        try:
            dataset = _call(client.retrieve_instance, server, "retrieving an instance", study_uid, series_uid,
                            sop_uid)
        except _Failed as err:
            failed[err.reason] += 1
            continue
        if str(getattr(dataset, "SOPInstanceUID", "")).strip() != sop_uid.strip():
            failed["the PACS answered with another instance than the one asked for"] += 1
            continue
        _write_atomic(path, dataset)
        fetched += 1
        logger.debug("wrote instance %s of study %s", uid_hash(sop_uid), uid_hash(study_uid))
    return fetched, skipped


def _write_atomic(path: Path, dataset: Dataset) -> None:
    """Write the dataset as received (same encoding, same meta) to a temporary name, then rename."""
    temp = path.with_name(path.name + _PART_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_as(temp, enforce_file_format=False)
        os.replace(temp, path)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise InputError(f"the pulled files must be writable under {path.parent.parent}, not failing "
                         f"({err.strerror}); free space or choose another --out, then run again to "
                         f"continue") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextmanager
def _quiet_libraries():
    """Drops the records below WARNING of the HTTP libraries (they quote URLs with UIDs) while pulling."""
    from dicomweb_client import web
    from urllib3 import connectionpool

    drop = _BelowWarning()
    # Their records below WARNING quote request URLs (with study UIDs) and request headers.
    loggers = [web.logger, connectionpool.log]
    for each in loggers:
        each.addFilter(drop)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(drop)


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING
