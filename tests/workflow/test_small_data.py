"""The small-data recipe: train.min_steps' passes and train.small_data_strategy, chosen from the training set's size."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from medtl.workflow.config import load_config
from medtl.workflow.train import training_strategy

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
PRETRAINED = SimpleNamespace(weights=SimpleNamespace(source="imagenet"))
RANDOM = SimpleNamespace(weights=SimpleNamespace(source="none"))


def _cfg(*extra: str):
    return load_config(WORKFLOWS / "classify_2d.yaml", list(extra))  # finetune, 8 epochs, batches of 32


@pytest.mark.parametrize(("n_train", "strategy"), [(244, "lp_ft"), (1984, "lp_ft"), (2016, "finetune"), (2428, "finetune")])
def test_pretrained_fine_tuning_of_a_small_training_set_probes_first(n_train, strategy):
    # 8 epochs of n // 32 steps: under 500 steps (n < 2016) the set is passed over several times an epoch.
    assert training_strategy(_cfg(), PRETRAINED, n_train) == strategy


def test_the_recipe_leaves_random_weights_other_strategies_and_its_off_switches_alone():
    assert training_strategy(_cfg(), RANDOM, 244) == "finetune"  # nothing pretrained to probe
    assert training_strategy(_cfg(), PRETRAINED, 244, "gradual_unfreeze") == "gradual_unfreeze"
    assert training_strategy(_cfg("train.strategy=linear_probe"), PRETRAINED, 244) == "linear_probe"
    assert training_strategy(_cfg("train.small_data_strategy=finetune"), PRETRAINED, 244) == "finetune"
    assert training_strategy(_cfg("train.min_steps=0"), PRETRAINED, 244) == "finetune"
    assert training_strategy(_cfg("train.small_data_strategy=linear_probe"), PRETRAINED, 244) == "linear_probe"
