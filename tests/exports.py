"""Real export folders for tests: de-identified PNG exports with a labels CSV, as hospitals ship them.

Shared by the tests of the workflow layer; a test module imports these helpers from here, never
from another test module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SPLITS = {"train": 36, "val": 12, "test": 12}


def write_png_exports(root: Path, *, seed: int = 0, labels: tuple[str, str] = ("0", "1")) -> Path:
    """60 grey 32x32 PNG exports in train/ val/ test/ folders and a path,label,split CSV.

    The second of `labels` has a brighter square in the middle: learnable in one epoch.

    Args:
        root: the export folder to write (created).
        seed: seeds the pixel noise.
        labels: the two label values written to the CSV (e.g. ("normal", "abnormal")).

    Returns:
        The labels CSV (`root/labels.csv`).
    """
    rng = np.random.default_rng(seed)
    rows, number = [], 0
    for split, count in SPLITS.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            number += 1
            finding = k % 2
            pixels = rng.normal(90.0, 15.0, (32, 32))
            if finding:
                pixels[8:24, 8:24] += 90.0
            path = f"{split}/{split}_{number:05d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(root / path)
            rows.append({"path": path, "label": labels[finding], "split": split})
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def write_nifti_exports(root: Path, *, patients: int = 12, mask_labels: int = 3, seed: int = 0) -> Path:
    """3D NIfTI volumes (16x16x8, no DICOM modality, like an MR collection) with label masks, and a labels CSV.

    Every mask holds the labels 0 to `mask_labels - 1` (a box per foreground label); one volume per
    patient, split 2:1:1 into train, val and test by the labels CSV.

    Returns:
        The labels CSV (`root/labels.csv`, columns path, mask, split).
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(patients):
        volume = rng.normal(300.0, 50.0, (16, 16, 8)).astype(np.float32)
        mask = np.zeros((16, 16, 8), dtype=np.uint8)
        for label in range(1, mask_labels):
            mask[2 * label:2 * label + 3, 4:12, 2:6] = label
            volume[mask == label] += 200.0 * label
        name = f"vol_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "images" / name)
        nib.save(nib.Nifti1Image(mask, np.eye(4)), root / "labels" / name)
        rows.append({"path": f"images/{name}", "mask": f"labels/{name}", "split": ("train", "train", "val", "test")[i % 4]})
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv
