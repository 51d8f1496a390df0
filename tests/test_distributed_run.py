"""`medtl run` under torchrun (2 gloo ranks): one MLflow run, one registered version, both models DDP-trained.

The engine-level test (tests/engine/test_distributed.py) checks that DDP trains like one process;
this one goes through the CLI with `audit.reference: scratch`, so the from-scratch twin must train
on both ranks too (a rank that skipped it would leave the other waiting in DDP's all-reduce).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medtl.data.demo import write_demo_data
from medtl.tracking import store

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_train_model_and_scratch_twin_and_rank_zero_alone_records(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_demo_data(data, patients=48, seed=0, progress=False)
    output = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "medtl.cli", "-q", "run", str(REPO / "workflows" / "classify_2d.yaml"), "--output", str(output)]
    for s in (f"data.root={data}", f"data.labels={data / 'labels.csv'}", f"data.manifest_out={tmp_path / 'manifest.csv'}",
              "data.image_size=[32, 32]", "train.epochs=1", "train.batch_size=16", "evaluation.n_boot=100",
              "audit.reference=scratch"):
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # own session: a hung run is killed with its workers
    try:
        printed, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, printed[-4000:]

    for folder in (output, output / "reference_scratch"):
        ckpt = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
        assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2, folder.name
    audit = json.loads((output / "audit.json").read_text())
    assert audit["reference"]["kind"] == "scratch" and "auroc" in audit["reference"]["test"]
    metrics = json.loads((output / "metrics.json").read_text())
    assert "reference_train_seconds" in metrics["timings"]
    assert printed.count("audit passed;") + printed.count("audit FAILED") == 1, printed[-2000:]

    monkeypatch.chdir(tmp_path)  # the embedded store is ./mlruns of the run's working directory
    store.tracking_uri()
    runs = store.client().search_runs([store.client().get_experiment_by_name("medtl").experiment_id])
    assert [r.info.run_id for r in runs] == [metrics["run_id"]], "only rank 0 may record a run"
    versions = store.client().search_model_versions("name='classify_2d'")
    assert len(versions) == 1 and versions[0].run_id == metrics["run_id"]
