"""Checkpoints: written atomically, tied to one manifest, complete enough to resume bit-exactly.

`last.pt` holds everything a resumed run needs (model, optimizer, scheduler, scaler, RNG states
of every rank, epoch, early-stopping state, history, manifest sha256); `best-epochNNN.pt` holds
the weights of the best epoch so far.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtl.engine.config import TrainConfig
from medtl.engine.runtime import DistInfo, barrier, gather_to_main, seed_everything
from medtl.errors import InputError

log = logging.getLogger(__name__)

# The only config key a resumed run may change without changing its results (worker counts change
# how augmentation streams are seeded; epochs change the cosine schedule).
_RESUME_FREE_KEYS = {"progress"}

# 2: the learning-rate schedule is timm's (its state, and each optimizer group's "lr_scale");
# a format-1 file holds a torch LambdaLR state that the schedule cannot continue.
FORMAT_VERSION = 2
LAST_NAME = "last.pt"


def best_name(epoch: int) -> str:
    """File name of the best-weights checkpoint of an epoch."""
    return f"best-epoch{epoch:03d}.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then rename over `path`.

    A process killed mid-write leaves the previous file intact (rename is atomic on POSIX).

    Args:
        obj: what to save.
        path: destination file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def capture_rng() -> dict[str, Any]:
    """RNG states of Python, NumPy, torch CPU and every CUDA device, in `weights_only`-safe types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back RNG states captured by `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path, *, manifest_sha256: str) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain types only) and check it belongs to this manifest.

    Args:
        path: checkpoint file.
        manifest_sha256: sha256 of the manifest the current run trains on.

    Returns:
        The checkpoint dictionary.

    Raises:
        InputError: when the file is unreadable, of another format, or from another manifest.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/foreign files
        raise InputError(
            f"checkpoint {path.name} must be a readable medtl checkpoint, not an unreadable file ({type(err).__name__}); "
            "delete it or start a fresh run with resume=False"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(
            f"checkpoint {path.name} must have format {FORMAT_VERSION}, not {found!r}; "
            "it was written by another tool or version: start a fresh run with resume=False"
        )
    saved = ckpt.get("manifest_sha256", "")
    if saved != manifest_sha256:
        raise InputError(
            f"checkpoint {path.name} must come from the current manifest (sha256 {manifest_sha256[:12] or '<empty>'}...), "
            f"not from manifest sha256 {saved[:12] or '<empty>'}...; the data changed since that run: "
            "start a fresh run (resume=False) or use another checkpoint_dir"
        )
    return ckpt


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict stored in a best-weights or last checkpoint.

    Raises:
        InputError: when the file is unreadable or holds no model weights.
    """
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(
            f"checkpoint {Path(path).name} must be readable, not {type(err).__name__}; rerun training"
        ) from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise InputError(
            f"checkpoint {Path(path).name} must hold a 'model' entry, not miss it; rerun training"
        )
    return ckpt["model"]


def remove_stale_best(folder: Path, keep: str | None) -> None:
    """Delete best-weights files other than `keep` (left by an earlier best or a killed write)."""
    for stale in folder.glob("best-epoch*.pt"):
        if stale.name != keep:
            stale.unlink(missing_ok=True)
    for tmp in folder.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


@dataclass
class RunState:
    """Everything about the run's progress that a checkpoint must carry besides the tensors."""

    next_epoch: int = 0
    best_metric: float = math.nan
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    time_to_best: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state dict (safe from later in-place updates)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_best(
    model: torch.nn.Module,
    folder: Path | None,
    epoch: int,
    cfg: TrainConfig,
    info: DistInfo,
    manifest_sha256: str,
) -> dict[str, torch.Tensor] | None:
    """Keep the weights of a new best epoch: in `folder/best-epochNNN.pt` (rank 0 writes) or, without
    a folder, in memory on every rank.

    Returns:
        The in-memory copy when `folder` is None, else None.
    """
    if folder is None:
        return cpu_state(model)
    if info.is_main:
        atomic_save(
            {
                "format": FORMAT_VERSION,
                "model": cpu_state(model),
                "epoch": epoch,
                "monitor": cfg.monitor,
                "manifest_sha256": manifest_sha256,
            },
            folder / best_name(epoch),
        )
    return None


def save_last(
    path: Path,
    model: torch.nn.Module,
    trainers: tuple,
    state: RunState,
    cfg: TrainConfig,
    info: DistInfo,
    manifest_sha256: str,
    *,
    ema: torch.nn.Module | None = None,
) -> None:
    """Write `last.pt` after an epoch (rank 0), then drop best files it no longer refers to.

    Every rank must call this: each contributes its RNG states.

    Args:
        path: the `last.pt` path.
        model: the unwrapped model.
        trainers: (optimizer, scheduler, grad scaler).
        state: progress after the epoch.
        cfg: the training config (stored to warn about changes on resume).
        info: this process's position in the run.
        manifest_sha256: sha256 of the training manifest.
        ema: the moving average of the weights (train.ema_decay), or None.
    """
    optimizer, scheduler, scaler = trainers
    rng = gather_to_main(capture_rng(), info)  # each rank's own streams (dropout differs per rank)
    if info.is_main:
        ckpt = {
            "format": FORMAT_VERSION,
            "manifest_sha256": manifest_sha256,
            "model": cpu_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "world_size": info.world_size,
            "config": dataclasses.asdict(cfg),
            "state": dataclasses.asdict(state),
        }
        if ema is not None:
            ckpt["ema"] = cpu_state(ema)
        atomic_save(ckpt, path)
        # Only now is an older best file unreferenced; deleting it earlier could strand last.pt.
        remove_stale_best(path.parent, best_name(state.best_epoch) if state.best_epoch >= 0 else None)
    barrier(info)


def resume_run(
    path: Path,
    model: torch.nn.Module,
    trainers: tuple,
    cfg: TrainConfig,
    info: DistInfo,
    manifest_sha256: str,
    *,
    ema: torch.nn.Module | None = None,
) -> RunState:
    """Restore model, optimizer, scheduler, scaler, this rank's RNG and `ema` (the moving average of
    the weights, when the run keeps one) from `last.pt`.

    Returns:
        The saved progress, or a fresh `RunState` when there is no checkpoint yet.

    Raises:
        InputError: for an unreadable checkpoint or one of another manifest.
    """
    if not path.exists():
        if info.is_main:
            log.info("no checkpoint in %s yet: starting a fresh run", path.parent.name)
        return RunState()
    ckpt = load_checkpoint(path, manifest_sha256=manifest_sha256)
    changed = sorted(
        k
        for k, v in dataclasses.asdict(cfg).items()
        if k not in _RESUME_FREE_KEYS and ckpt["config"].get(k) != v
    )
    if changed and info.is_main:
        warnings.warn(
            f"resuming with changed train settings {changed}: results will differ from an uninterrupted run",
            stacklevel=3,
        )
    optimizer, scheduler, scaler = trainers
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        if "ema" not in ckpt:
            raise InputError(f"{path.name} must hold the moving average of the weights to resume with train.ema_decay "
                             "set, not lack it; resume with train.ema_decay=0 (as the run started) or start afresh")
        ema.load_state_dict(ckpt["ema"])
    state = RunState(**ckpt["state"])
    if len(ckpt["rng"]) == info.world_size:
        restore_rng(ckpt["rng"][info.rank])
    else:
        seed_everything(cfg.seed + info.rank + 1000 * state.next_epoch)
        if info.is_main:
            warnings.warn(
                f"resuming on {info.world_size} processes, not {len(ckpt['rng'])}: random streams "
                "are reseeded, so results will differ from an uninterrupted run",
                stacklevel=3,
            )
    if info.is_main:  # a warning so the CLI (WARNING level) shows it: the user must see where training restarts
        log.warning("resumed from %s: %d epoch(s) already done, continuing", path.name, state.next_epoch)
    return state
