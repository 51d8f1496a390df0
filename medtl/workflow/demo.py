"""`medtl demo` / `make demo`: the main job end to end on synthetic studies, on embedded defaults.

demo studies -> manifest -> fine-tune the bundled ImageNet EfficientNet-Lite0 on chest radiographs ->
test metrics with CIs -> bias audit -> MLflow run + registry (alias `candidate`) -> HTML report.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from medtl.data.synthetic import write_demo_data
from medtl.workflow.config import load_config

# The demo's workflow, embedded so `medtl demo` works from an installed package too; it mirrors
# workflows/classify_2d.yaml with sizes chosen to finish in minutes on 2 CPU cores. A quarter of the
# patients are held out for test (not the usual 15 %) so that the planted site gap's CI is narrow
# enough to flag: with 600 patients the gap site has about 50 test studies (see docs/demo_data.md).
DEMO_WORKFLOW = {
    "name": "demo_classify_2d",
    "task": "classification",
    "seed": 0,
    "data": {"modalities": ["CR", "DX"], "image_size": [64, 64], "intensity": "xray", "fractions": [0.6, 0.15, 0.25]},
    "model": {"encoder": "efficientnet_lite0", "weights": "imagenet", "spatial_dims": 2, "in_channels": 1,
              "num_classes": 2},
    "train": {"strategy": "finetune", "epochs": 6, "batch_size": 32, "lr": 0.002, "warmup_epochs": 1,
              "early_stopping_patience": 3,
              # Sized to finish in minutes: the demo's few hundred radiographs get 6 passes, not the
              # 500-step minimum (train.min_steps) the shipped workflows give a small training set.
              "min_steps": 0},
    "evaluation": {"threshold_rule": "youden", "n_boot": 1000},
    # The demo has no champion to compare with, so its bias-amplification reference is the same model
    # trained from scratch (about doubling the training time).
    "audit": {"attributes": ["sex", "age_band", "site", "scanner"], "reference": "scratch"},
    "tracking": {"experiment": "medtl-demo", "registered_model": "demo_classify_2d"},
}


def _gap_site(cfg, summary) -> str:
    """The manifest's code of the demo site with the planted gap (never its fake name)."""
    from medtl.data.privacy import load_key, site_code

    key = load_key(cfg.data.key_file or None)
    return site_code(key, summary.gap_institution)


def run_demo(output: Path, *, patients: int = 600, seed: int = 0, progress: bool = True,
             overrides: list[str] | None = None):
    """Run the demo end to end and print a short summary; returns the `RunOutputs`."""
    from medtl.workflow.run import run_workflow

    start = time.perf_counter()
    output = Path(output)
    data_dir = output / "demo_data"
    if (data_dir / "labels.csv").is_file():
        shutil.rmtree(data_dir)  # our own synthetic folder from an earlier demo: write it afresh
    summary = write_demo_data(data_dir, patients=patients, seed=seed, progress=progress)
    print(f"[1/4] demo studies: {summary.n_studies} studies of {summary.n_patients} synthetic patients in {data_dir}")
    cfg = load_config(
        None,
        [
            f"data.root={data_dir}",
            f"data.labels={summary.labels_csv}",
            f"data.manifest_out={output / 'data_manifests' / 'demo.csv'}",
            f"seed={seed}",
            *(overrides or []),
        ],
        base=DEMO_WORKFLOW,
    )
    print("[2/4] manifest, [3/4] fine-tuning the ImageNet encoder, [4/4] audit, MLflow and report ...")
    outputs = run_workflow(cfg, output / "run", progress=progress,
                           extra_forbidden={s: "demo PHI" for s in summary.phi_strings}, synthetic=True,
                           # Not summary.planted_gap: it names the (fake) institution, which the PHI scan forbids.
                           source=f"medtl demo-data: {summary.n_patients} synthetic patients from four invented "
                                  f"sites (seed {seed}), with a planted performance gap at one site "
                                  "(docs/demo_data.md)")
    minutes = (time.perf_counter() - start) / 60
    test = outputs.metrics["test"]
    ci = outputs.metrics["test_ci"].get("auroc") or [float("nan")] * 2
    print()
    print(f"medtl demo finished in {minutes:.1f} min")
    print(f"  test AUROC {test.get('auroc', float('nan')):.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}), "
          f"accuracy {test.get('accuracy', float('nan')):.3f}")
    verdict = {"passed": "PASSED", "failed": "FAILED (flagged subgroup gaps, see the report)",
               "inconclusive": "INCONCLUSIVE (no subgroup could be evaluated, see the report)"}
    print(f"  audit: {verdict.get(outputs.audit_status, outputs.audit_status)}")
    print(f"  planted gap: the radiographs of site {_gap_site(cfg, summary)} show the finding fainter "
          "(docs/demo_data.md); the audit should flag that site and no sex or age group")
    print(f"  MLflow run {outputs.run_id}; registered model '{outputs.model_name}' version "
          f"{outputs.model_version} (alias candidate)")
    print(f"  outputs: {outputs.output_dir}/metrics.json, predictions.csv, audit.json")
    print(f"  report:  {outputs.report_path}")
    print("  MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")
    return outputs
