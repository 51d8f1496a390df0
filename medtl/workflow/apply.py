"""Apply a packaged model to studies: the frozen preprocessing, the network, masks back on the input grid.

Shared by `medtl predict`, `medtl evaluate` and the registered pyfunc model, so all three give
the scores the training run gave for the same study.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt
from monai.data import Dataset, MetaTensor
from tqdm.auto import tqdm

from medtl.data.dataset import scoring_item, scoring_transforms
from medtl.engine.inference import predict
from medtl.errors import InputError
from medtl.evaluation.shift import intensity_stats
from medtl.workflow.package import ModelPackage


@dataclass
class Scored:
    """One study's result: class probabilities, or a label map on the input's grid with its affine."""

    id: str
    probs: np.ndarray | None = None  # (classes,)
    mask: np.ndarray | None = None  # integer label map, the input's spatial shape
    affine: np.ndarray | None = None  # the mask's voxel-to-RAS affine (the input's)
    intensity: dict[str, float] | None = None  # raw-image statistics for the shift checks
    input_shape: tuple[int, ...] = ()  # the loaded image's spatial shape (the manifest's `shape`)


def device_for(network: torch.nn.Module) -> torch.device:
    """CUDA when present (the network is moved there), else the CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network.to(device)
    return device


def score_studies(package: ModelPackage, network: torch.nn.Module, studies: Sequence[tuple[str, Sequence[Path], str]],
                  *, progress: bool = True, batch_size: int = 8) -> list[Scored]:
    """Score studies given as `(id, files, modality)` with the package's frozen preprocessing.

    Args:
        package: The frozen model description.
        network: Its network with the trained weights.
        studies: One `(id, files, modality)` per study (files as `discover` found them).
        progress: Show progress bars.
        batch_size: Studies per forward pass (classification).

    Returns:
        One `Scored` per study, in order.
    """
    pipeline = scoring_transforms(package.prep())
    load = pipeline.transforms[0]
    items = (load(scoring_item(study_id, files, modality, package.prep())) for study_id, files, modality in studies)
    return score_loaded(package, network, items, total=len(studies), progress=progress, batch_size=batch_size)


def loaded_array(item_id: str, array: np.ndarray, modality: str, package: ModelPackage) -> dict:
    """An in-memory image as `LoadImaged` would give it: (1, *spatial) float32, identity affine (1 mm).

    For the pyfunc model's `image` column; the array is in MONAI's axis order (as `load_study` gives).
    """
    data = np.asarray(array, dtype=np.float32)
    if data.ndim != package.spatial_dims:
        raise InputError(f"an image must have {package.spatial_dims} axes for this model, not {data.ndim}; "
                         "pass one grey-level image per row (no channel axis)")
    image = MetaTensor(torch.from_numpy(data[None].copy()), affine=torch.eye(4, dtype=torch.float64))
    return {"id": item_id, "image": image, "intensity": scoring_item(item_id, [], modality, package.prep())["intensity"]}


#: Studies preprocessed and held in memory at a time: memory stays flat however many are scored.
CHUNK = 64


def score_loaded(package: ModelPackage, network: torch.nn.Module, items: Iterable[dict], *, total: int | None = None,
                 progress: bool = True, batch_size: int = 8) -> list[Scored]:
    """Score items already loaded (`LoadImaged` output or `loaded_array`) with the frozen preprocessing.

    Items are preprocessed and scored `CHUNK` at a time (segmentation: one at a time), so only the
    results, not every preprocessed image, accumulate.
    """
    device_for(network)
    pipeline = scoring_transforms(package.prep())
    rest = mt.Compose(list(pipeline.transforms[1:]))
    scored: list[Scored] = []
    with tqdm(total=total, desc="score", unit="study", disable=not progress) as bar:
        for chunk in _chunks(items, 1 if package.task == "segmentation" else CHUNK):
            loaded = [_preprocessed(item, rest) for item in chunk]
            if package.task == "segmentation":
                scored += [_segment(package, network, item, pipeline) for item in loaded]
            else:
                scored += _classify(package, network, loaded, batch_size)
            bar.update(len(chunk))
    return scored


def _chunks(items: Iterable[dict], size: int) -> Iterable[list[dict]]:
    chunk: list[dict] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _classify(package: ModelPackage, network: torch.nn.Module, loaded: list[dict], batch_size: int) -> list[Scored]:
    """Class probabilities of preprocessed items (sliding windows for patch-trained 3D models)."""
    prep = package.prep()
    dataset = Dataset([{"id": item["id"], "image": item["image"].as_tensor()} for item in loaded])
    activation = "sigmoid" if package.multi_label else "softmax"
    roi = tuple(prep.image_size) if prep.patch else None
    outputs = predict(network, dataset, activation=activation, batch_size=batch_size if roi is None else 1,
                      roi_size=roi, amp="auto", progress=False, flips=package.flips())
    return [Scored(out["id"], probs=out["output"].numpy().astype(np.float64), intensity=item["stats"],
                   input_shape=item["input_shape"])
            for out, item in zip(outputs, loaded, strict=True)]


def _preprocessed(item: dict, rest: mt.Compose) -> dict:
    """A loaded item's raw statistics, then the frozen transforms after loading, metadata kept."""
    stats = intensity_stats(np.asarray(item["image"].as_tensor()))
    shape = tuple(int(n) for n in item["image"].shape[1:])
    item = rest(item)
    item["stats"], item["input_shape"] = stats, shape
    return item


def _segment(package: ModelPackage, network: torch.nn.Module, item: dict, pipeline: mt.Compose) -> Scored:
    """Sliding-window (patch-trained) or whole-input segmentation, inverted onto the input's grid."""
    prep = package.prep()
    roi = tuple(prep.image_size) if prep.patch else None
    image: MetaTensor = item["image"]
    (out,) = predict(network, Dataset([{"id": item["id"], "image": image.as_tensor()}]), activation="softmax",
                     batch_size=1, roi_size=roi, amp="auto", progress=False, flips=package.flips())
    label = out["output"].argmax(0, keepdim=True).to(torch.float32)
    pred = MetaTensor(label, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    inverted = mt.Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=True)(
        {"image": image, "pred": pred})["pred"]
    mask = np.rint(np.asarray(inverted.as_tensor()[0])).astype(np.uint8)
    return Scored(item["id"], mask=mask, affine=np.asarray(inverted.affine, dtype=np.float64),
                  intensity=item["stats"], input_shape=item["input_shape"])


def decide(package: ModelPackage, probs: np.ndarray) -> int:
    """The predicted class index: binary at the frozen threshold (score of class 1 >= threshold),
    else the most probable class."""
    if len(package.classes) == 2 and package.threshold is not None and not package.multi_label:
        return int(probs[1] >= package.threshold)
    return int(np.argmax(probs))


def score_columns(package: ModelPackage, probs: np.ndarray) -> dict[str, float]:
    """predictions.csv's score columns: `y_score` for two classes, `y_score_<class>` otherwise."""
    if len(package.classes) == 2:
        return {"y_score": float(probs[1])}
    return {f"y_score_{c}": float(p) for c, p in zip(package.classes, probs, strict=True)}
