"""Log a trained torch model as an MLflow 3 logged model, with a signature and a zero input example.

In MLflow 3 `mlflow.pytorch.log_model` creates a *logged model* (`models:/<model_id>`) whose files
live under the experiment's `models/<model_id>/artifacts`, not among the run's artifacts; the run
lists it in `run.outputs.model_outputs`. The default `pt2` format (`torch.export`) needs an input
example and is loaded without unpickling code.

Two leaks MLflow leaves open are closed here:
- the logged model would get MLflow's context tags (OS user, script path, git remote): medtl creates
  it itself with neutral tags and passes its id;
- `torch.export` stores each graph node's Python stack trace, i.e. absolute paths of the virtual
  environment and of the training script, inside `model.pt2`: medtl strips them before upload.
"""

from __future__ import annotations

import copy
import shutil
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from medtl.errors import InputError
from medtl.tracking.store import NEUTRAL_TAGS, active_run, client
from medtl.tracking.values import safe_text

EXAMPLE_BATCH = 2  # torch.export specialises a batch of 1 to a constant; 2 keeps the batch dynamic.


def log_torch_model(
    model: torch.nn.Module,
    input_shape: Sequence[int],
    *,
    name: str = "model",
    serialization_format: Literal["pt2", "pickle"] = "pt2",
    step: int = 0,
    pyfunc: tuple[str, Path] | None = None,
) -> str:
    """Log a model into the active run; inputs are float32 `(batch, *input_shape)`.

    The caller's model is not touched: a CPU copy in eval mode is exported. The signature has a
    variable batch dimension and fixed channel/spatial sizes; the input example stored with the
    model is zeros of shape `(2, *input_shape)` (never a real image).

    Args:
        model: The trained network (any device).
        input_shape: One sample's shape without the batch axis, `(channels, *spatial)`, e.g.
            `(1, 96, 96)` or `(1, 64, 64, 64)`.
        name: The logged model's name (MLflow 3's `name`, formerly `artifact_path`).
        serialization_format: "pt2" (default; `torch.export`, loads without unpickling) or
            "pickle" (for networks `torch.export` cannot trace; loading needs their classes).
        step: Training step the model belongs to; MLflow links the run's metrics at that step.
        pyfunc: `(loader_module, folder)`: the model's `python_function` flavor becomes that
            module's `_load_pyfunc` over a copy of `folder` (the pytorch flavor stays as it is,
            for `mlflow.pytorch.load_model`). Its input is then a DataFrame, so the tensor
            signature is dropped (MLflow would enforce it on the DataFrame).

    Returns:
        The model URI, `models:/<model_id>`; pass it to `register_model`.

    Raises:
        InputError: when the shape is not positive integers, the format is unknown, no run is
            active, or the model cannot be run or exported on the zero input.

    Example:
        >>> uri = log_torch_model(net, (1, 96, 96))
    """
    run = active_run()
    shape = _sample_shape(input_shape)
    if serialization_format not in ("pt2", "pickle"):
        raise InputError(
            f"serialization_format must be 'pt2' or 'pickle', not {serialization_format!r}; "
            "use 'pt2' unless torch.export fails on the network"
        )
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    example = np.zeros((EXAMPLE_BATCH, *shape), dtype=np.float32)
    signature = _signature(cpu_model, example)
    mlflow_client = client()
    logged = mlflow_client.create_logged_model(
        run.info.experiment_id,
        name=safe_text(name),
        source_run_id=run.info.run_id,
        tags=dict(NEUTRAL_TAGS),
        model_type="pytorch",
    )
    try:
        info = Model.log(
            artifact_path=None,
            name=safe_text(name),
            flavor=_PYTORCH_FLAVOR,
            model_id=logged.model_id,
            step=int(step),
            pytorch_model=cpu_model,
            signature=signature,
            input_example=example,
            serialization_format=serialization_format,
            # Explicit requirements: inference would import the model in a subprocess (slow) and
            # may write an editable install's local path into requirements.txt.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            # MLflow would check the tensor input example against the pyfunc, which takes a
            # DataFrame of paths or images: a guaranteed, slow failure and a confusing warning.
            **({"medtl_pyfunc": pyfunc, "validate_serving_input": False} if pyfunc is not None else {}),
        )
    except Exception as err:
        mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        hint = "try serialization_format='pickle'" if serialization_format == "pt2" else "check the model"
        raise InputError(
            f"the model must be exportable as {serialization_format!r}, not fail with "
            f"{type(err).__name__}; {hint}"
        ) from err
    return info.model_uri


def _sample_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError) as err:
        raise InputError(
            "input_shape must be a sequence of integers such as (1, 96, 96), not "
            f"{type(input_shape).__name__}; pass (channels, *spatial) without the batch axis"
        ) from err
    if not shape or min(shape) < 1:
        raise InputError(
            f"input_shape must be positive sizes (channels, *spatial), not {shape}; "
            "pass one sample's shape without the batch axis"
        )
    return shape


def _signature(model: torch.nn.Module, example: np.ndarray) -> ModelSignature:
    try:
        with torch.no_grad():
            output = model(torch.from_numpy(example))
    except Exception as err:
        raise InputError(
            f"the model must accept a float32 batch of shape {example.shape}, not fail with "
            f"{type(err).__name__}; check input_shape (channels first, no batch axis)"
        ) from err
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))])
    outputs = None
    if isinstance(output, torch.Tensor):
        dtype = np.dtype(str(output.dtype).removeprefix("torch."))
        outputs = Schema([TensorSpec(dtype, (-1, *output.shape[1:]))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _save_model_without_stack_traces(path: str, mlflow_model: Model, **kwargs: Any) -> None:
    """`mlflow.pytorch.save_model`, then remove source file paths from the exported graph."""
    pyfunc = kwargs.pop("medtl_pyfunc", None)
    kwargs.pop("validate_serving_input", None)  # Model.log's option, not save_model's
    mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
    if pyfunc is not None:
        _own_pyfunc_flavor(path, mlflow_model, *pyfunc)
    archive = Path(path, "data", "model.pt2")
    if not archive.is_file():
        return
    before = archive.stat().st_size
    program = torch.export.load(archive)  # written a moment ago by MLflow in this process
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                node.meta.pop("stack_trace", None)
    torch.export.save(program, archive)
    if mlflow_model.model_size_bytes is not None:
        mlflow_model.model_size_bytes += archive.stat().st_size - before
        mlflow_model.save(str(Path(path, "MLmodel")))


PYFUNC_DATA = "medtl_package"


def _own_pyfunc_flavor(path: str, mlflow_model: Model, loader_module: str, folder: Path) -> None:
    """Point the `python_function` flavor at `loader_module` over a copy of `folder` (no pickle)."""
    shutil.copytree(folder, Path(path, PYFUNC_DATA))
    flavor = dict(mlflow_model.flavors.get("python_function", {}))
    flavor.update({"loader_module": loader_module, "data": PYFUNC_DATA})
    for key in ("model_path", "pickle_module_name", "model_config"):  # mlflow.pytorch's, not ours
        flavor.pop(key, None)
    mlflow_model.flavors["python_function"] = flavor
    mlflow_model.signature = None  # the pyfunc takes a DataFrame of paths or images, not the tensor
    mlflow_model.save(str(Path(path, "MLmodel")))


# `Model.log` accepts any flavor object with `save_model`; the name keeps MLflow's flavor label.
_PYTORCH_FLAVOR = types.SimpleNamespace(
    __name__="mlflow.pytorch", save_model=_save_model_without_stack_traces
)
