"""From the runs of a transfer-benefit study to `transfer_benefit.json`, its figures and HTML section.

Pure functions on plain run records (no training, no MLflow), so the JSON's shape and its headline
can be checked on hand-written numbers. The JSON interface is stable (keys may be added, never
renamed or removed):

    {"metric": "auroc",
     "arms": {"pretrained": {"0.1": {"mean", "sd", "runs": [...], "train_seconds", "ci", "n_seeds"}, ...},
              "scratch": {...}},
     "headline": {"matches_scratch_full_at", "scratch_full", "pretrained_at_that_fraction",
                  "label_savings", "time_to_target_seconds", "text", "reference_fraction", "target",
                  "time_to_target_reached", "bias", "flagged_gaps", "rule", "bias_by_fraction"}}

`ci` and `n_seeds` (per point), `rule` and `bias_by_fraction` (headline) were added later; the
other keys are the original interface.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from medtl.evaluation import report_plots as rp

CI_LEVEL = 0.95  # of the per-point interval over seeds
METRIC_NAMES = {"auroc": "AUROC", "auroc_macro": "AUROC (macro)", "dice": "Dice"}
# Close to the report's figure style (medtl.evaluation.report_plots), so the two plots sit together.
_RC = {"font.family": "DejaVu Sans", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
       "axes.grid": True, "grid.color": "#e5e7eb", "legend.frameon": False, "legend.fontsize": 8}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _percent(fraction: float) -> str:
    return f"{100 * float(fraction):g} %"


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd (ddof=1; 0.0 for one value) of the finite values, None when none is."""
    finite = np.array([v for v in values if _finite(v) is not None], dtype=float)
    if finite.size == 0:
        return None, None
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0


def mean_ci(values: Sequence[float | None], level: float = CI_LEVEL) -> list[float] | None:
    """Student-t interval of the mean over seeds: mean ± t_{(1+level)/2, n-1} · sd / √n.

    Seeds are few (often 3), so the t quantile (4.30 for n = 3 at 95 %), not the normal 1.96, is
    what makes the interval honest. Non-finite values are left out.

    Args:
        values: One test value per seed.
        level: Coverage of the interval.

    Returns:
        [low, high], or None with fewer than two finite values (one seed gives no interval).

    Example:
        >>> [round(v, 3) for v in mean_ci([0.80, 0.82, 0.84])]
        [0.77, 0.87]
    """
    finite = [float(v) for v in values if _finite(v) is not None]
    if len(finite) < 2:
        return None
    mean, sd = mean_sd(finite)
    half = float(stats.t.ppf((1 + level) / 2, len(finite) - 1)) * sd / math.sqrt(len(finite))
    return [mean - half, mean + half]


def time_to_target(history: Sequence[Mapping[str, Any]], target: float | None) -> float | None:
    """Cumulative training seconds at the end of the first epoch whose validation value reaches `target`.

    Args:
        history: Per-epoch records with "value" (validation metric) and "seconds" (cumulative).
        target: The validation value to reach; None gives None.

    Returns:
        Seconds, or None when the target was never reached.
    """
    if target is None:
        return None
    for record in history:
        value = _finite(record.get("value"))
        if value is not None and value >= target:
            return float(record["seconds"])
    return None


def default_target(metric: str, runs: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
                   ref_key: str) -> tuple[float | None, str]:
    """The time-to-target default: the lowest best validation value over the reference arm's seeds.

    The reference arm is scratch (the first arm without one) at the largest fraction. Its lowest
    best-over-epochs value is a level every one of its seeds reached by construction, so its
    time-to-target is defined; a mean over seeds would sit above the worse seeds' best and leave
    scratch's time undefined most of the time. (A seed whose validation value was never finite has
    no best and reaches no target.)

    Returns:
        (target value or None when no seed has a finite best, text for `headline.target.source`).
    """
    arm = "scratch" if "scratch" in runs else next(iter(runs))
    best = [v for v in (_finite(r.get("best_val")) for r in runs[arm].get(ref_key, [])) if v is not None]
    source = (f"{arm} arm's best validation {metric} at {_percent(float(ref_key))} of labels, lowest over "
              "seeds, so every seed of that arm reached it")
    return (min(best) if best else None), source


def summarise(
    metric: str,
    runs: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    *,
    target: float | None = None,
    bias: Mapping[str, Any] | None = None,
    bias_by_fraction: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The `transfer_benefit.json` document from the study's run records.

    Per arm and fraction: mean and sd over seeds of the test value, a 95 % Student-t CI of that
    mean over seeds (`ci`, None for one seed; `mean_ci`), the number of seeds and the mean
    training time. The headline names a fraction by `HEADLINE_RULE`. Time to target is measured at
    the largest fraction: an arm's `time_to_target_seconds` is the mean over its seeds of the
    training seconds until validation first reached the target, None unless every seed reached it
    (a mean over the seeds that did would flatter the arm); `time_to_target_reached` counts them.

    Args:
        metric: Name of the test metric (e.g. "auroc", "dice").
        runs: Arm -> fraction key ("0.1") -> run records (one per seed) with at least "value",
            "train_seconds", "best_val" and "history".
        target: Validation value for time-to-target; None takes `default_target`: the lowest over
            seeds of the scratch arm's best validation value at the largest fraction (the first
            arm's without a scratch arm), which every seed of that arm reached.
        bias: The pretrained-vs-scratch subgroup-gap comparison at the largest fraction
            (`bias_summary`), for `headline.bias`.
        bias_by_fraction: Fraction key -> `bias_summary` of the same comparison at that fraction,
            for `headline.bias_by_fraction`.

    Returns:
        The JSON-ready document (NaN never appears; undefined numbers are None).

    Example:
        >>> doc = summarise("auroc", {"scratch": {"1.0": [run]}, "pretrained": {"1.0": [run]}})  # doctest: +SKIP
        >>> doc["headline"]["text"]  # doctest: +SKIP
    """
    reference = max(float(k) for points in runs.values() for k in points)
    ref_key = str(reference)
    source = "given"
    if target is None:
        target, source = default_target(metric, runs, ref_key)
    arms: dict[str, dict[str, Any]] = {}
    for arm, points in runs.items():
        arms[arm] = {}
        for key in sorted(points, key=float):
            records = [dict(r, time_to_target_seconds=time_to_target(r.get("history", []), target))
                       for r in points[key]]
            values = [r.get("value") for r in records]
            mean, sd = mean_sd(values)
            seconds, _ = mean_sd([r.get("train_seconds") for r in records])
            arms[arm][key] = {"mean": mean, "sd": sd, "runs": records, "train_seconds": seconds,
                              "ci": mean_ci(values), "n_seeds": sum(_finite(v) is not None for v in values)}
    headline = _headline(metric, arms, ref_key, target, source)
    headline["bias"] = dict(bias) if bias else None
    headline["bias_by_fraction"] = {k: dict(v) for k, v in sorted((bias_by_fraction or {}).items(),
                                                                  key=lambda item: float(item[0]))}
    headline["flagged_gaps"] = {arm: {key: sorted({f"{g['attribute']}:{g['metric']}" for r in point["runs"]
                                                   for g in r.get("gaps", []) if g.get("flagged")})
                                      for key, point in points.items()} for arm, points in arms.items()}
    return {"metric": metric, "arms": arms, "headline": headline}


HEADLINE_RULE = ("the smallest label fraction X at which the pretrained arm's mean test {name} over seeds is "
                 ">= the scratch arm's mean at {full} of labels, at X and at every larger fraction tested")


def matching_fraction(pretrained: Mapping[str, Mapping[str, Any]], scratch_full: float | None) -> str | None:
    """The fraction key `HEADLINE_RULE` names, or None.

    A fraction counts only if every larger one also holds: a lucky small subset followed by worse
    larger ones (pretrained 0.95 at 5 %, 0.80 at 10 %) must not make "5 % matches" the headline.

    Args:
        pretrained: Fraction key -> point with "mean" (None: undefined, which does not match).
        scratch_full: Scratch's mean at the reference fraction.

    Returns:
        The key, or None when scratch_full is None or even the largest fraction falls short.
    """
    if scratch_full is None:
        return None
    match = None
    for key in sorted(pretrained, key=float, reverse=True):
        mean = pretrained[key].get("mean")
        if mean is None or mean < scratch_full:
            break
        match = key
    return match


def _headline(metric: str, arms: Mapping[str, Mapping[str, Any]], ref_key: str, target: float | None,
              source: str) -> dict[str, Any]:
    times: dict[str, float | None] = {}
    reached: dict[str, int] = {}
    for arm, points in arms.items():
        runs = points.get(ref_key, {}).get("runs", [])
        values = [r["time_to_target_seconds"] for r in runs]
        reached[arm] = sum(v is not None for v in values)
        # A mean over only the seeds that got there would flatter an arm that mostly did not.
        times[arm] = mean_sd(values)[0] if runs and reached[arm] == len(runs) else None
    name = METRIC_NAMES.get(metric, metric)
    full = _percent(float(ref_key))
    out: dict[str, Any] = {
        "matches_scratch_full_at": None, "scratch_full": None, "pretrained_at_that_fraction": None,
        "label_savings": None, "time_to_target_seconds": times, "text": "",
        "reference_fraction": float(ref_key), "target": {"value": target, "source": source},
        "time_to_target_reached": reached, "rule": HEADLINE_RULE.format(name=name, full=full),
    }
    if "pretrained" not in arms or "scratch" not in arms:
        out["text"] = "the headline compares the pretrained and the scratch arm; run both to get it"
        return out
    scratch_full = arms["scratch"].get(ref_key, {}).get("mean")
    pretrained = arms["pretrained"]
    out["scratch_full"] = scratch_full
    match = matching_fraction(pretrained, scratch_full)
    pre_full = pretrained.get(ref_key, {}).get("mean")
    if scratch_full is None:
        out["text"] = f"scratch {name} at {full} of labels is undefined, so there is no headline"
    elif match is None:
        verdict = (f"pretrained {_fmt(pre_full)} vs scratch {_fmt(scratch_full)}" if pre_full is not None
                   else f"scratch {_fmt(scratch_full)}")
        out["text"] = (f"pretrained did not match scratch at {full} of labels from any fraction tested up to "
                       f"{full} (test {name} at {full}: {verdict})")
    else:
        fraction = float(match)
        out.update(matches_scratch_full_at=fraction, pretrained_at_that_fraction=pretrained[match]["mean"],
                   label_savings=round(1.0 - fraction / float(ref_key), 9))
        larger = "; so does every larger fraction" if fraction < float(ref_key) else ""
        out["text"] = (f"pretrained at {_percent(fraction)} of labels matches scratch at {full} "
                       f"(test {name} {_fmt(pretrained[match]['mean'])} vs {_fmt(scratch_full)}, "
                       f"mean over {len(pretrained[match]['runs'])} seed(s){larger})")
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def bias_summary(amplification: Sequence[Mapping[str, Any]], *, fraction: float, seed: int) -> dict[str, Any]:
    """The pretrained-vs-scratch comparison of between-group gaps (`difference` kind) at one fraction.

    Ratio-kind gaps are left out: their "wider" runs the other way, and the difference gaps already
    cover the same metrics.

    Args:
        amplification: The paired audit's amplification entries (model = pretrained, reference = scratch).
        fraction: The label fraction both arms were trained on.
        seed: The seed of the compared runs.

    Returns:
        {"fraction", "seed", "paired", "comparisons", "widened", "narrowed", "text"}.

    Example:
        >>> bias_summary([{"attribute": "sex", "metric": "tpr", "kind": "difference",
        ...                "direction": "widened"}], fraction=0.5, seed=0)["widened"]
        ['sex:tpr']
    """
    rows = [dict(a) for a in amplification if a.get("kind", "difference") == "difference"]
    widened = sorted(f"{a['attribute']}:{a['metric']}" for a in rows if a.get("direction") == "widened")
    narrowed = sorted(f"{a['attribute']}:{a['metric']}" for a in rows if a.get("direction") == "narrowed")
    if not rows:
        text = f"at {_percent(fraction)} of labels no subgroup gap could be compared (too few reported groups)"
    else:
        text = (f"at {_percent(fraction)} of labels pretraining widened {len(widened)} and narrowed "
                f"{len(narrowed)} of {len(rows)} between-group gaps compared with scratch "
                f"(paired patient bootstrap, seed {seed})")
        if widened:
            text += "; widened: " + ", ".join(widened[:6]) + (" ..." if len(widened) > 6 else "")
    return {"fraction": float(fraction), "seed": int(seed), "paired": True, "comparisons": rows,
            "widened": widened, "narrowed": narrowed, "text": text}


def report_mapping(result: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Arm -> fraction key -> {"mean", "sd", "ci"}: the shape `ReportInputs.transfer_benefit` takes.

    Fractions whose mean is undefined are left out (the plot cannot draw them); "ci" is the 95 %
    CI over seeds (None for one seed).
    """
    return {arm: {key: {"mean": point["mean"], "sd": point["sd"] or 0.0, "ci": point.get("ci")}
                  for key, point in points.items() if point.get("mean") is not None}
            for arm, points in result["arms"].items()}


def _png_bytes(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


def efficiency_plot(result: Mapping[str, Any]) -> rp.Plot:
    """The data-efficiency curve: mean test metric over seeds per arm and fraction, band = 95 % CI over seeds.

    Points of one seed have no CI and get no band.
    """
    return rp.data_efficiency_plot(report_mapping(result), metric=METRIC_NAMES.get(result["metric"], result["metric"]))


def time_plot(result: Mapping[str, Any]) -> rp.Plot:
    """Validation metric against cumulative training time at the reference fraction, per arm and seed."""
    headline = result["headline"]
    ref_key = str(headline["reference_fraction"])
    name = METRIC_NAMES.get(result["metric"], result["metric"])
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(5.6, 3.8), dpi=rp.DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for colour, (arm, points) in zip(rp.SERIES * 4, result["arms"].items(), strict=False):
            for i, run in enumerate(points.get(ref_key, {}).get("runs", [])):
                history = run.get("history", [])
                x = [h["seconds"] for h in history]
                y = [np.nan if h.get("value") is None else h["value"] for h in history]
                ax.plot(x, y, color=colour, marker="o", markersize=3, linewidth=1.4, alpha=0.9,
                        label=arm if i == 0 else None)
        target = headline["target"]["value"]
        if target is not None:
            ax.axhline(target, color=rp.GREY, linestyle="--", linewidth=1.0, label="target")
        ax.set(xlabel="Cumulative training time (s)", ylabel=f"Validation {name}",
               title=f"Time to target at {_percent(float(ref_key))} of labels")
        ax.legend(loc="best")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=rp.DPI, metadata={"Software": None})
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    width, height = (int(round(v)) for v in fig.get_size_inches() * rp.DPI)
    times = ", ".join(f"{arm}: {_fmt(t)} s" for arm, t in headline["time_to_target_seconds"].items())
    return rp.Plot(uri, f"Validation {name} against training time per arm; time to target {times}.", width, height)


def write_figures(result: Mapping[str, Any], output_dir: Path) -> dict[str, Path]:
    """Write `transfer_benefit.png` (data efficiency) and `transfer_benefit_time.png` (time to target)."""
    paths = {"efficiency": output_dir / "transfer_benefit.png", "time": output_dir / "transfer_benefit_time.png"}
    paths["efficiency"].write_bytes(_png_bytes(efficiency_plot(result).uri))
    paths["time"].write_bytes(_png_bytes(time_plot(result).uri))
    return paths


def _results_table(result: Mapping[str, Any], keys: Sequence[str]) -> str:
    e = html.escape
    rows = []
    for arm, points in result["arms"].items():
        cells = []
        for key in keys:
            point = points.get(key)
            if point is None or point["mean"] is None:
                cells.append("n/a")
                continue
            ci = point.get("ci")
            interval = f"95 % CI {ci[0]:.3f}–{ci[1]:.3f}" if ci else "one seed: no CI"
            cells.append(f"{point['mean']:.3f} ± {point['sd']:.3f}<br><small>{interval}</small>"
                         f"<br><small>{point['train_seconds']:.0f} s</small>")
        rows.append(f"<tr><th>{e(arm)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table><tr><th>Arm</th>" + "".join(f"<th>{e(_percent(float(k)))}</th>" for k in keys) + "</tr>"
            + "".join(rows) + "</table>")


def _gaps_table(result: Mapping[str, Any], keys: Sequence[str]) -> str:
    e = html.escape
    head = result["headline"]
    flagged = head.get("flagged_gaps") or {}
    by_fraction = head.get("bias_by_fraction") or {}
    arms = list(result["arms"])
    rows = []
    for key in keys:
        cells = [e(", ".join(flagged.get(arm, {}).get(key, [])) or "none flagged") for arm in arms]
        cells.append(e((by_fraction.get(key) or {}).get("text") or "not compared"))
        rows.append(f"<tr><th>{e(_percent(float(key)))}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table><tr><th>Labels</th>" + "".join(f"<th>flagged gaps: {e(arm)}</th>" for arm in arms)
            + "<th>pretrained vs scratch</th></tr>" + "".join(rows) + "</table>")


def render_section(result: Mapping[str, Any]) -> str:
    """A self-contained HTML section (inline figures, escaped text) of the study's results.

    Shows the headline and its rule, the test metric per arm and fraction (mean ± sd, 95 % CI over
    seeds, training time), time to target, and per fraction each arm's flagged subgroup gaps (any
    seed) with the paired pretrained-vs-scratch gap comparison (first seed).
    """
    e = html.escape
    name = METRIC_NAMES.get(result["metric"], result["metric"])
    head = result["headline"]
    keys = sorted({k for points in result["arms"].values() for k in points}, key=float)
    times = "".join(f"<li>{e(arm)}: {e(_fmt(t))} s ({head['time_to_target_reached'][arm]} seed(s) reached it)</li>"
                    for arm, t in head["time_to_target_seconds"].items())
    target = head["target"]
    bias = head.get("bias") or {}
    rule = head.get("rule")
    figures = "".join(f'<img src="{p.uri}" alt="{e(p.alt)}" width="{p.width}">'
                      for p in (efficiency_plot(result), time_plot(result)))
    return (
        f'<section id="transfer-benefit"><h2>Transfer benefit</h2><p><strong>{e(head["text"])}</strong></p>'
        + (f"<p><small>Headline rule: {e(rule)}.</small></p>" if rule else "")
        + f"<h3>Test {e(name)} by fraction of labelled training patients (mean ± sd and 95 % t-interval "
        f"of the mean over seeds; mean training time)</h3>{_results_table(result, keys)}"
        f"<h3>Time to target</h3><p>Target: validation {e(name)} {e(_fmt(target['value']))} "
        f"({e(target['source'])}); an arm's time is the mean over seeds at {e(_percent(head['reference_fraction']))} "
        f"of labels, shown only when every seed reached the target.</p><ul>{times}</ul>"
        f"<h3>Subgroup gaps</h3><p>{e(bias.get('text') or 'no pretrained-vs-scratch comparison was run')}</p>"
        "<p><small>Flagged gaps: the audit's flagged between-group gaps of any seed of the arm at that fraction. "
        "Pretrained vs scratch: paired patient-bootstrap comparison of the first seed's gaps.</small></p>"
        f"{_gaps_table(result, keys)}"
        f"<div>{figures}</div></section>"
    )


def write_html(result: Mapping[str, Any], path: Path) -> Path:
    """Write the section as a small standalone page (no script, no external resource)."""
    path.write_text('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Transfer benefit</title>'
                    "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:"
                    "collapse}td,th{border:1px solid #d1d5db;padding:.3em .6em;text-align:right}</style></head>"
                    f"<body>{render_section(result)}</body></html>", encoding="utf-8")
    return path
