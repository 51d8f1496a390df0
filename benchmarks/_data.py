"""Shared data for the benchmarks: the real images under ../shared/data, exported the way medtl reads them.

PneumoniaMNIST ships as one .npz of 28x28 uint8 arrays; medtl reads de-identified image exports, so
`export_pneumonia` writes each array as a PNG plus a labels CSV (`path,label,patient_id,split`)
that keeps the published train/val/test split (each image is its own patient). The hippocampus
NIfTI volumes are read in place; `hippocampus_labels` writes their labels CSV (with a `mask`
column) into the work folder. Nothing is ever written into the repository.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PNEUMONIA_NPZ = SHARED_DATA / "pneumoniamnist" / "pneumoniamnist.npz"
HIPPOCAMPUS = SHARED_DATA / "hippocampus"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path(tempfile.gettempdir()) / "medtl-benchmarks"
SPLITS = ("train", "val", "test")


def require(path: Path, what: str) -> Path:
    """Exit with a clear message (status 0: a skip, not a failure) when shared data is absent."""
    if not path.exists():
        print(f"SKIPPED: {what} not found at {path}; the benchmarks need the shared data folder "
              f"../shared/data next to the repository (see its README.md).")
        sys.exit(0)
    return path


def work_folder(work: str | os.PathLike | None) -> Path:
    """The benchmark's work folder (created), refused when it lies inside the repository."""
    folder = Path(work).expanduser().resolve() if work else DEFAULT_WORK
    if folder == REPO or REPO in folder.parents:
        raise SystemExit(f"--work must be outside the repository ({REPO}), not {folder}; e.g. /tmp/medtl-benchmarks")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def export_pneumonia(work: Path, *, limit: int | None = None) -> tuple[Path, Path]:
    """Write PneumoniaMNIST as PNG files + labels.csv under `work` (reused when already complete).

    Args:
        work: the benchmark work folder.
        limit: keep only `limit` images of each split, half of each class (for --quick runs).

    Returns:
        (data root, labels CSV); the CSV's `split` column keeps the published split, less the val/test
        images whose pixels repeat an image of an earlier split (PneumoniaMNIST holds 3 val copies of
        train images: medtl links identical pixels into one group, so a split given across them is
        refused as leakage; the copies are left out, and counted, rather than moved).
    """
    from PIL import Image

    require(PNEUMONIA_NPZ, "PneumoniaMNIST (pneumoniamnist/pneumoniamnist.npz)")
    root = work / ("pneumoniamnist_png_dedup" if limit is None else f"pneumoniamnist_png_dedup_{limit}")
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        return root, labels_csv
    data = np.load(PNEUMONIA_NPZ)
    lines = ["path,label,patient_id,split"]
    earlier: set[bytes] = set()  # pixels of the images of earlier splits
    copies = 0
    for split in SPLITS:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        keep = range(len(images))
        if limit is not None:  # the arrays are sorted by class: take the first of each class
            keep = sorted(i for c in (0, 1) for i in np.flatnonzero(labels == c)[: limit // 2])
        (root / split).mkdir(parents=True, exist_ok=True)
        pixels = [np.asarray(image, dtype=np.uint8).tobytes() for image in images]
        copies += sum(1 for i in keep if pixels[i] in earlier)
        keep = [i for i in keep if pixels[i] not in earlier]
        earlier.update(pixels)
        for i in keep:
            rel = f"{split}/{split}_{i:05d}.png"
            Image.fromarray(np.asarray(images[i], dtype=np.uint8), mode="L").save(root / rel)
            lines.append(f"{rel},{int(labels[i])},pneumo-{split}-{i:05d},{split}")
    print(f"PneumoniaMNIST export: {copies} val/test images left out (pixel copies of an earlier split's image)")
    labels_csv.write_text("\n".join(lines) + "\n")  # written last: its presence marks a complete export
    return root, labels_csv


def hippocampus_labels(work: Path, *, limit: int | None = None) -> tuple[Path, Path]:
    """A labels CSV (`path,mask,patient_id`) for the hippocampus volumes, written under `work`.

    Returns:
        (data root = the shared hippocampus folder, labels CSV in the work folder).
    """
    require(HIPPOCAMPUS / "images", "hippocampus NIfTI volumes (hippocampus/images)")
    images = sorted((HIPPOCAMPUS / "images").glob("*.nii.gz"))[: limit or None]
    labels_csv = work / ("hippocampus_labels.csv" if limit is None else f"hippocampus_labels_{limit}.csv")
    lines = ["path,mask,patient_id"]
    for image in images:
        lines.append(f"images/{image.name},labels/{image.name},hippo-{image.name.split('.')[0]}")
    labels_csv.write_text("\n".join(lines) + "\n")
    return HIPPOCAMPUS, labels_csv


def hippocampus_volume_labels(work: Path) -> tuple[Path, Path]:
    """A 3D classification labels CSV (`path,label,patient_id`): is the hippocampus small?

    The label comes from the experts' masks: "small" when the segmented hippocampus (anterior +
    posterior voxels, 1 mm^3 each) is below the median of the 191 cases, else "normal" (hippocampal
    volume is the standard MRI marker of atrophy). The classifier sees the image only.

    Returns:
        (data root = the shared hippocampus folder, labels CSV in the work folder).
    """
    import nibabel as nib
    import numpy as np

    require(HIPPOCAMPUS / "labels", "hippocampus masks (hippocampus/labels)")
    images = sorted((HIPPOCAMPUS / "images").glob("*.nii.gz"))
    volumes = {image.name: float(np.count_nonzero(np.asarray(nib.load(HIPPOCAMPUS / "labels" / image.name).dataobj)))
               for image in images}
    median = float(np.median(list(volumes.values())))
    labels_csv = work / "hippocampus_volume_labels.csv"
    lines = ["path,label,patient_id"]
    for image in images:
        label = "small" if volumes[image.name] < median else "normal"
        lines.append(f"images/{image.name},{label},hippo-{image.name.split('.')[0]}")
    labels_csv.write_text("\n".join(lines) + "\n")
    return HIPPOCAMPUS, labels_csv


def mlflow_store(work: Path) -> str:
    """Point MLflow at a SQLite store inside `work` (never the repository's mlruns)."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def setup(work: str | os.PathLike | None, *, progress: bool = False) -> Path:
    """What every training benchmark does first; returns the work folder.

    Project keys go to `<work>/config` and MLflow to `<work>/mlflow.db` (never the repository's),
    MLflow's artifact progress bars are off unless `progress` (the PHI scan downloads each run's
    artifacts), and logging shows warnings only.
    """
    import logging

    folder = work_folder(work)
    os.environ.setdefault("MEDTL_CONFIG_DIR", str(folder / "config"))
    print("MLflow store:", mlflow_store(folder))
    if not progress:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.WARNING)
    return folder


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import platform

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": str(cores),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cuda": str(torch.cuda.is_available()),
        "load_avg_1_5_15": " ".join(f"{x:.1f}" for x in load),
    }


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """Print a GitHub-markdown table (pastes straight into docs/benchmarks.md)."""
    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
