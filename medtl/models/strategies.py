"""Transfer strategies as data the training engine consumes: optimizer groups + a per-epoch hook.

Strategies (by name):
- "finetune": every layer trains from epoch 0.
- "linear_probe": the encoder stays frozen (weights and BatchNorm statistics); only the head
  (classifier, or decoder + segmentation head) trains.
- "gradual_unfreeze": the head first; every `unfreeze_every` epochs one more encoder stage joins,
  from the deepest stage to the stem (ULMFiT, Howard and Ruder 2018).
- "lp_ft": linear probe for `probe_epochs`, then full fine-tuning (Kumar et al. 2022).
- "discriminative": fine-tuning with layer-wise learning-rate decay (`layer_decay`, default 0.5).
`layer_decay` also applies to the other strategies: encoder stage i of S (stem = 0) gets
lr x layer_decay^(S - i); the head gets lr. `bn="freeze"` keeps every encoder BatchNorm in eval
mode (running statistics fixed, affine parameters still train); `bn="adapt"` lets the statistics
of trainable stages adapt to the new data. Frozen stages always keep their statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from medtl.errors import ConfigError, did_you_mean
from medtl.models.encoder import Encoder
from medtl.vocabulary import STRATEGIES

BN_MODES = ("adapt", "freeze")
DEFAULT_DISCRIMINATIVE_DECAY = 0.5
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _task_model(model: nn.Module) -> nn.Module:
    """The medtl task model inside DistributedDataParallel / torch.compile wrappers."""
    while not isinstance(getattr(model, "encoder", None), Encoder):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"model must be a medtl task model with an `.encoder`, not {type(model).__name__}; "
                            f"build it with medtl.models.create_model")
        model = inner
    return model


def _stage_parameters(encoder: Encoder) -> list[list[nn.Parameter]]:
    seen: set[int] = set()
    stages = []
    for modules in encoder.stage_modules():
        params = []
        for param in (p for m in modules for p in m.parameters()):
            if id(param) not in seen:  # a module shared by two stages counts in the first
                seen.add(id(param))
                params.append(param)
        stages.append(params)
    loose = [n for n, p in encoder.named_parameters() if id(p) not in seen]
    if loose:
        raise ValueError(f"every encoder parameter must belong to a stage, not {loose[:3]}; fix the encoder's stages")
    return stages


def stage_group_name(index: int) -> str:
    """Optimizer group name of encoder stage `index` (0 = stem)."""
    return f"encoder.stage{index}"


@dataclass(frozen=True)
class TransferPlan:
    """Optimizer groups and the per-epoch freezing rule of one transfer strategy.

    Attributes:
        strategy: the strategy name.
        param_groups: torch optimizer groups ("params", "lr", "name"): "head" and, unless
            linear probing, one "encoder.stage<i>" per stage; every parameter that trains at
            some epoch is in a group from the start.
        num_stages: encoder stages (stem = 0).
        bn: "adapt" or "freeze".
        unfreeze_every: epochs between two unfreezing steps (gradual_unfreeze).
        probe_epochs: linear-probe epochs before fine-tuning (lp_ft).
    """

    strategy: str
    param_groups: list[dict[str, Any]]
    num_stages: int
    bn: str
    unfreeze_every: int
    probe_epochs: int

    def trainable_groups(self, epoch: int) -> tuple[str, ...]:
        """Names of the groups that train in `epoch` (0-based), in unfreezing order.

        gradual_unfreeze: ("head",) in epochs [0, k), then + "encoder.stage<S-1>" (deepest) in
        [k, 2k), + "encoder.stage<S-2>" in [2k, 3k), ... down to the stem (k = unfreeze_every).
        """
        head = ("head",)
        deepest_first = tuple(stage_group_name(i) for i in reversed(range(self.num_stages)))
        if self.strategy == "linear_probe" or (self.strategy == "lp_ft" and epoch < self.probe_epochs):
            return head
        if self.strategy == "gradual_unfreeze":
            return head + deepest_first[: epoch // self.unfreeze_every]
        return head + deepest_first

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Set `requires_grad` for this epoch and put frozen BatchNorm layers in eval mode.

        Call right after `model.train()` at the start of every epoch (0-based).

        Args:
            model: the task model (or its DDP / torch.compile wrapper).
            epoch: the epoch about to start.
        """
        model = _task_model(model)
        trainable = set(self.trainable_groups(epoch))
        for param in model.parameters():
            param.requires_grad_("head" in trainable)
        for index, modules in enumerate(model.encoder.stage_modules()):
            train_stage = stage_group_name(index) in trainable
            for module in modules:
                for param in module.parameters():
                    param.requires_grad_(train_stage)
                for layer in module.modules():
                    if isinstance(layer, _BATCHNORM) and (not train_stage or self.bn == "freeze"):
                        layer.eval()


def make_transfer_plan(
    model: nn.Module,
    strategy: str = "finetune",
    *,
    lr: float,
    layer_decay: float | None = None,
    bn: str = "adapt",
    unfreeze_every: int = 1,
    probe_epochs: int = 1,
) -> TransferPlan:
    """The optimizer groups and freezing schedule of a transfer strategy for a task model.

    Args:
        model: a model from `create_model` (has `.encoder`; everything else is "head").
        strategy: one of `medtl.vocabulary.STRATEGIES` (see the module docstring).
        lr: learning rate of the head (and of the encoder without layer decay).
        layer_decay: per-stage learning-rate factor in (0, 1]; None = 1 (or 0.5 for
            "discriminative").
        bn: "adapt" or "freeze" (encoder BatchNorm statistics).
        unfreeze_every: epochs between unfreezing steps for "gradual_unfreeze".
        probe_epochs: linear-probe epochs for "lp_ft".

    Returns:
        The plan; pass `plan.param_groups` to the optimizer and call `plan.on_epoch_start`.

    Raises:
        ConfigError: for an unknown strategy (with close matches) or invalid values.

    Example:
        >>> plan = make_transfer_plan(bundle.model, "gradual_unfreeze", lr=1e-3)
        >>> plan.trainable_groups(1)
        ('head', 'encoder.stage4')
    """
    layer_decay = _checked_layer_decay(strategy, lr, layer_decay, bn, unfreeze_every, probe_epochs)
    model = _task_model(model)
    stages = _stage_parameters(model.encoder)
    encoder_ids = {id(p) for stage in stages for p in stage}
    head = [p for p in model.parameters() if id(p) not in encoder_ids]
    groups: list[dict[str, Any]] = [{"params": head, "lr": float(lr), "name": "head"}]
    if strategy != "linear_probe":
        count = len(stages)
        groups += [
            {"params": params, "lr": float(lr) * layer_decay ** (count - index), "name": stage_group_name(index)}
            for index, params in enumerate(stages) if params
        ]
    return TransferPlan(strategy=strategy, param_groups=groups, num_stages=len(stages), bn=bn,
                        unfreeze_every=unfreeze_every, probe_epochs=probe_epochs)


def _checked_layer_decay(strategy: str, lr: float, layer_decay: float | None, bn: str, unfreeze_every: int,
                         probe_epochs: int) -> float:
    """Check `make_transfer_plan`'s arguments; returns the layer decay to use (None resolved)."""
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"transfer.strategy must be a known strategy, not {strategy!r}; {did_you_mean(strategy, STRATEGIES)}")
    if bn not in BN_MODES:
        raise ConfigError(f"transfer.bn must be one of {list(BN_MODES)}, not {bn!r}; fix the transfer config")
    if not (isinstance(lr, int | float) and lr > 0):
        raise ConfigError(f"transfer.lr must be a positive number, not {lr!r}; use e.g. 1e-3")
    if layer_decay is None:
        layer_decay = DEFAULT_DISCRIMINATIVE_DECAY if strategy == "discriminative" else 1.0
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"transfer.layer_decay must be in (0, 1], not {layer_decay!r}; use e.g. 0.5")
    for key, value in (("unfreeze_every", unfreeze_every), ("probe_epochs", probe_epochs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"transfer.{key} must be an integer >= 1, not {value!r}; fix the transfer config")
    return layer_decay
