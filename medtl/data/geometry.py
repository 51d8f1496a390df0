"""Slice geometry of DICOM stacks: ordering along the normal, spacing checks, gantry tilt, affines.

Pure numpy on positions and direction cosines (LPS mm, as DICOM stores them); reading them from
a dataset is `medtl.data.dicom.frame_geometry`. Slices are ordered by their position along the
normal of ImageOrientationPatient, never by file name or InstanceNumber. A stack is accepted
when its steps along the normal are even; a gantry-tilted stack (slice origins offset within the
plane) is resampled onto an orthogonal grid, as dcm2niix does, so the affine carries no shear
and the slice spacing is the distance along the normal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Point = tuple[float, float, float]  # ImagePositionPatient, LPS mm

# Slice spacing checks: positions come from decimal strings rounded by the scanner, so small jitter
# is normal; a missing slice doubles a gap. Tolerances are in mm / as a fraction of the median gap.
_DUPLICATE_MM = 0.01
_GAP_ATOL_MM = 0.05
_GAP_RTOL = 0.05
# Below this angle between the slice normal and the line through the slice origins, positions
# rounded by the scanner explain the offset; above it the stack is gantry-tilted and resampled.
TILT_MIN_DEG = 0.1
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Stack:
    """Slices ordered along the normal of their common orientation."""

    order: tuple[int, ...]
    step: Point  # LPS mm from one slice origin to the next (tilt included)
    tilt: float = 0.0  # degrees between the normal and the line through the slice origins


def order_stack(orientation: Sequence[float], positions: Sequence[Sequence[float]]) -> Stack | str:
    """Order slices by their position along the normal and check that they form an even stack.

    Never uses file names or InstanceNumber. Gantry tilt (positions offset within the plane) is
    fine as long as the spacing along the normal is even and the positions lie on a line; the
    loaders then resample the stack (`correct_gantry_tilt`).

    Args:
        orientation: ImageOrientationPatient (row then column direction cosines).
        positions: ImagePositionPatient of each slice (at least two).

    Returns:
        The `Stack`, or a one-line reason why these slices are not one (no header values): duplicate
        positions, missing slices (gaps that are whole multiples of the usual step), uneven spacing
        (several distinct steps), positions off one line; prefixed by the gantry tilt when tilted.
    """
    points = np.asarray(positions, dtype=np.float64)
    depth = points @ _normal(orientation)
    order = np.argsort(depth, kind="stable")
    gaps = np.diff(depth[order])
    repeated = int(np.sum(gaps < _DUPLICATE_MM))
    if repeated:
        return f"duplicate slice positions ({repeated} repeated) along the normal: several echoes, phases or copies?"
    ordered = points[order]
    tilt = gantry_tilt(orientation, ordered[-1] - ordered[0])
    problem = _spacing_problem(gaps)
    if problem:
        return f"gantry tilt {tilt:.1f}° and {problem}" if tilt >= TILT_MIN_DEG else problem
    step = (ordered[-1] - ordered[0]) / (len(ordered) - 1)
    predicted = ordered[0] + np.outer(np.arange(len(ordered)), step)
    if np.max(np.linalg.norm(ordered - predicted, axis=1)) > max(0.5, 0.5 * float(np.linalg.norm(step))):
        return "slice positions do not lie on one line (several stacks in one series?)"
    return Stack(tuple(int(i) for i in order), (float(step[0]), float(step[1]), float(step[2])), tilt)


def _spacing_problem(gaps: np.ndarray) -> str:
    """Why gaps along the normal are not one even step ("" when they are), naming the cause.

    Gaps that are all whole multiples of the usual (most frequent) step are missing slices;
    anything else is uneven spacing, as in CT with variable slice thickness.
    """
    median = float(np.median(gaps))
    if np.all(np.abs(gaps - median) <= max(_GAP_ATOL_MM, _GAP_RTOL * median)):
        return ""
    steps = _step_clusters(gaps)
    usual = float(np.median(max(steps, key=len)))  # max keeps the smallest step on a tie
    multiples = np.rint(gaps / usual)
    whole = np.all(multiples >= 1) and np.all(
        np.abs(gaps - multiples * usual) <= max(_GAP_ATOL_MM, _GAP_RTOL * usual)
    )
    long = multiples[multiples > 1].astype(int)
    if whole and not long.size:
        return ""  # every gap is within jitter of the usual step
    if whole:
        times = f"{long.min()}" if long.min() == long.max() else f"{long.min()}-{long.max()}"
        count = f"{len(long)} gap{'s' if len(long) > 1 else ''}"
        return f"missing slices: {count} of {times} times the usual {usual:.2f} mm step along the normal"
    return (
        f"uneven slice spacing: {len(steps)} distinct steps of {gaps.min():.2f}-{gaps.max():.2f} mm along the "
        "normal (variable slice thickness); resample it to even spacing first (e.g. dcm2niix)"
    )


def _step_clusters(gaps: np.ndarray) -> list[list[float]]:
    """Gaps grouped into distinct steps: sorted, a new step starts beyond the jitter tolerance."""
    clusters: list[list[float]] = []
    for gap in np.sort(gaps):
        if not clusters or gap - clusters[-1][0] > max(_GAP_ATOL_MM, _GAP_RTOL * clusters[-1][0]):
            clusters.append([])
        clusters[-1].append(float(gap))
    return clusters


def gantry_tilt(orientation: Sequence[float], step: Sequence[float]) -> float:
    """Degrees between the slice normal and a step from one slice origin to a later one.

    0 for an orthogonal stack; a CT acquired with a tilted gantry moves the table along its axis
    while the slice plane is tilted, so each slice origin is offset within the plane.
    """
    step_vec = np.asarray(step, dtype=np.float64)
    along = float(step_vec @ _normal(orientation))
    drift = float(np.linalg.norm(step_vec - along * _normal(orientation)))
    return float(np.degrees(np.arctan2(drift, abs(along))))


def correct_gantry_tilt(
    volume: np.ndarray,
    orientation: Sequence[float] | None,
    pixel_spacing: tuple[float, float] | None,
    step: Sequence[float] | float,
) -> tuple[np.ndarray, Sequence[float] | float]:
    """Resample a gantry-tilted stack onto the orthogonal grid of its slice normal, like dcm2niix.

    Slice k is shifted within its plane by k times the in-plane offset of one step (linear
    interpolation, `scipy.ndimage.shift`; outside the field of view gets the volume's minimum),
    so voxel (i, j, k) lies at origin + i, j along the rows/columns + k * (step along the normal).

    Args:
        volume: (columns, rows, slices) in slice order.
        orientation: ImageOrientationPatient, or None (nothing to correct).
        pixel_spacing: (between rows, between columns) mm, or None for 1 mm.
        step: LPS vector from one slice origin to the next, or a distance along the normal.

    Returns:
        (volume, step): unchanged when not tilted by at least `TILT_MIN_DEG`; else the resampled
        volume and the slice distance along the normal, for `volume_affine`.
    """
    if orientation is None or np.isscalar(step) or gantry_tilt(orientation, step) < TILT_MIN_DEG:
        return volume, step
    step_vec = np.asarray(step, dtype=np.float64)
    along = float(step_vec @ _normal(orientation))
    drift = step_vec - along * _normal(orientation)
    row_mm, col_mm = pixel_spacing or (1.0, 1.0)
    per_slice = (
        float(drift @ np.asarray(orientation[:3])) / col_mm,
        float(drift @ np.asarray(orientation[3:6])) / row_mm,
    )
    fill = float(volume.min())
    corrected = np.empty_like(volume)
    for k in range(volume.shape[2]):
        shift = (k * per_slice[0], k * per_slice[1])  # output[x] = input[x - shift]
        corrected[..., k] = ndimage.shift(volume[..., k], shift, order=1, mode="constant", cval=fill)
    return corrected, along


def _normal(orientation: Sequence[float]) -> np.ndarray:
    return np.cross(
        np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:6], dtype=np.float64)
    )


def volume_affine(
    orientation: Sequence[float] | None,
    origin: Sequence[float] | None,
    pixel_spacing: tuple[float, float] | None,
    step: Sequence[float] | float,
) -> np.ndarray:
    """Voxel (column, row, slice) to RAS mm affine from DICOM geometry (LPS converted to RAS).

    Args:
        orientation: ImageOrientationPatient, or None for images without patient geometry.
        origin: ImagePositionPatient of the first slice, or None.
        pixel_spacing: (between rows, between columns) mm, or None for 1 mm.
        step: LPS vector from one slice to the next, or a slice distance along the normal.

    Returns:
        The 4x4 affine; without orientation, the identity scaled by the spacings.
    """
    row_mm, col_mm = pixel_spacing or (1.0, 1.0)
    if orientation is None:
        thickness = float(step) if np.isscalar(step) else float(np.linalg.norm(step))
        return np.diag([col_mm, row_mm, thickness or 1.0, 1.0])
    along_row = np.asarray(orientation[:3], dtype=np.float64)
    along_col = np.asarray(orientation[3:6], dtype=np.float64)
    step_vec = (
        np.cross(along_row, along_col) * float(step)
        if np.isscalar(step)
        else np.asarray(step, dtype=np.float64)
    )
    affine = np.eye(4)
    affine[:3, 0] = along_row * col_mm  # voxel index i runs along a row, i.e. across columns
    affine[:3, 1] = along_col * row_mm
    affine[:3, 2] = step_vec
    affine[:3, 3] = np.asarray(origin if origin is not None else (0.0, 0.0, 0.0), dtype=np.float64)
    return _LPS_TO_RAS @ affine
