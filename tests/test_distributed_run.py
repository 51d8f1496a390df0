"""`medtl run` under torchrun (2 gloo ranks): one MLflow run, one registered version, both models DDP-trained.

The engine-level test (tests/engine/test_distributed.py) checks that DDP trains like one process;
this one goes through the CLI with `audit.reference: scratch`, so the from-scratch twin must train
on both ranks too (a rank that skipped it would leave the other waiting in DDP's all-reduce).
"""

from __future__ import annotations

import json

import pytest
import torch

from medtl.data.synthetic import write_demo_data
from medtl.tracking import store
from tests.processes import REPO, torchrun


@pytest.mark.slow
def test_torchrun_two_ranks_train_model_and_scratch_twin_and_rank_zero_alone_records(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_demo_data(data, patients=48, seed=0, progress=False)
    output = tmp_path / "out"
    cmd = ["-m", "medtl.cli", "-q", "run", str(REPO / "workflows" / "classify_2d.yaml"), "--output", str(output)]
    for setting in (f"data.root={data}", f"data.labels={data / 'labels.csv'}", f"data.manifest_out={tmp_path / 'manifest.csv'}",
              "data.image_size=[32, 32]", "train.epochs=1", "train.min_steps=0", "train.batch_size=16", "evaluation.n_boot=100",
              "audit.reference=scratch"):
        cmd += ["--set", setting]
    returncode, printed = torchrun(cmd, cwd=tmp_path, timeout=420)
    assert returncode == 0, printed[-4000:]

    for folder in (output, output / "reference_scratch"):
        ckpt = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
        assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2, folder.name
    audit = json.loads((output / "audit.json").read_text())
    assert audit["reference"]["kind"] == "scratch" and "auroc" in audit["reference"]["test"]
    metrics = json.loads((output / "metrics.json").read_text())
    assert "reference_train_seconds" in metrics["timings"]
    report = (output / "report.html").read_text()  # rank 0 evaluates and writes the report
    assert metrics["run_id"] in report and 'id="subgroups"' in report
    verdicts = ("audit passed;", "audit FAILED", "audit INCONCLUSIVE")
    assert sum(printed.count(v) for v in verdicts) == 1, printed[-2000:]

    monkeypatch.chdir(tmp_path)  # the embedded store is ./mlruns of the run's working directory
    store.tracking_uri()
    runs = store.client().search_runs([store.client().get_experiment_by_name("medtl").experiment_id])
    assert [r.info.run_id for r in runs] == [metrics["run_id"]], "only rank 0 may record a run"
    versions = store.client().search_model_versions("name='classify_2d'")
    assert len(versions) == 1 and versions[0].run_id == metrics["run_id"]
