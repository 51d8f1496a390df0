"""Regression tests for intake problems seen on real public data: odd file-system entries, series
that are not plain stacks, copies of one instance, non-finite values.

Every test writes real files (pydicom, nibabel, PIL, os.mkfifo, sockets) and checks that each
entry under the data root ends in exactly one Study or one Rejection whose reason names no path.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEG2000, DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from medtl.data.discover import discover, load_study
from medtl.data.types import Rejection, Study
from tests.data import dicom_factory as factory

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
TILT = 18.5  # degrees, as on the GE head CT in the wild (FIELD_NOTES.md)
TILTED = (1.0, 0.0, 0.0, 0.0, np.cos(np.deg2rad(TILT)), np.sin(np.deg2rad(TILT)))


def _entries(root: Path) -> list[Path]:
    """Every entry under root that is not a listed folder, found independently of medtl."""
    found = []
    for folder, dirs, names in os.walk(root):
        found += [Path(folder) / d for d in dirs if os.path.islink(os.path.join(folder, d))]
        found += [Path(folder) / n for n in names]
    return sorted(found)


def _outcomes(root: Path, studies: list[Study], rejections: list[Rejection]) -> dict[str, str]:
    """Relative path -> "study" or the rejection's status; checks that no entry is counted twice."""
    seen = [(f, "study") for s in studies for f in s.files] + [(r.path, r.status) for r in rejections]
    assert len(seen) == len({p for p, _ in seen})
    return {p.relative_to(root).as_posix(): outcome for p, outcome in seen}


def _reasons(root: Path, rejections: list[Rejection], *, names: bool = True) -> dict[str, str]:
    """Reasons by relative path, each checked to be one line naming no path (nor file name)."""
    for rejection in rejections:
        assert rejection.reason and "\n" not in rejection.reason and str(root) not in rejection.reason
        assert not names or rejection.path.name not in rejection.reason
    return {r.path.relative_to(root).as_posix(): r.reason for r in rejections}


def _png(path: Path, value: int = 7) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 5), value, np.uint8)).save(path)
    return path


def _discover_or_unblock(root: Path, seconds: float = 30.0) -> tuple[list[Study], list[Rejection]]:
    """Run discover in a thread; if it blocks (opened a FIFO), unblock it and fail the test."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(discover(root, progress=False)), daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        for folder, _dirs, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                if stat.S_ISFIFO(os.lstat(path).st_mode):
                    with contextlib.suppress(OSError):  # a writer that closes gives the reader EOF
                        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(seconds)
        pytest.fail("discover blocked: it opened a named pipe")
    return result[0]


# --- A. odd file-system entries -----------------------------------------------------------------


def test_broken_and_looping_symlinks_are_quarantined_with_their_own_reasons(tmp_path):
    root = tmp_path / "data"
    _png(root / "image.png")
    (root / "dangling.dcm").symlink_to("nowhere.dcm")
    (root / "loop_a").symlink_to("loop_b")
    (root / "loop_b").symlink_to("loop_a")

    studies, rejections = discover(root, progress=False)

    assert _outcomes(root, studies, rejections) == {
        "image.png": "study", "dangling.dcm": "quarantined", "loop_a": "quarantined", "loop_b": "quarantined",
    }  # fmt: skip
    reasons = _reasons(root, rejections)
    assert reasons["dangling.dcm"].startswith("broken symbolic link")
    assert reasons["loop_a"].startswith("symbolic link loop") and reasons["loop_b"] == reasons["loop_a"]


def test_fifo_socket_and_device_file_are_skipped_without_being_opened(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _png(root / "image.png")
    os.mkfifo(root / "x.dcm")
    monkeypatch.chdir(root)  # AF_UNIX socket paths are limited to ~108 bytes: bind a relative name
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("listener.dcm")
    expected = {"image.png": "study", "x.dcm": "skipped", "listener.dcm": "skipped"}
    try:
        os.mknod(root / "null.dcm", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
        expected["null.dcm"] = "skipped"
    except PermissionError:
        pass  # creating device files needs root; the FIFO and the socket still cover the rule

    studies, rejections = _discover_or_unblock(root)

    assert _outcomes(root, studies, rejections) == expected
    reasons = _reasons(root, rejections)
    assert reasons["x.dcm"] == "named pipe (FIFO), not a regular file"
    assert reasons["listener.dcm"] == "socket, not a regular file"
    if "null.dcm" in reasons:
        assert reasons["null.dcm"] == "character device file, not a regular file"


def _deep_file(root: Path, depth: int = 18) -> Path:
    """A PNG below `depth` folders of 250 characters: a path longer than PATH_MAX (4096)."""
    name = "d" * 250
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):  # one folder at a time, relative to its parent's descriptor
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(buffer, format="PNG")
        handle = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(handle, buffer.getvalue())
        os.close(handle)
    finally:
        os.close(fd)
    return root.joinpath(*[name] * depth, "deep.png")


def test_a_path_longer_than_path_max_is_seen_and_quarantined(tmp_path):
    root = tmp_path / "data"
    _png(root / "image.png")
    deep = _deep_file(root)
    assert len(str(deep)) > 4096

    studies, rejections = discover(root, progress=False)

    outcomes = _outcomes(root, studies, rejections)
    deep_rel = deep.relative_to(root).as_posix()
    assert outcomes == {"image.png": "study", deep_rel: "quarantined"}
    assert (
        _reasons(root, rejections)[deep_rel]
        == "path longer than the OS limit (PATH_MAX); shorten the folder names"
    )


@contextlib.contextmanager
def _unprivileged() -> Iterator[None]:
    """Drop the effective user id to `nobody` for the block when running as root (root reads anything)."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.seteuid(65534)
    except PermissionError:
        pytest.skip("running as root without the right to drop privileges")
    try:
        yield
    finally:
        os.seteuid(0)


def test_a_folder_that_cannot_be_listed_is_reported_as_a_rejection_of_that_folder():
    # Outside tmp_path: pytest's base folder is private to its owner, so `nobody` could not enter it.
    root = Path(tempfile.mkdtemp(prefix="medtl-locked-"))
    try:
        root.chmod(0o755)
        (root / "open").mkdir()
        (root / "open" / "notes.txt").write_text("readable\n")
        (root / "locked").mkdir()
        (root / "locked" / "notes.txt").write_text("hidden\n")
        discover(root, progress=False)  # imports everything discover needs while still privileged
        (root / "locked").chmod(0)
        with _unprivileged():
            studies, rejections = discover(root, progress=False)
        assert _outcomes(root, studies, rejections) == {"open/notes.txt": "skipped", "locked": "quarantined"}
        assert _reasons(root, rejections)["locked"].startswith("folder could not be listed")
    finally:
        (root / "locked").chmod(0o755)
        shutil.rmtree(root)


def test_symlinks_inside_the_root_are_followed_and_others_are_skipped_but_counted(tmp_path):
    root = tmp_path / "data"
    _png(root / "image.png")
    _png(root / "sub" / "x.png", 9)
    _png(tmp_path / "elsewhere" / "secret.png", 3)
    (root / "inside.png").symlink_to("image.png")
    (root / "outside.png").symlink_to(tmp_path / "elsewhere" / "secret.png")
    (root / "folder_link").symlink_to("sub")
    (root / "outside_folder").symlink_to(tmp_path / "elsewhere")

    studies, rejections = discover(root, progress=False)

    assert _outcomes(root, studies, rejections) == {
        "image.png": "study", "inside.png": "study", "sub/x.png": "study", "outside.png": "skipped",
        "folder_link": "skipped", "outside_folder": "skipped",
    }  # fmt: skip
    assert root / "inside.png" in {s.files[0] for s in studies}  # absolute, the link itself
    reasons = _reasons(root, rejections)
    assert reasons["outside.png"] == "symbolic link to a file outside the data root, not followed"
    assert reasons["folder_link"] == reasons["outside_folder"] == "symbolic link to a folder, not followed"


def test_a_root_that_is_a_symlink_keeps_study_paths_under_the_given_root(tmp_path):
    _png(tmp_path / "real" / "a" / "image.png")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    studies, rejections = discover(tmp_path / "alias", progress=False)
    assert rejections == [] and [s.files for s in studies] == [(tmp_path / "alias" / "a" / "image.png",)]


def test_walk_is_what_discover_and_the_manifest_inventory_both_count(tmp_path):
    from medtl.data.discover import walk
    from medtl.data.inventory import _scan_disk

    root = tmp_path / "data"
    _png(root / "image.png")
    (root / "folder_link").symlink_to(tmp_path)
    (root / "dangling").symlink_to("nowhere")
    deep = _deep_file(root, depth=17)

    entries = walk(root)
    disk = _scan_disk(root, set(), False)

    assert entries == sorted([*_entries(root), deep])  # os.walk alone never sees the deep file
    assert disk.files == [p.relative_to(root).as_posix() for p in entries]
    counted = [*disk.study_of, *disk.rejected]  # used + quarantined + skipped
    assert sorted(counted) == sorted(disk.files) and len(counted) == len(set(counted))


# --- B. series assembly -------------------------------------------------------------------------


def _ramp(slices: int, rows: int = 12, columns: int = 16) -> np.ndarray:
    """raw[k, j, i] = 100 k + 10 j + i: linear in the row index, so linear resampling is exact."""
    k, j, i = np.meshgrid(np.arange(slices), np.arange(rows), np.arange(columns), indexing="ij")
    return (100 * k + 10 * j + i).astype(np.int16)


def _z_positions(normal_gaps: list[float]) -> list[tuple[float, float, float]]:
    """Table positions along z whose distances along the tilted normal are `normal_gaps`."""
    z = np.concatenate([[0.0], np.cumsum(normal_gaps)]) / np.cos(np.deg2rad(TILT))
    return [(0.0, 0.0, float(v)) for v in z]


def test_tilted_ct_with_variable_spacing_names_the_tilt_and_the_uneven_spacing(tmp_path):
    gaps = [1.1, 1.1, 1.1, 2.5, 2.5, 5.0, 5.0, 7.4, 7.4]
    factory.write_series(tmp_path, _ramp(len(gaps) + 1), orientation=TILTED, positions=_z_positions(gaps))

    studies, rejections = discover(tmp_path, progress=False)

    assert studies == [] and {r.status for r in rejections} == {"quarantined"}
    (reason,) = {r.reason for r in rejections}
    assert reason.startswith("gantry tilt 18.5° and uneven slice spacing: 4 distinct steps of 1.10-7.40 mm")
    assert "missing" not in reason and "\n" not in reason


def test_tilted_ct_with_a_missing_slice_names_the_tilt_and_the_missing_slice(tmp_path):
    paths = factory.write_series(tmp_path, _ramp(8), orientation=TILTED, positions=_z_positions([2.0] * 7))
    paths[4].unlink()
    _studies, rejections = discover(tmp_path, progress=False)
    (reason,) = {r.reason for r in rejections}
    assert (
        reason
        == "gantry tilt 18.5° and missing slices: 1 gap of 2 times the usual 2.00 mm step along the normal"
    )


def _check_tilt_corrected(image, origin_of, row_mm: float, col_mm: float, z_step: float) -> None:
    """Voxel (i, j, k) holds slice k's value at the world point the affine gives it."""
    t = np.deg2rad(TILT)
    along = z_step * np.cos(t)
    np.testing.assert_allclose(image.spacing, (col_mm, row_mm, along), atol=1e-5)
    np.testing.assert_allclose(
        image.affine[:3, 2] / along, (0.0, np.sin(t), np.cos(t)), atol=1e-6
    )  # RAS normal
    slices, rows = image.array.shape[2], image.array.shape[1]
    shift = z_step * np.sin(t) / row_mm  # rows the tilted slice k is offset by, per slice
    row_dir, col_dir = np.array(TILTED[:3]), np.array(TILTED[3:])
    checked = 0
    for k in range(slices):
        for j in range(rows):
            source_row = j - k * shift  # where voxel (., j, k) falls inside the tilted slice k
            if not 0 <= source_row <= rows - 1:
                continue
            for i in (0, 5, 15):
                lps = origin_of(k) + i * col_mm * row_dir + source_row * row_mm * col_dir
                np.testing.assert_allclose((image.affine @ [i, j, k, 1])[:3], lps * [-1, -1, 1], atol=1e-4)
                expected = 100 * k + 10 * source_row + i - 1024.0
                assert image.array[i, j, k] == pytest.approx(expected, abs=1e-3)
                checked += 1
    assert checked > 50


def test_evenly_spaced_tilted_series_is_resampled_onto_an_orthogonal_grid(tmp_path):
    factory.write_series(tmp_path, _ramp(6), orientation=TILTED, step=(0.0, 0.0, 3.0), origin=(5.0, 6.0, 7.0))

    (study,), rejections = discover(tmp_path, progress=False)

    assert rejections == [] and study.notes == ("gantry tilt 18.5° corrected by resampling",)
    image = load_study(study)
    assert image.array.shape == (16, 12, 6)
    _check_tilt_corrected(image, lambda k: np.array([5.0, 6.0, 7.0 + 3.0 * k]), 0.8, 0.7, 3.0)


def test_tilted_enhanced_multiframe_is_resampled_like_a_series(tmp_path):
    positions = [(0.0, 0.0, 3.0 * k) for k in (2, 0, 4, 1, 3)]
    factory.write_multiframe(tmp_path / "mf.dcm", _ramp(5)[[2, 0, 4, 1, 3]], positions, orientation=TILTED)
    (study,), rejections = discover(tmp_path, progress=False)
    assert rejections == [] and study.notes == ("gantry tilt 18.5° corrected by resampling",)
    _check_tilt_corrected(load_study(study), lambda k: np.array([0.0, 0.0, 3.0 * k]), 0.5, 0.6, 3.0)


@pytest.mark.parametrize("time_vector", [False, True], ids=["FrameTime", "FrameTimeVector"])
def test_ultrasound_cine_is_skipped_not_stacked_as_a_volume(tmp_path, time_vector):
    factory.write_cine(tmp_path / "loop.dcm", 120, time_vector=time_vector)
    studies, rejections = discover(tmp_path, progress=False)
    assert studies == [] and [r.status for r in rejections] == ["skipped"]
    assert rejections[0].reason == (
        "multi-frame cine (time series of 120 frames), not a 3D volume; export a frame as PNG or DICOM to use it"
    )


def test_multiframe_without_positions_or_slice_spacing_is_quarantined_not_given_1_mm(tmp_path):
    factory.write_multiframe_without_geometry(tmp_path / "frames.dcm")
    studies, rejections = discover(tmp_path, progress=False)
    assert studies == [] and [r.status for r in rejections] == ["quarantined"]
    assert rejections[0].reason.startswith("multi-frame image without frame positions or slice spacing")


def test_copies_of_a_radiograph_in_other_encodings_are_one_study(tmp_path):
    pixels = np.arange(48 * 40).reshape(48, 40) % 3000
    plain = factory.write_radiograph(tmp_path / "z_plain.dcm", pixels)  # sorts last: rank, not name, wins
    factory.write_reencoded(plain, tmp_path / "a_rle.dcm", RLELossless)
    factory.write_reencoded(plain, tmp_path / "b_deflated.dcm", DeflatedExplicitVRLittleEndian)
    factory.write_reencoded(plain, tmp_path / "c_j2k.dcm", JPEG2000Lossless)

    studies, rejections = discover(tmp_path, progress=False)

    assert [s.files for s in studies] == [(plain,)]
    assert {r.path.name: r.status for r in rejections} == dict.fromkeys(
        ["a_rle.dcm", "b_deflated.dcm", "c_j2k.dcm"], "skipped"
    )
    assert {r.reason for r in rejections} == {"another copy of the same DICOM instance in another encoding"}


def test_lossless_copy_is_preferred_over_a_lossy_one(tmp_path):
    plain = factory.write_radiograph(tmp_path / "plain.dcm", np.arange(48 * 40).reshape(48, 40) % 3000)
    lossy = factory.write_reencoded(plain, tmp_path / "a_lossy.dcm", JPEG2000, j2k_cr=[10])
    rle = factory.write_reencoded(plain, tmp_path / "b_rle.dcm", RLELossless)
    plain.unlink()
    studies, rejections = discover(tmp_path, progress=False)
    assert [s.files for s in studies] == [(rle,)] and [r.path for r in rejections] == [lossy]


def test_series_copied_in_another_encoding_is_one_stack_not_a_duplicate_position_quarantine(tmp_path):
    paths = factory.write_series(tmp_path / "plain", _ramp(5), slice_gap=2.0)
    copies = [factory.write_reencoded(p, tmp_path / "rle" / p.name, RLELossless) for p in paths]

    studies, rejections = discover(tmp_path, progress=False)

    assert [s.files for s in studies] == [tuple(paths)]
    assert sorted(r.path for r in rejections) == sorted(copies) and {r.status for r in rejections} == {
        "skipped"
    }


def test_different_images_that_share_a_sop_instance_uid_are_not_taken_for_copies(tmp_path):
    # Some anonymisers write one constant SOPInstanceUID: different pixels mean different images.
    first = factory.write_radiograph(tmp_path / "a.dcm", np.arange(48 * 40).reshape(48, 40) % 3000)
    second = factory.write_radiograph(tmp_path / "b.dcm", np.arange(48 * 40).reshape(48, 40)[::-1] % 3000)
    ds = pydicom.dcmread(second)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.dcmread(first).SOPInstanceUID
    ds.save_as(second)
    factory.write_reencoded(second, tmp_path / "c.dcm", RLELossless)
    studies, rejections = discover(tmp_path, progress=False)
    assert sorted(s.files[0].name for s in studies) == ["a.dcm", "b.dcm"]
    assert [r.path.name for r in rejections] == ["c.dcm"]


# --- C. values ----------------------------------------------------------------------------------


def test_nifti_with_nan_or_inf_voxels_is_quarantined_at_discovery(tmp_path):
    data = np.ones((4, 5, 6), np.float32)
    some = data.copy()
    some[0, 0, :2], some[1, 1, 1] = np.nan, np.inf
    nib.save(nib.Nifti1Image(some, np.eye(4)), tmp_path / "some.nii.gz")
    nib.save(nib.Nifti1Image(np.full_like(data, np.nan), np.eye(4)), tmp_path / "all.nii")
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "fine.nii.gz")

    studies, rejections = discover(tmp_path, progress=False)

    assert [s.files[0].name for s in studies] == ["fine.nii.gz"]
    assert _reasons(tmp_path, rejections) == {
        "all.nii": "every voxel is NaN", "some.nii.gz": "non-finite voxel values (NaN or Inf) in 3 of 120 voxels",
    }  # fmt: skip
    assert {r.status for r in rejections} == {"quarantined"}


def test_float_tiff_with_nan_pixels_is_quarantined(tmp_path):
    pixels = np.ones((4, 5), np.float32)
    pixels[2, 3] = np.nan
    Image.fromarray(pixels).save(tmp_path / "map.tif")
    studies, rejections = discover(tmp_path, progress=False)
    assert studies == [] and _reasons(tmp_path, rejections) == {
        "map.tif": "non-finite pixel values (NaN or Inf) in 1 of 20 pixels"
    }


def test_dicom_whose_rescale_overflows_to_infinity_is_quarantined(tmp_path):
    factory.write_slice(
        tmp_path / "slope.dcm", np.full((4, 5), 1000, np.int16), position=(0.0, 0.0, 0.0),
        series_uid="1.2.3.9", study_uid="1.2.3.10", rescale=(1e38, 0.0),
    )  # fmt: skip
    studies, rejections = discover(tmp_path, progress=False)
    assert studies == [] and [r.status for r in rejections] == ["quarantined"]
    assert rejections[0].reason == "non-finite pixel values (NaN or Inf) in 20 of 20 pixels"


# --- D. real public files -----------------------------------------------------------------------


def _discover_copies(sources: list[Path], root: Path, capfd) -> tuple[list[Study], list[Rejection]]:
    for source in sources:
        shutil.copytree(source, root / source.name, symlinks=True)
    studies, rejections = discover(root, progress=True)
    captured = capfd.readouterr()
    for text in (captured.out, captured.err):
        assert "Traceback" not in text and str(root) not in text
    assert sorted(_outcomes(root, studies, rejections)) == [
        p.relative_to(root).as_posix() for p in _entries(root)
    ]
    _reasons(root, rejections, names=False)  # a file named DICOMDIR is a "DICOMDIR index file"
    for study in studies:
        assert np.isfinite(load_study(study).array).all()
    return studies, rejections


def test_copies_of_the_files_pydicom_ships_are_all_accounted_for(tmp_path, capfd):
    studies, rejections = _discover_copies([PYDICOM_FILES], tmp_path / "data", capfd)
    status = {r.path.name: (r.status, r.reason) for r in rejections}
    assert status["examples_ybr_color.dcm"][0] == "skipped" and "cine" in status["examples_ybr_color.dcm"][1]
    assert status["SC_rgb_rle_2frame.dcm"][0] == "quarantined"
    for copy in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"):
        assert status[copy] == ("skipped", "another copy of the same DICOM instance in another encoding")
    assert "MR_small.dcm" in {s.files[0].name for s in studies}


def test_copies_of_the_shared_real_dicom_are_all_accounted_for(shared_data, tmp_path, capfd):
    sources = sorted(p for p in (shared_data / "dicom").iterdir() if p.is_dir())
    studies, _ = _discover_copies(sources, tmp_path / "data", capfd)
    assert len(studies) >= 10


def test_regular_file_tells_which_listed_entries_may_be_read(tmp_path, monkeypatch):
    from medtl.data.discover import regular_file, walk

    root = tmp_path / "data"
    _png(root / "image.png")
    (root / "empty.dcm").write_bytes(b"")
    (root / "inside.png").symlink_to("image.png")
    _png(tmp_path / "elsewhere" / "secret.png")
    (root / "outside.png").symlink_to(tmp_path / "elsewhere" / "secret.png")
    (root / "folder_link").symlink_to(tmp_path / "elsewhere")
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "pipe")
    monkeypatch.chdir(root)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("listener")
    deep = _deep_file(root, depth=17)

    readable = {p.relative_to(root).as_posix() for p in walk(root) if regular_file(p, root)}

    assert readable == {"image.png", "empty.dcm", "inside.png"}
    assert not regular_file(deep, root)
