"""Check a manifest against its data root, and find the files behind its rows.

`verify_manifest` re-walks the data root and re-hashes files and decoded pixels against the
manifest and the inventory in its sidecar; `resolve_path` and `resolve_study` turn a row's
relative path or alias back into a file and a study on the machine that holds the key.

Example:
    >>> verify_manifest(Path("out/manifest.csv"), Path("data")).ok  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from medtl.data import dicom_masks
from medtl.data import discover as discovery
from medtl.data.inventory import _Disk, _inside, _row_id, _scan_disk, _series_identity, file_sha256
from medtl.data.manifest import _namer, pixel_sha256
from medtl.data.manifest_masks import label_map_sha256
from medtl.data.privacy import ALIAS_PREFIX, legacy_key_id, load_key, resolve_alias
from medtl.data.types import Study
from medtl.errors import ConfigError, InputError


@dataclass(frozen=True)
class VerifyResult:
    """What `verify_manifest` found; files are named by alias or safe relative path, rows by id."""

    ok: bool
    files_checked: int
    rows_checked: int
    manifest_modified: bool
    changed: tuple[str, ...]
    missing: tuple[str, ...]
    new: tuple[str, ...]
    rows_changed: tuple[str, ...]
    rows_missing: tuple[str, ...]

    @property
    def problems(self) -> list[str]:
        """One line per difference, for the CLI."""
        out = ["the manifest CSV differs from the SHA-256 in its sidecar"] if self.manifest_modified else []
        out += [f"changed file: {f}" for f in self.changed] + [f"missing file: {f}" for f in self.missing]
        out += [f"new file: {f}" for f in self.new]
        out += [f"row {r}: pixel sha256 changed (of its image or its mask, or the mask is gone)" for r in self.rows_changed]
        return out + [f"row {r}: study not found" for r in self.rows_missing]


def verify_manifest(manifest_csv: Path, root: Path, *, key_file: Path | None = None,
                    progress: bool = True) -> VerifyResult:
    """Re-walk the data root and re-hash files and pixels against the manifest and its sidecar.

    Args:
        manifest_csv: A manifest written by `build_manifest` (its sidecar must lie beside it).
        root: The data root it was built from.
        key_file: The key it was built with (default as in `load_key`).
        progress: Show a progress bar over rows.

    Returns:
        A `VerifyResult`; `ok` is False when anything differs.

    Raises:
        InputError: If the manifest or its sidecar is missing or unreadable.
        ConfigError: If the key is not the one the manifest was built with.
    """
    manifest_csv, root = Path(manifest_csv).resolve(), Path(root).resolve()
    sidecar_json = manifest_csv.with_suffix(".json")
    try:
        sidecar = json.loads(sidecar_json.read_text(encoding="utf-8"))
        table = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise InputError(f"manifest {manifest_csv.name} and its sidecar {sidecar_json.name} must be readable, not "
                         f"{type(err).__name__}; rebuild the manifest") from err
    key = load_key(key_file)
    if sidecar.get("key_id") != key.key_id and sidecar.get("key_id") == legacy_key_id(key.path):
        raise ConfigError(
            f"key must give the manifest's key id {sidecar.get('key_id')}, not {key.key_id}: it is the right key file, "
            f"but medtl 0.1 read its trailing whitespace as part of the key and medtl now strips it; rebuild the "
            f"manifest with this key (pseudonyms change once) and keep the new one"
        )
    if sidecar.get("key_id") != key.key_id:
        raise ConfigError(f"key must be the one the manifest was built with (key id {sidecar.get('key_id')}), not "
                          f"key id {key.key_id}; pass its key file")
    modified = file_sha256(manifest_csv) != sidecar.get("manifest_sha256")
    outputs = {_inside(root, p) for p in (manifest_csv, sidecar_json)} - {None}
    disk = _scan_disk(root, outputs, progress=False)
    namer = _namer(key, disk, [], tuple(str(c) for c in sidecar.get("classes", [])))
    before = {e["token"]: e for e in sidecar.get("inventory", [])}
    now = {key.pseudonym("path", rel): rel for rel in disk.files}
    changed = [before[t]["file"] for t, rel in now.items()
               if t in before and _entry_sha256(root, rel) != before[t]["sha256"]]
    missing = [e["file"] for t, e in before.items() if t not in now]
    new = [namer(rel) for t, rel in now.items() if t not in before]
    by_id = {_row_id(key, s, disk): i for i, s in enumerate(disk.studies)}
    rows_changed, rows_missing = [], []
    for row in tqdm(table.to_dict("records"), desc="verifying rows", unit="row", disable=not progress):
        index = by_id.get(row["id"])
        if index is None:
            rows_missing.append(f"{row['id']} ({row['path']})")
            continue
        try:
            same = pixel_sha256(discovery.load_study(disk.studies[index]).array) == row["sha256"]
            if same and row.get("mask"):
                same = _mask_sha256(disk, resolve_alias(key, row["mask"], disk.files), row, index,
                                    sidecar.get("segment_map") or {}) == row["mask_sha256"]
        except Exception:  # noqa: BLE001 - an undecodable file is a change, not a crash
            same = False
        if not same:
            rows_changed.append(f"{row['id']} ({row['path']})")
    ok = not (modified or changed or missing or new or rows_changed or rows_missing)
    return VerifyResult(ok, len(disk.files), len(table), modified, tuple(sorted(changed)), tuple(sorted(missing)),
                        tuple(sorted(new)), tuple(rows_changed), tuple(rows_missing))


def _entry_sha256(root: Path, rel: str) -> str:
    """A file's SHA-256, "" for entries that are listed but never read (FIFOs, broken links)."""
    return file_sha256(root / rel) if discovery.regular_file(root / rel, root) else ""


def _mask_sha256(disk: _Disk, rel: str, row: dict, index: int, segment_map: dict) -> str:
    """The pixel hash of a row's mask as the build made it ("" when it is gone): a DICOM SEG/RTSTRUCT
    rasterised onto the row's series with the sidecar's segment map, else the mask image's pixels."""
    if str(row.get("mask_sop_class") or "").strip():
        labels, _ = dicom_masks.label_map(disk.root / rel, disk.studies[index].files, segment_map)
        return label_map_sha256(labels)
    mask = _study_at(disk, rel)
    return pixel_sha256(discovery.load_study(mask).array) if mask is not None else ""


def _study_at(disk: _Disk, rel: str) -> Study | None:
    found = disk.targets(rel)
    return disk.studies[found[0]] if found and len(found) == 1 else None


def resolve_path(ref: str, root: Path, *, key_file: Path | None = None) -> Path:
    """Absolute path of a manifest `path`/`mask` value (a relative path or "alias:<hex>").

    Raises:
        InputError: If the alias cannot be resolved or the path does not exist under `root`.
    """
    root, ref = Path(root).resolve(), str(ref)
    rel = resolve_alias(load_key(key_file), ref, _walk_all(root)) if ref.startswith(ALIAS_PREFIX) else ref
    target = root / rel
    if not target.exists():
        # Name the manifest value, never the resolved path: that is what the alias hides.
        raise InputError(f"manifest path {ref} must exist under the data root, not missing; run medtl verify")
    return target


def resolve_study(row: Mapping, root: Path, *, key_file: Path | None = None) -> Study:
    """The `Study` of a manifest row: resolve its path, rediscover there, pick the row's series.

    Args:
        row: A manifest row (needs `id`, `series` and `path`).
        root: The data root the manifest was built from.
        key_file: The key it was built with.

    Returns:
        The study, ready for `load_study`.

    Raises:
        InputError: If the path or the series cannot be found.
    """
    root = Path(root).resolve()
    key = load_key(key_file)
    target = resolve_path(str(row["path"]), root, key_file=key_file)
    folder = target if target.is_dir() else target.parent
    studies = _discover_cached(folder)
    disk = _Disk(root, list(studies), [], [])
    candidates = list(_by_series(folder, root, key, studies, disk).get(row["series"], ()))
    if len(candidates) > 1:
        candidates = [s for s in candidates if _row_id(key, s, disk) == row["id"]]
    if len(candidates) != 1:
        raise InputError(f"manifest row {row['id']} must resolve to one series under its path, not "
                         f"{len(candidates)}; run medtl verify to see what changed")
    return candidates[0]


_DISCOVERED: dict[tuple[str, int], list[Study]] = {}


def _discover_cached(folder: Path) -> list[Study]:
    """Studies of a folder, remembered while its entries do not change: the data pipeline resolves
    every row of a flat folder of thousands of images, and must not rediscover it each time."""
    stamp = (str(folder), folder.stat().st_mtime_ns)
    if stamp not in _DISCOVERED:
        if len(_DISCOVERED) >= 8:
            _DISCOVERED.pop(next(iter(_DISCOVERED)))
        _DISCOVERED[stamp] = discovery.discover(folder, progress=False)[0]
    return _DISCOVERED[stamp]


_BY_SERIES: dict[tuple[str, int, str, str], dict[str, list[Study]]] = {}


def _by_series(folder: Path, root: Path, key, studies: list[Study], disk: _Disk) -> dict[str, list[Study]]:
    """Studies of a discovered folder by series pseudonym, computed once per folder and key.

    Without it, resolving every row of a flat folder of N images costs N x N keyed hashes
    (12 minutes for PneumoniaMNIST's 2,428 training images).
    """
    memo_key = (str(folder), folder.stat().st_mtime_ns, str(root), key.key_id)
    if memo_key not in _BY_SERIES:
        if len(_BY_SERIES) >= 8:
            _BY_SERIES.pop(next(iter(_BY_SERIES)))
        table: dict[str, list[Study]] = {}
        for study in studies:
            table.setdefault(key.pseudonym("series", _series_identity(study, disk)), []).append(study)
        _BY_SERIES[memo_key] = table
    return _BY_SERIES[memo_key]


def _walk_all(root: Path) -> Iterator[str]:
    for folder, dirs, names in os.walk(root):
        for name in (*dirs, *names):
            yield (Path(folder) / name).relative_to(root).as_posix()
