"""Identifying needles, which paths are aliased, and the PHI scan of outputs.

Needles are the identifying values of a data set (DICOM header values, labels-CSV patient IDs,
non-generic path components) in every form they are likely to be written in: person names by
component and in given-family order, DICOM dates as YYYY-MM-DD, the digit runs of IDs. What is
generic (placeholders, medtl's own words, single common words, the class names) is never a
needle: `medtl.vocabulary` decides, the same list for path aliasing and for both PHI guards.
`scan_for_phi` is the last line of defence: the manifest builder runs it over every output
before it lets a build succeed.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from medtl.data.privacy import ProjectKey, parse_dicom_date, path_alias
from medtl.vocabulary import (
    CARETED,
    MIN_ID_DIGITS,
    MIN_SCANNED_DIGITS,
    generic_component,
    generic_value,
    long_enough,
    normalise,
)

_PREFIX = 2  # needles are indexed by their first characters: 2, the shortest needle (a CJK name part)
_SCAN_KEY = 8  # the output scan's index: up to 8 first characters (see `Needles.scan_index`)
# Decimal numbers ("1.25" in a private tag) identify nobody but collide with spacings.
_DECIMAL = re.compile(r"[+-]?\d*\.\d+")
_LONG_DIGITS = re.compile(r"\d{6,}")
_NAME_SPLIT = re.compile(r"[\s,^=]+")


@dataclass(frozen=True)
class Needles:
    """Normalised identifying strings (`normalise`), each with a label naming its source (never the value).

    Indexed so that checking a path part costs one lookup per character however many values a
    data set holds (a scan per value would not scale).
    """

    labels: Mapping[str, str] = field(repr=False)  # the keys are identifying values: never shown
    by_prefix: Mapping[str, tuple[str, ...]] = field(repr=False)

    @functools.cached_property
    def scan_index(self) -> tuple[dict[str, str], dict[str, list[str]], tuple[int, ...]]:
        """The needles `scan_for_phi` searches, indexed by their first `_SCAN_KEY` characters (all of a
        shorter needle), with the key lengths in use.

        A scan then tries needles only where a word starts, one dict lookup per key length: a
        2-character index put thousands of dates behind "20" and "19", and the scan grew with
        the square of the data set. Digits-only needles under 5 digits are left out: they
        collide with shapes and counts ("1024x1024").
        """
        patterns = {n: label for n, label in self.labels.items() if not (n.isdigit() and len(n) < MIN_SCANNED_DIGITS)}
        by_key: dict[str, list[str]] = {}
        for needle in patterns:
            by_key.setdefault(needle[:_SCAN_KEY], []).append(needle)
        return patterns, by_key, tuple(sorted({len(key) for key in by_key}))

    def found_in(self, text: str) -> bool:
        """True if any needle occurs in `text`, normalised (a substring, not only whole words)."""
        folded = normalise(text)
        for at in range(len(folded) - _PREFIX + 1):
            for needle in self.by_prefix.get(folded[at : at + _PREFIX], ()):
                if folded.startswith(needle, at):
                    return True
        return False


def identifying_needles(
    values: Iterable[str] | Iterable[tuple] | Mapping[str, str], allowed: Iterable[str] = ()
) -> Needles:
    """The strings whose presence in an output or a path component identifies someone.

    Each value counts whole; person names (DICOM PN values, name-like patient IDs, and any
    "^"-joined token inside other text, e.g. "DOE^JANE" in a description) also by component
    and as "given family"/"family given"; IDs that mix letters and digits also by their run of
    6+ digits ("MRN0012345" -> "0012345"); DICOM dates also year-first, day-first and
    month-first with any separator. Left out: values and parts that are generic
    (`medtl.vocabulary.generic_value`: placeholders, medtl's own words, single common words,
    descriptions made of common words, and the `allowed` class names), parts under 3
    characters (2 in CJK scripts), digits-only values under 4 digits, decimals.

    Args:
        values: Identifying values; or (value, source) or (value, source, kind) tuples, or a
            value -> source mapping, where source says where the value came from ("the DICOM
            PatientName of file alias:3fa2..."), never the value itself, and kind is how
            `medtl.vocabulary.generic_value` reads it ("person", "name" or "text", the default).
        allowed: Whole values the outputs hold by design (the class names).

    Returns:
        The needles (normalised) with their labels ("<source> (<form>)").
    """
    items = values.items() if isinstance(values, Mapping) else values
    allowed = tuple(allowed)
    labels: dict[str, str] = {}
    for item in items:
        value, source, kind = (item, "", "text") if isinstance(item, str) else (*item, "text")[:3]
        for needle, form in needles_of(value, allowed=allowed, kind=kind):
            labels.setdefault(needle, f"{source} ({form})" if source else form)
    by_prefix: dict[str, list[str]] = {}
    for needle in labels:
        by_prefix.setdefault(needle[:_PREFIX], []).append(needle)
    return Needles(labels, {k: tuple(v) for k, v in by_prefix.items()})


def needles_of(value: str, *, allowed: Iterable[str] = (), kind: str = "text") -> list[tuple[str, str]]:
    """The (normalised needle, form) pairs of one identifying value; see `identifying_needles`."""
    text = " ".join(str(value).split()).casefold()
    allowed = tuple(allowed)
    person = kind == "person"
    if not text or _DECIMAL.fullmatch(text) or generic_value(text, allowed, kind=kind):
        return []
    out: list[tuple[str, str]] = []
    whole = normalise(text)
    if len(whole) >= MIN_ID_DIGITS if whole.isdigit() else long_enough(whole):
        out.append((whole, "person name" if person else _kind_of(text)))
    names = [_NAME_SPLIT.split(text)] if person else [re.split(r"[\^=]", t) for t in CARETED.findall(text)]
    for parts in names:
        out.extend(_name_needles([normalise(p) for p in parts if normalise(p)], allowed))
    if re.search(r"[^\W\d_]", text) and "." not in text:
        # Not for UIDs: their digit runs (org roots) are shared by unrelated files.
        out.extend((run, "digits of an identifier") for run in _LONG_DIGITS.findall(text))
    out.extend(_date_needles(text))
    return list(dict.fromkeys((n, f) for n, f in out if n))


def _date_needles(text: str) -> list[tuple[str, str]]:
    """A DICOM date (YYYYMMDD, DT values too) in the orders people write it: Y-M-D, D-M-Y, M-D-Y."""
    date = parse_dicom_date(text) if re.fullmatch(r"\d{8}(\d{6}(\.\d+)?)?([+-]\d{4})?", text) else None
    if date is None:
        return []
    forms = ("%Y %m %d", "%d %m %Y", "%m %d %Y", "%Y%m%d", "%d%m%Y", "%m%d%Y")
    return [(date.strftime(form), "date") for form in forms]


def _name_needles(parts: list[str], allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """A person name's needles: itself, its components, and given-family orders."""
    if generic_value(" ".join(parts), allowed, kind="person"):
        return []  # "ANONYMOUS^PATIENT", "NAME^PATIENT^NAME": placeholders, not a person
    out = [(" ".join(parts), "person name")]
    out.extend((p, "person-name component") for p in parts
               if long_enough(p) and not generic_value(p, allowed, kind="person"))
    if len(parts) >= 2:
        family, given = parts[0], parts[1]
        out.extend(((f"{given} {family}", "person name"), (f"{family} {given}", "person name")))
    return [(n, f) for n, f in out if long_enough(n)]


def _kind_of(text: str) -> str:
    if parse_dicom_date(text) is not None and re.fullmatch(r"\d{8}.*", text):
        return "date"
    if re.fullmatch(r"[\d.]+", text) and text.count(".") >= 2:
        return "UID"
    if text.isdigit():
        return "digits-only identifier"
    if "^" in text:
        return "person name"
    return "identifying text value"


def looks_identifying(component: str, allowed_words: Iterable[str] = ()) -> bool:
    """True for a path component medtl cannot vouch for: not every token of it is generic.

    See `medtl.vocabulary.generic_component`: split/class names, imaging and file words, short
    numbers and hex/UUID tokens are generic; names, long numbers, dates and e-mail addresses
    are not.

    Example:
        >>> looks_identifying("SMITH_JOHN"), looks_identifying("image_01.png")
        (True, False)
    """
    return not generic_component(component, allowed_words)


@dataclass
class PathNamer:
    """Names files in outputs: the relative path, or its alias when a part may identify someone.

    A path is written in clear only when every component is generic (`looks_identifying`) and
    neither a component nor the whole path (normalised) holds a needle: the same needles, matched
    as substrings, that the PHI scan looks for as words, so a path written in clear can never
    trip the scan. `aliases` collects alias -> relative path for the local alias map.

    Example:
        >>> namer = PathNamer(key, identifying_needles(["DOE^JANE"]))  # doctest: +SKIP
        >>> namer("train/img_001.png"), namer("DOE_JANE/x.dcm")  # doctest: +SKIP
        ('train/img_001.png', 'alias:3f0c...')
    """

    key: ProjectKey = field(repr=False)
    needles: Needles = field(repr=False)
    allowed_words: tuple[str, ...] = field(default=(), repr=False)  # more generic words: class-name words
    aliases: dict[str, str] = field(default_factory=dict, repr=False)
    flagged: set[str] = field(default_factory=set, repr=False)  # parts that are not generic
    _parts: dict[str, bool] = field(default_factory=dict, repr=False)

    def __call__(self, rel: str | PurePosixPath) -> str:
        rel = PurePosixPath(rel).as_posix()
        hit = self.needles.found_in(rel)
        for part in PurePosixPath(rel).parts:
            if part not in self._parts:
                shaped = looks_identifying(part, self.allowed_words)
                self._parts[part] = shaped or self.needles.found_in(part)
                if shaped:
                    self.flagged.add(part)
            hit = hit or self._parts[part]
        if not hit:
            return rel
        alias = path_alias(self.key, rel)
        self.aliases[alias] = rel
        return alias


# --- the PHI scan of outputs ------------------------------------------------------------------

# Hashes, pseudonyms and site/scanner codes ("SITE-1ada2f" has 6 hex digits): a short value found
# inside one is chance, not a leak.
_HEX_TOKEN = re.compile(r"(?<![0-9a-z])(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{6,}(?![0-9a-z])")
_SURE_LENGTH = 12  # a 12+ character value inside a hash by chance: ~1e-15 per position
# Where a bounded match can start: a letter after a non-letter, a digit after a non-digit.
_WORD_START = re.compile(r"(?<![^\W\d_])[^\W\d_]|(?<!\d)\d")


def scan_for_phi(
    texts_or_files: Mapping[str, str] | Iterable[str | os.PathLike[str]],
    forbidden: Needles | Mapping[str, str] | Iterable[str],
    allowed: Iterable[str] = (),
) -> list[str]:
    """Find identifying values in outputs; findings name the output and the source, never the value.

    Matching is on `normalise`d text (case-folded, every run of separators one space) and on
    whole words: a value must not continue into letters (for a value ending in a letter) or
    digits (ending in a digit), so "Ned" does not hit "quarantined", while "DOE^JANE" hits
    "Doe, Jane".
    Needles are built by `identifying_needles` (person names also by component, DICOM dates also
    as YYYY-MM-DD, ...; generic values such as placeholders, medtl's own words and the `allowed`
    class names are never needles). Digits-only needles under 5 digits are not searched: they
    collide with shapes and counts ("1024x1024"). Matches of short values inside long hex
    tokens (hashes, pseudonyms) are chance and ignored.

    Args:
        texts_or_files: A mapping output name -> text, or an iterable of files (`Path`) and
            texts (`str`, named "text 1", "text 2", ...).
        forbidden: `Needles`, or identifying values (a mapping value -> source, e.g. "DICOM
            PatientName of file alias:..."), from which needles are built.
        allowed: Whole values the outputs hold by design (class names), when `forbidden` are values.

    Returns:
        One line per (output, needle label) found, e.g. "manifest.csv: contains the PatientName
        of file a/b.dcm (person name)".
    """
    needles = forbidden if isinstance(forbidden, Needles) else identifying_needles(forbidden, allowed)
    patterns, by_key, key_lengths = needles.scan_index
    findings: list[str] = []
    for name, text in _iter_outputs(texts_or_files):
        folded = normalise(text)
        hex_spans = [m.span() for m in _HEX_TOKEN.finditer(folded)]
        hex_starts = [a for a, _ in hex_spans]
        hits: set[str] = set()
        for match in _WORD_START.finditer(folded):
            at = match.start()
            for length in key_lengths:
                for needle in by_key.get(folded[at : at + length], ()):
                    if folded.startswith(needle, at) and _counts(folded, at, needle, hex_spans, hex_starts):
                        hits.add(patterns[needle])
        findings.extend(f"{name}: contains {_article(label)}" for label in sorted(hits))
    return findings


def _article(label: str) -> str:
    return label if label.startswith(("the ", "a ", "an ")) else f"a {label}"


def _iter_outputs(texts_or_files) -> Iterable[tuple[str, str]]:
    if isinstance(texts_or_files, Mapping):
        yield from ((str(k), str(v)) for k, v in texts_or_files.items())
        return
    count = 0
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            path = Path(item)
            yield path.name, path.read_text(encoding="utf-8", errors="replace")
        else:
            count += 1
            yield f"text {count}", str(item)


def _counts(text: str, start: int, needle: str, hex_spans: list[tuple[int, int]], hex_starts: list[int]) -> bool:
    end = start + len(needle)
    if not _bounded(text, start, end):
        return False
    if len(needle) >= _SURE_LENGTH:
        return True
    i = bisect.bisect_right(hex_starts, start) - 1
    return not (i >= 0 and end <= hex_spans[i][1])


def _bounded(text: str, start: int, end: int) -> bool:
    def same_class(a: str, b: str) -> bool:
        return (a.isalpha() and b.isalpha()) or (a.isdigit() and b.isdigit())

    before = start == 0 or not same_class(text[start - 1], text[start])
    after = end == len(text) or not same_class(text[end - 1], text[end])
    return before and after
