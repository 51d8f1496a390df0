"""The training loop: one `fit` for classification and segmentation, 2D and 3D, one process or
many (torchrun), with per-update warm-up + cosine (timm), early stopping, best-epoch selection
and resumable checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medtl.engine.checkpoint import (
    LAST_NAME,
    RunState,
    best_name,
    load_weights,
    resume_run,
    save_best,
    save_last,
)
from medtl.engine.config import FitResult, TrainConfig, TransferPlanLike
from medtl.engine.inference import collate_fn, plain_tensor, sliding_window_predict
from medtl.engine.optim import build_optimizer, build_scheduler, default_param_groups
from medtl.engine.runtime import (
    DistInfo,
    all_reduce_sum,
    auto_cpu_threads,
    barrier,
    broadcast_from_main,
    configure_determinism,
    cpu_share,
    device_setup,
    gather_to_main,
    init_distributed,
    pick_cpu_threads,
    resolve_amp,
    seed_everything,
)
from medtl.engine.sampling import passes_per_epoch, shard_indices, train_sampler
from medtl.errors import ConfigError, InputError

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], "dict[str, float] | float"]
EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class _Runtime:
    """Where this process trains and how (resolved once from the config)."""

    info: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format | None

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None
        )


@dataclass
class _Run:
    """What a run carries from epoch to epoch: its trainers, sampler, progress and wrapped model."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler, stepped per update (see `build_scheduler`)
    scaler: torch.amp.GradScaler
    sampler: Any
    steps_per_epoch: int
    drop_last: bool
    state: RunState
    folder: Path | None
    retune_threads: bool
    first_epoch: int
    passes: int
    best_in_memory: dict[str, torch.Tensor] | None = None
    net: torch.nn.Module | None = None  # the DDP / compiled wrapper of the model, rebuilt on (un)freezing
    trainable: tuple[bool, ...] | None = None
    ema: ModelEmaV3 | None = None  # the averaged weights (train.ema_decay), validated and kept instead

    def kept(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose weights are validated, selected and returned: the average when there is one."""
        return self.ema.module if self.ema is not None else model

    @property
    def trainers(self) -> tuple:
        """(optimizer, scheduler, grad scaler), as checkpoints store them."""
        return self.optimizer, self.scheduler, self.scaler


def fit(
    model: torch.nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    *,
    loss_fn: LossFn,
    cfg: TrainConfig,
    val_metric_fn: MetricFn | None = None,
    plan: TransferPlanLike | None = None,
    checkpoint_dir: Path | str | None = None,
    resume: bool = False,
    manifest_sha256: str = "",
    on_epoch_end: EpochCallback | None = None,
) -> FitResult:
    """Train `model` and leave the best epoch's weights in it.

    Under torchrun every process calls `fit` with the same arguments: it joins the process group
    (see `init_distributed`), wraps the model in DistributedDataParallel, splits the data with
    epoch-seeded samplers, and lets rank 0 show progress, write checkpoints and call
    `on_epoch_end`. The caller leaves the group with `cleanup_distributed()` when done.

    Every epoch: `model.train()`, `plan.on_epoch_start(model, epoch)`, one pass over the training
    data (lr stepped per batch), validation, early-stopping bookkeeping, checkpoint. Validation
    outputs of all ranks are concatenated on CPU in dataset order and passed once per epoch to
    `val_metric_fn(outputs, targets)`; "val_loss" (`loss_fn` averaged over validation samples)
    is always reported. A NaN monitored value (a metric undefined on this validation set) carries
    no information: it is never an improvement and never counts towards early stopping.

    Args:
        model: the network (moved to the training device in place).
        train_ds: yields {"image": C x spatial tensor, "label": class index / multi-hot / mask}.
        val_ds: same layout; whole volumes are allowed with `cfg.val_roi_size`.
        loss_fn: `loss_fn(outputs, labels) -> scalar tensor`.
        cfg: the training config.
        val_metric_fn: `(outputs, targets) -> {name: value}` (or one float, named "val_metric").
        plan: transfer plan giving parameter groups and `on_epoch_start`; None = all trainable
            parameters at `cfg.lr`, without weight decay on biases and norms.
        checkpoint_dir: where `last.pt` (every epoch) and `best-epochNNN.pt` go (rank 0 writes;
            every rank reads on resume, so multi-node runs need a shared folder). None = keep
            the best weights in memory and write nothing.
        resume: continue from `checkpoint_dir/last.pt` when it exists (a fresh start otherwise).
        manifest_sha256: sha256 of the training manifest, stored in checkpoints and checked on resume.
        on_epoch_end: `on_epoch_end(epoch, record)` on rank 0 after each epoch's checkpoint.

    Returns:
        A `FitResult` (history, best epoch and metric, timings).

    Raises:
        ConfigError: bad settings (unknown monitor, resume without a folder, nothing trainable).
        InputError: empty datasets, or a checkpoint from another manifest or format.
        FloatingPointError: when the training loss stops being finite (without fp16 loss scaling).

    Example:
        >>> result = fit(net, train_ds, val_ds, loss_fn=torch.nn.CrossEntropyLoss(), cfg=TrainConfig(epochs=5),
        ...              val_metric_fn=lambda out, y: {"accuracy": (out.argmax(1) == y).float().mean().item()},
        ...              checkpoint_dir="runs/ckpt")
    """
    # Long only by its docstring (the engine's public contract); the body is the run's steps.
    _check_arguments(train_ds, val_ds, plan, resume, checkpoint_dir)
    rt = _setup(model, train_ds, cfg)
    run = _start_run(model, train_ds, cfg, rt, plan, checkpoint_dir, resume, manifest_sha256)
    show = cfg.progress and rt.info.is_main
    with tqdm(total=cfg.epochs, initial=run.state.next_epoch, desc="fit", unit="epoch", disable=not show) as bar:
        for epoch in range(run.state.next_epoch, cfg.epochs):
            if run.state.stopped_early:
                break
            record = _run_epoch(model, epoch, run, train_ds, val_ds, loss_fn, val_metric_fn, plan, cfg, rt)
            _end_epoch(model, epoch, record, run, cfg, rt, manifest_sha256, on_epoch_end)
            bar.set_postfix(train_loss=f"{record['train_loss']:.4f}", **{cfg.monitor: f"{record[cfg.monitor]:.4f}"})
            bar.update(1)
    if run.ema is not None:  # what `_finish` keeps when no epoch was best: the average, as validated
        model.load_state_dict(run.ema.module.state_dict())
    return dataclasses.replace(_finish(model, run.folder, run.state, run.best_in_memory, cfg, rt),
                               passes_per_epoch=run.passes)


def _check_arguments(
    train_ds: Dataset, val_ds: Dataset, plan: Any, resume: bool, checkpoint_dir: Path | str | None
) -> None:
    if plan is not None and not isinstance(plan, TransferPlanLike):
        raise TypeError(
            f"plan must have param_groups and on_epoch_start(model, epoch), not {type(plan).__name__}"
        )
    for name, ds in (("train", train_ds), ("val", val_ds)):
        if len(ds) == 0:  # type: ignore[arg-type]
            raise InputError(f"{name} dataset must hold at least one sample, not 0; check the {name} split")
    if resume and checkpoint_dir is None:
        raise ConfigError(
            "checkpoint_dir must be set when resume=True, not None; pass the folder of the run to resume"
        )


def _start_run(
    model: torch.nn.Module,
    train_ds: Dataset,
    cfg: TrainConfig,
    rt: _Runtime,
    plan: TransferPlanLike | None,
    checkpoint_dir: Path | str | None,
    resume: bool,
    manifest_sha256: str,
) -> _Run:
    """Optimizer, schedule, sampler and progress of a run: fresh, or restored from `last.pt`."""
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    groups = plan.param_groups if plan is not None else default_param_groups(model, cfg.weight_decay)
    optimizer = build_optimizer(groups, cfg)
    passes = passes_per_epoch(math.ceil(len(train_ds) / rt.info.world_size), cfg.batch_size, cfg.epochs,  # type: ignore[arg-type]
                              cfg.min_steps)
    if passes > 1 and rt.info.is_main:
        log.info("the training set is small for %d optimizer steps: each epoch goes over it %d times (train.min_steps)",
                 cfg.min_steps, passes)
    sampler = train_sampler(
        train_ds, cfg.balance, seed=cfg.seed, rank=rt.info.rank, world_size=rt.info.world_size, passes=passes
    )
    # Several passes see every sample several times an epoch: a partial last batch adds nothing, and
    # one of a single sample would fail in BatchNorm (the caller's drop_last guards one pass only).
    drop_last = (cfg.drop_last or passes > 1) and len(sampler) >= cfg.batch_size
    steps_per_epoch = (
        len(sampler) // cfg.batch_size if drop_last else math.ceil(len(sampler) / cfg.batch_size)
    )
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    # timm's warm-up (decay 1 - (1 + step)^-2/3, capped at ema_decay) scales the averaging horizon
    # with the run: early updates are not averaged with the starting weights for long.
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay > 0 else None
    state = RunState()
    if resume:
        state = resume_run(
            folder / LAST_NAME, model, (optimizer, scheduler, scaler), cfg, rt.info, manifest_sha256,  # type: ignore[operator]
            ema=None if ema is None else ema.module,
        )
    return _Run(
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, sampler=sampler, steps_per_epoch=steps_per_epoch,
        drop_last=drop_last, state=state, folder=folder, retune_threads=_retune_threads(cfg, rt, state),
        first_epoch=state.next_epoch, ema=ema, passes=passes,
    )


def _retune_threads(cfg: TrainConfig, rt: _Runtime, state: RunState) -> bool:
    """Whether to measure the CPU thread count again at every epoch.

    Measured per epoch unless the run must be reproducible: then once, and a resumed run keeps
    the count of the run it resumes (float reductions depend on it).
    """
    retune = rt.device.type == "cpu" and cfg.num_threads is None and auto_cpu_threads()
    if retune and cfg.deterministic:
        if state.history and "num_threads" in state.history[-1]:
            torch.set_num_threads(int(state.history[-1]["num_threads"]))
        return False
    return retune


def _run_epoch(
    model: torch.nn.Module,
    epoch: int,
    run: _Run,
    train_ds: Dataset,
    val_ds: Dataset,
    loss_fn: LossFn,
    val_metric_fn: MetricFn | None,
    plan: TransferPlanLike | None,
    cfg: TrainConfig,
    rt: _Runtime,
) -> dict[str, float]:
    """Train one epoch and validate; returns the epoch's record (the same on every rank)."""
    if run.retune_threads and epoch > run.first_epoch:  # the first epoch uses the count `_setup` measured
        pick_cpu_threads(cpu_share(rt.info))
    started = time.perf_counter()
    net = _prepare_epoch(model, epoch, run, plan, cfg, rt)
    run.sampler.set_epoch(epoch)
    loader = _loader(
        train_ds, cfg, rt, batch_size=cfg.batch_size, sampler=run.sampler, drop_last=run.drop_last,
        seed=_epoch_seed(cfg.seed, epoch, rt.info.rank),
    )
    desc = f"epoch {epoch + 1}/{cfg.epochs}"
    loss_sum, seen = _train_epoch(net, loader, run, loss_fn, cfg, rt, desc, first_update=epoch * run.steps_per_epoch)
    _sync_buffers(model, rt.info)
    if run.ema is not None:  # the average of rank 0's buffers, like the model's (parameters agree on every rank)
        _sync_buffers(run.ema.module, rt.info)
    train_seconds = time.perf_counter() - started
    loss_sum, seen = all_reduce_sum([loss_sum, float(seen)], rt.info, rt.device)
    metrics = _evaluate(run.kept(model), val_ds, loss_fn, val_metric_fn, cfg, rt)
    record = {
        "epoch": epoch,
        "train_loss": loss_sum / max(seen, 1.0),
        **metrics,
        **_learning_rates(run.optimizer, per_group=plan is not None),
        "epoch_seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "samples_per_s": seen / max(train_seconds, 1e-9),
        "num_threads": float(torch.get_num_threads()),
    }
    return broadcast_from_main(record, rt.info)  # one set of timings, so every rank decides alike


def _prepare_epoch(
    model: torch.nn.Module, epoch: int, run: _Run, plan: TransferPlanLike | None, cfg: TrainConfig, rt: _Runtime
) -> torch.nn.Module:
    """Train mode, the plan's freezing for `epoch`, and the module that trains (re-wrapped when needed)."""
    model.train()
    if plan is not None:
        plan.on_epoch_start(model, epoch)
    now_trainable = tuple(p.requires_grad for p in model.parameters())
    if not any(now_trainable):
        raise ConfigError(
            f"the model must have trainable parameters at epoch {epoch}, not none; check the strategy"
        )
    if run.net is None or now_trainable != run.trainable:
        # DDP registers gradient hooks for the parameters trainable at wrap time only, so a plan
        # that (un)freezes layers needs a fresh wrapper for gradients to stay synchronised.
        run.net, run.trainable = None, now_trainable
        run.net = _wrap(model, cfg, rt)
    return run.net


def _end_epoch(
    model: torch.nn.Module,
    epoch: int,
    record: dict[str, float],
    run: _Run,
    cfg: TrainConfig,
    rt: _Runtime,
    manifest_sha256: str,
    on_epoch_end: EpochCallback | None,
) -> None:
    """Early-stopping bookkeeping, best and last checkpoints, the log line and the callback."""
    if _update_state(run.state, record, cfg):
        run.best_in_memory = save_best(run.kept(model), run.folder, epoch, cfg, rt.info, manifest_sha256)
    if run.folder is not None:
        save_last(run.folder / LAST_NAME, model, run.trainers, run.state, cfg, rt.info, manifest_sha256,
                  ema=None if run.ema is None else run.ema.module)
    if rt.info.is_main:
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        if on_epoch_end is not None:
            on_epoch_end(epoch, dict(record))


def _setup(model: torch.nn.Module, train_ds: Dataset, cfg: TrainConfig) -> _Runtime:
    info = init_distributed()
    device = device_setup(info, num_threads=cfg.num_threads)
    configure_determinism(cfg.deterministic, compiled=cfg.compile)
    seed_everything(cfg.seed + info.rank)
    amp_dtype = resolve_amp(cfg.amp, device)
    memory_format = None
    if device.type == "cuda" and cfg.channels_last:
        spatial_dims = train_ds[0]["image"].ndim - 1
        memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}.get(spatial_dims)
    model.to(device)
    if memory_format is not None:
        model.to(memory_format=memory_format)
    if cfg.sync_bn and info.distributed and device.type == "cuda":
        # Replaces BatchNorm children in place, so the caller's model object is the one trained.
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if info.is_main:
        log.info(
            "training on %s (world size %d, %d CPU threads), amp=%s",
            device, info.world_size, torch.get_num_threads(), amp_dtype,
        )
    return _Runtime(info, device, amp_dtype, memory_format)


def _wrap(model: torch.nn.Module, cfg: TrainConfig, rt: _Runtime) -> torch.nn.Module:
    net: torch.nn.Module = model
    if rt.info.distributed:
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        net = DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=cfg.find_unused_parameters
        )
    if cfg.compile:
        net = torch.compile(net)
    return net


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of an epoch's data loading on one rank: fixed by (seed, epoch, rank) alone, so a
    resumed epoch draws the same augmentations as the original one."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _loader(
    ds: Dataset, cfg: TrainConfig, rt: _Runtime, *, batch_size: int, sampler: Any, drop_last: bool, seed: int
) -> DataLoader:
    worker_init = None
    if "monai" in sys.modules:  # MONAI random transforms keep their own RandomState: reseed them per epoch
        from monai.data.utils import set_rnd, worker_init_fn

        if cfg.num_workers == 0:
            set_rnd(ds, seed)
        worker_init = worker_init_fn  # seeds each worker's transforms from the loader's generator
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=cfg.num_workers,
        pin_memory=rt.device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=worker_init,
        collate_fn=collate_fn(),
    )


def _learning_rates(optimizer: torch.optim.Optimizer, *, per_group: bool) -> dict[str, float]:
    """The first group's "lr", plus "lr_<name>" per group when a plan gives several."""
    groups = optimizer.param_groups
    rates = {"lr": float(groups[0]["lr"])}
    if per_group and len(groups) > 1:
        rates.update({f"lr_{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(groups)})
    return rates


def _to_device(batch: dict[str, Any], rt: _Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    images = plain_tensor(batch["image"]).to(rt.device, non_blocking=True)
    if rt.memory_format is not None:
        images = images.contiguous(memory_format=rt.memory_format)
    labels = plain_tensor(torch.as_tensor(batch["label"])).to(rt.device, non_blocking=True)
    return images, labels


def _train_epoch(
    net: torch.nn.Module,
    loader: DataLoader,
    run: _Run,
    loss_fn: LossFn,
    cfg: TrainConfig,
    rt: _Runtime,
    desc: str,
    *,
    first_update: int,
) -> tuple[float, int]:
    """One pass over the training data; returns (loss summed over samples, samples seen).

    `first_update` counts the optimizer updates of earlier epochs, so the schedule's position is
    a function of (epoch, step) alone and a resumed run continues it exactly.
    """
    optimizer, scheduler, scaler = run.trainers
    params = [p for group in optimizer.param_groups for p in group["params"]]
    show = cfg.progress and rt.info.is_main
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    seen = 0
    started = time.perf_counter()
    with tqdm(total=len(loader), desc=desc, unit="step", disable=not show, leave=False) as bar:
        for step, batch in enumerate(loader):
            images, labels = _to_device(batch, rt)
            with rt.autocast():
                loss = loss_fn(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step_update(first_update + step + 1)
            if run.ema is not None:
                run.ema.update(_unwrapped(net), step=first_update + step + 1)
            total += loss.detach().double() * images.shape[0]
            seen += images.shape[0]
            if show:
                bar.update(1)
                if step % 10 == 0 or step == len(loader) - 1:  # .item() syncs the GPU: not every step
                    rate = seen * rt.info.world_size / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.1f}")
    value = float(total)
    if not math.isfinite(value) and not scaler.is_enabled():
        raise FloatingPointError(
            f"training loss must stay finite, not {value} ({desc}); lower train.lr, set train.grad_clip "
            "or check the labels"
        )
    return value, seen


def _unwrapped(net: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP and/or torch.compile wrapper (whose state-dict keys the average follows)."""
    while isinstance(net, DistributedDataParallel) or hasattr(net, "_orig_mod"):
        net = net.module if isinstance(net, DistributedDataParallel) else net._orig_mod
    return net


def _sync_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics) before validation and checkpoints.

    DDP broadcasts buffers at the start of each forward pass, so after the last step every rank
    holds its own update; validating with them would make each shard see different statistics.
    """
    if info.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _evaluate(
    model: torch.nn.Module,
    val_ds: Dataset,
    loss_fn: LossFn,
    val_metric_fn: MetricFn | None,
    cfg: TrainConfig,
    rt: _Runtime,
) -> dict[str, float]:
    model.eval()
    indices = list(shard_indices(len(val_ds), rt.info.rank, rt.info.world_size))  # type: ignore[arg-type]
    batch_size = cfg.val_batch_size or (1 if cfg.val_roi_size else cfg.batch_size)
    loader = DataLoader(
        val_ds,
        batch_size=batch_size,
        sampler=indices,
        num_workers=cfg.num_workers,
        pin_memory=rt.device.type == "cuda",
        collate_fn=collate_fn(),
    )
    outputs, targets, loss_sum = [], [], 0.0
    with torch.no_grad(), rt.autocast():
        for batch in loader:
            images, labels = _to_device(batch, rt)
            if cfg.val_roi_size:
                out = sliding_window_predict(
                    model,
                    images,
                    roi_size=cfg.val_roi_size,
                    sw_batch_size=cfg.sw_batch_size,
                    overlap=cfg.sw_overlap,
                )
            else:
                out = model(images)
            out = plain_tensor(out)
            loss_sum += float(loss_fn(out, labels)) * images.shape[0]
            outputs.append(out.float().cpu())
            targets.append(labels.cpu())
    loss_sum, count = all_reduce_sum([loss_sum, float(len(indices))], rt.info, rt.device)
    local = (indices, _cat_padded(outputs), _cat_padded(targets)) if outputs else None
    gathered = gather_to_main(local, rt.info)
    result: dict[str, float] | BaseException | None = None
    if rt.info.is_main:
        try:
            result = {"val_loss": loss_sum / count, **_metrics(gathered, val_metric_fn)}
        except Exception as err:  # re-raised on every rank below, so no rank waits forever
            result = err
    result = broadcast_from_main(result, rt.info)
    if isinstance(result, BaseException):
        raise result
    return result  # type: ignore[return-value]


def _metrics(gathered: list[Any] | None, val_metric_fn: MetricFn | None) -> dict[str, float]:
    if val_metric_fn is None:
        return {}
    parts = [part for part in gathered or [] if part is not None]
    order = torch.as_tensor([i for part in parts for i in part[0]]).argsort()
    outputs = _cat_padded([part[1] for part in parts])[order]
    targets = _cat_padded([part[2] for part in parts])[order]
    value = val_metric_fn(outputs, targets)
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    return {"val_metric": float(value)}


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch, zero-padding spatial axes to the largest size.

    Whole validation volumes differ in size (e.g. hippocampus crops); zero padding adds only
    background (label 0, equal logits -> class 0), which foreground metrics such as Dice ignore.
    """
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) == 1:
        return torch.cat(tensors)
    target = [max(sizes) for sizes in zip(*shapes, strict=True)]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for have, want in zip(reversed(t.shape[1:]), reversed(target), strict=True):
            pad += [0, want - have]
        padded.append(torch.nn.functional.pad(t, pad))
    return torch.cat(padded)


def _update_state(state: RunState, record: dict[str, float], cfg: TrainConfig) -> bool:
    """Book an epoch's record into the run state; returns whether it is the best epoch so far.

    A NaN monitored value (e.g. AUROC or Dice undefined on this validation set) is no information:
    never an improvement, and not a bad epoch either, so it cannot stop the run early.
    """
    if cfg.monitor not in record:
        raise ConfigError(
            f"train.monitor must be one of {sorted(k for k in record if k != 'epoch')}, not {cfg.monitor!r}; "
            "pick a metric that val_metric_fn returns"
        )
    value, best = record[cfg.monitor], state.best_metric
    sign = 1.0 if cfg.mode == "max" else -1.0
    improved = math.isfinite(value) and (not math.isfinite(best) or sign * (value - best) > cfg.min_delta)
    state.train_seconds += record["epoch_seconds"]
    state.history.append(record)
    state.next_epoch = int(record["epoch"]) + 1
    if improved:
        state.best_metric, state.best_epoch, state.bad_epochs = value, int(record["epoch"]), 0
        state.time_to_best = state.train_seconds
    elif not math.isnan(value):
        state.bad_epochs += 1
    patience = cfg.early_stopping_patience
    state.stopped_early = (
        patience is not None and state.bad_epochs >= patience and state.next_epoch < cfg.epochs
    )
    return improved


def _finish(
    model: torch.nn.Module,
    folder: Path | None,
    state: RunState,
    best_in_memory: dict[str, torch.Tensor] | None,
    cfg: TrainConfig,
    rt: _Runtime,
) -> FitResult:
    best_path = folder / best_name(state.best_epoch) if folder is not None and state.best_epoch >= 0 else None
    if best_path is not None:
        model.load_state_dict(load_weights(best_path))
    elif best_in_memory is not None:
        model.load_state_dict(best_in_memory)
    elif state.best_epoch < 0 and rt.info.is_main:
        warnings.warn(f"{cfg.monitor} was never finite: keeping the last epoch's weights", stacklevel=3)
    barrier(rt.info)
    return FitResult(
        history=[dict(r) for r in state.history],
        best_epoch=state.best_epoch,
        best_metric=state.best_metric,
        monitor=cfg.monitor,
        epochs_run=len(state.history),
        stopped_early=state.stopped_early,
        total_train_seconds=state.train_seconds,
        time_to_best_seconds=state.time_to_best,
        best_checkpoint=best_path,
    )
