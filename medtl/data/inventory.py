"""The data root as the manifest sees it: files and studies by relative path, row ids, file names.

Internal helpers shared by `medtl.data.manifest` (build) and `medtl.data.verify` (verify,
resolve), so both walk a root, derive row ids and name files in their outputs the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from medtl.data import discover as discovery
from medtl.data.dicom import PixelSummary
from medtl.data.privacy import ProjectKey
from medtl.data.types import Rejection, Study


@dataclass
class _Disk:
    """Discovered studies and rejections of one root, indexed by relative path."""

    root: Path
    studies: list[Study]
    rejections: list[Rejection]
    files: list[str]  # every file under root (our own walk), relative POSIX paths
    study_of: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, Rejection] = field(default_factory=dict)
    below: dict[str, set[int]] = field(default_factory=dict)  # folder -> studies under it
    pixels: dict[int, PixelSummary] = field(default_factory=dict)  # study -> pixels known from discovery
    # Files the build decided about beyond discovery (a DICOM SEG used as a mask): rel -> (status, reason).
    decided: dict[str, tuple[str, str]] = field(default_factory=dict)

    def rel(self, path: Path) -> str:
        path = Path(path)
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.resolve().relative_to(self.root).as_posix()

    def targets(self, rel: str) -> list[int] | None:
        """Studies a labels path points at: [] if it exists without studies, None if missing."""
        if rel in self.study_of:
            return [self.study_of[rel]]
        copy_of = self.rejected[rel].copy_of if rel in self.rejected else None
        if copy_of is not None and self.rel(copy_of) in self.study_of:
            return [self.study_of[self.rel(copy_of)]]  # a labelled copy is served by the file it copies
        if rel == ".":
            return list(range(len(self.studies)))
        if rel in self.below:
            return sorted(self.below[rel])
        return [] if self.exists(rel) else None

    def exists(self, rel: str) -> bool:
        """Whether a labels path names anything under the root; an unusable path (longer than the
        OS limit, in a folder that cannot be read) names nothing, and never raises with the path."""
        try:
            return (self.root / rel).exists()
        except OSError:
            return False


def _scan_disk(root: Path, exclude: set[str], progress: bool, workers: int | None = None) -> _Disk:
    studies, rejections, pixels = discovery.discover_with_pixels(root, progress=progress, workers=workers)
    # The same walk as discover's, so every entry it counts has a study or a rejection.
    files = [path.relative_to(root).as_posix() for path in discovery.walk(root)]
    disk = _Disk(root, [], [], [rel for rel in files if rel not in exclude])
    for study in studies:
        rels = [disk.rel(f) for f in study.files]
        if any(r in exclude for r in rels):
            continue
        index = len(disk.studies)
        disk.studies.append(study)
        if study.files[0] in pixels:
            disk.pixels[index] = pixels[study.files[0]]
        for rel in rels:
            disk.study_of[rel] = index
            for parent in PurePosixPath(rel).parents:
                if parent.as_posix() != ".":
                    disk.below.setdefault(parent.as_posix(), set()).add(index)
    for rejection in rejections:
        rel = disk.rel(rejection.path)
        if rel not in exclude:
            disk.rejections.append(rejection)
            disk.rejected[rel] = rejection
    return disk


def _series_identity(study: Study, disk: _Disk) -> str:
    header = study.header
    if header is not None and header.series_uid:
        return header.series_uid
    return "file:" + disk.rel(study.files[0])


def _row_id(key: ProjectKey, study: Study, disk: _Disk) -> str:
    return key.pseudonym("row", _series_identity(study, disk) + "\x00" + disk.rel(study.files[0]))


def _inside(root: Path, path: Path) -> str | None:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (the standard library reads it in chunks)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
