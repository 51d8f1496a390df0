"""Benchmark: data-pipeline and training throughput (samples/s) on the shared real data.

1. Data pipeline: `medtl.data.dataset.make_dataset` with cache "none", "memory" and "disk" on the
   PneumoniaMNIST PNG export (2D classification, training augmentations on) and the hippocampus
   NIfTI volumes (3D segmentation with masks, random patches). Per cache: the time to build the
   dataset (the memory cache is filled here), the first pass and a second pass through a
   DataLoader as the engine makes it (batch size, MONAI collate, no workers), and the second
   pass's CPU time per sample (comparable between caches on a loaded machine).
2. Engine overhead: `medtl.engine.fit` (finetune plan) against a minimal hand-written loop on the
   same model (`create_model`), the same cached tensors, batch size, AdamW and number of steps, in
   the same process, interleaved round by round. The ratio engine/hand is the engine's overhead.
   The thread count is part of the comparison: rows with the engine's own choice
   (`runtime.pick_cpu_threads`) and with all cores (torch's default).

Usage:
    .venv/bin/python benchmarks/pipeline.py [--work DIR] [--quick]

Prints markdown tables (pasted into docs/benchmarks.md). Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402  (the benchmarks folder is not a package)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help=f"work folder outside the repo (default {_data.DEFAULT_WORK})")
    parser.add_argument("--quick", action="store_true", help="tiny version for smoke checks")
    parser.add_argument("--image-size", type=int, default=64, help="2D network input size (pixels)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15, help="training steps per engine/hand measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the training comparison")
    parser.add_argument("--skip", choices=["data", "train"], action="append", default=[],
                        help="skip a part (repeatable)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# 1. Data pipeline


def _manifest(work: Path, name: str, root: Path, labels: Path):
    import pandas as pd

    from medtl.data.manifest import build_manifest

    out = work / "manifests" / f"{name}.csv"
    start = time.perf_counter()
    build_manifest(root, labels, out, progress=False)
    seconds = time.perf_counter() - start
    return pd.read_csv(out, dtype=str, keep_default_na=False), seconds


def _passes(dataset, batch_size: int, max_items: int | None) -> tuple[float, float, float]:
    """Samples/s of two passes (at most `max_items` samples each) through a DataLoader built like
    the engine's (shuffled, MONAI collate, no workers), and the second pass's CPU milliseconds per
    sample (this process's CPU time: unlike samples/s, it hardly moves with the load of a shared
    machine, so ratios between caches stay comparable)."""
    import torch

    from medtl.engine.inference import collate_fn

    rates, cpu_ms = [], 0.0
    for _ in range(2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                             num_workers=0, collate_fn=collate_fn())
        start, cpu, count = time.perf_counter(), time.process_time(), 0
        for batch in loader:
            count += len(batch["image"])
            if max_items is not None and count >= max_items:
                break
        rates.append(count / (time.perf_counter() - start))
        cpu_ms = (time.process_time() - cpu) / count * 1000
    return rates[0], rates[1], cpu_ms


def data_benchmark(work: Path, args: argparse.Namespace, threads: int) -> list[list[object]]:
    """Rows of the data-pipeline table (see the module docstring)."""
    import shutil

    import torch

    from medtl.data.dataset import Preprocessing, class_names, make_dataset, manifest_items

    limit = 40 if args.quick else None
    png_root, png_labels = _data.export_pneumonia(work, limit=limit)
    pneumonia, seconds = _manifest(work, "pneumonia" if limit is None else "pneumonia_quick", png_root, png_labels)
    print(f"pneumonia manifest: {len(pneumonia)} rows in {seconds:.1f} s")
    hip_root, hip_labels = _data.hippocampus_labels(work, limit=12 if args.quick else None)
    hip, seconds = _manifest(work, "hippocampus" if not args.quick else "hippocampus_quick", hip_root, hip_labels)
    print(f"hippocampus manifest: {len(hip)} rows in {seconds:.1f} s")
    size = (args.image_size, args.image_size)
    prep2d = Preprocessing(spatial_dims=2, image_size=size, intensity="xray")
    # As the segment_3d workflow with the ImageNet encoder: source 1 mm spacing, random 32^3 patches.
    prep3d = Preprocessing(spatial_dims=3, image_size=(32, 32, 32), intensity="mr", patch=True)
    cores = torch.get_num_threads()
    # (name, split, manifest, root, preprocessing, batch, caches, samples a pass, threads)
    cases = [("pneumonia PNG", "val", pneumonia, png_root, prep2d, args.batch_size, ("none", "memory", "disk"), None,
              threads)]
    if not args.quick:
        # Uncached reads of the 2428-image train folder: a sample of one pass shows the per-item cost.
        cases.append(("pneumonia PNG", "train", pneumonia, png_root, prep2d, args.batch_size, ("none",), 128, threads))
        if cores != threads:
            cases.append(("pneumonia PNG", "val", pneumonia, png_root, prep2d, args.batch_size, ("none", "memory"),
                          None, cores))
    cases.append(("hippocampus NIfTI", "all", hip, hip_root, prep3d, 2, ("none", "memory", "disk"), None, threads))
    rows: list[list[object]] = []
    for name, split, table, root, prep, batch, caches, max_items, count in cases:
        torch.set_num_threads(count)
        task = "segmentation" if prep.patch else "classification"
        classes = class_names(table["label"]) if task == "classification" else []
        splits = ("train", "val", "test") if split == "all" else (split,)
        items = [item for part in splits for item in manifest_items(table, part, task, classes)]
        for cache in caches:
            cache_dir = work / "cache" / f"{name.split()[0]}-{split}"
            shutil.rmtree(cache_dir, ignore_errors=True)  # a cold disk cache: the first pass writes it
            start = time.perf_counter()
            dataset = make_dataset(items, prep, root, train=True, cache=cache, cache_dir=cache_dir, progress=False)
            build = time.perf_counter() - start
            first, second, cpu_ms = _passes(dataset, batch, max_items)
            seen = min(len(items), max_items or len(items))
            first_total = seen / (build + seen / first)
            rows.append([name, split, len(items), cache, count, f"{build:.1f}", f"{first_total:.1f}",
                         f"{second:.1f}", f"{cpu_ms:.2f}"])
            print(" | ".join(str(v) for v in rows[-1]), flush=True)
    torch.set_num_threads(cores)
    return rows


# ---------------------------------------------------------------------------------------------
# 2. Engine against a hand-written loop


def _cached_tensors(work: Path, args: argparse.Namespace, count: int):
    """The first `count` training images of the PNG export, preprocessed once (no augmentation)."""
    import torch

    from medtl.data.dataset import Preprocessing, class_names, make_dataset, manifest_items

    limit = 40 if args.quick else None
    root, labels = _data.export_pneumonia(work, limit=limit)
    manifest, _ = _manifest(work, "pneumonia" if limit is None else "pneumonia_quick", root, labels)
    items = manifest_items(manifest, "train", "classification", class_names(manifest["label"]))[:count]
    prep = Preprocessing(spatial_dims=2, image_size=(args.image_size,) * 2, intensity="xray")
    dataset = make_dataset(items, prep, root, train=False, cache="memory", progress=False)
    images = torch.stack([torch.as_tensor(dataset[i]["image"]).as_subclass(torch.Tensor) for i in range(len(items))])
    labels_t = torch.tensor([int(dataset[i]["label"]) for i in range(len(items))])
    augmenting = make_dataset(items, prep, root, train=True, cache="memory", progress=False)
    return images.contiguous(), labels_t, augmenting


class _Tensors:
    """A map-style dataset over preprocessed tensors (what both loops train on)."""

    def __init__(self, images, labels) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i]}


def _model():
    import torch

    from medtl.models.factory import create_model

    torch.manual_seed(0)
    return create_model("classification", "efficientnet_lite0", in_channels=1, num_classes=2, weights="imagenet").model


def hand_loop(images, labels, batch_size: int, threads: int) -> float:
    """Samples/s of a minimal PyTorch loop: shuffled batches, AdamW, cross-entropy, nothing else."""
    import torch

    torch.set_num_threads(threads)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    model.train()
    for first in range(0, len(order), batch_size):
        index = order[first:first + batch_size]
        loss = loss_fn(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(order) / (time.perf_counter() - start)


def engine_loop(train_ds, val_ds, batch_size: int, *, threads: int | None, deterministic: bool) -> tuple[float, int]:
    """Samples/s of one `fit` epoch (training part only, as the engine reports it) and its threads."""
    import torch

    from medtl.engine import TrainConfig, fit
    from medtl.models.strategies import make_transfer_plan

    model = _model()
    plan = make_transfer_plan(model, "finetune", lr=1e-3)
    ce = torch.nn.CrossEntropyLoss()
    cfg = TrainConfig(epochs=1, batch_size=batch_size, weight_decay=1e-4, num_workers=0, num_threads=threads,
                      deterministic=deterministic, progress=False, drop_last=False, early_stopping_patience=None,
                      amp="off")
    result = fit(model, train_ds, val_ds, loss_fn=lambda out, target: ce(out, target.long()), cfg=cfg, plan=plan)
    record = result.history[0]
    return record["samples_per_s"], int(record.get("num_threads", torch.get_num_threads()))


ENGINE_AUTO = "engine (deterministic, as the workflows run it), threads of its own choice"
HAND_SAME = "hand-written loop, same threads"
HAND_ALL = "hand-written loop, all cores (torch's default)"
ENGINE_ALL = "engine, all cores (the engine's default before this benchmark)"


def train_benchmark(work: Path, args: argparse.Namespace) -> tuple[list[list[object]], dict]:
    import torch

    from medtl.engine.runtime import DistInfo, cpu_share

    steps = 2 if args.quick else args.steps
    rounds = 1 if args.quick else args.rounds
    count = steps * args.batch_size
    images, labels, augmenting = _cached_tensors(work, args, count + args.batch_size)
    train, val = _Tensors(images[:count], labels[:count]), _Tensors(images[count:], labels[count:])
    count = len(train)
    cores = cpu_share(DistInfo())
    results: dict[str, list[float]] = {}
    used: dict[str, list[int]] = {}

    def record(name: str, rate: float, threads: int) -> None:
        results.setdefault(name, []).append(rate)
        used.setdefault(name, []).append(threads)
        print(f"  {name} ({threads} thread(s)): {rate:.1f} samples/s", flush=True)

    def hand(threads: int) -> float:
        return hand_loop(images[:count], labels[:count], args.batch_size, threads)

    # Warm-up: oneDNN builds its kernels for each shape and thread count on first use.
    for threads in sorted({1, cores}):
        hand_loop(images[: 2 * args.batch_size], labels[: 2 * args.batch_size], args.batch_size, threads)
    for index in range(rounds):
        print(f"round {index + 1}/{rounds} ({count} samples = {count // args.batch_size} steps of {args.batch_size}, "
              f"{args.image_size} px; load {os.getloadavg()[0]:.1f})", flush=True)
        # The engine's own thread choice first; the rest use the same count, in an order rotated
        # each round so that drifting load does not always hit the same row.
        rate, chosen = engine_loop(train, val, args.batch_size, threads=None, deterministic=True)
        record(ENGINE_AUTO, rate, chosen)
        runs = [
            (HAND_SAME, lambda t=chosen: hand(t), chosen),
            ("engine, same threads, not deterministic",
             lambda t=chosen: engine_loop(train, val, args.batch_size, threads=t, deterministic=False)[0], chosen),
            ("engine + MONAI augmentations (memory cache), same threads",
             lambda t=chosen: engine_loop(augmenting, val, args.batch_size, threads=t, deterministic=True)[0], chosen),
        ]
        if cores > 1:
            runs += [
                (HAND_ALL, lambda: hand(cores), cores),
                (ENGINE_ALL, lambda: engine_loop(train, val, args.batch_size, threads=cores, deterministic=True)[0],
                 cores),
            ]
        shift = index % len(runs)
        for name, run, threads in runs[shift:] + runs[:shift]:
            record(name, run(), threads)
    torch.set_num_threads(cores)
    rows = [[name, "/".join(str(t) for t in used[name]), f"{statistics.median(rates):.1f}",
             ", ".join(f"{r:.1f}" for r in rates)] for name, rates in results.items()]
    ratios = {"engine / hand loop, engine's threads": [e / h for e, h in zip(results[ENGINE_AUTO], results[HAND_SAME],
                                                                              strict=True)]}
    if ENGINE_ALL in results:
        ratios[f"engine / hand loop, {cores} threads"] = [e / h for e, h in zip(results[ENGINE_ALL], results[HAND_ALL],
                                                                                strict=True)]
    return rows, {"ratios": ratios, "samples": count}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.batch_size = 8
    work = _data.work_folder(args.work)
    _data.require(_data.SHARED_DATA, "the shared data folder")
    os.environ.setdefault("MEDTL_CONFIG_DIR", str(work / "config"))  # benchmark keys stay in the work folder
    logging.basicConfig(level=logging.WARNING)
    import torch

    from medtl.engine.runtime import DistInfo, cpu_share, pick_cpu_threads

    print("machine:", _data.machine())
    cores = cpu_share(DistInfo())
    threads = pick_cpu_threads(cores)
    torch.set_num_threads(cores)
    print(f"threads the engine would choose now: {threads} of {cores}")
    if "data" not in args.skip:
        rows = data_benchmark(work, args, threads)
        _data.print_table(
            "Data pipeline (training transforms, DataLoader without workers)",
            ["data", "split", "items", "cache", "threads", "build s", "first pass samples/s (incl. build)",
             "second pass samples/s", "second pass CPU ms/sample"],
            rows,
        )
    if "train" not in args.skip:
        rows, extra = train_benchmark(work, args)
        _data.print_table(
            f"Training throughput, EfficientNet-Lite0 finetune, {args.image_size} px, batch {args.batch_size}, "
            f"{extra['samples']} samples a measurement",
            ["loop", "threads (per round)", "median samples/s", "samples/s per round"],
            rows,
        )
        for name, values in extra["ratios"].items():
            print(f"{name}: " + ", ".join(f"{v:.2f}" for v in values))
    print("machine after:", _data.machine())


if __name__ == "__main__":
    main()
