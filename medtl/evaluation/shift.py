"""Dataset shift: a training data reference profile, its comparison with external data, per-study flags.

A trained model keeps a *reference profile* of its training data: aggregates only, never a row.
Later the profile of an external data set is compared with it (`compare_profiles`: is the
external validation set like the training data?), and single new studies are checked against it
(`within_distribution`: is this study inside what the model was trained on?).

Privacy of the profile (it travels with the model, so treat it as published):

- categorical attributes keep the share of a value only when at least `min_count` studies have
  it. Rarer values are merged into "other", because a small cell can identify someone (the one
  patient from a rare scanner, or aged 90+). When "other" itself would hold fewer than
  `min_count` studies, the smallest kept values join it until it does: with a known vocabulary
  (sex codes, age bands) an "other" of one missing value *is* that value (complementary
  suppression, as in `medtl.evaluation.suppression`);
- a numeric distribution is kept only when at least `min_count` studies have the value, and its
  quantile levels are clamped so that `min_count` studies lie at or beyond every reported
  quantile (the p01 of 100 studies would otherwise be one study's own value);
- the score histogram merges neighbouring bins until each holds no study or at least
  `min_count` studies.

Thresholds (module constants): total variation distance > 0.2 for categorical attributes,
|standardized mean difference| > 0.5 for numeric ones, population stability index > 0.25 for
the scores: the usual "large" cut-offs (Cohen's d of 0.5 is a medium effect; PSI above 0.25 is
the credit-scoring rule for a significant population change).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from medtl.errors import InputError

SCHEMA_VERSION = 1
#: Fewest studies behind any published aggregate (a value's share, a distribution, a histogram bin).
MIN_COUNT = 5
TVD_THRESHOLD = 0.2
SMD_THRESHOLD = 0.5
PSI_THRESHOLD = 0.25
#: Floor of a bin's share in the PSI, so an empty bin on one side gives a large, finite term.
PSI_EPSILON = 1e-4
#: How far `within_distribution` widens a training [p01, p99] range, as a fraction of its width
#: (or of its larger end's magnitude when that is larger, since one image size gives zero width).
WIDEN = 0.5
HIST_BINS = 20
QUANTILES = {"p01": 0.01, "p05": 0.05, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p95": 0.95, "p99": 0.99}
CATEGORICAL = ("modality", "scanner", "site", "sex", "age_band")
#: Pseudonymised attributes: a new study's value may hide in "other", so "other" counts as seen.
PSEUDONYMISED = ("scanner", "site")
UNKNOWN_VALUE = "unknown"  # the manifest's code for an absent institution or scanner
# Small cells are merged for the attributes that, combined, can single a patient out. The modality
# is a property of the examination, not of the person: its shares stay exact, or a set of 45 DX and
# 3 CR studies would become all "other" and every DX study would look unseen to the checks.
QUASI_IDENTIFIERS = ("scanner", "site", "sex", "age_band")
INTENSITY_STATS = ("mean", "std", "p01", "p50", "p99")
MAX_AXES = 3
OTHER = "other"
MISSING = "(missing)"

REASON_MODALITY = "modality not seen in training"
REASON_SCANNER = "scanner not seen in training"
REASON_SIZE = "image size outside the training range"
REASON_SPACING = "voxel spacing outside the training range"
REASON_INTENSITY = "intensity outside the training range"
REASON_SCORE = "score outside the validation score range"

_REQUIRED_COLUMNS = (*CATEGORICAL, "shape", "spacing")
_DIMS = re.compile(r"^\s*\d+(\.\d+)?(\s*x\s*\d+(\.\d+)?)*\s*$")


def intensity_stats(array: np.ndarray) -> dict[str, float]:
    """Summary of one study's raw loaded image over its finite values.

    Args:
        array: The image as loaded (any shape, any numeric dtype).

    Returns:
        {"mean", "std", "p01", "p50", "p99"} as floats.

    Raises:
        InputError: when the array has no finite value.

    Example:
        >>> intensity_stats(np.arange(101.0))["p50"]
        50.0
    """
    values = np.asarray(array, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise InputError("the image must have at least one finite value, not none; check how it was loaded")
    p01, p50, p99 = np.percentile(values, [1, 50, 99])
    return {"mean": float(values.mean()), "std": float(values.std()),
            "p01": float(p01), "p50": float(p50), "p99": float(p99)}


def build_profile(
    rows: pd.DataFrame,
    intensities: Sequence[Mapping[str, float]],
    scores: Sequence[float] | None,
    *,
    min_count: int = MIN_COUNT,
) -> dict[str, Any]:
    """The reference profile of a data set: shares, size/spacing/intensity and score distributions.

    Args:
        rows: Manifest rows (str columns modality, scanner, site, sex, age_band, shape, spacing).
        intensities: `intensity_stats` of the studies (one per study; only aggregates are kept).
        scores: Predicted scores in [0, 1] (the validation predictions for a training profile),
            or None.
        min_count: Fewest studies behind any published aggregate.

    Returns:
        A JSON-serialisable dict: schema_version, n_studies, min_count, categorical
        (attribute -> value -> share), numeric (name -> distribution or None) and scores
        (distribution with a histogram, or None). A distribution is {"n", "mean", "std",
        "quantiles": {"p01", ..., "p99"}}.

    Raises:
        InputError: when a column is missing, a shape or spacing is malformed, a score lies
            outside [0, 1], or there are fewer than `min_count` studies.

    Example:
        >>> profile = build_profile(rows, [intensity_stats(a) for a in arrays], val_scores)
        >>> profile["categorical"]["modality"]
        {'DX': 0.68, 'CR': 0.23, 'CT': 0.09}
    """
    if not isinstance(min_count, int) or min_count < 1:
        raise InputError(f"min_count must be a positive integer, not {min_count!r}")
    missing = [c for c in _REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise InputError(f"rows must have the columns {', '.join(_REQUIRED_COLUMNS)}; "
                         f"missing {', '.join(missing)}")
    if len(rows) < min_count:
        raise InputError(f"a profile needs at least {min_count} studies, not {len(rows)}; "
                         "a smaller set's aggregates would describe individuals")
    text = rows.loc[:, list(_REQUIRED_COLUMNS)].fillna("").astype(str)
    numeric: dict[str, dict[str, Any] | None] = {}
    shapes = [_dims(v, "shape") for v in text["shape"]]
    numeric["size.voxels"] = _distribution([math.prod(s) for s in shapes if s], min_count)
    numeric.update(_axis_distributions("size", shapes, min_count))
    numeric.update(_axis_distributions("spacing", [_dims(v, "spacing") for v in text["spacing"]], min_count))
    for stat in INTENSITY_STATS:
        values = [_intensity_value(i, stat) for i in intensities]
        numeric[f"intensity.{stat}"] = _distribution(values, min_count)
    return {
        "schema_version": SCHEMA_VERSION,
        "n_studies": len(rows),
        "min_count": min_count,
        "categorical": {a: _shares(text[a], min_count if a in QUASI_IDENTIFIERS else 1) for a in CATEGORICAL},
        # Which keyed pseudonyms training saw, without counts: the per-study check needs membership,
        # and "other" (rare values merged) would otherwise hide every unseen scanner or site.
        "seen": {a: sorted({v for v in text[a] if v and v != UNKNOWN_VALUE}) for a in PSEUDONYMISED},
        "numeric": numeric,
        "scores": None if scores is None else _score_profile(scores, min_count),
    }


def compare_profiles(reference: Mapping[str, Any], external: Mapping[str, Any]) -> dict[str, Any]:
    """Dataset shift of an external profile against the reference (training) profile.

    Categorical attributes are compared by total variation distance (TVD: the share of studies
    that would have to change value to match), numeric ones by standardized mean difference
    (SMD, pooled SD) and the scores by population stability index (PSI) over the score
    histogram bins both profiles keep. Values merged into "other" on one side are merged on
    both, so the TVD and PSI use only what both profiles can tell apart.

    Args:
        reference: `build_profile` of the training data (scores: validation predictions).
        external: `build_profile` of the external data.

    Returns:
        {"schema_version", "thresholds", "attributes": name -> entry, "flagged": [names],
        "shifted": bool}. Every entry has kind, measure, value (None when not comparable),
        flagged and note; categorical entries add shares, numeric and score entries add
        quantiles ({"p01": {"reference", "external"}, ...}) and n, scores add
        median_difference.

    Raises:
        InputError: when either profile is not a `build_profile` result of this schema version.

    Example:
        >>> comparison = compare_profiles(training_profile, external_profile)
        >>> comparison["shifted"], comparison["flagged"]
        (True, ['scanner', 'scores'])
    """
    for name, profile in (("reference", reference), ("external", external)):
        if not isinstance(profile, Mapping) or profile.get("schema_version") != SCHEMA_VERSION:
            found = profile.get("schema_version") if isinstance(profile, Mapping) else type(profile).__name__
            raise InputError(f"{name} must be a shift profile of schema_version {SCHEMA_VERSION}, "
                             f"not {found!r}; rebuild it with build_profile")
    attributes: dict[str, dict[str, Any]] = {}
    for attribute in CATEGORICAL:
        attributes[attribute] = _compare_shares(attribute, reference["categorical"].get(attribute) or {},
                                                external["categorical"].get(attribute) or {})
    for name, ref in reference["numeric"].items():
        attributes[name] = _compare_numeric(name, ref, external["numeric"].get(name))
    attributes["scores"] = _compare_scores(reference.get("scores"), external.get("scores"))
    flagged = [name for name, entry in attributes.items() if entry["flagged"]]
    return {
        "schema_version": SCHEMA_VERSION,
        "thresholds": {"tvd": TVD_THRESHOLD, "smd": SMD_THRESHOLD, "psi": PSI_THRESHOLD},
        "attributes": attributes,
        "flagged": flagged,
        "shifted": bool(flagged),
    }


def within_distribution(
    reference: Mapping[str, Any],
    row: Mapping[str, str],
    intensity: Mapping[str, float] | None,
    score: float | None,
) -> tuple[bool, list[str]]:
    """Whether one new study lies within the training distribution, and if not, why.

    A study is outside when its modality or scanner was not seen in training ("other" counts as
    seen for the pseudonymised scanner only, since a rare scanner hides there); its image size
    or spacing (voxels and every axis) lies outside the training [p01, p99] widened by `WIDEN`;
    its intensity p50 or p99 lies outside the training [p01, p99] of that statistic, widened
    alike; or its score lies outside the validation scores' [p01, p99]. A check is skipped when
    the study or the profile lacks the value (no spacing in a PNG, no intensity profile).

    Args:
        reference: `build_profile` of the training data.
        row: The study's manifest row (str values; an empty value is a missing one; a key the row
            lacks is not checked).
        intensity: `intensity_stats` of the study's image, or None.
        score: The model's score for the study, or None.

    Returns:
        (inside, reasons): reasons are fixed strings (the REASON_* constants), never values.

    Raises:
        InputError: when the row's shape or spacing is malformed.

    Example:
        >>> within_distribution(profile, {**training_row, "modality": "MR"}, stats, 0.3)
        (False, ['modality not seen in training'])
    """
    reasons: list[str] = []
    categorical, numeric = reference["categorical"], reference["numeric"]
    for attribute, reason in (("modality", REASON_MODALITY), ("scanner", REASON_SCANNER)):
        if attribute not in row:  # not known for this study (a served image has no scanner pseudonym)
            continue
        seen = categorical.get(attribute) or {}
        value = str(row.get(attribute) or "") or MISSING
        listed = (reference.get("seen") or {}).get(attribute)
        if listed is not None and value not in (MISSING, UNKNOWN_VALUE):
            unseen = value not in listed  # the pseudonyms training saw (profiles from now on)
        else:
            unseen = value not in seen and not (attribute in PSEUDONYMISED and OTHER in seen)
        if unseen:
            reasons.append(reason)
    shape = _dims(str(row.get("shape") or ""), "shape")
    if shape and numeric.get("size.voxels") is not None:
        keys = ["size.voxels", *(f"size.axis{i}" for i in range(len(shape)))]
        if not _all_inside([math.prod(shape), *shape], [numeric.get(k) for k in keys]):
            reasons.append(REASON_SIZE)
    spacing = _dims(str(row.get("spacing") or ""), "spacing")
    if spacing and numeric.get("spacing.axis0") is not None:
        if not _all_inside(list(spacing), [numeric.get(f"spacing.axis{i}") for i in range(len(spacing))]):
            reasons.append(REASON_SPACING)
    if intensity is not None:
        stats = [s for s in ("p50", "p99") if numeric.get(f"intensity.{s}") is not None]
        if stats and not _all_inside([_intensity_value(intensity, s) for s in stats],
                                     [numeric[f"intensity.{s}"] for s in stats]):
            reasons.append(REASON_INTENSITY)
    scores = reference.get("scores")
    if score is not None and scores is not None and _far_from_scores(score, scores["histogram"]):
        reasons.append(REASON_SCORE)
    return not reasons, reasons


def _far_from_scores(score: float, histogram: Mapping[str, Sequence[float]]) -> bool:
    """Whether a score lies more than one histogram bin (1 / HIST_BINS) away from every validation score.

    A quantile range would flag a fixed share of ordinary studies (with 10 validation scores the
    clamped [p01, p99] holds only the middle ones); the histogram's support, padded by one bin,
    flags only scores where validation had none nearby.
    """
    if not math.isfinite(score):
        return True
    edges, shares = histogram["edges"], histogram["shares"]
    pad = 1.0 / HIST_BINS
    support = [(lo, hi) for lo, hi, share in zip(edges[:-1], edges[1:], shares, strict=True) if share > 0]
    return all(score < lo - pad - 1e-12 or score > hi + pad + 1e-12 for lo, hi in support)


def render_shift_html(comparison: Mapping[str, Any]) -> str:
    """The "Dataset shift" section of a report: one table row per compared attribute.

    Args:
        comparison: A `compare_profiles` result.

    Returns:
        An HTML fragment, `<section id="shift">...</section>`; every text is escaped.

    Example:
        >>> render_shift_html(compare_profiles(training, external)).startswith('<section id="shift">')
        True
    """
    e = html.escape
    thresholds = comparison.get("thresholds", {})
    rows = []
    for name, entry in comparison.get("attributes", {}).items():
        flagged = bool(entry.get("flagged"))
        note = e(str(entry.get("note", "")))
        rows.append(
            f'<tr class="{"flagged" if flagged else ""}"><td title="{note}">{e(str(name))}</td>'
            f"<td>{e(_MEASURES.get(entry.get('measure'), str(entry.get('measure'))))}</td>"
            f"<td>{e(_format(entry.get('value')))}</td><td>{'yes' if flagged else 'no'}</td></tr>"
        )
    verdict = ("Shift detected in: " + ", ".join(str(n) for n in comparison.get("flagged", []))
               if comparison.get("shifted") else "No attribute shows a shift above its threshold.")
    explanation = (
        "The external data are compared with an aggregate profile of the training data (no study-level "
        "values are stored). A row is flagged when the total variation distance exceeds "
        f"{thresholds.get('tvd')} "
        f"(categorical attributes), the standardized mean difference exceeds {thresholds.get('smd')} in "
        f"magnitude (sizes, spacing, intensities) or the population stability index of the scores exceeds "
        f"{thresholds.get('psi')}."
    )
    return (
        '<section id="shift"><h2>Dataset shift</h2>'
        f"<p>{e(explanation)}</p><p><strong>{e(verdict)}</strong></p>"
        '<table class="shift"><thead><tr><th>attribute</th><th>measure</th><th>value</th>'
        f"<th>flagged</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


_MEASURES = {"tvd": "total variation distance", "smd": "standardized mean difference",
             "psi": "population stability index"}


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _dims(text: str, column: str) -> tuple[float, ...]:
    """"128x128" -> (128.0, 128.0); "" -> ()."""
    if not text.strip():
        return ()
    if not _DIMS.match(text):
        raise InputError(f"{column} must be numbers joined by 'x' (like '128x128' or '0.8x0.7x2.5'), "
                         f"not {text!r}; check the manifest's {column} column")
    return tuple(float(part) for part in text.split("x"))


def _intensity_value(intensity: Mapping[str, float], stat: str) -> float:
    if not isinstance(intensity, Mapping) or stat not in intensity:
        raise InputError(f"intensity stats must be mappings with the keys {', '.join(INTENSITY_STATS)}; "
                         f"'{stat}' is missing; compute them with intensity_stats")
    return float(intensity[stat])


def _shares(values: pd.Series, min_count: int) -> dict[str, float]:
    """Share of each value among all studies; rarer than `min_count` merged into OTHER."""
    counts = values.replace("", MISSING).value_counts()
    n = int(counts.sum())
    # A value spelled "other" joins the bucket of merged values rather than colliding with it.
    kept = {str(k): int(c) for k, c in counts.items() if c >= min_count and k != OTHER}
    other = n - sum(kept.values())
    # Complementary suppression: a small "other" of a known vocabulary names the values missing.
    while 0 < other < min_count and kept:
        smallest = min(kept, key=lambda k: (kept[k], k))
        other += kept.pop(smallest)
    shares = {k: c / n for k, c in sorted(kept.items(), key=lambda kv: (-kv[1], kv[0]))}
    if other:
        shares[OTHER] = other / n
    return shares


def _axis_distributions(prefix: str, dims: list[tuple[float, ...]], min_count: int) -> dict[str, Any]:
    # Every axis key is always present (None when rare or absent), so a key's presence never
    # tells that a few 3D studies exist.
    return {f"{prefix}.axis{i}": _distribution([d[i] for d in dims if len(d) > i], min_count)
            for i in range(MAX_AXES)}


def _quantiles(values: np.ndarray, min_count: int) -> dict[str, float]:
    """Quantiles with their positions clamped so `min_count` values lie at or beyond each."""
    ordered = np.sort(values)
    n = ordered.size
    lo, hi = min(min_count - 1, (n - 1) / 2), max(n - min_count, (n - 1) / 2)
    positions = np.clip([q * (n - 1) for q in QUANTILES.values()], lo, hi)
    return {name: float(np.interp(p, np.arange(n), ordered))
            for name, p in zip(QUANTILES, positions, strict=True)}


def _distribution(values: Sequence[float], min_count: int) -> dict[str, Any] | None:
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size < min_count:
        return None
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    quantiles = _quantiles(array, min_count)
    return {"n": int(array.size), "mean": float(array.mean()), "std": std, "quantiles": quantiles}


def _score_profile(scores: Sequence[float], min_count: int) -> dict[str, Any] | None:
    array = np.asarray(scores, dtype=np.float64).ravel()
    if array.size and not (np.all(np.isfinite(array)) and array.min() >= 0.0 and array.max() <= 1.0):
        raise InputError("scores must be finite probabilities in [0, 1], not values outside it; "
                         "pass the positive-class probability")
    profile = _distribution(array, min_count)
    if profile is not None:
        counts, _ = np.histogram(array, bins=HIST_BINS, range=(0.0, 1.0))
        profile["histogram"] = _merged_histogram(counts, min_count)
    return profile


def _merged_histogram(counts: np.ndarray, min_count: int) -> dict[str, list[float]]:
    """Merge neighbouring bins until each holds no study or at least `min_count` studies."""
    edges, groups, accumulated = [0], [], 0
    for index, count in enumerate(counts, start=1):
        if accumulated == 0 and count == 0:
            edges.append(index)
            groups.append(0)
            continue
        accumulated += int(count)
        if accumulated >= min_count:
            edges.append(index)
            groups.append(accumulated)
            accumulated = 0
    if accumulated:  # a small last group joins the last non-empty group (and the empty bins between)
        last = max(i for i, g in enumerate(groups) if g > 0)
        edges = [*edges[: last + 1], len(counts)]
        groups = [*groups[:last], sum(groups[last:]) + accumulated]
    total = sum(groups)
    return {"edges": [i / HIST_BINS for i in edges], "shares": [g / total for g in groups]}


def _coarsen(histogram: Mapping[str, Sequence[float]], common: list[int]) -> np.ndarray:
    """Shares of a merged histogram summed into the bins between `common` edge indices."""
    bounds = [round(e * HIST_BINS) for e in histogram["edges"]]
    shares = np.zeros(len(common) - 1)
    for start, share in zip(bounds[:-1], histogram["shares"], strict=True):
        shares[np.searchsorted(common, start, side="right") - 1] += share
    return shares


def _psi(reference: Mapping[str, Any], external: Mapping[str, Any]) -> float:
    ref_edges, ext_edges = ({round(e * HIST_BINS) for e in h["edges"]} for h in (reference, external))
    common = sorted(ref_edges & ext_edges)
    ref = np.maximum(_coarsen(reference, common), PSI_EPSILON)
    ext = np.maximum(_coarsen(external, common), PSI_EPSILON)
    return float(np.sum((ext - ref) * np.log(ext / ref)))


def _compare_shares(
    attribute: str, reference: Mapping[str, float], external: Mapping[str, float]
) -> dict[str, Any]:
    # A value only one side shows may hide in the other side's "other": merge it there on both.
    def hidden(key: str, side: Mapping[str, float]) -> bool:
        return key not in side and side.get(OTHER, 0) > 0

    merged = {k for k in set(reference) | set(external)
              if k != OTHER and (hidden(k, reference) or hidden(k, external))}

    def fold(shares: Mapping[str, float]) -> dict[str, float]:
        folded: dict[str, float] = {}
        for key, share in shares.items():
            target = OTHER if key in merged else key
            folded[target] = folded.get(target, 0.0) + share
        return folded

    ref, ext = fold(reference), fold(external)
    keys = [*ref, *(k for k in ext if k not in ref)]
    tvd = 0.5 * sum(abs(ref.get(k, 0.0) - ext.get(k, 0.0)) for k in keys) if ref and ext else None
    flagged = tvd is not None and tvd > TVD_THRESHOLD
    note = (f"{attribute}: not recorded on one side" if tvd is None else
            f"{attribute}: {tvd:.0%} of studies would need another value to match the training mix"
            + (f" (above {TVD_THRESHOLD:.0%})" if flagged else ""))
    return {"kind": "categorical", "measure": "tvd", "value": tvd, "flagged": flagged, "note": note,
            "shares": {k: {"reference": ref.get(k, 0.0), "external": ext.get(k, 0.0)} for k in keys}}


def _side_by_side(reference: Mapping[str, Any] | None, external: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "n": {"reference": reference["n"] if reference else None,
              "external": external["n"] if external else None},
        "quantiles": {q: {"reference": reference["quantiles"][q] if reference else None,
                          "external": external["quantiles"][q] if external else None} for q in QUANTILES},
    }


def _compare_numeric(
    name: str, reference: Mapping[str, Any] | None, external: Mapping[str, Any] | None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": "numeric", "measure": "smd", "value": None, "flagged": False}
    entry.update(_side_by_side(reference, external))
    if reference is None or external is None:
        entry["note"] = f"{name}: too few studies with this value on one side to compare"
        return entry
    difference = external["mean"] - reference["mean"]
    pooled = math.sqrt((reference["std"] ** 2 + external["std"] ** 2) / 2)
    if pooled > 0:
        smd = difference / pooled
        entry["value"], entry["flagged"] = smd, abs(smd) > SMD_THRESHOLD
        direction = "higher" if smd > 0 else "lower"
        entry["note"] = (f"{name}: external mean is {abs(smd):.2f} standard deviations {direction} "
                         "than training"
                         + (f" (above {SMD_THRESHOLD})" if entry["flagged"] else ""))
    else:  # constant on both sides (one image size): any difference is a shift, an SMD is undefined
        entry["value"] = 0.0 if difference == 0 else None
        entry["flagged"] = difference != 0
        same = "different" if difference else "the same"
        entry["note"] = f"{name}: one constant value on each side, {same}"
    return entry


def _compare_scores(
    reference: Mapping[str, Any] | None, external: Mapping[str, Any] | None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": "scores", "measure": "psi", "value": None, "flagged": False,
                             "median_difference": None}
    entry.update(_side_by_side(reference, external))
    if reference is None or external is None:
        entry["note"] = "scores: no score distribution on one side to compare"
        return entry
    psi = _psi(reference["histogram"], external["histogram"])
    median = external["quantiles"]["p50"] - reference["quantiles"]["p50"]
    entry.update(value=psi, flagged=psi > PSI_THRESHOLD, median_difference=median)
    entry["note"] = (f"scores: population stability index {psi:.2f} against the validation scores"
                     + (f" (above {PSI_THRESHOLD})" if entry["flagged"] else "")
                     + f"; median score {median:+.2f}")
    return entry


def _widened(distribution: Mapping[str, Any]) -> tuple[float, float]:
    lo, hi = distribution["quantiles"]["p01"], distribution["quantiles"]["p99"]
    margin = WIDEN * max(hi - lo, abs(lo), abs(hi))
    return lo - margin, hi + margin


def _all_inside(values: Sequence[float], distributions: Sequence[Mapping[str, Any] | None]) -> bool:
    """Every value within its widened training range; a missing distribution means never seen."""
    for value, distribution in zip(values, distributions, strict=True):
        if distribution is None or not math.isfinite(value):
            return False
        lo, hi = _widened(distribution)
        if not lo <= value <= hi:
            return False
    return True
