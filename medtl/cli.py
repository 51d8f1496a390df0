"""The `medtl` command line: a thin shell over the orchestration layer and the data layer.

Every command prints only pseudonyms, aliases, counts and paths the user gave; it never prints a
patient identifier, an original file name or a DICOM header value.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from medtl import __version__
from medtl.errors import MedtlError

EPILOG = """examples:
  medtl demo-data demo_data --patients 200 --seed 0
  medtl manifest build demo_data --labels demo_data/labels.csv --out data_manifests/demo.csv
  medtl manifest verify data_manifests/demo.csv --root demo_data
  medtl demo --output demo_output
"""


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from medtl.data.demo import write_demo_data

    summary = write_demo_data(Path(args.dir), patients=args.patients, seed=args.seed, progress=not args.quiet)
    print(
        f"wrote {summary.n_studies} synthetic studies of {summary.n_patients} patients to {args.dir}; "
        f"labels: {summary.labels_csv}"
    )
    # The generator's own description names the (fake) institution: print no header value.
    print("planted gap: one site's radiographs show the finding fainter (see docs/demo_data.md)")
    return 0


def _cmd_manifest_build(args: argparse.Namespace) -> int:
    from medtl.data.manifest import build_manifest

    fractions = tuple(float(x) for x in args.fractions.split(","))
    subgroups = tuple(s for s in (args.subgroups or "").split(",") if s)
    result = build_manifest(
        Path(args.root),
        Path(args.labels),
        Path(args.out),
        key_file=Path(args.key_file) if args.key_file else None,
        seed=args.seed,
        subgroup_columns=subgroups,
        fractions=fractions,  # type: ignore[arg-type]
        k_min=args.k_min,
        progress=not args.quiet,
    )
    if result.key_message:
        print(result.key_message)
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    splits = ", ".join(f"{k} {v}" for k, v in result.split_rows.items())
    print(f"manifest: {result.manifest_csv} ({result.rows} rows, {result.patients} patients; splits: {splits})")
    print(f"sidecar:  {result.sidecar_json} (files: {counts}; k-anonymity {result.k_anonymity}; key id {result.key_id})")
    if result.rows == 0:
        print("medtl: error: no study matched a labels row; check --labels paths against ROOT", file=sys.stderr)
        return 1
    return 0


def _cmd_manifest_verify(args: argparse.Namespace) -> int:
    from medtl.data.verify import verify_manifest

    result = verify_manifest(
        Path(args.manifest), Path(args.root), key_file=Path(args.key_file) if args.key_file else None
    )
    for line in result.problems:
        print(line)
    verdict = "OK" if result.ok else "DIFFERS"
    print(f"verify {verdict}: {result.files_checked} files and {result.rows_checked} rows checked")
    return 0 if result.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from medtl.demo import run_demo

    run_demo(Path(args.output), patients=args.patients, seed=args.seed, progress=not args.quiet,
             overrides=args.set)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from medtl.config import load_config
    from medtl.run import run_workflow

    cfg = load_config(Path(args.workflow), args.set)
    output = Path(args.output or Path("outputs") / cfg.name)
    out = run_workflow(cfg, output, resume=args.resume, progress=not args.quiet)
    if not out.run_id:  # a non-zero torchrun rank: rank 0 reports
        return 0
    for part in ("test", "old_test", "target_test", "source_test"):
        if isinstance(out.metrics.get(part), dict):
            values = ", ".join(f"{k} {v:.3f}" for k, v in out.metrics[part].items() if isinstance(v, float))
            print(f"run {out.run_id}: {part} {values}")
    print(f"audit {'passed' if out.audit_passed else 'FAILED'}; registered {out.model_name} v{out.model_version}")
    print(f"outputs in {out.output_dir} (metrics.json, predictions.csv, audit.json, report.html)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from medtl.run import rerender_report

    path = rerender_report(args.run_id, Path(args.output or f"report-{args.run_id[:8]}.html"), pdf=args.pdf)
    print(f"report written to {path}" + (f" and {path.with_suffix('.pdf')}" if args.pdf else ""))
    return 0


def _cmd_study_transfer_benefit(args: argparse.Namespace) -> int:
    from medtl.config import load_config
    from medtl.studies import run_transfer_benefit

    cfg = load_config(Path(args.workflow), args.set)
    output = Path(args.output or Path("outputs") / f"{cfg.name}-transfer-benefit")
    result = run_transfer_benefit(
        cfg,
        output,
        fractions=[f for f in args.fractions.split(",") if f.strip()],  # validated inside (ConfigError)
        seeds=args.seeds,
        arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()),
        linear_probe=args.linear_probe,
        target=args.target,
        n_boot=args.n_boot,
        keep_checkpoints=args.keep_checkpoints,
        progress=not args.quiet,
    )
    print(result["headline"]["text"])
    print(f"outputs in {output} (transfer_benefit.json, transfer_benefit.png, transfer_benefit_time.png, "
          "transfer_benefit.html)")
    return 0


def _cmd_study_few_shot(args: argparse.Namespace) -> int:
    from medtl.adaptation import few_shot_summary
    from medtl.config import load_config
    from medtl.run import run_few_shot

    cfg = load_config(Path(args.workflow), args.set)
    ks = [int(k) for k in args.k.split(",") if k.strip()] if args.k else None
    output = Path(args.output or Path("outputs") / f"{cfg.name}-few-shot")
    result = run_few_shot(cfg, output, ks=ks, draws=args.draws, progress=not args.quiet)
    for line in few_shot_summary(result):
        print(line)
    print(f"run {result['run_id']}; results in {output / 'few_shot.json'}")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from medtl.tracking import registry, store

    store.tracking_uri()
    registry.promote(args.name, args.version)
    print(f"{args.name} version {args.version} is now @champion")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `medtl` console script."""
    parser = argparse.ArgumentParser(
        prog="medtl",
        description=(
            "Transfer learning for hospital imaging studies: privacy-aware manifests, pretrained "
            "encoders, MLflow records and per-subgroup audits."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medtl {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo-data", help="write fully synthetic hospital-like demo studies and labels.csv")
    p.add_argument("dir", help="output folder")
    p.add_argument("--patients", type=int, default=200, help="number of synthetic patients (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_cmd_demo_data)

    manifest = sub.add_parser("manifest", help="build or verify a privacy-aware data manifest")
    msub = manifest.add_subparsers(dest="manifest_command", metavar="ACTION")
    b = msub.add_parser("build", help="list every study under ROOT with pseudonyms, hashes, subgroups and splits")
    b.add_argument("root", help="data root folder (paths in the labels CSV are relative to it)")
    b.add_argument("--labels", required=True, help="labels CSV: path, label and/or mask, optional patient_id, split, ...")
    b.add_argument("--out", required=True, help="manifest CSV to write, e.g. data_manifests/NAME.csv")
    b.add_argument("--key-file", help="project key file (default: $MEDTL_KEY_FILE, else created in the config folder)")
    b.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    b.add_argument("--subgroups", help="extra subgroup columns of the labels CSV, comma-separated")
    b.add_argument("--fractions", default="0.7,0.15,0.15", help="train,val,test fractions (default 0.7,0.15,0.15)")
    b.add_argument("--k-min", type=int, default=11, help="warn when k-anonymity is below this (default 11)")
    b.set_defaults(func=_cmd_manifest_build)
    v = msub.add_parser("verify", help="re-hash the files of a manifest; exit 1 when anything changed")
    v.add_argument("manifest", help="manifest CSV")
    v.add_argument("--root", required=True, help="data root folder")
    v.add_argument("--key-file", help="project key file (default: $MEDTL_KEY_FILE or the config folder)")
    v.set_defaults(func=_cmd_manifest_verify)

    d = sub.add_parser("demo", help="the main job end to end on synthetic demo studies")
    d.add_argument("--output", default="demo_output", help="output folder (default demo_output)")
    d.add_argument("--patients", type=int, default=600, help="number of synthetic patients (default 600)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    d.set_defaults(func=_cmd_demo)

    r = sub.add_parser("run", help="run a workflow: manifest -> train -> evaluate -> audit -> MLflow -> report")
    r.add_argument("workflow", help="workflow YAML, e.g. workflows/classify_2d.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in dotted form, e.g. --set train.epochs=3 (repeatable)")
    r.add_argument("--output", help="output folder (default outputs/<workflow name>)")
    r.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")
    r.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="render the audited evaluation report of an MLflow run again")
    rep.add_argument("run_id", help="MLflow run id (printed by `medtl run`)")
    rep.add_argument("--output", help="HTML file to write (default report-<run id>.html)")
    rep.add_argument("--pdf", action="store_true", help="also print a PDF with headless Chromium")
    rep.set_defaults(func=_cmd_report)

    st = sub.add_parser("study", help="studies built on a workflow (transfer benefit, few-shot)")
    ssub = st.add_subparsers(dest="study_command", metavar="STUDY")
    tb = ssub.add_parser("transfer-benefit", help="pretrained vs scratch at several label fractions and seeds")
    tb.add_argument("workflow", help="workflow YAML")
    tb.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    tb.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1.0", help="label fractions of the training patients")
    tb.add_argument("--seeds", type=int, default=3, help="runs per arm and fraction (default 3)")
    tb.add_argument("--arms", default="pretrained,scratch", help="among pretrained, scratch, linear_probe")
    tb.add_argument("--linear-probe", action="store_true", help="add the linear-probe arm")
    tb.add_argument("--target", type=float,
                    help="validation value for time-to-target (default: the lowest over seeds of scratch's best at the "
                         "largest fraction, so every scratch seed reaches it)")
    tb.add_argument("--n-boot", type=int, help="bootstrap replicates (>= 100; default evaluation.n_boot)")
    tb.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints under OUTPUT/runs/")
    tb.add_argument("--output", help="output folder (default outputs/<name>-transfer-benefit)")
    tb.set_defaults(func=_cmd_study_transfer_benefit)

    fs = ssub.add_parser("few-shot", help="frozen-encoder prototype classifier and linear probe with k studies per class")
    fs.add_argument("workflow", help="workflow YAML")
    fs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    fs.add_argument("--k", help="studies per class, comma-separated (default fewshot.ks: 1,5,10,20)")
    fs.add_argument("--draws", type=int, help="random draws of the k studies per k (default fewshot.draws: 5)")
    fs.add_argument("--output", help="output folder (default outputs/<name>-few-shot)")
    fs.set_defaults(func=_cmd_study_few_shot)

    reg = sub.add_parser("registry", help="model registry actions")
    rsub = reg.add_subparsers(dest="registry_command", metavar="ACTION")
    pr = rsub.add_parser("promote", help="give a version the alias champion (its audit must have passed)")
    pr.add_argument("name", help="registered model name")
    pr.add_argument("version", help="version number")
    pr.set_defaults(func=_cmd_promote)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `medtl` console script."""
    # MLflow 3 sends usage telemetry unless told not to; hospital machines must not phone home.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(level=logging.WARNING, format="medtl: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MedtlError as err:
        print(f"medtl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
