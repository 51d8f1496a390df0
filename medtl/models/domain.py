"""Domain adaptation to a new site or scanner from unlabelled target studies: AdaBN and DANN.

- **AdaBN** (Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation"):
  after training on the source domain, `adapt_batchnorm` re-estimates every BatchNorm layer's
  running mean and variance on target-domain images. No weight and no other buffer changes.
- **DANN** (Ganin et al. 2016, "Domain-Adversarial Training of Neural Networks"): `DANNModel` puts
  a domain classifier on the encoder's pooled features behind a gradient-reversal layer, so the
  encoder learns features that predict the class but not the domain. It trains with the engine's
  unchanged `fit`:

  ============  ======================================================================
  train labels  `(B, 2)` long = [class index, or -1 for an unlabelled target study,
                domain index]; wrap the training set in `DomainLabelDataset`.
  train output  `(B, num_classes + num_domains)`: class logits, then domain logits
                (`model.train()`).
  eval output   `(B, num_classes)` class logits only (`model.eval()`), so validation
                on labelled source studies and `predict` work as for a `Classifier`.
  loss          `dann_loss(num_classes, domain_weight)` reads both layouts and skips
                class labels of -1.
  schedule      `DANNPlan` wraps a `TransferPlan` and sets the reversal strength at each
                epoch start: lambda(p) = 2 / (1 + exp(-gamma p)) - 1, p = epoch / epochs.
  ============  ======================================================================

`image_batches` turns a tensor, a dataset of {"image": ...} items or a loader into image batches
(shared with `medtl.models.fewshot`).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from medtl.errors import ConfigError, InputError
from medtl.models.heads import Classifier
from medtl.models.strategies import TransferPlan

ImageSource = torch.Tensor | np.ndarray | Dataset | Iterable[Any]
DOMAIN_PREFIXES = ("grl.", "domain_head.")


# --------------------------------------------------------------------------------------- images in
def _plain(value: Any) -> torch.Tensor:
    """A tensor without MONAI metadata (MetaTensor ops are slow and carry source metadata)."""
    tensor = torch.as_tensor(value)
    as_tensor = getattr(tensor, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else tensor


def _is_sample_sequence(data: Any) -> bool:
    """A map-style dataset or a list of samples (indexable, sized), as opposed to a loader of batches."""
    if isinstance(data, IterableDataset | DataLoader):
        return False
    return isinstance(data, Dataset | Sequence)


def image_batches(data: ImageSource, *, batch_size: int = 32) -> Iterator[torch.Tensor]:
    """Image batches from a tensor/array, a map-style dataset or an iterable of batches.

    Args:
        data: an (N, C, *spatial) tensor or array (cut into batches); a dataset or list whose
            items are {"image": C x spatial} dicts (batched in order); or a loader / iterable
            yielding batches as {"image": ...} dicts, (images, ...) tuples or image tensors.
        batch_size: images per batch for tensors and datasets.

    Yields:
        (B, C, *spatial) plain tensors on the CPU (or wherever the source put them).

    Raises:
        InputError: when a batch has no "image" entry.
    """
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield _plain(data[start:start + batch_size])
        return
    if _is_sample_sequence(data):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)  # type: ignore[arg-type]
    for batch in data:
        if isinstance(batch, Mapping):
            if "image" not in batch:
                raise InputError(f"image batches must be dicts with an 'image' entry, not keys {sorted(batch)}; "
                                 f"pass the dataset built by medtl.data")
            batch = batch["image"]
        elif isinstance(batch, list | tuple):
            batch = batch[0]
        yield _plain(batch)


def _num_batches(data: ImageSource, batch_size: int) -> int | None:
    if isinstance(data, np.ndarray | torch.Tensor):
        return math.ceil(data.shape[0] / batch_size)
    if _is_sample_sequence(data):
        return math.ceil(len(data) / batch_size)  # type: ignore[arg-type]
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """`device` (the model is moved there) or the device of the model's parameters."""
    if device is not None:
        device = torch.device(device)
        model.to(device)
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------- AdaBN
def adapt_batchnorm(
    model: nn.Module,
    data: ImageSource,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> int:
    """AdaBN: re-estimate every BatchNorm layer's running statistics on target-domain images.

    Each layer's statistics are reset and re-accumulated as a cumulative average over the batches
    (momentum None), with only the BatchNorm layers in train mode: dropout stays off and no
    weight changes. The running mean becomes the mean over the target images (exactly, for equal
    batch sizes); the running variance the average of the per-batch unbiased variances. Momenta
    and every module's train/eval mode are restored afterwards; on error the old statistics are.
    Written here rather than with `torch.optim.swa_utils.update_bn` because that one runs the
    whole model in train mode (active dropout changes the statistics of later layers), restores
    only the top-level mode (undoing frozen-BatchNorm settings) and cannot read dict batches.

    Args:
        model: any model (a task model, `DANNModel`, `MultiTaskModel`, ...).
        data: target-domain images, as for `image_batches` (deterministic preprocessing, no
            augmentation; labels, if any, are ignored).
        device: where to run (the model is moved there); None = the model's device.
        batch_size: images per forward pass for tensors and datasets (larger = steadier variance).
        progress: show a tqdm bar.

    Returns:
        The number of BatchNorm layers re-estimated.

    Raises:
        InputError: when `data` yields no image (nothing is changed then).

    Example:
        >>> n = adapt_batchnorm(bundle.model, target_ds, batch_size=64)
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    device = _model_device(model, device)
    batches = iter(image_batches(data, batch_size=batch_size))
    first = next(batches, None)
    if first is None or first.shape[0] == 0:
        raise InputError("adaptation data must hold at least one target-domain image, not none; "
                         "check adaptation.target and the domain column")
    if not layers:
        return 0
    with _reestimating(model, layers), torch.no_grad():
        for images in tqdm(_chain(first, batches), total=_num_batches(data, batch_size), desc="adabn", unit="batch",
                           disable=not progress, leave=False):
            model(images.to(device, non_blocking=True))
    return len(layers)


@contextlib.contextmanager
def _reestimating(model: nn.Module, layers: list[_BatchNorm]) -> Iterator[None]:
    """Only `layers` in train mode, their statistics reset to a cumulative average over the batches.

    On exit every module's train/eval mode and the layers' momenta are restored; on error also
    the statistics they had before.
    """
    modes = {module: module.training for module in model.modules()}
    momenta = {layer: layer.momentum for layer in layers}
    saved = {layer: [b.detach().clone() for b in layer.buffers()] for layer in layers}
    try:
        model.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative moving average over the batches
            layer.train()
        yield
    except BaseException:
        with torch.no_grad():
            for layer, buffers in saved.items():
                for buffer, old in zip(layer.buffers(), buffers, strict=True):
                    buffer.copy_(old)
        raise
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, mode in modes.items():
            module.training = mode


def _chain(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest


# --------------------------------------------------------------------------------------- gradient reversal
class _ReverseGradient(torch.autograd.Function):
    """Identity forward; gradient times -lambda backward (no library provides this layer)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * -ctx.lambda_, None


def grad_reverse(x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """Gradient reversal: returns `x` unchanged; its gradient is multiplied by `-lambda_`.

    Args:
        x: any tensor.
        lambda_: reversal strength (>= 0).

    Returns:
        A view of `x` whose backward pass flips and scales the gradient.
    """
    return _ReverseGradient.apply(x, float(lambda_))


class GradientReversal(nn.Module):
    """`grad_reverse` as a layer; `lambda_` is a plain attribute the schedule updates.

    Args:
        lambda_: initial reversal strength.
    """

    def __init__(self, lambda_: float = 1.0) -> None:
        super().__init__()
        self.lambda_ = float(lambda_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambda_)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_:.4g}"


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """Ganin et al.'s reversal schedule 2 / (1 + exp(-gamma p)) - 1: 0 at p=0, ~1 at p=1.

    Args:
        progress: training progress p, clipped to [0, 1].
        gamma: steepness (10 in the paper).

    Returns:
        The reversal strength in [0, 1).
    """
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


# --------------------------------------------------------------------------------------- DANN
class DANNModel(nn.Module):
    """A classifier with a domain classifier behind a gradient-reversal layer (DANN).

    Keeps the classifier's `encoder` and `head` under the same names, so transfer strategies work
    unchanged (the domain head joins the "head" group) and `classifier_state_dict()` loads into a
    plain `Classifier`. See the module docstring for the output and label layouts.

    Args:
        classifier: a single-label `Classifier` from `create_model`.
        num_domains: domain classes (2 = source/target; more = one per site).
        hidden: width of the domain classifier's hidden layer.
        dropout: dropout in the domain classifier.
        lambda_: initial reversal strength (`DANNPlan` schedules it per epoch).

    Raises:
        TypeError: when `classifier` is not a `Classifier`.
        ConfigError: for a multi-label classifier or invalid sizes.
    """

    def __init__(self, classifier: Classifier, num_domains: int = 2, *, hidden: int = 256, dropout: float = 0.5,
                 lambda_: float = 1.0) -> None:
        super().__init__()
        if not isinstance(classifier, Classifier):
            raise TypeError(f"DANN needs a medtl Classifier, not {type(classifier).__name__}; build it with "
                            f"create_model('classification', ...) (segmentation: use AdaBN)")
        if classifier.multi_label:
            raise ConfigError("model.multi_label must be false for adaptation.method=dann, not true; DANN "
                              "labels hold one class index per study")
        for key, value, low in (("num_domains", num_domains, 2), ("hidden", hidden, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"adaptation.{key} must be an integer >= {low}, not {value!r}; fix the config")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"adaptation.dropout must be in [0, 1), not {dropout!r}; use e.g. 0.5")
        self.encoder = classifier.encoder
        self.head = classifier.head
        self.multi_label = False
        self.grl = GradientReversal(lambda_)
        features = self.encoder.num_features
        self.domain_head = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_domains),
        )
        param = next(classifier.parameters(), None)
        if param is not None:
            self.domain_head.to(param.device)

    @property
    def num_classes(self) -> int:
        """Number of class logits."""
        return self.head.fc.out_features

    @property
    def num_domains(self) -> int:
        """Number of domain logits."""
        return self.domain_head[-1].out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's deepest feature map."""
        return self.encoder.forward_features(x)

    def forward_with_domain(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (B, num_classes) and domain logits (B, num_domains), in any mode."""
        features = self.encoder.forward_features(x)
        pooled = features.flatten(2).mean(-1)
        return self.head(features), self.domain_head(self.grl(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Train mode: [class logits | domain logits]; eval mode: class logits only."""
        if not self.training:
            return self.head(self.encoder.forward_features(x))
        logits, domains = self.forward_with_domain(x)
        return torch.cat([logits, domains.to(logits.dtype)], dim=1)

    def set_progress(self, progress: float, *, gamma: float = 10.0, max_lambda: float = 1.0) -> float:
        """Set the reversal strength for training progress p in [0, 1]; returns it."""
        self.grl.lambda_ = max_lambda * dann_lambda(progress, gamma)
        return self.grl.lambda_

    def classifier_state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """The weights without the domain classifier: loads into the `Classifier` it came from."""
        return OrderedDict((k, v) for k, v in self.state_dict().items() if not k.startswith(DOMAIN_PREFIXES))


def _find_dann(model: nn.Module) -> DANNModel:
    """The `DANNModel` inside DistributedDataParallel / torch.compile wrappers."""
    while not isinstance(model, DANNModel):
        inner = next((getattr(model, name) for name in ("module", "_orig_mod")
                      if getattr(model, name, None) is not None), None)
        if inner is None:
            raise TypeError(f"model must be a DANNModel, not {type(model).__name__}; wrap the classifier in DANNModel")
        model = inner
    return model


@dataclass(frozen=True)
class DANNPlan:
    """A transfer plan plus DANN's reversal schedule, for the engine's `plan=` argument.

    `on_epoch_start` runs the base plan's hook, then sets the model's reversal strength to
    `max_lambda * dann_lambda(epoch / epochs, gamma)` (0 in the first epoch: the domain classifier
    learns before its gradient reaches the encoder).

    Attributes:
        base: the plan of the transfer strategy (`make_transfer_plan(dann_model, ...)`).
        epochs: planned epochs (the `train.epochs` given to `fit`).
        gamma: schedule steepness (10 in Ganin et al.).
        max_lambda: final reversal strength.
    """

    base: TransferPlan
    epochs: int
    gamma: float = 10.0
    max_lambda: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise ConfigError(f"train.epochs must be an integer >= 1 for DANN, not {self.epochs!r}")
        if not (isinstance(self.gamma, int | float) and self.gamma > 0):
            raise ConfigError(f"adaptation.gamma must be a positive number, not {self.gamma!r}; use e.g. 10")
        if not (isinstance(self.max_lambda, int | float) and self.max_lambda >= 0):
            raise ConfigError(f"adaptation.max_lambda must be a number >= 0, not {self.max_lambda!r}; use e.g. 1")

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base plan's optimizer groups (the domain classifier is in "head")."""
        return self.base.param_groups

    def lambda_at(self, epoch: int) -> float:
        """Reversal strength during `epoch` (0-based)."""
        return self.max_lambda * dann_lambda(epoch / self.epochs, self.gamma)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """The base plan's freezing rule, then this epoch's reversal strength."""
        self.base.on_epoch_start(model, epoch)
        _find_dann(model).grl.lambda_ = self.lambda_at(epoch)


def cross_entropy_known(logits: torch.Tensor, targets: torch.Tensor, *,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the rows whose target is >= 0; a zero that keeps the graph when none is.

    `F.cross_entropy(ignore_index=-1)` returns NaN for a batch without any labelled row, which
    happens with DANN batches of target studies only.

    Args:
        logits: (B, K) logits.
        targets: (B,) class indices, -1 = unknown.
        weight: optional (K,) class weights.

    Returns:
        A scalar tensor.
    """
    known = targets >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    if weight is not None:
        weight = weight.to(logits.device, torch.float32)
    return F.cross_entropy(logits[known].float(), targets[known].long(), weight=weight)


def dann_loss(num_classes: int, domain_weight: float = 1.0, *,
              class_weights: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The DANN objective: class cross-entropy on labelled rows + weighted domain cross-entropy.

    Args:
        num_classes: class logits at the front of the model's output.
        domain_weight: weight of the domain term (the reversal strength scales what reaches the
            encoder on top of it).
        class_weights: optional (num_classes,) class weights.

    Returns:
        `loss(outputs, labels)`: outputs (B, num_classes + num_domains) with labels (B, 2) =
        [class or -1, domain] (training), or outputs (B, num_classes) with labels (B,) or (B, 2)
        (validation: class term only).

    Raises:
        ConfigError: for invalid weights.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"model.num_classes must be an integer >= 1, not {num_classes!r}")
    if not (isinstance(domain_weight, int | float) and domain_weight >= 0):
        raise ConfigError(f"adaptation.domain_weight must be a number >= 0, not {domain_weight!r}; use e.g. 1.0")

    def loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        classes = labels[:, 0] if labels.ndim == 2 else labels
        value = cross_entropy_known(outputs[:, :num_classes], classes, weight=class_weights)
        if outputs.shape[1] > num_classes:
            if labels.ndim != 2 or labels.shape[1] != 2:
                raise InputError(f"DANN training labels must have shape (batch, 2) = [class or -1, domain], not "
                                 f"{tuple(labels.shape)}; wrap the training set in DomainLabelDataset")
            value = value + domain_weight * F.cross_entropy(outputs[:, num_classes:].float(), labels[:, 1])
        return value

    return loss


# --------------------------------------------------------------------------------------- DANN data
def domain_labels(values: Sequence[Any], *, target: str | None = None,
                  column: str = "site") -> tuple[np.ndarray, list[str]]:
    """Domain indices of studies from a manifest column (e.g. `site` or `scanner`).

    Args:
        values: the column's value per study.
        target: the target domain's value: then 0 = source (every other value), 1 = target.
            None = one domain per distinct value (sorted).
        column: the column's name, for messages.

    Returns:
        (int64 domain index per study, domain names).

    Raises:
        ConfigError: when `target` is not a value of the column.
    """
    text = np.asarray([str(v) for v in values])
    if target is not None:
        if not (text == str(target)).any():
            raise ConfigError(f"adaptation.target must be a value of manifest column '{column}', not {target!r}; "
                              f"choose one of {sorted(set(text.tolist()))}")
        return (text == str(target)).astype(np.int64), ["source", str(target)]
    names = sorted(set(text.tolist()))
    index = {name: i for i, name in enumerate(names)}
    return np.asarray([index[v] for v in text], dtype=np.int64), names


class DomainLabelDataset(Dataset):
    """Wraps a classification dataset so each item's "label" is [class or -1, domain] (long).

    Args:
        dataset: yields {"image", "label" (class index, -1 for unlabelled studies), ...} items.
        domains: domain index of every item (from `domain_labels`).
        class_labels: class index of every item (-1 = unlabelled) overriding the dataset's.

    Raises:
        InputError: when the lengths differ.
    """

    def __init__(self, dataset: Dataset, domains: Sequence[int],
                 class_labels: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.domains = np.asarray(domains, dtype=np.int64)
        self.class_labels = None if class_labels is None else np.asarray(class_labels, dtype=np.int64)
        size = len(dataset)  # type: ignore[arg-type]
        for name, column in (("domains", self.domains), ("class_labels", self.class_labels)):
            if column is not None and len(column) != size:
                raise InputError(f"{name} must have one entry per study ({size}), not {len(column)}")

    def __len__(self) -> int:
        return len(self.domains)

    def _pack(self, item: Mapping[str, Any], index: int) -> dict[str, Any]:
        label = self.class_labels[index] if self.class_labels is not None else int(_plain(item["label"]))
        return {**item, "label": torch.tensor([int(label), int(self.domains[index])], dtype=torch.long)}

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, list):  # MONAI multi-sample transforms return one dict per sample
            return [self._pack(part, index) for part in item]
        return self._pack(item, index)
