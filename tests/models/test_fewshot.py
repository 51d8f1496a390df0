"""Few-shot: embeddings, the prototype classifier, patient-level k-shot draws and their evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import check_estimator
from torch import nn

from medtl.errors import ConfigError, InputError
from medtl.models import Classifier, Encoder
from medtl.models.fewshot import (
    PrototypeClassifier,
    embed,
    few_shot_eval,
    flatten_results,
    linear_probe,
    sample_k_shot,
)


def _separable(n_per_class: int, seed: int, classes=(0, 1, 2), dim: int = 8, spread: float = 0.3):
    """Clusters around distinct directions, far apart relative to their spread."""
    rng = np.random.default_rng(seed)
    centres = {c: 10.0 * np.eye(dim)[i] + 1.0 for i, c in enumerate(classes)}
    X = np.concatenate([centres[c] + spread * rng.standard_normal((n_per_class, dim)) for c in classes])
    y = np.repeat(np.asarray(classes), n_per_class)
    return X, y


@pytest.mark.parametrize("normalize", [True, False])
def test_prototype_classifier_is_exact_on_separable_embeddings(normalize):
    X_train, y_train = _separable(5, seed=0, classes=("a", "b", "c"))
    X_test, y_test = _separable(50, seed=1, classes=("a", "b", "c"))
    clf = PrototypeClassifier(normalize=normalize).fit(X_train, y_train)
    assert clf.classes_.tolist() == ["a", "b", "c"]
    assert (clf.predict(X_test) == y_test).all()
    proba = clf.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert (proba.argmax(axis=1) == np.searchsorted(clf.classes_, y_test)).all()


def test_prototype_probabilities_are_a_softmax_of_negative_squared_distances():
    X = np.array([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])
    clf = PrototypeClassifier(normalize=False, temperature=2.0).fit(X, [0, 0, 1, 1])
    np.testing.assert_allclose(clf.prototypes_, [[0.0, 1.0], [4.0, 1.0]])
    point = np.array([[1.0, 1.0]])
    expected = softmax(-np.array([1.0, 9.0]) / 2.0)
    np.testing.assert_allclose(clf.predict_proba(point)[0], expected)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")  # array-API checks need SCIPY_ARRAY_API
def test_prototype_classifier_follows_the_sklearn_estimator_contract():
    clf = PrototypeClassifier(normalize=False, temperature=0.5)
    assert clone(clf).get_params() == {"normalize": False, "temperature": 0.5}
    with pytest.raises(NotFittedError):
        clf.predict(np.zeros((1, 2)))
    check_estimator(PrototypeClassifier())  # scikit-learn's own common checks


def test_sample_k_shot_draws_k_distinct_patients_per_class_reproducibly():
    labels = np.array([0] * 12 + [1] * 12)
    patients = np.array([f"p{i // 2}" for i in range(24)])  # two studies per patient
    draw = sample_k_shot(labels, patients, k=3, seed=7)
    assert len(draw) == 6
    for label in (0, 1):
        rows = draw[labels[draw] == label]
        assert len(rows) == 3 and len(set(patients[rows])) == 3
    assert np.array_equal(draw, sample_k_shot(labels, patients, k=3, seed=7))
    assert any(not np.array_equal(draw, sample_k_shot(labels, patients, k=3, seed=s)) for s in range(8, 12))
    with pytest.raises(InputError, match="at least k=7 patients"):
        sample_k_shot(labels, patients, k=7, seed=0)  # 6 patients per class
    with pytest.raises(ConfigError, match="fewshot.ks"):
        sample_k_shot(labels, patients, k=0, seed=0)


def test_few_shot_eval_reports_mean_and_sd_per_k_and_method_and_skips_impossible_k():
    X_train, y_train = _separable(10, seed=0, classes=(0, 1))
    patients = np.array([f"p{i}" for i in range(len(y_train))])
    X_test, y_test = _separable(20, seed=1, classes=(0, 1))
    with pytest.warns(UserWarning, match="k=20 skipped"):
        results = few_shot_eval(X_train, y_train, patients, X_test, y_test, ks=(1, 5, 20), draws=3, seed=0,
                                progress=False)
    assert set(results) == {"prototype", "linear_probe"}
    for method in results:
        assert sorted(results[method]) == [1, 5]
        for k, entry in results[method].items():
            assert len(entry["auroc"]) == 3 and entry["n_support"] == 2 * k
            assert entry["auroc_mean"] == 1.0 and entry["accuracy_mean"] == 1.0 and entry["auroc_sd"] == 0.0
    flat = flatten_results(results)
    assert flat["fewshot.prototype.k5.auroc_mean"] == 1.0 and len(flat) == 2 * 2 * 4


def test_few_shot_eval_varies_with_the_draw_on_overlapping_classes():
    X_train, y_train = _separable(30, seed=0, classes=(0, 1), spread=8.0)
    patients = np.arange(len(y_train))
    X_test, y_test = _separable(30, seed=1, classes=(0, 1), spread=8.0)
    results = few_shot_eval(X_train, y_train, patients, X_test, y_test, ks=(1,), draws=4, methods=("prototype",),
                            progress=False)
    entry = results["prototype"][1]
    assert entry["auroc_sd"] > 0 and entry["auroc_mean"] == pytest.approx(np.mean(entry["auroc"]))
    assert entry["auroc_sd"] == pytest.approx(np.std(entry["auroc"], ddof=1))
    again = few_shot_eval(X_train, y_train, patients, X_test, y_test, ks=(1,), draws=4, methods=("prototype",),
                          progress=False)
    assert again["prototype"][1]["auroc"] == entry["auroc"]


def test_linear_probe_is_a_logistic_regression_on_normalised_embeddings():
    X_train, y_train = _separable(5, seed=0, classes=(0, 1))
    probe = linear_probe(C=0.5).fit(X_train, y_train)
    assert probe[-1].C == 0.5 and probe.predict_proba(X_train).shape == (10, 2)
    np.testing.assert_allclose(probe.predict_proba(X_train), probe.predict_proba(3.0 * X_train))  # scale-free
    assert len(linear_probe(normalize=False)) == 1


def test_embed_returns_pooled_encoder_features_from_tensors_and_datasets():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    model = Classifier(Encoder(net, [["0", "1", "2"]], [4], [1], spatial_dims=2, in_channels=1, first_conv="0"), 2)
    model.train()
    images = torch.randn(5, 1, 8, 8)
    expected = model.eval().encoder.forward_features(images).flatten(2).mean(-1).detach().numpy()
    model.train()
    stats = model.encoder.net[1].running_mean.clone()

    from_tensor = embed(model, images, batch_size=2, progress=False)
    from_items = embed(model, [{"image": image, "label": 0} for image in images], progress=False)

    np.testing.assert_allclose(from_tensor, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_items, expected, rtol=1e-5, atol=1e-6)
    assert from_tensor.dtype == np.float32 and from_tensor.shape == (5, 4)
    assert model.training and torch.equal(model.encoder.net[1].running_mean, stats)  # eval pass, mode restored
