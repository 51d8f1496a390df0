"""Per-case segmentation metrics from MONAI: Dice, 95th-percentile Hausdorff, surface Dice.

Cases are scored one at a time because 3D cases rarely share a shape or a voxel spacing, and
every per-case, per-class value is kept: group means, bootstrap CIs and the bias audit are
all computed from this table (column names `dice_<class>`, `hd95_<class>`,
`surface_dice_<class>`, plus the across-class means `dice`, `hd95`, `surface_dice`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from medtl.errors import InputError

#: Per-case metric families; each has one column per foreground class and a class mean.
SEGMENTATION_METRICS: tuple[str, ...] = ("dice", "hd95", "surface_dice")
#: +1 higher is better, -1 lower is better (HD95 is a distance in mm).
SEGMENTATION_DIRECTION: dict[str, int] = {"dice": 1, "hd95": -1, "surface_dice": 1}


def _one_hot(label_map: Any, num_classes: int, what: str) -> Any:
    import torch
    from monai.networks.utils import one_hot

    arr = np.asarray(label_map)
    if not np.issubdtype(arr.dtype, np.integer) and not np.array_equal(arr, np.round(arr)):
        raise InputError(
            f"{what} must be an integer label map, not {arr.dtype} with fractions; argmax the logits first"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise InputError(
            f"{what} labels must lie in 0..{num_classes - 1}, not {int(arr.min())}..{int(arr.max())}; "
            "check num_classes"
        )
    return one_hot(torch.as_tensor(arr.astype(np.int64))[None, None], num_classes)


def segmentation_case_metrics(
    y_pred: Sequence[Any],
    y_true: Sequence[Any],
    *,
    num_classes: int,
    ids: Sequence[str] | None = None,
    spacing: Sequence[Sequence[float]] | Sequence[float] | None = None,
    tolerance_mm: float | Sequence[float] = 1.0,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Dice, HD95 and surface Dice per case and foreground class (MONAI metrics).

    Empty classes follow MONAI: Dice is NaN when the reference is empty (MONAI's
    `ignore_empty=True`), HD95 is NaN when the prediction or the reference is empty; group
    summaries ignore NaN.

    Args:
        y_pred: predicted label maps, one integer array per case (MONAI layout, no channel).
        y_true: reference label maps, same shapes as `y_pred` case by case.
        num_classes: number of classes including background 0.
        ids: row pseudonyms (`id` of predictions.csv), one per case; default "0", "1", ...
        spacing: voxel spacing in mm, one tuple for all cases or one per case; default 1 mm.
        tolerance_mm: surface-Dice tolerance, one value or one per foreground class.
        class_names: names of the foreground classes for column suffixes; default "1".."k".

    Returns:
        DataFrame with `id`, then `dice_<c>`, `hd95_<c>`, `surface_dice_<c>` per foreground
        class, then the class means `dice`, `hd95`, `surface_dice`.

    Raises:
        InputError: on mismatched lengths/shapes or labels outside 0..num_classes-1.

    Example:
        >>> gt = np.zeros((8, 8), int); gt[2:6, 2:6] = 1
        >>> segmentation_case_metrics([gt], [gt], num_classes=2)["dice_1"].tolist()
        [1.0]
    """
    n = len(y_true)
    if len(y_pred) != n or (ids is not None and len(ids) != n):
        raise InputError("y_pred, y_true and ids must have one entry per case, not different lengths; align them")
    names, tol = _class_names_and_tolerances(num_classes, class_names, tolerance_mm)
    spacings = _per_case_spacing(spacing, n)
    # Imported here: torch + MONAI take seconds to import, and the audit (which only needs the
    # column names above) must stay light for classification runs.
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

    metrics = {
        "dice": DiceMetric(include_background=False, reduction="none"),
        "hd95": HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none"),
        "surface_dice": SurfaceDiceMetric(class_thresholds=tol, include_background=False, reduction="none"),
    }
    rows = [_case_values(i, y_pred[i], y_true[i], num_classes, spacings[i], metrics, names) for i in range(n)]
    table = pd.DataFrame(rows, columns=[f"{m}_{c}" for m in SEGMENTATION_METRICS for c in names])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows give NaN means
        for m in SEGMENTATION_METRICS:
            table[m] = np.nanmean(table[[f"{m}_{c}" for c in names]].to_numpy(dtype=np.float64), axis=1)
    table.insert(0, "id", [str(v) for v in ids] if ids is not None else [str(i) for i in range(n)])
    return table


def _class_names_and_tolerances(
    num_classes: int, class_names: Sequence[str] | None, tolerance_mm: float | Sequence[float]
) -> tuple[list[str], list[float]]:
    """The foreground class names (column suffixes) and one surface-Dice tolerance per class, checked."""
    names = [str(c) for c in (class_names or range(1, num_classes))]
    if len(names) != num_classes - 1:
        raise InputError(
            f"class_names must name {num_classes - 1} foreground classes, not {len(names)}; fix the list"
        )
    tol = (
        [float(tolerance_mm)] * len(names) if np.isscalar(tolerance_mm) else [float(t) for t in tolerance_mm]
    )
    if len(tol) != len(names):
        raise InputError(
            f"tolerance_mm must have one value per foreground class ({len(names)}), not {len(tol)}"
        )
    return names, tol


def _case_values(
    i: int, y_pred: Any, y_true: Any, num_classes: int, spacing: tuple[float, ...] | None, metrics: dict[str, Any],
    names: Sequence[str],
) -> dict[str, float]:
    """One case's row: every metric family per foreground class (`dice_<c>`, `hd95_<c>`, ...)."""
    pred, true = np.asarray(y_pred), np.asarray(y_true)
    if pred.shape != true.shape:
        raise InputError(
            f"prediction of case {i} must have the reference's shape {true.shape}, not {pred.shape}"
        )
    p, t = _one_hot(pred, num_classes, f"y_pred[{i}]"), _one_hot(true, num_classes, f"y_true[{i}]")
    sp = spacing if spacing is not None else (1.0,) * pred.ndim
    with warnings.catch_warnings():
        # MONAI warns for every empty class ("may result in nan/inf distance") and about its
        # own deprecated internals; NaN is the documented, intended outcome here.
        warnings.simplefilter("ignore")
        values = {
            "dice": metrics["dice"](p, t)[0],
            "hd95": metrics["hd95"](p, t, spacing=sp)[0],
            "surface_dice": metrics["surface_dice"](p, t, spacing=sp)[0],
        }
    return {f"{m}_{c}": float(values[m][k]) for m in SEGMENTATION_METRICS for k, c in enumerate(names)}


def _per_case_spacing(spacing: Any, n: int) -> list[tuple[float, ...] | None]:
    if spacing is None:
        return [None] * n
    if len(spacing) and np.isscalar(spacing[0]):
        return [tuple(float(v) for v in spacing)] * n
    if len(spacing) != n:
        raise InputError(
            f"spacing must be one tuple or one tuple per case ({n}), not {len(spacing)}; align it"
        )
    return [tuple(float(v) for v in s) for s in spacing]


def segmentation_summary(case_metrics: pd.DataFrame) -> dict[str, float]:
    """Mean of every per-case metric column, ignoring NaN (undefined cases).

    Args:
        case_metrics: the table from segmentation_case_metrics.

    Returns:
        Dict column -> mean (NaN when no case defines it).
    """
    cols = segmentation_columns(case_metrics.columns)
    values = case_metrics[cols].to_numpy(dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(values, axis=0) if len(values) else np.full(len(cols), np.nan)
    return {c: float(v) for c, v in zip(cols, means, strict=True)}


def segmentation_family(column: str) -> str | None:
    """The metric family ("dice", "hd95", "surface_dice") of a per-case column, else None."""
    for family in ("surface_dice", "hd95", "dice"):  # longest first: "surface_dice_1" is not Dice
        if column == family or column.startswith(f"{family}_"):
            return family
    return None


def segmentation_columns(columns: Sequence[str]) -> list[str]:
    """The per-case metric columns among `columns` (`dice`, `dice_<c>`, `hd95_<c>`, ...), in order."""
    return [c for c in columns if segmentation_family(str(c)) is not None]
