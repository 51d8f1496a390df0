"""Reading a predictions table (predictions.csv) into the arrays the audit works on.

Columns follow the brief: `id`, `split`, `y_true`, `y_score` (binary) or `y_score_<class>`
(with `y_true` labels for multi-class, `y_true_<class>` indicators for multi-label), `y_pred`,
then subgroup columns. Segmentation tables carry per-case metric columns instead
(segmentation_case_metrics). Patient ids are not read here: they come in as an argument.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from medtl.errors import ConfigError, InputError
from medtl.evaluation.bootstrap import weighted_binary_metrics, weighted_nanmean
from medtl.evaluation.metrics import BINARY_METRICS, binary_metrics, check_binary
from medtl.evaluation.segmentation import segmentation_columns, segmentation_family

#: Columns never taken as subgroups: predictions columns and the manifest's technical/identifying ones.
RESERVED_COLUMNS = frozenset(
    {
        "id",
        "split",
        "y_true",
        "y_pred",
        "y_score",
        "patient",
        "study",
        "series",
        "key_id",
        "path",
        "kind",
        "n_files",
        "shape",
        "spacing",
        "orientation",
        "sha256",
        "label",
        "mask",
        "mask_sha256",
    }
)
MAX_GROUPS = 100
MISSING = "missing"


@dataclass(frozen=True)
class Scores:
    """The audited rows in numeric form: binary labels/scores, or per-case segmentation values."""

    y: np.ndarray | None = None
    s: np.ndarray | None = None
    values: np.ndarray | None = None
    columns: tuple[str, ...] = ()
    y_val: np.ndarray | None = None
    s_val: np.ndarray | None = None

    def point(self, rows: np.ndarray, threshold: float, metrics: Sequence[str]) -> dict[str, float]:
        """Point estimates (scikit-learn for classification) on `rows`."""
        if self.values is None:
            return binary_metrics(self.y[rows], self.s[rows], threshold, metrics=metrics)
        return {m: nanmean(self.values[rows, self.columns.index(m)]) for m in metrics}

    def replicates(
        self, rows: np.ndarray, w: np.ndarray, thresholds: Any, metrics: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Bootstrap replicates on `rows` for weight rows `w` (shape (b, len(rows)))."""
        if self.values is None:
            return weighted_binary_metrics(self.y[rows], self.s[rows], w, thresholds, metrics)
        return {m: weighted_nanmean(self.values[rows, self.columns.index(m)], w) for m in metrics}


def nanmean(v: np.ndarray) -> float:
    """Mean of the finite values, NaN when there are none."""
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def attribute_specs(
    df: pd.DataFrame,
    rows: np.ndarray,
    attributes: Sequence[str] | None,
    intersections: bool | Sequence[Sequence[str]],
) -> list[tuple[str, np.ndarray]]:
    """(attribute name, group label per audited row) for every attribute and intersection.

    Args:
        df: the predictions.
        rows: positions of the audited rows.
        attributes: subgroup columns; None for every column that is not reserved.
        intersections: True (all pairs), False (none) or tuples of attribute names.

    Returns:
        Pairs like ("sex", labels) and ("sex&age_band", labels such as "F&40-64").

    Raises:
        InputError: no subgroup column, or a named column missing.
    """
    if attributes is None:
        attrs = [
            str(c)
            for c in df.columns
            if c not in RESERVED_COLUMNS
            and not str(c).startswith(("y_score_", "y_true_"))
            and segmentation_family(str(c)) is None
        ]
    else:
        attrs = [str(a) for a in attributes]
    if not attrs:
        raise InputError(
            "predictions must have subgroup columns (sex, age_band, site, scanner, ...), not none; "
            "add them or pass attributes="
        )
    if intersections is True:
        combos = list(itertools.combinations(attrs, 2))
    elif intersections is False:
        combos = []
    else:
        combos = [tuple(str(a) for a in c) for c in intersections]
    labels = {a: group_labels(df, a, rows) for combo in [attrs, *combos] for a in combo}
    specs = [(a, labels[a]) for a in attrs]
    for combo in combos:
        joined = ["&".join(parts) for parts in zip(*(labels[a] for a in combo), strict=True)]
        specs.append(("&".join(combo), np.asarray(joined, dtype=object)))
    return specs


def without_repeating_intersections(
    df: pd.DataFrame, rows: np.ndarray, specs: list[tuple[str, np.ndarray]], split: str
) -> tuple[list[tuple[str, np.ndarray]], list[dict[str, str]]]:
    """The specs without intersections that repeat another attribute, and those left out with why.

    An intersection with an attribute of a single value in the audited split ("sex&age_band"
    when every test patient is 0-17) has the other attribute's groups under longer names. Its
    gaps would be tested twice and widen every tested CI through the Bonferroni correction.

    Args:
        df: the predictions.
        rows: positions of the audited rows.
        specs: from `attribute_specs`.
        split: the audited split's name, for the reasons ("test").

    Returns:
        The kept specs, and {"attribute", "reason"} for each intersection left out.
    """
    kept, left_out = [], []
    for name, labels in specs:
        parts = name.split("&")
        if name in df.columns or len(parts) < 2 or not all(p in df.columns for p in parts):
            kept.append((name, labels))
            continue
        single = [p for p in parts if len(set(group_labels(df, p, rows).tolist())) == 1]
        if not single:
            kept.append((name, labels))
            continue
        others = [p for p in parts if p not in single]
        repeated = f"those of {'&'.join(others)}" if others else f"the whole {split} split"
        left_out.append({"attribute": name, "reason": (
            f"{' and '.join(single)} {'has' if len(single) == 1 else 'have'} one value for every {split} "
            f"patient, so its groups are {repeated}; left out of the tested gaps and the multiple-testing "
            "correction")})
    return kept, left_out


def read_scores(
    df: pd.DataFrame,
    rows: np.ndarray,
    val_rows: np.ndarray,
    *,
    task: str,
    positive_class: Any = None,
    required: Sequence[str] = (),
) -> Scores:
    """The audited (and validation) rows in numeric form, validated.

    Args:
        df: the predictions.
        rows: positions of the audited rows.
        val_rows: positions of the validation rows (may be empty).
        task: "classification" or "segmentation".
        positive_class: class audited one-vs-rest for y_score_<class> columns.
        required: segmentation columns that must exist (the gap metrics).

    Returns:
        A Scores record.

    Raises:
        InputError: missing columns or invalid values.
        ConfigError: multi-class predictions without a positive_class.
    """
    if task == "segmentation":
        cols = tuple(segmentation_columns([str(c) for c in df.columns]))
        if not cols:
            raise InputError(
                "segmentation predictions must have per-case columns (dice_<class>, hd95_<class>, ...), "
                "not none; join segmentation_case_metrics(...) on id"
            )
        missing = [m for m in required if m not in cols]
        if missing:
            raise InputError(
                f"segmentation predictions must have the gap metric columns {', '.join(missing)}, not "
                "lack them; use segmentation_case_metrics(...) or set gap_metrics"
            )
        return Scores(values=df.iloc[rows][list(cols)].to_numpy(dtype=np.float64), columns=cols)
    y_all, s_all, name = _binary_columns(df, positive_class)
    y, s = check_binary(y_all[rows], s_all[rows], name=name)
    if val_rows.size == 0:
        return Scores(y=y, s=s, columns=BINARY_METRICS)
    yv, sv = check_binary(y_all[val_rows], s_all[val_rows], name=f"validation {name}")
    return Scores(y=y, s=s, columns=BINARY_METRICS, y_val=yv, s_val=sv)


def _binary_columns(df: pd.DataFrame, positive_class: Any) -> tuple[np.ndarray, np.ndarray, str]:
    if positive_class is None:
        if "y_score" not in df.columns:
            classes = [str(c)[len("y_score_") :] for c in df.columns if str(c).startswith("y_score_")]
            raise ConfigError(
                f"positive_class must name the class audited one-vs-rest ({', '.join(classes) or 'none'}), "
                "not None; set positive_class, or provide a binary y_score column"
            )
        return (
            column(df, "y_true").to_numpy(),
            column(df, "y_score").to_numpy(dtype=np.float64),
            "y_score",
        )
    name = f"y_score_{positive_class}"
    score = column(df, name).to_numpy(dtype=np.float64)
    if f"y_true_{positive_class}" in df.columns:  # multi-label: one indicator column per label
        return df[f"y_true_{positive_class}"].to_numpy(), score, name
    truth = column(df, "y_true").astype(str).to_numpy() == str(positive_class)
    return truth.astype(np.int64), score, name


def column(df: pd.DataFrame, name: str) -> pd.Series:
    """A column of the predictions, or an InputError naming it."""
    if not isinstance(df, pd.DataFrame):
        raise InputError(
            f"predictions must be a pandas DataFrame, not {type(df).__name__}; pd.read_csv predictions.csv"
        )
    if name not in df.columns:
        raise InputError(
            f"predictions must have a {name!r} column, not lack it; columns present: "
            f"{', '.join(map(str, df.columns[:20]))}"
        )
    return df[name]


def group_labels(df: pd.DataFrame, attribute: str, rows: np.ndarray) -> np.ndarray:
    """Group label per audited row as text; missing values form the group "missing"."""
    values = column(df, attribute).iloc[rows]
    return np.asarray([MISSING if pd.isna(v) else str(v) for v in values], dtype=object)


def align_reference(reference: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """The reference's rows in the order of the model's predictions (matched on id)."""
    ref = column(reference, "id")
    if ref.duplicated().any():
        raise InputError("reference_predictions ids must be unique, not repeated; write one row per id")
    ids = column(predictions, "id")
    indexed = reference.set_index("id")
    missing = int((~ids.isin(indexed.index)).sum())
    if missing:
        raise InputError(
            f"reference_predictions must cover every id of the predictions, not miss {missing}; "
            "predict the reference on the same manifest"
        )
    aligned = indexed.loc[ids.to_numpy()].reset_index()
    aligned["split"] = predictions["split"].to_numpy()
    return aligned
