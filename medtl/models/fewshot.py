"""Few-shot transfer: k labelled studies per class on top of a frozen pretrained encoder.

The encoder is run once (`embed`: the deepest feature map, global-average pooled as the
classification head pools it); two cheap classifiers are fitted on the embeddings of k studies
per class and scored on the test embeddings, over several random draws of the k studies
(`few_shot_eval`):

- `PrototypeClassifier`: nearest class mean (Snell et al. 2017, "Prototypical Networks"), on
  L2-normalised embeddings by default (SimpleShot, Wang et al. 2019), probabilities = softmax of
  negative squared Euclidean distances. On unit vectors ||a - b||^2 = 2 - 2 cos(a, b), so it ranks
  like cosine similarity; squared Euclidean is what prototypical networks found best.
- the linear probe (`linear_probe`): scikit-learn's `LogisticRegression` on the same
  (L2-normalised) embeddings.

Draws are patient-level (`sample_k_shot`: k distinct patients per class, one study each), so no
patient's second study inflates the support set.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, normalize
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn
from tqdm.auto import tqdm

from medtl.errors import ConfigError, InputError
from medtl.models.domain import ImageSource, _model_device, _num_batches, image_batches
from medtl.models.encoder import Encoder
from medtl.vocabulary import FEW_SHOT_METHODS


def _encoder_of(model: nn.Module) -> Encoder:
    while not isinstance(model, Encoder):
        inner = next((getattr(model, name) for name in ("encoder", "module", "_orig_mod")
                      if getattr(model, name, None) is not None), None)
        if inner is None:
            raise TypeError(f"model must be a medtl Encoder or a model with an `.encoder`, not {type(model).__name__}; "
                            f"build it with medtl.models.create_model")
        model = inner
    return model


def embed(
    model: nn.Module,
    data: ImageSource,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Pooled encoder features of every image: the deepest map averaged over space.

    Runs in eval mode without gradients (BatchNorm uses its running statistics, dropout is off)
    and restores every module's mode afterwards.

    Args:
        model: an `Encoder` or a model with one (`Classifier`, `Segmenter`, `DANNModel`, ...).
        data: images as for `image_batches` (a tensor, a dataset of {"image"} items, a loader).
        batch_size: images per forward pass for tensors and datasets.
        device: where to run (the model is moved there); None = the model's device.
        progress: show a tqdm bar.

    Returns:
        A float32 array (N, num_features), in data order.

    Raises:
        InputError: when `data` yields no image.

    Example:
        >>> X_train = embed(bundle.model, sets["train"])
    """
    encoder = _encoder_of(model)
    device = _model_device(model, device)
    modes = {module: module.training for module in model.modules()}
    parts = []
    try:
        model.eval()
        batches = image_batches(data, batch_size=batch_size)
        with torch.no_grad():
            for images in tqdm(batches, total=_num_batches(data, batch_size), desc="embed", unit="batch",
                               disable=not progress, leave=False):
                features = encoder.forward_features(images.to(device, non_blocking=True))
                parts.append(features.flatten(2).mean(-1).float().cpu())
    finally:
        for module, mode in modes.items():
            module.training = mode
    if not parts:
        raise InputError("data must hold at least one image to embed, not none; check the split")
    return torch.cat(parts).numpy()


class PrototypeClassifier(ClassifierMixin, BaseEstimator):
    """Nearest-prototype classifier: one mean embedding per class, softmax over -distance^2.

    Args:
        normalize: L2-normalise embeddings before averaging and measuring distances.
        temperature: divides the negative squared distances before the softmax (smaller =
            sharper probabilities; rankings, hence AUROC, do not change).

    Attributes:
        classes_: the class labels, sorted.
        prototypes_: (n_classes, n_features) mean (normalised) embedding of each class.
        n_features_in_: embedding width seen in `fit`.

    Example:
        >>> clf = PrototypeClassifier().fit(X_support, y_support)
        >>> clf.predict_proba(X_test)[:, 1]
    """

    def __init__(self, normalize: bool = True, temperature: float = 1.0) -> None:
        self.normalize = normalize
        self.temperature = temperature

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        return normalize(X) if self.normalize else X

    def fit(self, X: Any, y: Any) -> PrototypeClassifier:
        """Learn one prototype per class.

        Args:
            X: (n_samples, n_features) embeddings.
            y: (n_samples,) class labels.

        Returns:
            self.

        Raises:
            ValueError: for a non-positive temperature or invalid arrays.
        """
        if not (isinstance(self.temperature, int | float) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, not {self.temperature!r}; use e.g. 1.0")
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, inverse = np.unique(y, return_inverse=True)
        X = self._prepare(X)
        self.prototypes_ = np.stack([X[inverse == i].mean(axis=0) for i in range(len(self.classes_))])
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities: softmax over -||x - prototype||^2 / temperature.

        Args:
            X: (n_samples, n_features) embeddings.

        Returns:
            (n_samples, n_classes) probabilities, columns in `classes_` order.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        distances = euclidean_distances(self._prepare(X), self.prototypes_, squared=True)
        return softmax(-distances / self.temperature, axis=1)

    def predict(self, X: Any) -> np.ndarray:
        """The class of the nearest prototype."""
        proba = self.predict_proba(X)  # first: it raises NotFittedError before classes_ is read
        return self.classes_[np.argmax(proba, axis=1)]


def linear_probe(C: float = 1.0, max_iter: int = 2000, *, normalize: bool = True) -> Pipeline:
    """The linear probe: scikit-learn `LogisticRegression` (L2 penalty, lbfgs) on the embeddings.

    Embeddings are L2-normalised (as for the prototypes), not standardised: per-feature statistics
    of a support set of 2k studies would blow noise features up to the scale of informative ones.

    Args:
        C: inverse regularisation strength (no validation set to tune it in the few-shot regime).
        max_iter: solver iterations.
        normalize: L2-normalise each embedding first.

    Returns:
        An unfitted scikit-learn pipeline.
    """
    steps = [Normalizer()] if normalize else []
    return make_pipeline(*steps, LogisticRegression(C=C, max_iter=max_iter))


def _check_k(k: Any) -> None:
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"fewshot.ks must hold integers >= 1, not {k!r}; e.g. [1, 5, 10]")


def sample_k_shot(labels: Sequence[Any], patients: Sequence[Any], k: int, seed: int) -> np.ndarray:
    """Indices of a k-shot support set: k distinct patients per class, one random study each.

    The same patient may be drawn for two classes if they have studies of both.

    Args:
        labels: class label of every study.
        patients: patient pseudonym of every study.
        k: patients per class.
        seed: random seed (the same seed gives the same draw).

    Returns:
        Sorted int64 indices into `labels`, k per class.

    Raises:
        ConfigError: when k is not a positive integer.
        InputError: when lengths differ or a class has fewer than k patients.
    """
    _check_k(k)
    labels = np.asarray(labels)
    patients = np.asarray(patients)
    if labels.shape != patients.shape or labels.ndim != 1:
        raise InputError(f"labels and patients must be two flat sequences of one length, not shapes "
                         f"{labels.shape} and {patients.shape}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        pool = np.unique(patients[rows])
        if len(pool) < k:
            raise InputError(f"class {label!r} must have at least k={k} patients in the training pool, not "
                             f"{len(pool)}; lower fewshot.ks or add studies")
        for patient in rng.choice(pool, size=k, replace=False):
            chosen.append(rng.choice(rows[patients[rows] == patient]))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _estimator(method: str, normalize_embeddings: bool, C: float) -> Any:
    if method == "prototype":
        return PrototypeClassifier(normalize=normalize_embeddings)
    return linear_probe(C=C, normalize=normalize_embeddings)


def _scores(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    accuracy = float(accuracy_score(y_true, classes[np.argmax(proba, axis=1)]))
    if len(np.unique(y_true)) < 2:
        return float("nan"), accuracy  # AUROC is undefined on one class
    if len(classes) == 2:
        return float(roc_auc_score(y_true == classes[1], proba[:, 1])), accuracy
    return float(roc_auc_score(y_true, proba, multi_class="ovr", labels=classes)), accuracy


def _summary(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    if np.isnan(array).all():
        return float("nan"), float("nan")
    sd = float(np.nanstd(array, ddof=1)) if np.count_nonzero(~np.isnan(array)) > 1 else 0.0
    return float(np.nanmean(array)), sd


def few_shot_eval(
    embeddings_train: np.ndarray,
    y_train: Sequence[Any],
    patients_train: Sequence[Any],
    embeddings_test: np.ndarray,
    y_test: Sequence[Any],
    ks: Sequence[int] = (1, 5, 10, 20),
    draws: int = 5,
    seed: int = 0,
    *,
    methods: Sequence[str] = FEW_SHOT_METHODS,
    normalize_embeddings: bool = True,
    C: float = 1.0,
    progress: bool = True,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Few-shot AUROC and accuracy per k and method, as mean and SD over random draws.

    Draw d of a given k uses the same support set for every method (paired comparison), seeded
    by (seed, k, d), so adding a k or a method does not change the other draws. A k that some
    class cannot supply with distinct patients is skipped with a warning.

    Args:
        embeddings_train: (N, F) embeddings of the training pool (from `embed`).
        y_train: class label of each training study.
        patients_train: patient pseudonym of each training study.
        embeddings_test: (M, F) embeddings of the test studies.
        y_test: class label of each test study (classes of the training pool).
        ks: support sizes (patients per class).
        draws: random draws per k.
        seed: base seed.
        methods: any of "prototype", "linear_probe".
        normalize_embeddings: L2-normalise embeddings (both methods).
        C: inverse regularisation of the linear probe.
        progress: show a tqdm bar.

    Returns:
        {method: {k: {"auroc_mean", "auroc_sd", "accuracy_mean", "accuracy_sd" (floats; AUROC is
        NaN when the test set holds one class; binary AUROC scores the larger label),
        "auroc", "accuracy" (one value per draw), "n_support" (studies per draw)}}}.

    Raises:
        ConfigError: for unknown methods or invalid ks/draws.
        InputError: for mismatched shapes or test classes absent from the training pool.

    Example:
        >>> results = few_shot_eval(X_tr, y_tr, patients, X_te, y_te, ks=(1, 5), draws=10)
        >>> results["prototype"][5]["auroc_mean"]
    """
    # Long only by its docstring (the study's public contract); the body is the draw loop.
    X_train, X_test = np.asarray(embeddings_train), np.asarray(embeddings_test)
    y_train_arr, y_test_arr = np.asarray(y_train), np.asarray(y_test)
    classes = _check_few_shot_inputs(methods, draws, X_train, X_test, y_train_arr, y_test_arr)
    usable = _usable_ks(ks, y_train_arr, np.asarray(patients_train), classes)
    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
    bar = tqdm(total=len(usable) * draws, desc="few-shot", unit="draw", disable=not progress, leave=False)
    for k in usable:
        scores: dict[str, dict[str, list[float]]] = {m: {"auroc": [], "accuracy": []} for m in methods}
        for draw in range(draws):
            draw_seed = int(np.random.SeedSequence([seed, k, draw]).generate_state(1)[0])
            support = sample_k_shot(y_train_arr, patients_train, k, draw_seed)
            for method in methods:
                model = _estimator(method, normalize_embeddings, C).fit(X_train[support], y_train_arr[support])
                auroc, accuracy = _scores(y_test_arr, model.predict_proba(X_test), classes)
                scores[method]["auroc"].append(auroc)
                scores[method]["accuracy"].append(accuracy)
            bar.update(1)
        for method in methods:
            results[method][k] = _entry(scores[method], n_support=k * len(classes))
    bar.close()
    return results


def _check_few_shot_inputs(methods: Sequence[str], draws: Any, X_train: np.ndarray, X_test: np.ndarray,
                           y_train: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    """Refuse unknown methods, bad draws and mismatched arrays; returns the training pool's classes."""
    unknown = [m for m in methods if m not in FEW_SHOT_METHODS]
    if unknown or not methods:
        raise ConfigError(f"fewshot.methods must be among {list(FEW_SHOT_METHODS)}, not {list(methods)}")
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise ConfigError(f"fewshot.draws must be an integer >= 1, not {draws!r}; e.g. 5")
    if X_train.ndim != 2 or X_test.ndim != 2 or X_train.shape[1] != X_test.shape[1]:
        raise InputError(f"embeddings must be (N, F) arrays of one width, not {X_train.shape} and {X_test.shape}")
    if len(y_train) != len(X_train) or len(y_test) != len(X_test):
        raise InputError("y_train and y_test must have one label per embedding row; check the inputs")
    classes = np.unique(y_train)
    missing = sorted(set(np.unique(y_test).tolist()) - set(classes.tolist()))
    if missing:
        raise InputError(f"test classes must occur in the training pool, not {missing}; check the splits")
    return classes


def _usable_ks(ks: Sequence[int], y_train: np.ndarray, patients: np.ndarray, classes: np.ndarray) -> list[int]:
    """The ks every class can supply with distinct patients (the others skipped with a warning)."""
    counts = {label: len(np.unique(patients[y_train == label])) for label in classes}
    usable = []
    for k in ks:
        _check_k(k)
        if k > min(counts.values()):
            warnings.warn(f"few-shot k={k} skipped: the smallest class has {min(counts.values())} patients in the "
                          f"training pool", stacklevel=3)
        else:
            usable.append(int(k))
    return usable


def _entry(scores: dict[str, list[float]], *, n_support: int) -> dict[str, Any]:
    """One method's result at one k: mean and SD over the draws, and the values per draw."""
    auroc_mean, auroc_sd = _summary(scores["auroc"])
    acc_mean, acc_sd = _summary(scores["accuracy"])
    return {
        "auroc_mean": auroc_mean, "auroc_sd": auroc_sd, "accuracy_mean": acc_mean, "accuracy_sd": acc_sd,
        "auroc": scores["auroc"], "accuracy": scores["accuracy"], "n_support": n_support,
    }


def flatten_results(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, float]:
    """`few_shot_eval` output as flat metric names for MLflow, e.g. "fewshot.prototype.k5.auroc_mean".

    Args:
        results: the output of `few_shot_eval`.

    Returns:
        {name: value} for the mean/SD entries.
    """
    return {
        f"fewshot.{method}.k{k}.{name}": float(entry[name])
        for method, by_k in results.items()
        for k, entry in by_k.items()
        for name in ("auroc_mean", "auroc_sd", "accuracy_mean", "accuracy_sd")
    }
