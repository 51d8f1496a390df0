"""PHI guard: look through everything a run (or a registered version) stored for identifiers.

The guard reads back what the tracking server holds, not what medtl meant to send, so it also
catches what MLflow adds by itself. It looks at every experiment/run/model name, param, tag,
metric name and dataset input (name, source, schema, profile, tags), and at every artifact of the
run and of its logged models: each file is downloaded and searched as bytes, which covers text
files (JSON, YAML, CSV, HTML, MLmodel, ...) and the text inside binary ones; compressed members of
zip archives are searched after decompression.

It looks for the caller's forbidden strings (patient names, MRNs, accession numbers, original file
or folder names; case-insensitive, and normalised like the manifest's guard so that "DOE^JANE"
finds "Doe_Jane" and "22 07 2019" finds "22.07.2019"; numbers only whole, from
`medtl.vocabulary.MIN_SCANNED_DIGITS` digits on), for the given absolute paths and the current user's home
folder, and for a field whose whole value is the OS user name, unless that name is a common word
("root", "admin", "user": `medtl.vocabulary.common_word`). Such a name identifies no one, and
containers run as "root": a data folder named "root" would otherwise fail every run. The store's
own artifact locations (which MLflow writes into every `MLmodel`) are not path findings.

A finding says where and what kind ("run param 'data.root': forbidden path #1"), never the value;
when a name itself contains a forbidden item it is replaced by its position. `scan_fields` checks
params and names with the same rules before they are logged.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import mmap
import os
import re
import tempfile
import urllib.parse
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath

import mlflow
from mlflow.entities import LoggedModel, Run
from mlflow.exceptions import MlflowException

from medtl.errors import InputError
from medtl.tracking.registry import get_model_version
from medtl.tracking.store import client
from medtl.vocabulary import MIN_SCANNED_DIGITS, common_word, normalise

_MAX_MEMBER_BYTES = 1 << 30  # compressed zip members larger than this are reported, not read


@dataclass(frozen=True)
class _Needles:
    """Search needles; labels name the kind of finding, never the value.

    Each forbidden string is matched twice. As lower-cased bytes with `in` (one fast substring
    search per needle) rather than one regex each: a run's artifacts include multi-megabyte model
    files and a manifest can contribute thousands of identifying values. And normalised
    (`medtl.vocabulary.normalise`: case-folded, every run of separators one space) against the
    normalised text, as a whole-word sequence, the way the manifest's guard matches: the needle
    "doe jane" finds "Doe_Jane_CT" and "22 07 2019" finds "22.07.2019".
    """

    strings: tuple[tuple[str, tuple[bytes, ...], str | None], ...]
    paths: tuple[tuple[str, re.Pattern[bytes]], ...]
    user: str | None
    allowed: tuple[re.Pattern[bytes], ...] = ()

    def hits(self, data: bytes | mmap.mmap) -> list[str]:
        raw = bytes(data)
        text, binary = _text_of(raw)
        text = text.lower()
        normalised: tuple[str, frozenset[str]] | None = None
        found = []
        for label, variants, needle in self.strings:
            hit = any(_raw_hit(v, text, binary) for v in variants)
            if not hit and needle is not None and (not binary or len(needle) >= _MIN_SUBSTRING_NEEDLE):
                if normalised is None:
                    words = normalise(text.decode("utf-8", errors="replace"))
                    # Padded, so that " needle " also matches at the very start and end; the set of
                    # words lets most needles stop at one lookup (thousands of needles, MBs of text).
                    normalised = f" {words} ", frozenset(words.split())
                hit = needle.split(" ", 1)[0] in normalised[1] and f" {needle} " in normalised[0]
            if hit:
                found.append(label)
        spans: list[tuple[int, int]] | None = None
        for label, pattern in self.paths:
            for match in pattern.finditer(raw):
                if spans is None:
                    spans = [m.span() for allowed in self.allowed for m in allowed.finditer(raw)]
                if not any(start <= match.start() < end for start, end in spans):
                    found.append(label)
                    break
        return found

    def with_allowed(self, locations: Iterable[str | None]) -> _Needles:
        patterns = set(self.allowed)
        for location in locations:
            for form in _location_forms(location):
                patterns.add(re.compile(re.escape(form.encode()), re.IGNORECASE))
        return _Needles(self.strings, self.paths, self.user, tuple(patterns))


def scan_run(run_id: str, forbidden: Iterable[str], forbidden_paths: Iterable[Path]) -> list[str]:
    """Scan one run, its dataset inputs, artifacts and logged models for PHI and local paths.

    Args:
        run_id: The MLflow run id.
        forbidden: Strings that must appear nowhere (case-insensitive), e.g. patient names, MRNs,
            original file names. Blank entries are ignored.
        forbidden_paths: Absolute paths that must appear nowhere (data root, key file, ...); the
            current user's home folder is always added.

    Returns:
        Findings such as `"run artifact 'weights/load_report.json': forbidden string #2"`; empty
        when the run is clean.

    Raises:
        InputError: when `forbidden`/`forbidden_paths` is a single string, a path is the
            filesystem root, or the run does not exist.

    Example:
        >>> assert not scan_run(run.info.run_id, ["DOE^JOHN"], [Path("/data/raw")])
    """
    needles = _needles(forbidden, forbidden_paths)
    findings: list[str] = []
    _scan_run(_get_run(run_id), needles, findings, set())
    return list(dict.fromkeys(findings))


def scan_files(paths: Iterable[Path], forbidden: Iterable[str], forbidden_paths: Iterable[Path]) -> list[str]:
    """Scan local files (e.g. a report about to be logged) with the same needles as `scan_run`.

    Args:
        paths: The files to scan.
        forbidden: Strings that must appear nowhere (case-insensitive).
        forbidden_paths: Absolute paths that must appear nowhere; the user's home is always added.

    Returns:
        Findings such as `"file 'report.html': forbidden string #2"`; empty when clean.

    Raises:
        InputError: as `scan_run`, for a single string instead of a list or a root path.
    """
    needles = _needles(forbidden, forbidden_paths)
    findings: list[str] = []
    for path in paths:
        path = Path(path)
        findings.extend(f"file {path.name!r}: {hit}" for hit in _file_hits(path, needles))
        if zipfile.is_zipfile(path):
            findings.extend(f"file {path.name!r}: {hit}" for hit in _zip_hits(path, needles))
    return list(dict.fromkeys(findings))


def scan_fields(
    fields: Mapping[str, object],
    forbidden: Iterable[str],
    forbidden_paths: Iterable[Path],
    *,
    where: str = "field",
) -> list[str]:
    """Check name/value pairs (params, tags, names) before anything is logged to MLflow.

    The same rules as the fields of `scan_run`: forbidden strings (raw and normalised), forbidden
    paths and the home folder, and a value that is the OS user name. A run can thus refuse its
    params, experiment and model names before MLflow stores them.

    Args:
        fields: Name -> value, e.g. the flattened params a run is about to log.
        forbidden: Strings that must appear nowhere (as for `scan_run`).
        forbidden_paths: Absolute paths that must appear nowhere; the user's home is always added.
        where: What the fields are, for the findings ("run param", "experiment", ...).

    Returns:
        Findings naming the key, never the value, e.g. `"run param 'data.root': forbidden path #1"`;
        a key that itself holds a forbidden item is withheld (`"run param (name withheld) name:
        forbidden string #1"`). Empty when clean.

    Raises:
        InputError: as `scan_run`, for a single string instead of a list or a root path, or when
            `fields` is not a mapping.

    Example:
        >>> scan_fields({"data.root": "DOE_JANE"}, ["DOE^JANE"], [], where="run param")  # doctest: +SKIP
        ["run param 'data.root': forbidden string #1"]
    """
    if not isinstance(fields, Mapping):
        raise InputError(
            f"fields must be a mapping name -> value, not {type(fields).__name__}; pass e.g. the params as a dict"
        )
    needles = _needles(forbidden, forbidden_paths)
    findings: list[str] = []
    for key, value in fields.items():
        _field(findings, needles, where, key, value)
    return list(dict.fromkeys(findings))


def scan_registered_version(
    name: str, version: str | int, forbidden: Iterable[str], forbidden_paths: Iterable[Path]
) -> list[str]:
    """Scan a registered version (names, tags, descriptions, aliases), its source run and model.

    Args:
        name: Registered model name.
        version: Version number.
        forbidden: As for `scan_run`.
        forbidden_paths: As for `scan_run`.

    Returns:
        Findings, empty when clean.

    Raises:
        InputError: as for `scan_run`, or when the version does not exist.
    """
    needles = _needles(forbidden, forbidden_paths)
    current = get_model_version(name, version)
    registered = client().get_registered_model(name)
    findings: list[str] = []
    _field(findings, needles, "registered model", "name", registered.name)
    _field(findings, needles, "registered model", "description", registered.description)
    for key, value in sorted((registered.tags or {}).items()):
        _field(findings, needles, "registered model tag", key, value)
    for alias in sorted(registered.aliases or {}):
        _field(findings, needles, "registered model alias", alias, "")
    _field(findings, needles, "model version", "description", current.description)
    _field(findings, needles, "model version", "source", current.source)
    for key, value in sorted((current.tags or {}).items()):
        _field(findings, needles, "model version tag", key, value)
    seen: set[str] = set()
    if current.run_id:
        _scan_run(_get_run(current.run_id), needles, findings, seen)
    model_id = getattr(current, "model_id", None)
    if not model_id and (current.source or "").startswith("models:/m-"):
        model_id = current.source.removeprefix("models:/")  # MLflow 3 sources name the logged model
    if model_id and model_id not in seen:
        _scan_logged_model(client().get_logged_model(model_id), needles, findings, seen)
    return list(dict.fromkeys(findings))


def _scan_run(run: Run, needles: _Needles, findings: list[str], seen: set[str]) -> None:
    mlflow_client = client()
    experiment = mlflow_client.get_experiment(run.info.experiment_id)
    needles = needles.with_allowed([experiment.artifact_location, run.info.artifact_uri])
    _field(findings, needles, "experiment", "name", experiment.name)
    for key, value in sorted((experiment.tags or {}).items()):
        _field(findings, needles, "experiment tag", key, value)
    _field(findings, needles, "run", "name", run.info.run_name)
    for kind, items in (("run param", run.data.params), ("run tag", run.data.tags)):
        for key, value in sorted(items.items()):
            _field(findings, needles, kind, key, value)
    for key in sorted(run.data.metrics):
        _field(findings, needles, "run metric", key, "")
    for number, dataset_input in enumerate(run.inputs.dataset_inputs if run.inputs else [], 1):
        dataset = dataset_input.dataset
        where = f"run dataset input #{number}"
        for part in ("name", "digest", "source_type", "source", "schema", "profile"):
            _field(findings, needles, where, part, getattr(dataset, part, None))
        for tag in dataset_input.tags or []:
            _field(findings, needles, f"{where} tag", tag.key, tag.value)
    if mlflow_client.list_artifacts(run.info.run_id):
        with tempfile.TemporaryDirectory(prefix="medtl-scan-") as tmp:
            with _quiet_downloads():
                local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=tmp)
            _scan_tree(Path(local), "run artifact", needles, findings)
    for model in _run_models(run):
        if model.model_id not in seen:
            _scan_logged_model(model, needles, findings, seen)


def _scan_logged_model(model: LoggedModel, needles: _Needles, findings: list[str], seen: set[str]) -> None:
    seen.add(model.model_id)
    needles = needles.with_allowed([model.artifact_location])
    where = f"logged model {model.model_id}"
    _field(findings, needles, where, "name", model.name)
    for kind, items in (("param", model.params), ("tag", model.tags)):
        for key, value in sorted((items or {}).items()):
            _field(findings, needles, f"{where} {kind}", key, value)
    for metric in model.metrics or []:
        _field(findings, needles, f"{where} metric", metric.key, "")
    with tempfile.TemporaryDirectory(prefix="medtl-scan-") as tmp:
        with _quiet_downloads():
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model.model_id}", dst_path=tmp)
        _scan_tree(Path(local), f"{where} artifact", needles, findings)


def _run_models(run: Run) -> Iterator[LoggedModel]:
    """Logged models listed as the run's outputs plus any created with it as source run."""
    mlflow_client = client()
    ids = [output.model_id for output in (run.outputs.model_outputs if run.outputs else [])]
    token = None
    while True:
        page = mlflow_client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
            page_token=token,
        )
        ids.extend(model.model_id for model in page)
        token = page.token
        if not token:
            break
    for model_id in dict.fromkeys(ids):
        yield mlflow_client.get_logged_model(model_id)


def _scan_tree(root: Path, where: str, needles: _Needles, findings: list[str]) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for number, file in enumerate(files, 1):
        relative = file.relative_to(root).as_posix()
        name_hits = needles.hits(relative.encode())
        label = f"{where} #{number}" if name_hits else f"{where} {relative!r}"
        findings.extend(f"{label} (file name): {hit}" for hit in name_hits)
        findings.extend(f"{label}: {hit}" for hit in _file_hits(file, needles))
        if zipfile.is_zipfile(file):
            findings.extend(f"{label}: {hit}" for hit in _zip_hits(file, needles))


def _file_hits(file: Path, needles: _Needles) -> list[str]:
    if file.stat().st_size == 0:
        return []
    header = _safetensors_header(file)
    if header is not None:
        # A safetensors file is a JSON header (tensor names, dtypes, shapes, metadata: where text
        # could be) followed by raw numbers. Scanning megabytes of weights as text finds nothing
        # but chance byte patterns and took most of a run's scan time.
        return needles.hits(header)
    if _is_torch_export(file):
        return _export_hits(file, needles)
    # A memory map lets the patterns run over model files of any size without loading them.
    with file.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return needles.hits(data)


_EXPORT_WEIGHTS = "/data/weights/"  # torch.export (.pt2): raw tensor storage, one member per weight


def _is_torch_export(file: Path) -> bool:
    """A torch.export archive (`model.pt2`): a zip with an `archive_format` member."""
    if file.suffix != ".pt2" or not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        return any(name.endswith("/archive_format") or name == "archive_format" for name in archive.namelist())


def _export_hits(file: Path, needles: _Needles) -> list[str]:
    """Every member of a .pt2 archive except its weight storage: the graph (model.json, where stack
    traces held paths), constants, sample inputs. The weights are numbers; scanning tens of MB of
    them as text found only chance byte patterns and took most of a run's scan. Member names are
    scanned by `_zip_hits`."""
    hits: list[str] = []
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            if _EXPORT_WEIGHTS in f"/{info.filename}":
                continue
            if info.file_size > _MAX_MEMBER_BYTES:
                hits.append("archive member too large to scan")
                continue
            hits.extend(needles.hits(archive.read(info)))
    return list(dict.fromkeys(hits))


def _safetensors_header(file: Path) -> bytes | None:
    """The JSON header of a well-formed `.safetensors` file whose header covers the rest, else None."""
    if file.suffix != ".safetensors":
        return None
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return None
        length = int.from_bytes(prefix, "little")
        if length <= 0 or 8 + length > file.stat().st_size:
            return None
        header = handle.read(length)
    try:
        layout = json.loads(header)
        ends = [int(t["data_offsets"][1]) for k, t in layout.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    # Only when the tensors account for every byte after the header is the rest numbers only.
    return header if 8 + length + max(ends, default=0) == file.stat().st_size else None


def _zip_hits(file: Path, needles: _Needles) -> list[str]:
    """Hits in member names and compressed members (stored members were searched as raw bytes)."""
    hits: list[str] = []
    try:
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                hits.extend(f"archive member name: {hit}" for hit in needles.hits(info.filename.encode()))
                if info.compress_type == zipfile.ZIP_STORED:
                    continue
                if info.file_size > _MAX_MEMBER_BYTES:
                    hits.append("compressed archive member too large to scan")
                    continue
                hits.extend(f"archive member: {hit}" for hit in needles.hits(archive.read(info)))
    except (zipfile.BadZipFile, NotImplementedError, OSError):
        hits.append("archive could not be opened for scanning")
    return list(dict.fromkeys(hits))


def _field(findings: list[str], needles: _Needles, where: str, key: str | None, value: object) -> None:
    key_text = "" if key is None else str(key)
    value_text = "" if value is None else str(value)
    key_hits = needles.hits(key_text.encode())
    # Only the name's position is safe to show when the name itself holds a forbidden item.
    label = f"{where} (name withheld)" if key_hits else f"{where} {key_text!r}"
    findings.extend(f"{label} name: {hit}" for hit in key_hits)
    findings.extend(f"{label}: {hit}" for hit in needles.hits(value_text.encode()))
    if needles.user and value_text.strip().casefold() == needles.user:
        findings.append(f"{label}: OS user name")


def _needles(forbidden: Iterable[str], forbidden_paths: Iterable[Path]) -> _Needles:
    for argument, what in ((forbidden, "forbidden"), (forbidden_paths, "forbidden_paths")):
        if isinstance(argument, str | bytes | PurePath):
            raise InputError(
                f"{what} must be a list, not a single {type(argument).__name__}; wrap it in a list"
            )
    strings = []
    for number, text in enumerate(forbidden, 1):
        text = str(text)
        if not text.strip():
            continue
        needle = normalise(text)
        if needle.isdigit() and len(needle) < MIN_SCANNED_DIGITS:
            continue  # short numbers occur in every metrics file ("1024x1024"); such IDs are not evidence
        variants = {v.encode().lower() for v in (text, text.casefold())}
        # A number matches only whole (the raw rule): normalised, the score "0.12345" reads "0 12345".
        strings.append((f"forbidden string #{number}", tuple(sorted(variants)),
                        None if not needle or needle.isdigit() else needle))
    paths = []
    for number, path in enumerate(forbidden_paths, 1):
        absolute = Path(path).expanduser().absolute()
        if absolute == Path(absolute.anchor):
            raise InputError(
                f"forbidden path #{number} must be a folder or file, not the filesystem root; "
                "pass the data root or the file concerned"
            )
        paths.append((f"forbidden path #{number}", _path_pattern(absolute)))
    home = Path.home()
    if home != Path(home.anchor):
        paths.append(("home directory", _path_pattern(home)))
    return _Needles(tuple(strings), tuple(paths), _identifying_user())


def _identifying_user() -> str | None:
    """The OS user name, case-folded, when a field holding it would identify someone.

    None when it is unknown or a common word: "root", "admin" or "user" name no one, and a field
    equal to one (a data folder named "root", a class named "user") is no leak.
    """
    try:
        user = getpass.getuser().strip().casefold()
    except (ImportError, KeyError, OSError):
        return None
    return user if user and not common_word(user) else None


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No MLflow download progress bars while the guard reads a run back (it is not user work)."""
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


_MIN_SUBSTRING_NEEDLE = 6
# A hash-like token (run and model ids, SHA-256): 12+ hex characters mixing letters and digits. A
# 5-digit ID inside one is chance (a 32-character run id holds a given 5-digit run ~1 in 30,000 times).
_HEX_TOKEN = re.compile(rb"(?<![0-9a-z])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{12,}(?![0-9a-z])")
_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e\t\n\r]{3,}")
# Inline images (the report's plots) are base64 noise in which short needles match by chance.
_DATA_URI = re.compile(rb"data:[a-z/+.-]+;base64,[A-Za-z0-9+/=\s]+")


def _raw_hit(needle: bytes, text: bytes, binary: bool) -> bool:
    """Whether one raw (lower-cased) form of a forbidden string occurs in the lower-cased text."""
    if needle not in text:
        return False  # the cheap test first: almost every needle stops here
    if needle.isdigit():
        # A whole number: the ID 12345 is in "12345" and in "12345.0" (a pandas float ID column),
        # not in the score 0.123456, the decimal 12345.5 or the hash "3fa12345b9c0d1e2".
        pattern = rb"(?<![0-9.])" + needle + rb"(?:\.0+)?(?![0-9]|\.[0-9])"
        hex_spans = None
        for match in re.finditer(pattern, text):
            if hex_spans is None:
                hex_spans = [m.span() for m in _HEX_TOKEN.finditer(text)]
            if not any(start <= match.start() < end for start, end in hex_spans):
                return True
        return False
    if len(needle) >= _MIN_SUBSTRING_NEEDLE:
        return True
    if binary:
        return False  # in the printable runs of binary data, short needles match by chance
    # Short values (name parts such as "WEI") only count as whole tokens: as substrings they match
    # ordinary words ("weights").
    return re.search(_token_pattern(needle), text) is not None


def _token_pattern(needle: bytes) -> bytes:
    return rb"(?<![a-z0-9])" + re.escape(needle) + rb"(?![a-z0-9])"


def _text_of(raw: bytes) -> tuple[bytes, bool]:
    """The text a reader could see: the whole file if it is text, else its printable runs.

    Binary files (weights, pt2 archives) are reduced to their ASCII runs of 3+ characters, like
    `strings(1)`: identifiers in them are stored as text, and the reduction keeps the substring
    search over a 20 MB model file cheap.
    """
    if b"\x00" not in raw[:8192]:
        return (_DATA_URI.sub(b"data:base64-removed", raw) if b";base64," in raw else raw), False
    return b"\n".join(_PRINTABLE_RUN.findall(raw)), True


def _path_pattern(path: Path) -> re.Pattern[bytes]:
    forms = {str(path), path.as_posix(), urllib.parse.quote(path.as_posix())}
    try:
        resolved = path.resolve()
        forms |= {str(resolved), resolved.as_posix()}
    except OSError:
        pass
    # A longer name that merely starts with the path ("/home/ann" vs "/home/anna") is not a hit.
    alternatives = b"|".join(re.escape(form.encode()) for form in sorted(forms, key=len, reverse=True))
    return re.compile(b"(?:" + alternatives + rb")(?![\w-])", re.IGNORECASE)


def _location_forms(location: str | None) -> set[str]:
    if not location:
        return set()
    forms = {location}
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        forms.add(urllib.parse.unquote(parsed.path))
    return forms


def _get_run(run_id: str) -> Run:
    try:
        return client().get_run(run_id)
    except MlflowException as err:
        raise InputError(
            f"run {run_id!r} must exist in the tracking store, not be unknown; check the run id and "
            f"MLFLOW_TRACKING_URI ({err.error_code})"
        ) from err
