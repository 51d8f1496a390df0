"""Training engine: the loop (`fit`), checkpoints, distribution, class balance and inference.

Example:
    >>> from medtl.engine import TrainConfig, fit, predict
    >>> result = fit(model, train_ds, val_ds, loss_fn=loss, val_metric_fn=auroc, cfg=TrainConfig(epochs=10),
    ...              plan=plan, checkpoint_dir="run/ckpt", manifest_sha256=sha)
    >>> rows = predict(model, test_ds, activation="softmax")
"""

from medtl.engine.checkpoint import load_checkpoint, load_weights
from medtl.engine.config import FitResult, TrainConfig, TransferPlanLike
from medtl.engine.inference import predict, sliding_window_predict, tta_flips
from medtl.engine.loop import fit
from medtl.engine.optim import build_optimizer, build_scheduler, default_param_groups
from medtl.engine.runtime import (
    DistInfo,
    cleanup_distributed,
    configure_determinism,
    device_setup,
    init_distributed,
    resolve_amp,
    seed_everything,
)
from medtl.engine.sampling import BalancedSampler, class_counts, class_weights, dataset_labels, sample_weights

__all__ = [
    "BalancedSampler",
    "DistInfo",
    "FitResult",
    "TrainConfig",
    "TransferPlanLike",
    "build_optimizer",
    "build_scheduler",
    "class_counts",
    "class_weights",
    "cleanup_distributed",
    "configure_determinism",
    "dataset_labels",
    "default_param_groups",
    "device_setup",
    "fit",
    "init_distributed",
    "load_checkpoint",
    "load_weights",
    "predict",
    "resolve_amp",
    "sample_weights",
    "seed_everything",
    "sliding_window_predict",
    "tta_flips",
]
