"""From the runs of a transfer-benefit study to `transfer_benefit.json`, its figures and HTML section.

Pure functions on plain run records (no training, no MLflow), so the JSON's shape and its headline
can be checked on hand-written numbers. The JSON interface is stable:

    {"metric": "auroc",
     "arms": {"pretrained": {"0.1": {"mean", "sd", "runs": [...], "train_seconds"}, ...}, "scratch": {...}},
     "headline": {"matches_scratch_full_at", "scratch_full", "pretrained_at_that_fraction",
                  "label_savings", "time_to_target_seconds", "text", ...}}
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

from medtl.evaluation import report_plots as rp

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


def summarise(
    metric: str,
    runs: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    *,
    target: float | None = None,
    bias: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `transfer_benefit.json` document from the study's run records.

    Args:
        metric: Name of the test metric (e.g. "auroc", "dice").
        runs: Arm -> fraction key ("0.1") -> run records (one per seed) with at least "value",
            "train_seconds", "best_val" and "history".
        target: Validation value for time-to-target; None takes the scratch arm's mean best
            validation value at the largest fraction (or the first arm's without a scratch arm).
        bias: The pretrained-vs-scratch subgroup-gap comparison to put in the headline.

    Returns:
        The JSON-ready document (NaN never appears; undefined numbers are None).
    """
    reference = max(float(k) for points in runs.values() for k in points)
    ref_key = str(reference)
    source = "given"
    if target is None:
        arm = "scratch" if "scratch" in runs else next(iter(runs))
        target, _ = mean_sd([r.get("best_val") for r in runs[arm].get(ref_key, [])])
        source = f"{arm} arm's best validation {metric} at {_percent(reference)} of labels (mean over seeds)"
    arms: dict[str, dict[str, Any]] = {}
    for arm, points in runs.items():
        arms[arm] = {}
        for key in sorted(points, key=float):
            records = [dict(r, time_to_target_seconds=time_to_target(r.get("history", []), target))
                       for r in points[key]]
            mean, sd = mean_sd([r.get("value") for r in records])
            seconds, _ = mean_sd([r.get("train_seconds") for r in records])
            arms[arm][key] = {"mean": mean, "sd": sd, "runs": records, "train_seconds": seconds}
    headline = _headline(metric, arms, ref_key, target, source)
    headline["bias"] = dict(bias) if bias else None
    headline["flagged_gaps"] = {arm: {key: sorted({f"{g['attribute']}:{g['metric']}" for r in point["runs"]
                                                   for g in r.get("gaps", []) if g.get("flagged")})
                                      for key, point in points.items()} for arm, points in arms.items()}
    return {"metric": metric, "arms": arms, "headline": headline}


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
    out: dict[str, Any] = {
        "matches_scratch_full_at": None, "scratch_full": None, "pretrained_at_that_fraction": None,
        "label_savings": None, "time_to_target_seconds": times, "text": "",
        "reference_fraction": float(ref_key), "target": {"value": target, "source": source},
        "time_to_target_reached": reached,
    }
    name = METRIC_NAMES.get(metric, metric)
    full = _percent(float(ref_key))
    if "pretrained" not in arms or "scratch" not in arms:
        out["text"] = "the headline compares the pretrained and the scratch arm; run both to get it"
        return out
    scratch_full = arms["scratch"].get(ref_key, {}).get("mean")
    pretrained = arms["pretrained"]
    out["scratch_full"] = scratch_full
    match = next((k for k in sorted(pretrained, key=float)
                  if pretrained[k]["mean"] is not None and scratch_full is not None
                  and pretrained[k]["mean"] >= scratch_full), None)
    pre_full = pretrained.get(ref_key, {}).get("mean")
    if scratch_full is None:
        out["text"] = f"scratch {name} at {full} of labels is undefined, so there is no headline"
    elif match is None:
        verdict = (f"pretrained {_fmt(pre_full)} vs scratch {_fmt(scratch_full)}" if pre_full is not None
                   else f"scratch {_fmt(scratch_full)}")
        out["text"] = (f"pretrained did not match scratch at {full} of labels at any fraction tested "
                       f"(test {name} at {full}: {verdict})")
    else:
        fraction = float(match)
        out.update(matches_scratch_full_at=fraction, pretrained_at_that_fraction=pretrained[match]["mean"],
                   label_savings=round(1.0 - fraction / float(ref_key), 9))
        out["text"] = (f"pretrained at {_percent(fraction)} of labels matches scratch at {full} "
                       f"(test {name} {_fmt(pretrained[match]['mean'])} vs {_fmt(scratch_full)}, "
                       f"mean over {len(pretrained[match]['runs'])} seed(s))")
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def bias_summary(amplification: Sequence[Mapping[str, Any]], *, fraction: float, seed: int) -> dict[str, Any]:
    """The headline's pretrained-vs-scratch comparison of between-group gaps (`difference` kind).

    Args:
        amplification: The paired audit's amplification entries (model = pretrained, reference = scratch).
        fraction: The label fraction both arms were trained on.
        seed: The seed of the compared runs.

    Returns:
        {"fraction", "seed", "paired", "comparisons", "widened", "narrowed", "text"}.
    """
    rows = [dict(a) for a in amplification if a.get("kind", "difference") == "difference"]
    widened = sorted(f"{a['attribute']}:{a['metric']}" for a in rows if a.get("direction") == "widened")
    narrowed = sorted(f"{a['attribute']}:{a['metric']}" for a in rows if a.get("direction") == "narrowed")
    if not rows:
        text = "no subgroup gap could be compared (too few reported groups)"
    else:
        text = (f"at {_percent(fraction)} of labels pretraining widened {len(widened)} and narrowed "
                f"{len(narrowed)} of {len(rows)} between-group gaps compared with scratch "
                f"(paired patient bootstrap, seed {seed})")
        if widened:
            text += "; widened: " + ", ".join(widened[:6]) + (" ..." if len(widened) > 6 else "")
    return {"fraction": float(fraction), "seed": int(seed), "paired": True, "comparisons": rows,
            "widened": widened, "narrowed": narrowed, "text": text}


def report_mapping(result: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Arm -> fraction key -> {"mean", "sd"}: the shape `ReportInputs.transfer_benefit` takes.

    Fractions whose mean is undefined are left out (the plot cannot draw them).
    """
    return {arm: {key: {"mean": point["mean"], "sd": point["sd"] or 0.0}
                  for key, point in points.items() if point.get("mean") is not None}
            for arm, points in result["arms"].items()}


def _png_bytes(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


def efficiency_plot(result: Mapping[str, Any]) -> rp.Plot:
    """The data-efficiency curve (test metric vs label fraction per arm, mean ± sd over seeds)."""
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


def render_section(result: Mapping[str, Any]) -> str:
    """A self-contained HTML section (inline figures, escaped text) of the study's results."""
    e = html.escape
    name = METRIC_NAMES.get(result["metric"], result["metric"])
    head = result["headline"]
    keys = sorted({k for points in result["arms"].values() for k in points}, key=float)
    rows = []
    for arm, points in result["arms"].items():
        cells = []
        for key in keys:
            point = points.get(key)
            cells.append("n/a" if point is None or point["mean"] is None else
                         f"{point['mean']:.3f} ± {point['sd']:.3f}<br><small>{point['train_seconds']:.0f} s</small>")
        rows.append(f"<tr><th>{e(arm)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = ("<table><tr><th>Arm</th>" + "".join(f"<th>{e(_percent(float(k)))}</th>" for k in keys) + "</tr>"
             + "".join(rows) + "</table>")
    times = "".join(f"<li>{e(arm)}: {e(_fmt(t))} s ({head['time_to_target_reached'][arm]} seed(s) reached it)</li>"
                    for arm, t in head["time_to_target_seconds"].items())
    target = head["target"]
    bias = head.get("bias") or {}
    figures = "".join(f'<img src="{p.uri}" alt="{e(p.alt)}" width="{p.width}">'
                      for p in (efficiency_plot(result), time_plot(result)))
    return (
        f'<section id="transfer-benefit"><h2>Transfer benefit</h2><p><strong>{e(head["text"])}</strong></p>'
        f"<h3>Test {e(name)} by fraction of labelled training patients (mean ± sd over seeds; "
        f"mean training time)</h3>{table}"
        f"<h3>Time to target</h3><p>Target: validation {e(name)} {e(_fmt(target['value']))} "
        f"({e(target['source'])}).</p><ul>{times}</ul>"
        f"<h3>Subgroup gaps</h3><p>{e(bias.get('text') or 'no pretrained-vs-scratch comparison was run')}</p>"
        f"<div>{figures}</div></section>"
    )


def write_html(result: Mapping[str, Any], path: Path) -> Path:
    """Write the section as a small standalone page (no script, no external resource)."""
    path.write_text('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Transfer benefit</title>'
                    "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:"
                    "collapse}td,th{border:1px solid #d1d5db;padding:.3em .6em;text-align:right}</style></head>"
                    f"<body>{render_section(result)}</body></html>", encoding="utf-8")
    return path
