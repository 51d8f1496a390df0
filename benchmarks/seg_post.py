"""Benchmark: segmentation post-processing and mirror test-time augmentation on finished 3D runs, without training.

For each run folder given (a `medtl run` segmentation output with `package/` and `manifest.csv`),
the run's val and test datasets are rebuilt as the workflow builds them (`prepare_data` on the
run's own manifest, `datasets_for` with the package's frozen preprocessing), every volume is scored
by the packaged network with MONAI sliding windows (`medtl.engine.inference.sliding_window_predict`,
the settings `predict` uses) in all 8 mirror views, and the mean Dice over the foreground classes
(`segmentation_case_metrics`, averaged over cases as metrics.json is) is computed for:

- `none`: the image alone (must reproduce the run's metrics.json val and test Dice);
- `lcc class` / `lcc union`: nnU-Net's post-processing, MONAI `KeepLargestConnectedComponent`
  (face connectivity, as nnU-Net's `scipy.ndimage.label`): the largest component of each foreground
  class, or of the union of the foreground classes (what it drops becomes background);
- `mirror axN`: softmax averaged over the image and its copy mirrored along spatial axis N (mirrored
  back), `predict(flips=(N,))`; `mirror each`: the image and each single-axis mirror (4 views,
  `predict(flips=(0, 1, 2))`); `mirror all`: all 8 combinations of the 3 axes (nnU-Net's mirroring);
- `axN view alone`: the mirrored view alone (mirrored back), a diagnostic of how far off its
  training distribution the mirrored image is;
- `mirror all + lcc ...`, and `+ best lcc`: the LCC choice (none, class, union) with the higher
  validation Dice of that run, applied to its test set (nnU-Net's rule).

Volumes are oriented to RAS before scoring (`Orientationd(axcodes="RAS")`), so spatial axis 0 runs
left-right, 1 posterior-anterior, 2 inferior-superior. Printed: per-run val/test Dice, mean ± sd
over runs, paired differences against `none`, and the check of `none` against metrics.json.

Usage:
    .venv/bin/python benchmarks/seg_post.py --work WORK [--root DATA_ROOT] RUN_DIR [RUN_DIR ...]

WORK is the training benchmark's work folder (its project key under WORK/config resolves the rows);
DATA_ROOT defaults to the shared hippocampus folder.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402  (the benchmarks folder is not a package)

from medtl.engine.inference import plain_tensor, predict, sliding_window_predict  # noqa: E402
from medtl.evaluation.segmentation import segmentation_case_metrics, segmentation_summary  # noqa: E402
from medtl.workflow.config import load_config  # noqa: E402
from medtl.workflow.package import read_package  # noqa: E402
from medtl.workflow.prepare import prepare_data  # noqa: E402
from medtl.workflow.train import datasets_for  # noqa: E402

#: Every mirror combination of the 3 spatial axes, the identity first (nnU-Net's 8 views).
MIRRORS = [axes for k in range(4) for axes in itertools.combinations(range(3), k)]
#: The views each test-time augmentation averages.
TTA = {
    "none": [()],
    "mirror ax0 (LR)": [(), (0,)],
    "mirror ax1 (PA)": [(), (1,)],
    "mirror ax2 (IS)": [(), (2,)],
    "mirror each (4 views)": [(), (0,), (1,), (2,)],
    "mirror all (8 views)": MIRRORS,
    # Diagnostics: a mirrored view alone (mirrored back), no averaging.
    "ax0 view alone": [(0,)],
    "ax1 view alone": [(1,)],
    "ax2 view alone": [(2,)],
}
LCC = ("none", "class", "union")
ARMS = ["none", "lcc class", "lcc union", *[t for t in TTA if t.startswith("mirror")],
        "mirror all + lcc class", "mirror all + lcc union", "mirror all + best lcc",
        *[t for t in TTA if t.endswith("alone")]]


def run_config(run: Path, root: Path):
    """The run's workflow settings (frozen in its package) on its own manifest and the data root."""
    package, network = read_package(run / "package")
    base = json.loads(json.dumps(package.workflow_config))
    base["data"] = {**base["data"], "root": str(root), "manifest": str(run / "manifest.csv")}
    return package, network, load_config(None, [], base=base)


def mirror_views(model: torch.nn.Module, image: torch.Tensor, roi: tuple[int, ...]) -> dict[tuple, torch.Tensor]:
    """Softmax probabilities (K x spatial) of every mirror view of one (C x spatial) volume, mirrored back.

    The forward pass of `medtl.engine.inference.predict`: sliding windows with its default settings,
    softmax on the CPU in float32.
    """
    out = {}
    with torch.no_grad():
        for axes in MIRRORS:
            dims = [2 + a for a in axes]  # batch and channel axes first
            x = image[None].flip(dims) if dims else image[None]
            p = torch.softmax(plain_tensor(sliding_window_predict(model, x, roi_size=roi, output_device="cpu"))
                              .float(), dim=1).cpu()
            out[axes] = (p.flip(dims) if dims else p)[0]
    return out


def keep_largest(label_map: np.ndarray, mode: str, num_classes: int) -> np.ndarray:
    """The label map with only the largest connected component of each class ("class") or of the foreground union ("union")."""
    if mode == "none":
        return label_map
    from monai.transforms import KeepLargestConnectedComponent

    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, num_classes)), is_onehot=False,
                                         independent=mode == "class", connectivity=1)
    # A copy: MONAI edits the tensor it is given, and torch.as_tensor would share the caller's array.
    return np.asarray(plain_tensor(keep(torch.tensor(label_map)[None]))[0]).astype(np.uint8)


def label_maps(model: torch.nn.Module, dataset, roi: tuple[int, ...], num_classes: int) -> tuple[list, dict]:
    """Reference masks, ids and predicted label maps of every (tta, lcc) arm for one split's dataset."""
    truth, ids, preds = [], [], {(t, c): [] for t in TTA for c in LCC}
    for i in range(len(dataset)):
        item = dataset[i]
        ids.append(item["id"])
        truth.append(np.asarray(plain_tensor(item["label"])[0]).astype(np.uint8))
        views = mirror_views(model, plain_tensor(item["image"]), roi)
        for tta, used in TTA.items():
            probs = torch.stack([views[v] for v in used]).mean(0) if len(used) > 1 else views[used[0]]
            label_map = probs.argmax(0).numpy().astype(np.uint8)
            for lcc in LCC:
                preds[(tta, lcc)].append(keep_largest(label_map, lcc, num_classes))
    return [truth, ids], preds


def mean_dice(preds: list, truth: list, ids: list, num_classes: int, *, full: bool = False) -> float:
    """Mean over cases of the per-case mean foreground Dice, as metrics.json's `dice`.

    `full`: through `segmentation_case_metrics` itself (it also computes HD95 and surface Dice,
    about 0.5 s a case); otherwise its Dice alone, the same MONAI `DiceMetric` on the same one-hot
    maps (NaN for a class absent from the reference, ignored in the means).
    """
    if full:
        cases = segmentation_case_metrics(preds, truth, num_classes=num_classes, ids=ids)
        return segmentation_summary(cases[["id", "dice"]])["dice"]
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="none")
    per_case = []
    for p, t in zip(preds, truth, strict=True):
        hot = [one_hot(torch.as_tensor(a.astype(np.int64))[None, None], num_classes) for a in (p, t)]
        per_case.append(metric(*hot)[0].numpy().astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a case without any reference class: NaN, left out
        return float(np.nanmean(np.nanmean(np.asarray(per_case), axis=1)))


def check_predict(model: torch.nn.Module, dataset, roi: tuple[int, ...], first: int = 3) -> float:
    """Largest difference between `predict(flips=(0, 1, 2))` and the 4 views averaged here (first volumes)."""
    subset = torch.utils.data.Subset(dataset, range(min(first, len(dataset))))
    rows = predict(model, subset, activation="softmax", roi_size=roi, batch_size=1, progress=False, flips=(0, 1, 2))
    worst = 0.0
    for i, row in enumerate(rows):
        views = mirror_views(model, plain_tensor(dataset[i]["image"]), roi)
        mine = torch.stack([views[v] for v in TTA["mirror each (4 views)"]]).mean(0)
        worst = max(worst, float((mine - row["output"]).abs().max()))
    return worst


def score_run(run: Path, root: Path) -> dict:
    """Val and test mean Dice of every arm for one run, with its metrics.json values."""
    start = time.perf_counter()
    package, network, cfg = run_config(run, root)
    roi = tuple(cfg.data.image_size)
    with tempfile.TemporaryDirectory() as scratch:  # prepare_data's cache folder (memory cache: stays empty)
        data = prepare_data(cfg, Path(scratch), progress=False)
        sets = datasets_for(cfg, data, package.prep(), progress=False, splits=("val", "test"))
    expected = pd.read_csv(run / "predictions.csv")
    for split in ("val", "test"):
        ids = [sets[split][i]["id"] for i in range(len(sets[split]))]
        if sorted(ids) != sorted(expected.loc[expected["split"] == split, "id"]):
            raise SystemExit(f"{run.name}: the rebuilt {split} set is not the run's (predictions.csv)")
    k = package.num_classes
    result: dict = {"metrics": json.loads((run / "metrics.json").read_text()),
                    "predict_diff": check_predict(network, sets["test"], roi)}
    for split in ("val", "test"):
        (truth, ids), preds = label_maps(network, sets[split], roi, k)
        dice = {key: mean_dice(p, truth, ids, k) for key, p in preds.items()}
        full = mean_dice(preds[("none", "none")], truth, ids, k, full=True)  # the run's own scoring
        if abs(full - dice[("none", "none")]) > 1e-7:
            raise SystemExit(f"{run.name}: Dice alone {dice[('none', 'none')]} differs from segmentation_case_metrics "
                             f"{full} on {split}")
        result[split] = {
            "none": dice[("none", "none")], "lcc class": dice[("none", "class")], "lcc union": dice[("none", "union")],
            **{t: dice[(t, "none")] for t in TTA if t != "none"},
            "mirror all + lcc class": dice[("mirror all (8 views)", "class")],
            "mirror all + lcc union": dice[("mirror all (8 views)", "union")],
        }
        result[f"_{split}_all"] = dice
    best = max(LCC, key=lambda c: result["_val_all"][("mirror all (8 views)", c)])  # chosen on validation
    result["best_lcc"] = best
    for split in ("val", "test"):
        result[split]["mirror all + best lcc"] = result[f"_{split}_all"][("mirror all (8 views)", best)]
    result["seconds"] = time.perf_counter() - start
    return result


def mean_sd(values: list[float], digits: int = 4) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="the work folder of the benchmark that trained the runs")
    parser.add_argument("--root", default=str(_data.HIPPOCAMPUS), help="the data root the runs were trained on")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 is ~10x faster when another process keeps a core of 2 busy)")
    parser.add_argument("runs", nargs="+", help="run output folders")
    args = parser.parse_args(argv)
    _data.require(Path(args.root), "the runs' data root")
    _data.setup(args.work)
    torch.set_num_threads(args.threads)
    print("machine:", _data.machine())
    start = time.perf_counter()
    runs = [Path(r) for r in args.runs]
    results = []
    for run in runs:
        r = score_run(run, Path(args.root))
        results.append(r)
        m = r["metrics"]
        print(f"{run.name}: none val {r['val']['none']:.6f} (metrics.json {m['val']['dice']:.6f}), "
              f"test {r['test']['none']:.6f} (metrics.json {m['test']['dice']:.6f}); predict(flips) vs views here: "
              f"max |diff| {r['predict_diff']:.1e}; best lcc on val after mirror all: {r['best_lcc']}; "
              f"{r['seconds']:.0f} s", flush=True)

    names = [r.name for r in runs]
    header = ["arm", *[f"{n} {s}" for n in names for s in ("val", "test")], "val mean ± sd", "test mean ± sd"]
    rows = [[arm, *[f"{r[s][arm]:.4f}" for r in results for s in ("val", "test")],
             *[mean_sd([r[s][arm] for r in results]) for s in ("val", "test")]] for arm in ARMS]
    _data.print_table("Mean foreground Dice (2 classes, mean over cases)", header, rows)

    header = ["arm", *[f"{n} test Δ" for n in names], "val Δ mean ± sd", "test Δ mean ± sd"]
    rows = [[arm, *[f"{r['test'][arm] - r['test']['none']:+.4f}" for r in results],
             *[mean_sd([r[s][arm] - r[s]["none"] for r in results]) for s in ("val", "test")]]
            for arm in ARMS if arm != "none"]
    _data.print_table("Paired differences against none (Dice)", header, rows)

    reproduced = [abs(r["test"]["none"] - r["metrics"]["test"]["dice"]) < 1e-6
                  and abs(r["val"]["none"] - r["metrics"]["val"]["dice"]) < 1e-6 for r in results]
    print(f"\n'none' reproduces metrics.json val and test Dice (to 1e-6): {sum(reproduced)}/{len(results)} runs")
    print(f"wall time {time.perf_counter() - start:.0f} s; machine after:", _data.machine()["load_avg_1_5_15"])


if __name__ == "__main__":
    main()
