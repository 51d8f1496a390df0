"""The logged model: signature, zero input example, pt2 without source paths, neutral tags."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from medtl import tracking
from medtl.errors import InputError

HERE = Path(__file__).resolve().parent


def test_logged_model_has_signature_zero_example_and_reloads_with_any_batch(store, tiny_model, tmp_path):
    tiny_model.train()  # the caller's mode must survive logging
    with tracking.start_run("medtl-test") as run:
        model_uri = tracking.log_torch_model(tiny_model, (1, 8, 8))
    assert tiny_model.training
    assert model_uri.startswith("models:/m-")

    info = mlflow.models.get_model_info(model_uri)
    spec = info.signature.inputs.inputs[0]
    assert spec.shape == (-1, 1, 8, 8) and spec.type == np.dtype(np.float32)
    assert info.signature.outputs.inputs[0].shape == (-1, 2)
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path)))
    example = np.asarray(json.loads((local / "input_example.json").read_text()))
    assert example.shape == (2, 1, 8, 8) and not example.any(), "the example must be zeros, never an image"
    assert (local / "data" / "model.pt2").is_file()

    loaded = mlflow.pytorch.load_model(model_uri)
    batch = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(batch), tiny_model.eval()(batch), atol=1e-5)

    model = mlflow.MlflowClient().get_logged_model(model_uri.removeprefix("models:/"))
    assert model.source_run_id == run.info.run_id
    assert model.tags["mlflow.user"] == "medtl" and model.tags["mlflow.source.name"] == "medtl"
    outputs = mlflow.MlflowClient().get_run(run.info.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [model.model_id]


def test_pt2_archive_holds_no_source_file_paths(store, tiny_model, tmp_path):
    with tracking.start_run("medtl-test"):
        model_uri = tracking.log_torch_model(tiny_model, (1, 8, 8))
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path)))
    archive = (local / "data" / "model.pt2").read_bytes()
    # torch.export records stack traces through TinyNet.forward (tests/tracking/helpers.py)
    # and torch's own modules; both folders must be gone from the stored archive.
    assert str(HERE).encode() not in archive
    assert str(Path(torch.__file__).parent).encode() not in archive
    assert b'.py", line' not in archive


def test_wrong_input_shape_is_refused_with_a_clear_message(store, tiny_model):
    with tracking.start_run("medtl-test"):
        with pytest.raises(InputError, match="input_shape must be positive sizes"):
            tracking.log_torch_model(tiny_model, (1, 0, 8))
        with pytest.raises(InputError, match=r"must accept a float32 batch of shape \(2, 3, 8, 8\)"):
            tracking.log_torch_model(tiny_model, (3, 8, 8))
