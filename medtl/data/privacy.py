"""The project key, keyed pseudonyms, coarsened subgroups and the local map of path aliases.

Everything medtl writes about a patient goes through this module: identifiers become keyed
HMAC-SHA-256 pseudonyms (DICOM PS3.15 warns that plain hashes of identifiers fall to dictionary
attacks), ages become bands top-coded at 90 (HIPAA Safe Harbor), institutions and scanners
become keyed codes, and relative paths that carry a name, an ID or a date become aliases whose
originals live only in a local file beside the key. `scan_for_phi` is the last line of defence:
the manifest builder runs it over every output before it lets the build succeed.

Example:
    >>> key = load_key()                             # doctest: +SKIP
    >>> key.pseudonym("patient", "12345678")        # doctest: +SKIP
    'P-3f0c2a...'
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from medtl.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
_MIN_KEY_BITS = 128
_TEXT_KEY = re.compile(rb"[\x20-\x7e\t\r\n]*")
_PADDED_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/_-]{4})*[A-Za-z0-9+/_-]{2,3}={1,2}")
KEY_ENV = "MEDTL_KEY_FILE"
CONFIG_ENV = "MEDTL_CONFIG_DIR"
ALIAS_PREFIX = "alias:"
UNKNOWN = "unknown"

# One HMAC domain per kind of value, so equal strings of different kinds never share a pseudonym.
_PREFIXES = {
    "patient": "P-",
    "study": "ST-",
    "series": "SE-",
    "row": "R-",
    "path": "",
    "site": "SITE-",
    "scanner": "SCN-",
}
_HEX_LENGTH = {"site": 6, "scanner": 6}
_DEFAULT_HEX = 16

AGE_BANDS = ("0-17", "18-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80-89", "90+")


@dataclass(frozen=True)
class ProjectKey:
    """The secret that makes pseudonyms reproducible for one project and useless to anyone else.

    Attributes:
        path: Where the key file lives (alias maps are kept beside it, in `aliases/`).
        key_id: A short HMAC-derived id that names the key in outputs; it never reveals the key.
        created: True when this call created the key file (the CLI tells the user to back it up).
    """

    path: Path
    key_id: str
    created: bool
    secret: bytes = field(repr=False)

    def pseudonym(self, kind: str, value: str) -> str:
        """Keyed pseudonym of `value` in the domain `kind` (patient, study, series, row, path, ...).

        Args:
            kind: One of patient, study, series, row, path, site, scanner.
            value: The identifying value (stripped before hashing).

        Returns:
            The prefix of the kind plus hex digits, e.g. "P-<16 hex>" or "SITE-<6 hex>".

        Raises:
            ValueError: If `kind` is not a known pseudonym domain.
        """
        if kind not in _PREFIXES:
            raise ValueError(f"pseudonym kind must be one of {sorted(_PREFIXES)}, not {kind!r}")
        # surrogateescape: file names that are not UTF-8 (Latin-1 exports) hash by their raw bytes.
        mac = hmac.new(self.secret, f"medtl/{kind}\x00{value.strip()}".encode("utf-8", "surrogateescape"),
                       hashlib.sha256)
        return _PREFIXES[kind] + mac.hexdigest()[: _HEX_LENGTH.get(kind, _DEFAULT_HEX)]

    @property
    def alias_file(self) -> Path:
        """Local-only JSON map from path aliases to relative paths, beside the key."""
        return self.path.parent / "aliases" / f"{self.key_id}.json"


def config_dir() -> Path:
    """medtl's configuration folder: `$MEDTL_CONFIG_DIR`, else `~/.config/medtl`."""
    env = os.environ.get(CONFIG_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".config" / "medtl"


def default_key_path() -> Path:
    """Where a new project key is created when none is given: `<config dir>/keys/medtl.key`."""
    return config_dir() / "keys" / "medtl.key"


def load_key(key_file: str | os.PathLike[str] | None = None) -> ProjectKey:
    """Load the project key, creating one only at the default location.

    The key comes from `key_file`, else `$MEDTL_KEY_FILE`, else `<config dir>/keys/medtl.key`,
    which is created (32 random bytes as hex, mode 0600) when missing. An explicitly named key
    that does not exist is refused rather than created: a typo must not silently start a new
    pseudonym space.

    Args:
        key_file: Path of an existing key file, or None.

    Returns:
        The key; `created` says whether this call wrote it.

    Raises:
        ConfigError: If a named key file is missing or does not hold at least 32 bytes.
    """
    explicit = key_file if key_file is not None else (os.environ.get(KEY_ENV, "").strip() or None)
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            source = "key_file" if key_file is not None else f"${KEY_ENV}"
            raise ConfigError(
                f"{source} must name an existing key file, not the missing {path}; pass the key this "
                f"project was built with, or omit it to use {default_key_path()}"
            )
        return _key_from_file(path, created=False)
    path = default_key_path()
    created = False
    if not path.is_file():
        created = _create_key_file(path)
    return _key_from_file(path, created=created)


def key_created_message(key: ProjectKey) -> str | None:
    """The sentence the CLI prints when `load_key` created a key; None when it already existed."""
    if not key.created:
        return None
    return (
        f"Created a new project key at {key.path} (key id {key.key_id}, mode 0600). Back it up with "
        f"its aliases/ folder: without it, pseudonyms cannot be reproduced and aliases not resolved."
    )


def _create_key_file(path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # O_EXCL: two processes racing to create the key must not both write one.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(KEY_BYTES) + "\n")
    os.chmod(path, 0o600)
    return True


def _key_from_file(path: Path, *, created: bool) -> ProjectKey:
    _check_key_mode(path)
    secret = _key_secret(path.read_bytes())
    problem = _weak_key(secret)
    if problem:
        raise ConfigError(
            f"key file {path} must hold at least {KEY_BYTES} random bytes, not {problem}; create a key with "
            f"`head -c 32 /dev/urandom | base64 > FILE` (or remove the setting to create one) and chmod 600 it"
        )
    key_id = hmac.new(secret, b"medtl/key-id", hashlib.sha256).hexdigest()[:16]
    return ProjectKey(path=path, key_id=key_id, created=created, secret=secret)


def _key_secret(raw: bytes) -> bytes:
    """The key material of a key file's bytes.

    A text key (hex, base64, a passphrase: printable ASCII) is stripped of surrounding whitespace,
    so an editor's trailing newline never changes the key id (and with it every pseudonym). A hex
    key of 64+ digits is decoded, as medtl has always created them; other text keys are used as
    they are. A binary key (raw random bytes) is used byte for byte: stripping could drop a random
    byte that happens to be a space.
    """
    if not _TEXT_KEY.fullmatch(raw):
        return raw
    text = raw.strip()
    if re.fullmatch(rb"[0-9a-fA-F]{64,}", text) and len(text) % 2 == 0:
        return bytes.fromhex(text.decode())
    return text


def legacy_key_id(path: Path) -> str:
    """The key id medtl 0.1 gave this key file: it used text keys with their trailing newline.

    Only for telling a user why a manifest built then no longer matches (`medtl manifest verify`).
    """
    raw = Path(path).read_bytes()
    text = raw.strip()
    secret = bytes.fromhex(text.decode()) if re.fullmatch(rb"[0-9a-fA-F]{64,}", text) and len(text) % 2 == 0 else raw
    return hmac.new(secret, b"medtl/key-id", hashlib.sha256).hexdigest()[:16]


def _weak_key(secret: bytes) -> str:
    """Why a key is too weak to keep pseudonyms secret ("" when it is fine).

    The random bytes are counted after base64 decoding when the key is padded base64 text (so a
    base64 text of 31 bytes is refused), else as the key holds them; their randomness is the
    empirical entropy of those bytes times their number.
    """
    material, how = secret, "after stripping whitespace"
    if _PADDED_BASE64.fullmatch(secret):
        with contextlib.suppress(ValueError, binascii.Error):
            material, how = base64.b64decode(secret, altchars=b"-_" if b"-" in secret or b"_" in secret else None,
                                             validate=True), "after base64 decoding"
    if len(material) < KEY_BYTES:
        return f"{len(material)} bytes ({how})"
    # 32 random bytes give ~155 bits; 32 x "a" or "abab..." give 0 or 32. 128 bits is the strength
    # HMAC-SHA-256 keys are meant to carry.
    counts = Counter(material)
    entropy = -sum(n / len(material) * math.log2(n / len(material)) for n in counts.values()) * len(material)
    if entropy < _MIN_KEY_BITS:
        return (f"a low-entropy value (about {max(0.0, entropy):.0f} bits, fewer than {_MIN_KEY_BITS}: a repeated "
                f"or placeholder text)")
    return ""


def _check_key_mode(path: Path) -> None:
    """Refuse a key other users may write; warn when they may read it (POSIX only)."""
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o022:
        raise ConfigError(
            f"key file {path} must be writable by its owner only, not mode {mode:04o} (another user could "
            f"replace it and with it every pseudonym); run `chmod 600 {path}`"
        )
    if mode & 0o044:
        logger.warning("key file %s is readable by other users (mode %04o): anyone who can read it can test "
                       "guessed identifiers against the pseudonyms; run `chmod 600` on it", path, mode)


# ---------------------------------------------------------------------------------------------
# Coarsened subgroups


def normalise_sex(value: str | None) -> str:
    """Map a sex value from DICOM or a labels CSV to M, F, O or U (unknown).

    Example:
        >>> normalise_sex("female"), normalise_sex(""), normalise_sex("o")
        ('F', 'U', 'O')
    """
    text = (value or "").strip().casefold()
    if text in {"m", "male", "man", "1"}:
        return "M"
    if text in {"f", "female", "woman", "2"}:
        return "F"
    if text in {"o", "other", "x", "diverse", "non-binary", "nonbinary"}:
        return "O"
    return "U"


def age_band_of(years: float | None) -> str:
    """Band an age in years: 0-17, 18-29, 30-39, ..., 80-89, 90+ (top-coded); None -> "unknown"."""
    if years is None or years != years or years < 0 or years > 150:
        return UNKNOWN
    if years < 18:
        return AGE_BANDS[0]
    if years >= 90:
        return AGE_BANDS[-1]
    if years < 30:
        return AGE_BANDS[1]
    return AGE_BANDS[int(years // 10) - 1]


def years_from_dicom_age(value: str | None) -> float | None:
    """Age in years from a DICOM AS value such as "045Y", "006M", "002W" or "010D"."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([YMWDymwd])?\s*", value or "")
    if not match:
        return None
    number = int(match.group(1))
    per_year = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.2425}[(match.group(2) or "Y").upper()]
    return number / per_year


def years_between(birth_date: str | None, study_date: str | None) -> float | None:
    """Completed years from a DICOM birth date to a study date (both YYYYMMDD), or None."""
    birth, study = parse_dicom_date(birth_date), parse_dicom_date(study_date)
    if birth is None or study is None or study < birth:
        return None
    years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    return float(years)


def age_band(
    *,
    age: str | float | None = None,
    patient_age: str | None = None,
    birth_date: str | None = None,
    study_date: str | None = None,
) -> str:
    """Age band from the first available source: a numeric age, PatientAge, or the two dates.

    Args:
        age: Age in years (the labels CSV `age` column); empty strings count as absent.
        patient_age: DICOM PatientAge ("045Y", "006M", ...).
        birth_date: DICOM PatientBirthDate (YYYYMMDD).
        study_date: DICOM StudyDate (YYYYMMDD).

    Returns:
        One of `AGE_BANDS` or "unknown".

    Example:
        >>> age_band(patient_age="093Y"), age_band(birth_date="19800615", study_date="20200614")
        ('90+', '30-39')
    """
    if age is not None and str(age).strip() != "":
        return age_band_of(float(age))
    years = years_from_dicom_age(patient_age)
    if years is None:
        years = years_between(birth_date, study_date)
    return age_band_of(years)


def site_code(key: ProjectKey, institution: str | None) -> str:
    """Keyed short code of an institution name ("SITE-3fa2c1"); "unknown" when empty.

    Names are compared case- and whitespace-insensitively, so "St Mary's" and "ST MARY'S " agree.
    A value that already is a site code is kept.
    """
    text = " ".join((institution or "").split()).casefold()
    if not text:
        return UNKNOWN
    if re.fullmatch(r"site-[0-9a-f]{6}", text):
        return text.upper()[:5] + text[5:]
    return key.pseudonym("site", text)


def scanner_code(key: ProjectKey, manufacturer: str | None, model: str | None = None) -> str:
    """Keyed short code of a scanner from manufacturer and model ("SCN-1b2c3d"); "unknown" if both empty."""
    parts = [" ".join((v or "").split()).casefold() for v in (manufacturer, model)]
    if not any(parts):
        return UNKNOWN
    if not parts[1] and re.fullmatch(r"scn-[0-9a-f]{6}", parts[0]):
        return "SCN-" + parts[0][4:]
    return key.pseudonym("scanner", "|".join(parts))


def parse_dicom_date(value: str | None) -> dt.date | None:
    """A DICOM DA value (YYYYMMDD, extra characters ignored) as a date; None when absent or invalid."""
    text = (value or "").strip()[:8]
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def path_alias(key: ProjectKey, relative: str | PurePosixPath) -> str:
    """The alias of a relative path, "alias:<16 hex>", whether or not it needs one."""
    return ALIAS_PREFIX + key.pseudonym("path", PurePosixPath(relative).as_posix())


def load_aliases(key: ProjectKey) -> dict[str, str]:
    """The local alias map of this key (alias -> relative path); empty when none was saved."""
    try:
        data = json.loads(key.alias_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"alias map {key.alias_file} must be readable JSON, not {type(err).__name__}; "
            f"restore it from backup or rebuild the manifest"
        ) from err
    return {str(k): str(v) for k, v in data.get("aliases", {}).items()}


def save_aliases(key: ProjectKey, aliases: Mapping[str, str]) -> Path:
    """Merge `aliases` into the key's local alias map (mode 0600) and return its path."""
    merged = load_aliases(key)
    merged.update(aliases)
    target = key.alias_file
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"key_id": key.key_id, "aliases": dict(sorted(merged.items()))}, handle, indent=1)
    os.replace(tmp, target)
    return target


def resolve_alias(key: ProjectKey, path: str, candidates: Iterable[str] = ()) -> str:
    """Turn a manifest path back into a relative path.

    Args:
        key: The key the manifest was built with.
        path: A relative path or "alias:<hex>".
        candidates: Relative paths to try when the alias is not in the local map (the alias is
            a keyed hash, so any path under the data root can be checked against it).

    Returns:
        The relative path.

    Raises:
        InputError: If the alias is neither in the map nor any candidate's alias.
    """
    if not path.startswith(ALIAS_PREFIX):
        return path
    found = load_aliases(key).get(path)
    if found is not None:
        return found
    for candidate in candidates:
        if path_alias(key, candidate) == path:
            return PurePosixPath(candidate).as_posix()
    raise InputError(
        f"path {path} must resolve through the alias map {key.alias_file} or a file under the data "
        f"root, not neither; use the key the manifest was built with and the same data root"
    )
