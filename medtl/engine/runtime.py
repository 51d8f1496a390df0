"""Where and how training runs: process group (torchrun), device, threads, seeds, determinism
and mixed precision."""

from __future__ import annotations

import datetime
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from medtl.errors import ConfigError

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Position of this process in a (possibly single-process) run.

    Attributes:
        rank: global rank (0 = the process that logs and writes checkpoints).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        local_world_size: processes on this node (shares the CPU cores).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs, shows progress and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether gradients are synchronised across processes."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError as err:
        raise ConfigError(
            f"environment variable {name} must be an integer, not {raw!r}; launch with torchrun"
        ) from err


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by torchrun's environment variables (idempotent).

    Without `WORLD_SIZE` > 1 this is a single-process run and nothing is initialised.

    Args:
        backend: "nccl" or "gloo"; None = NCCL when CUDA is available, else gloo.
        timeout_minutes: collective timeout (long validation passes run on every rank).

    Returns:
        This process's `DistInfo`.

    Raises:
        ConfigError: when WORLD_SIZE > 1 but torchrun's other variables are missing.

    Example:
        >>> info = init_distributed()  # under `torchrun --nproc_per_node 2 train.py`
    """
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), local_world)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ConfigError(
            f"environment must define {list(_TORCHRUN_VARS)} when WORLD_SIZE > 1, not miss {missing}; "
            "launch with `torchrun --nproc_per_node N ...`"
        )
    info = DistInfo(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), max(local_world, 1))
    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
        kwargs["device_id"] = torch.device("cuda", info.local_rank)  # binds NCCL to one GPU early
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=info.rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        **kwargs,
    )
    return info


def cleanup_distributed() -> None:
    """Leave the process group, if one was joined (safe to call in single-process runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_setup(info: DistInfo | None = None, *, num_threads: int | None = None) -> torch.device:
    """Pick the device for this process and tune the backend for it.

    On CUDA: the GPU of `local_rank`, TF32 matmuls. On CPU, the intra-op thread count is
    `num_threads` if given, else OMP_NUM_THREADS if set (torchrun sets it), else chosen by
    `pick_cpu_threads` among the cores left to this process (its share of the node's cores).

    Args:
        info: position in the run; None = read from torchrun's environment (or single process).
        num_threads: CPU intra-op threads; None = as described above.

    Returns:
        The device to train on.
    """
    info = info or DistInfo(
        local_rank=_env_int("LOCAL_RANK", 0), local_world_size=_env_int("LOCAL_WORLD_SIZE", 1)
    )
    if torch.cuda.is_available():
        index = info.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        torch.set_float32_matmul_precision(
            "high"
        )  # TF32 on Ampere+: large speed-up, accuracy unaffected in practice
        return torch.device("cuda", index)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    elif auto_cpu_threads():
        torch.set_num_threads(pick_cpu_threads(cpu_share(info)))
    return torch.device("cpu")


def cpu_share(info: DistInfo) -> int:
    """This process's share of the cores it may run on (split between the node's processes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(info.local_world_size, 1))


def auto_cpu_threads() -> bool:
    """Whether medtl picks the CPU thread count (OMP_NUM_THREADS, when set, is obeyed instead)."""
    return "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available()


def _probe_seconds(threads: int, reps: int, give_up_after: float) -> float:
    """Slowest of `reps` timings of a small conv + elementwise workload on `threads` threads."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, 32, 32, generator=gen)
    w = torch.randn(32, 32, 3, 3, generator=gen)
    v = torch.randn(1 << 17, generator=gen)
    times = []
    with torch.no_grad():
        for _ in range(reps):
            start = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            for _ in range(10):
                v.mul(1.0001)
            times.append(time.perf_counter() - start)
            if times[-1] > give_up_after:
                break
    return max(times)


def pick_cpu_threads(max_threads: int, *, reps: int = 5) -> int:
    """The fastest intra-op thread count right now, among max_threads, max_threads/2, ..., 1.

    Why measure: every parallel op of OpenMP waits for all its threads, so when other processes
    keep the cores busy each op waits for a scheduler time slice. Seen on 2 shared cores: 2 threads
    trained EfficientNet-Lite0 (64 px) at 5 samples/s, 1 thread at 38. Neither torch nor OpenMP
    adapts to that (libgomp's OMP_DYNAMIC follows the 1-minute load average, far too slowly), so a
    workload of a few ms (a conv and elementwise ops above torch's parallel grain size) is timed
    `reps` times at each candidate count, and the count with the best worst-case time is kept.
    Load comes and goes, and a contended op costs far more (10x) than a lost core on an idle
    machine (<2x), so more threads must be clearly faster (by 20 %) to be chosen; on an idle
    machine they are (2 threads take ~0.55x the time of 1 on the conv).

    Args:
        max_threads: the most threads to consider (this process's share of the cores).
        reps: timings per candidate (the slowest counts).

    Returns:
        The chosen count, also set with `torch.set_num_threads`.
    """
    candidates = []
    count = max(1, max_threads)
    while count not in candidates:
        candidates.append(count)
        count = max(1, count // 2)
    if len(candidates) == 1:
        torch.set_num_threads(candidates[0])
        return candidates[0]
    best, best_seconds = 1, math.inf
    for threads in reversed(candidates):  # 1 thread first: its time bounds how long the others may take
        seconds = _probe_seconds(threads, reps, give_up_after=4 * best_seconds)
        if seconds < best_seconds * 0.8:
            best, best_seconds = threads, seconds
    torch.set_num_threads(best)
    return best


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with MONAI's `set_determinism`.

    `set_determinism` also switches cuDNN to deterministic mode; the switches `configure_determinism`
    set from `TrainConfig.deterministic` are put back, so seeding never changes how a run computes.

    Args:
        seed: non-negative seed (taken modulo 2**32, as every seeded generator does).

    Example:
        >>> seed_everything(cfg.seed + info.rank)
    """
    from monai.utils import set_determinism  # seconds-long import, only needed here

    cudnn = torch.backends.cudnn
    deterministic, benchmark = cudnn.deterministic, cudnn.benchmark
    set_determinism(seed=seed)
    cudnn.deterministic, cudnn.benchmark = deterministic, benchmark


def configure_determinism(deterministic: bool, *, compiled: bool = False) -> None:
    """Switch deterministic algorithms and cuDNN autotuning for this process.

    Deterministic mode is "warn only": the few ops without a deterministic kernel (e.g. some 3D
    interpolation backward passes on CUDA) warn instead of stopping the run.

    Args:
        deterministic: True for reproducible (slower) runs, False for cuDNN autotuning.
        compiled: whether `torch.compile` will be used (then its inductor backend is told too).
    """
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if compiled:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    else:
        # Same switch without `use_deterministic_algorithms`' import of torch._inductor (seconds per
        # process, and only useful to torch.compile).
        torch.set_deterministic_debug_mode("warn" if deterministic else "default")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic and torch.cuda.is_available()


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an `amp` setting on a device (None = full precision).

    Args:
        amp: "auto", "bf16", "fp16" or "off".
        device: the training device.

    Returns:
        torch.bfloat16, torch.float16 or None.

    Raises:
        ConfigError: for "fp16" on CPU.
    """
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if amp == "fp16":
        raise ConfigError(
            "train.amp must be 'bf16', 'auto' or 'off' on CPU, not 'fp16'; fp16 needs a CUDA GPU"
        )
    # "auto" stays in fp32 on CPU: bf16 autocast is slower than fp32 on most CPUs.
    return torch.bfloat16 if amp == "bf16" else None


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum floats over all processes (identity in single-process runs)."""
    if not info.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_to_main(obj: Any, info: DistInfo) -> list[Any] | None:
    """Collect one picklable object per process on rank 0 (None on other ranks)."""
    if not info.distributed:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, info: DistInfo) -> Any:
    """Send rank 0's picklable object to every process."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for all processes (no-op in single-process runs)."""
    if info.distributed:
        dist.barrier()
