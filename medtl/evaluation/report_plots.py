"""The figures of the evaluation report, drawn with matplotlib and returned as inline PNG data URIs.

Every function takes plain data (lists and mappings of numbers, as the evaluation layer writes
them to JSON) and returns a `Plot`: a `data:image/png;base64,...` URI and the alt text a screen
reader (or a reviewer reading the HTML source) gets instead of the picture. Figures are built on
`matplotlib.figure.Figure` with the Agg canvas, never through `pyplot`, so rendering a report
neither changes the caller's backend nor keeps global figure state. PNGs are written without
the "Software" chunk so that the same inputs give byte-identical images on any matplotlib.

Per-case values (Dice of each case) are only ever drawn as distributions; no function here
labels a point with a case or patient.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# A restrained palette that stays distinguishable in grey-scale print and for red-green colour
# blindness (Okabe-Ito blue/vermillion/green + greys).
BLUE = "#0072B2"
ORANGE = "#D55E00"
GREEN = "#009E73"
PURPLE = "#CC79A7"
GREY = "#6b7280"
LIGHT = "#d1d5db"
SERIES = (BLUE, ORANGE, GREEN, PURPLE, "#E69F00", "#56B4E9", GREY)

DPI = 110
_RC = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 8,
}


class Plot(NamedTuple):
    """One rendered figure: an inline PNG URI, its alt text and its size in CSS pixels."""

    uri: str
    alt: str
    width: int
    height: int


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _encode(fig: Figure, alt: str) -> Plot:
    buffer = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    width, height = fig.get_size_inches() * DPI
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return Plot(uri, alt, int(round(width)), int(round(height)))


def _floats(values: Any) -> np.ndarray:
    return np.asarray([np.nan if v is None else float(v) for v in (values or [])], dtype=float)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _curve_panel(ax: Any, curves: Mapping[str, Mapping[str, Any]], x_key: str, y_key: str,
                 labels: Mapping[str, str]) -> None:
    """Draw one line per curve; a curve with `<y_key>_lo`/`<y_key>_hi` gets its CI band."""
    for colour, (name, curve) in zip(SERIES * 4, curves.items(), strict=False):
        x, y = _floats(curve.get(x_key)), _floats(curve.get(y_key))
        lo, hi = curve.get(f"{y_key}_lo"), curve.get(f"{y_key}_hi")
        if lo is not None and hi is not None:
            ax.fill_between(x, _floats(lo), _floats(hi), color=colour, alpha=0.18, linewidth=0,
                            label="95% CI band")
        ax.plot(x, y, color=colour, linewidth=1.8, label=labels.get(name, name))


def roc_plot(curves: Mapping[str, Mapping[str, Any]], *, labels: Mapping[str, str] | None = None,
             operating_point: tuple[float, float] | None = None) -> Plot:
    """ROC curves (one, or one-vs-rest per class) with optional bootstrap bands and operating point.

    Args:
        curves: Curve name -> `{"fpr": [...], "tpr": [...]}` (the `roc` of
            `metrics.classification_report_data`), optionally `tpr_lo`/`tpr_hi` on the same grid.
        labels: Curve name -> legend text (e.g. "AUROC 0.912 [0.881, 0.940]").
        operating_point: (fpr, tpr) at the operating threshold, if known.

    Returns:
        The figure as a `Plot`.
    """
    labels = dict(labels or {})
    with matplotlib.rc_context(_RC):
        fig = _new_figure(4.6, 4.2)
        ax = fig.add_subplot()
        _curve_panel(ax, curves, "fpr", "tpr", labels)
        ax.plot([0, 1], [0, 1], color=GREY, linestyle=":", linewidth=1, label="chance")
        if operating_point is not None:
            ax.plot(*operating_point, marker="o", color=ORANGE, markersize=6, linestyle="none",
                    label="operating point")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
               ylabel="True positive rate (sensitivity)", title="ROC curve (test set)")
        ax.set_aspect("equal")
        ax.legend(loc="lower right")
        fig.tight_layout()
    alt = "ROC curve of the test set: " + "; ".join(labels.get(n, n) for n in curves)
    if operating_point is not None:
        alt += f"; operating point at FPR {_fmt(operating_point[0])}, sensitivity {_fmt(operating_point[1])}"
    return _encode(fig, alt + ".")


def pr_plot(curves: Mapping[str, Mapping[str, Any]], *, labels: Mapping[str, str] | None = None,
            prevalence: float | None = None) -> Plot:
    """Precision-recall curves with optional bands and the prevalence baseline.

    Args:
        curves: Curve name -> `{"recall": [...], "precision": [...]}`, optionally
            `precision_lo`/`precision_hi`.
        labels: Curve name -> legend text.
        prevalence: Positive fraction of the test set (the no-skill precision), if binary.

    Returns:
        The figure as a `Plot`.
    """
    labels = dict(labels or {})
    with matplotlib.rc_context(_RC):
        fig = _new_figure(4.6, 4.2)
        ax = fig.add_subplot()
        _curve_panel(ax, curves, "recall", "precision", labels)
        if prevalence is not None:
            ax.axhline(float(prevalence), color=GREY, linestyle=":", linewidth=1,
                       label=f"prevalence {_fmt(float(prevalence), 2)}")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall (sensitivity)", ylabel="Precision (PPV)",
               title="Precision-recall curve (test set)")
        ax.set_aspect("equal")
        ax.legend(loc="lower left")
        fig.tight_layout()
    alt = "Precision-recall curve of the test set: " + "; ".join(labels.get(n, n) for n in curves)
    if prevalence is not None:
        alt += f"; prevalence {_fmt(float(prevalence), 2)}"
    return _encode(fig, alt + ".")


def reliability_plot(curves: Mapping[str, Mapping[str, Any]], *, labels: Mapping[str, str] | None = None) -> Plot:
    """Reliability diagram (calibration) with the number of cases per bin underneath.

    Args:
        curves: Curve name -> `metrics.reliability_curve` output (`mean_predicted`,
            `fraction_positive`, `count`; None marks an empty bin).
        labels: Curve name -> legend text (e.g. with the ECE).

    Returns:
        The figure as a `Plot`.
    """
    labels = dict(labels or {})
    with matplotlib.rc_context(_RC):
        fig = _new_figure(4.6, 4.8)
        grid = fig.add_gridspec(2, 1, height_ratios=(4, 1), hspace=0.08)
        ax = fig.add_subplot(grid[0])
        hist = fig.add_subplot(grid[1], sharex=ax)
        ax.plot([0, 1], [0, 1], color=GREY, linestyle=":", linewidth=1, label="perfect calibration")
        n_bins = 0
        for index, (colour, (name, bins)) in enumerate(zip(SERIES * 4, curves.items(), strict=False)):
            pred, true = _floats(bins.get("mean_predicted")), _floats(bins.get("fraction_positive"))
            keep = np.isfinite(pred) & np.isfinite(true)
            n_bins = max(n_bins, int(keep.sum()))
            ax.plot(pred[keep], true[keep], color=colour, marker="o", markersize=4, linewidth=1.6,
                    label=labels.get(name, name))
            lower, upper = _floats(bins.get("bin_lower")), _floats(bins.get("bin_upper"))
            count = _floats(bins.get("count"))
            if index == 0 and count.size and lower.size == count.size == upper.size:
                hist.bar(lower, count, width=upper - lower, align="edge", color=LIGHT, edgecolor=GREY,
                         linewidth=0.5)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="Observed fraction positive",
               title="Calibration (reliability diagram)")
        ax.tick_params(labelbottom=False)
        ax.legend(loc="upper left")
        hist.set(xlabel="Mean predicted probability", ylabel="cases")
        hist.grid(False)
        fig.subplots_adjust(left=0.14, right=0.97, top=0.93, bottom=0.11)
    alt = (f"Reliability diagram of the test set over up to {n_bins} non-empty probability bins: "
           + "; ".join(labels.get(n, n) for n in curves))
    return _encode(fig, alt + ".")


def confusion_plot(labels: Sequence[str], matrix: Sequence[Sequence[float]], *, threshold: float | None = None) -> Plot:
    """Confusion matrix heatmap: counts and row percentages (recall of each true class).

    Args:
        labels: Class names, in the matrix's order.
        matrix: Counts, rows = true class, columns = predicted class.
        threshold: The operating threshold, named in the title.

    Returns:
        The figure as a `Plot`.
    """
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = max(3.6, 1.1 * len(labels) + 2.2)
    with matplotlib.rc_context(_RC):
        fig = _new_figure(size, size * 0.88)
        ax = fig.add_subplot()
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.grid(False)
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                colour = "white" if share[i, j] > 0.6 else "#111827"
                ax.text(j, i, f"{int(counts[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                        color=colour, fontsize=9)
        ticks = range(len(labels))
        ax.set_xticks(ticks, [str(v) for v in labels])
        ax.set_yticks(ticks, [str(v) for v in labels])
        title = "Confusion matrix (test set)"
        if threshold is not None:
            title += f"\nthreshold {_fmt(threshold)}"
        ax.set(xlabel="Predicted", ylabel="True", title=title)
        fig.tight_layout()
    cells = "; ".join(f"true {labels[i]} predicted {labels[j]}: {int(counts[i, j])}"
                      for i in range(counts.shape[0]) for j in range(counts.shape[1]))
    return _encode(fig, f"Confusion matrix of the test set ({cells}).")


class ForestRow(NamedTuple):
    """One line of a forest plot: a label, a point estimate with its CI, and whether it is flagged."""

    label: str
    value: float
    lo: float | None
    hi: float | None
    flagged: bool = False
    muted: bool = False  # e.g. an imprecise estimate: drawn hollow


def forest_plot(panels: Sequence[tuple[str, Sequence[ForestRow], float | None]], *, title: str,
                xlabel: str, reference_line: float | None = 0.0, symmetric_tolerance: bool = True,
                share_x: bool = False) -> Plot:
    """A forest plot with one panel per metric; flagged rows are drawn in vermillion.

    Args:
        panels: (panel title, rows, tolerance or None) triples; a tolerance draws dashed lines at
            +tolerance (and -tolerance when `symmetric_tolerance`).
        title: Figure title.
        xlabel: Label of the x axis.
        reference_line: Where the solid "no difference" line goes (None for none).
        symmetric_tolerance: Draw the tolerance on both sides of the reference line.
        share_x: One x scale for all panels (when they show the same metric).

    Returns:
        The figure as a `Plot`.
    """
    n_rows = sum(max(len(rows), 1) for _, rows, _ in panels)
    height = 0.8 + 0.26 * n_rows + (0.35 if share_x else 0.6) * len(panels)
    with matplotlib.rc_context(_RC):
        fig = _new_figure(8.6, height)
        fig.set_layout_engine("constrained", h_pad=0.06, hspace=0.02)
        axes = fig.subplots(len(panels), 1, sharex=share_x, squeeze=False,
                            height_ratios=[max(len(r), 1) + 0.8 for _, r, _ in panels])[:, 0]
        for ax, (panel_title, rows, tolerance) in zip(axes, panels, strict=True):
            _forest_panel(ax, panel_title, rows, tolerance, reference_line, symmetric_tolerance)
        axes[-1].set_xlabel(xlabel)
        fig.suptitle(title, fontsize=10, fontweight="bold")
    flagged = [f"{p}: {r.label}" for p, rows, _ in panels for r in rows if r.flagged]
    alt = f"{title}: {n_rows} estimates with 95% confidence intervals in {len(panels)} panel(s)"
    alt += f"; flagged: {', '.join(flagged)}." if flagged else "; none flagged."
    return _encode(fig, alt)


def _forest_panel(ax: Any, panel_title: str, rows: Sequence[ForestRow], tolerance: float | None,
                  reference_line: float | None, symmetric: bool) -> None:
    y = np.arange(len(rows))[::-1]
    for yi, row in zip(y, rows, strict=True):
        colour = ORANGE if row.flagged else BLUE
        if row.lo is not None and row.hi is not None:
            ax.plot([row.lo, row.hi], [yi, yi], color=colour, linewidth=1.6, solid_capstyle="butt")
        ax.plot(row.value, yi, marker="D" if row.flagged else "s", markersize=5.5, color=colour,
                markerfacecolor="white" if row.muted else colour, linestyle="none")
    if reference_line is not None:
        ax.axvline(reference_line, color="#374151", linewidth=0.9)
    if tolerance is not None:
        base = reference_line or 0.0
        ax.axvline(base + tolerance, color=ORANGE, linestyle="--", linewidth=0.9)
        if symmetric:
            ax.axvline(base - tolerance, color=ORANGE, linestyle="--", linewidth=0.9)
    ax.set_yticks(y, [r.label for r in rows])
    ax.set_ylim(-0.7, max(len(rows), 1) - 0.3)
    ax.grid(axis="y", visible=False)
    suffix = f"  (tolerance ±{tolerance:g})" if tolerance is not None and symmetric else (
        f"  (tolerance {tolerance:g})" if tolerance is not None else "")
    ax.set_title(panel_title + suffix, loc="left", fontsize=9)


def dice_plot(per_case: Mapping[str, Sequence[float]]) -> Plot:
    """Distribution of per-case Dice for each class: a violin with a box plot inside.

    Args:
        per_case: Class name -> per-case Dice values (drawn only as a distribution).

    Returns:
        The figure as a `Plot`.
    """
    names = list(per_case)
    data = [_floats(per_case[n])[np.isfinite(_floats(per_case[n]))] for n in names]
    with matplotlib.rc_context(_RC):
        fig = _new_figure(max(4.2, 1.3 * len(names) + 2.0), 3.8)
        ax = fig.add_subplot()
        positions = np.arange(1, len(names) + 1)
        drawable = [d if d.size > 1 else np.repeat(d, 2) if d.size else np.array([np.nan, np.nan]) for d in data]
        parts = ax.violinplot(drawable, positions=positions, showextrema=False, widths=0.8)
        for body in parts["bodies"]:
            body.set_facecolor(BLUE)
            body.set_alpha(0.25)
        ax.boxplot(drawable, positions=positions, widths=0.18, showfliers=False,
                   medianprops={"color": ORANGE, "linewidth": 1.6}, boxprops={"color": "#1f2937"},
                   whiskerprops={"color": "#1f2937"}, capprops={"color": "#1f2937"})
        ax.set_xticks(positions, [f"{n}\n(n={d.size})" for n, d in zip(names, data, strict=True)])
        ax.set(ylim=(0, 1.02), ylabel="Dice per case", title="Dice distribution per class (test set)")
        fig.tight_layout()
    summary = "; ".join(
        f"{n}: median {_fmt(float(np.median(d)))}, IQR {_fmt(float(np.percentile(d, 25)))}"
        f"-{_fmt(float(np.percentile(d, 75)))} over {d.size} cases" if d.size else f"{n}: no cases"
        for n, d in zip(names, data, strict=True))
    return _encode(fig, f"Violin and box plots of per-case Dice ({summary}).")


def data_efficiency_plot(benefit: Mapping[str, Mapping[Any, Mapping[str, Any]]], *, metric: str) -> Plot:
    """Test metric against the fraction of training data used, one line per arm, with a shaded band.

    The band is each point's `ci` when the mapping has that key (a study's 95 % CI over seeds; a
    point whose `ci` is None, e.g. one seed, gets no band rather than a made-up one), else ± `sd`.
    The title and the legend say which, so the figure reads correctly out of its caption.

    Args:
        benefit: Arm (e.g. "imagenet", "scratch") -> training fraction -> `{"mean", "sd"}`, optionally
            with `"ci": [low, high] | None`.
        metric: The metric's display name, for the y axis.

    Returns:
        The figure as a `Plot`.

    Example:
        >>> plot = data_efficiency_plot({"scratch": {0.1: {"mean": 0.7, "sd": 0.02, "ci": [0.66, 0.74]},
        ...                                          1.0: {"mean": 0.9, "sd": 0.01, "ci": None}}}, metric="AUROC")
        >>> "95 % CI over seeds" in plot.alt
        True
    """
    with_ci = any(point.get("ci") is not None for points in benefit.values() for point in points.values())
    band = "95 % CI over seeds" if with_ci else "± sd"
    with matplotlib.rc_context(_RC):
        fig = _new_figure(5.6, 3.8)
        ax = fig.add_subplot()
        described = [_efficiency_line(ax, str(arm), points, colour, with_ci)
                     for colour, (arm, points) in zip(SERIES * 4, benefit.items(), strict=False)]
        ax.fill_between([], [], [], color=GREY, alpha=0.25, linewidth=0, label=f"band: {band}")
        ax.set_xscale("log")
        ticks = sorted({float(f) for points in benefit.values() for f in points})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set(xlabel="Fraction of the training set used",
               ylabel=f"{metric} (mean over seeds)" if with_ci else metric,
               title="Data efficiency: mean and 95 % CI over seeds" if with_ci
               else "Data efficiency: transfer vs. other initialisations (mean ± sd)")
        ax.legend(loc="lower right")
        fig.tight_layout()
    note = ("band: 95 % CI over seeds (t-interval of the mean; none for one seed)" if with_ci
            else "band: mean ± sd")
    return _encode(fig, f"Data-efficiency curve of {metric} by training fraction, {note} ({'; '.join(described)}).")


def _efficiency_line(ax: Any, arm: str, points: Mapping[Any, Mapping[str, Any]], colour: str, with_ci: bool) -> str:
    """Draw one arm's mean line and band (95 % CI over seeds, or ± sd); return its alt-text description."""
    fractions = sorted(points, key=float)
    x = np.array([float(f) for f in fractions])
    mean = np.array([float(points[f]["mean"]) for f in fractions])
    if with_ci:
        # NaN leaves a gap in the band: no interval is drawn where there is none.
        cis = [points[f].get("ci") or (math.nan, math.nan) for f in fractions]
        low, high = (np.array([float(c[i]) for c in cis]) for i in (0, 1))
        has = np.isfinite(low) & np.isfinite(high)
        # Error bars too, so that an interval between two points without one still shows
        # (clipped: matplotlib refuses a negative error, as an interval not around its mean gives).
        yerr = np.clip([mean[has] - low[has], high[has] - mean[has]], 0.0, None)
        ax.errorbar(x[has], mean[has], yerr=yerr, fmt="none", ecolor=colour, elinewidth=1.0, capsize=3, alpha=0.8)
    else:
        sd = np.array([float(points[f].get("sd") or 0.0) for f in fractions])
        low, high = mean - sd, mean + sd
        has = np.zeros(len(x), dtype=bool)  # nothing to spell out in the alt text
    ax.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)
    ax.plot(x, mean, color=colour, marker="o", markersize=4, linewidth=1.6, label=arm)
    return f"{arm}: " + ", ".join(
        f"{_fmt(xi, 2)} -> {_fmt(mi)}" + (f" [{_fmt(lo)}, {_fmt(hi)}]" if ok else "")
        for xi, mi, lo, hi, ok in zip(x, mean, low, high, has, strict=True))


# ------------------------------------------------------------ figures composed from report data


def _legend(name: str, entry: Any) -> str:
    if not isinstance(entry, Mapping) or entry.get("value") is None:
        return name
    ci = entry.get("ci")
    text = f"{name} {_fmt(entry['value'])}"
    return text + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci and None not in ci else "")


def classification_figures(curves: Mapping[str, Any], metrics: Mapping[str, Any],
                           threshold: float | None) -> list[tuple[Plot, str]]:
    """ROC, PR, reliability and confusion figures from `metrics.classification_report_data` output.

    Args:
        curves: Binary (`roc`, `pr`, `reliability`, `confusion_matrix`) or multi-class (`per_class`
            of those, `confusion_matrix`) report data.
        metrics: Overall metric -> {"value", "ci"} (legends use AUROC/AUPRC/ECE, the operating
            point uses TPR/FPR).
        threshold: The operating threshold, for the confusion matrix title.

    Returns:
        (plot, caption) pairs, in report order; absent curves are skipped.
    """
    out: list[tuple[Plot, str]] = []
    if "per_class" in curves:
        per = curves["per_class"]
        roc = {c: v["roc"] for c, v in per.items() if v.get("roc")}
        pr = {c: v["pr"] for c, v in per.items() if v.get("pr")}
        rel = {c: v["reliability"] for c, v in per.items() if v.get("reliability")}
        names = {c: f"class {c} vs rest" for c in per}
        prevalence, point = None, None
    else:
        roc = {"model": curves["roc"]} if curves.get("roc") else {}
        pr = {"model": curves["pr"]} if curves.get("pr") else {}
        rel = {"model": curves["reliability"]} if curves.get("reliability") else {}
        counts = np.asarray(curves.get("confusion_matrix", {}).get("matrix", [[0]]), dtype=float)
        prevalence = float(counts[1].sum() / counts.sum()) if counts.shape == (2, 2) and counts.sum() else None
        tpr, fpr = (metrics.get("tpr", {}) or {}).get("value"), (metrics.get("fpr", {}) or {}).get("value")
        point = (float(fpr), float(tpr)) if tpr is not None and fpr is not None else None
        names = {"model": _legend("AUROC", metrics.get("auroc"))}
    if roc:
        out.append((roc_plot(roc, labels=names, operating_point=point),
                    "ROC curve of the test set; shaded: pointwise bootstrap band where available; dot: operating point."))
    if pr:
        labels = names if "per_class" in curves else {"model": _legend("AUPRC", metrics.get("auprc"))}
        out.append((pr_plot(pr, labels=labels, prevalence=prevalence),
                    "Precision-recall curve; the dotted line is the prevalence (a classifier without skill)."))
    if rel:
        labels = names if "per_class" in curves else {"model": _legend("model, ECE", metrics.get("ece"))}
        out.append((reliability_plot(rel, labels=labels),
                    "Calibration: observed fraction of positives against mean predicted probability per bin."))
    cm = curves.get("confusion_matrix")
    if cm and cm.get("matrix"):
        labels = [str(v) for v in cm.get("labels", range(len(cm["matrix"])))]
        out.append((confusion_plot(labels, cm["matrix"], threshold=threshold),
                    "Confusion matrix at the operating threshold: counts and share of each true class."))
    return out


def group_forest(groups: Sequence[Mapping[str, Any]], metric: str, label: str,
                 overall: float | None) -> Plot | None:
    """Per-group estimates of one metric, one panel per attribute (suppressed groups left out).

    Args:
        groups: The `groups` of audit.json.
        metric: Metric key, e.g. "auroc".
        label: Display name of the metric.
        overall: The overall test value, drawn as the reference line.

    Returns:
        The figure, or None when no group has the metric.
    """
    panels: dict[str, list[ForestRow]] = {}
    for g in groups:
        entry = (g.get("metrics") or {}).get(metric)
        if g.get("suppressed") or not isinstance(entry, Mapping) or entry.get("value") is None:
            continue
        ci = entry.get("ci") or (None, None)
        muted = bool(g.get("imprecise") is True or entry.get("imprecise")
                     or (isinstance(g.get("imprecise"), list | tuple) and metric in g["imprecise"]))
        panels.setdefault(str(g.get("attribute")), []).append(
            # n is None when the audit withholds the group's counts (they would reveal a suppressed one).
            ForestRow(f"{str(g.get('group')).replace('&', ' × ')} "
                      + (f"(n={g['n']})" if g.get("n") is not None else "(n withheld)"),
                      float(entry["value"]), ci[0], ci[1], muted=muted))
    if not panels:
        return None
    return forest_plot([(a.replace("&", " × "), rows, None) for a, rows in panels.items()],
                       title=f"{label} by subgroup", xlabel=label, reference_line=overall, share_x=True)


def gap_forest(gaps: Sequence[Mapping[str, Any]], tolerances: Mapping[str, float],
               names: Mapping[str, str]) -> Plot:
    """Forest plot of the audit's gaps, one panel per metric, with the tolerance lines.

    Args:
        gaps: The `gaps` of audit.json.
        tolerances: Metric -> tolerance, used when a gap carries no `tolerance` of its own.
        names: Metric -> display name.

    Returns:
        The figure.
    """
    panels: dict[str, list[ForestRow]] = {}
    tol: dict[str, float | None] = {}
    for g in gaps:
        metric = str(g.get("metric"))
        ci = g.get("ci") or (None, None)
        value = g.get("value")
        panels.setdefault(metric, []).append(
            ForestRow(str(g.get("attribute")).replace("&", " × "), math.nan if value is None else float(value),
                      ci[0], ci[1], flagged=bool(g.get("flagged")), muted=g.get("status") == "inconclusive"))
        tol.setdefault(metric, g.get("tolerance", tolerances.get(metric)))
    symmetric = any(r.value < 0 or (r.lo is not None and r.lo < 0) for rows in panels.values() for r in rows)
    return forest_plot([(names.get(m, m), rows, tol[m]) for m, rows in panels.items()],
                       title="Subgroup gaps with 95% confidence intervals", xlabel="gap (difference between groups)",
                       reference_line=0.0, symmetric_tolerance=symmetric)
