"""The `medtl` command line: a thin shell over the orchestration layer and the data layer.

Every command prints only pseudonyms, aliases, counts and paths the user gave; it never prints a
patient identifier, an original file name or a DICOM header value. Nor a traceback, unless
`--debug` asks for one: tracebacks quote file paths (folders can carry patient names) and library
messages quote values. An unexpected error is reported as one line naming the step it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from medtl import __version__
from medtl.errors import MedtlError

EPILOG = """examples:
  medtl demo-data demo_data --patients 200 --seed 0
  medtl manifest build demo_data --labels demo_data/labels.csv --out data_manifests/demo.csv
  medtl manifest verify data_manifests/demo.csv --root demo_data
  medtl pull --dicomweb https://pacs.hospital.example/dicom-web --query 'Modality=CR&StudyDate=20240101-20241231' --out pulled
  medtl demo --output demo_output

exit status: 0 done; 1 `manifest verify` found differences, or `pull` could not fetch some instances;
2 an error, e.g. a labels CSV that matches no study (one line on stderr; `--debug` adds the
traceback, which may show file paths);
130 interrupted.
"""

#: Exit status of every error, expected (a MedtlError) or not.
ERROR_EXIT = 2


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from medtl.data.synthetic import write_demo_data

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
        segment_map=_segment_map(args.segment_map),
        masks_from_dicom=args.masks_from_dicom,
    )
    if result.key_message:
        print(result.key_message)
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    splits = ", ".join(f"{k} {v}" for k, v in result.split_rows.items())
    print(f"manifest: {result.manifest_csv} ({result.rows} rows, {result.patients} patients; splits: {splits})")
    print(f"sidecar:  {result.sidecar_json} (files: {counts}; k-anonymity {result.k_anonymity}; key id {result.key_id})")
    return 0


def _segment_map(text: str | None) -> dict[str, int]:
    """`--segment-map`: "liver=1,tumour=2", or a YAML/JSON file holding such a mapping."""
    import yaml

    from medtl.errors import InputError

    if not text:
        return {}
    if Path(text).suffix.lower() in (".yaml", ".yml", ".json") and Path(text).is_file():
        mapping = yaml.safe_load(Path(text).read_text(encoding="utf-8")) or {}
        if not isinstance(mapping, dict):
            raise InputError(f"--segment-map file {Path(text).name} must hold a mapping of names to class indices, "
                             f"not a {type(mapping).__name__}; write e.g. 'liver: 1'")
        return mapping
    pairs = [part.rpartition("=") for part in text.split(",") if part.strip()]
    if any(not sep or not name.strip() or not index.strip().isdigit() for name, sep, index in pairs):
        raise InputError("--segment-map must be NAME=INDEX pairs separated by commas (e.g. liver=1,tumour=2) or a "
                         "YAML/JSON file, not another form")
    return {name.strip(): int(index) for name, _, index in pairs}


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


def _cmd_pull(args: argparse.Namespace) -> int:
    from medtl.data.pacs import parse_query, pull

    query = parse_query(args.query)
    result = pull(args.dicomweb, query, Path(args.out), progress=not args.quiet,
                  auth_file=Path(args.netrc) if args.netrc else None)
    # Counts only: the server's UIDs and header values are never printed.
    print(f"pulled {result.studies} studies ({result.series} series) into {args.out}: {result.fetched} instances "
          f"fetched, {result.skipped} already present, {result.n_failed} failed")
    return _failures(result.failed, "run the same command again to retry them; files already written are kept")


def _failures(failed: dict[str, int], retry: str) -> int:
    """One line per failure reason of a PACS transfer (counts only), the retry hint; the exit status."""
    for reason, n in sorted(failed.items()):
        print(f"failed: {n} ({reason})")
    if failed:
        print(retry)
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from medtl.workflow.demo import run_demo

    run_demo(Path(args.output), patients=args.patients, seed=args.seed, progress=not args.quiet,
             overrides=args.set)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from medtl.workflow.config import load_config
    from medtl.workflow.run import run_workflow

    args.step = "loading the workflow config"
    cfg = load_config(Path(args.workflow), args.set)
    output = Path(args.output or Path("outputs") / cfg.name)
    args.step = "running the workflow"  # run_workflow names its own steps (medtl.workflow.steps.set_step)
    out = run_workflow(cfg, output, resume=args.resume, progress=not args.quiet)
    args.step = "printing the run's summary"
    if not out.run_id:  # a non-zero torchrun rank: rank 0 reports
        return 0
    for part in ("test", "old_test", "target_test", "source_test"):
        if isinstance(out.metrics.get(part), dict):
            values = ", ".join(f"{k} {v:.3f}" for k, v in out.metrics[part].items() if isinstance(v, float))
            print(f"run {out.run_id}: {part} {values}")
    if out.metrics.get("positive_class") is not None:
        print(f"positive class: {out.metrics['positive_class']} (sensitivity, FNR and the audit's subgroup gaps "
              f"refer to it; set audit.positive_class to choose another)")
    registered = f"registered {out.model_name} v{out.model_version}" if out.model_version else "not registered"
    print(_audit_summary(out.audit_status, out.audit_passed, out.output_dir / "audit.json", registered))
    print(f"outputs in {out.output_dir} (metrics.json, predictions.csv, audit.json, report.html)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medtl.workflow.external import run_external_validation

    output = Path(args.output or "external_validation")
    out = run_external_validation(args.model, Path(args.root), Path(args.labels), output,
                                  train_manifest=Path(args.train_manifest) if args.train_manifest else None,
                                  overrides=args.set, key_file=Path(args.key_file) if args.key_file else None,
                                  progress=not args.quiet)
    values = ", ".join(f"{k} {v:.3f}" for k, v in out.metrics["test"].items() if isinstance(v, float) and k != "threshold")
    print(f"external validation run {out.run_id}: {values}")
    print(f"operating threshold {out.metrics['threshold']} (frozen at training); "
          f"{out.metrics['counts']['studies']} studies of {out.metrics['counts']['patients']} patients evaluated")
    for reason, n in out.left_out.items():
        print(f"left out: {n} studies ({reason})")
    print(f"outputs in {out.output_dir} (metrics.json, predictions.csv, audit.json, report.html)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from medtl.data.pacs import check_store_url
    from medtl.workflow.predict import run_predict

    if args.store_to:
        check_store_url(args.store_to)  # a malformed URL is refused before the predictions, not after
    out = run_predict(args.model, Path(args.root), Path(args.output),
                      labels=Path(args.labels) if args.labels else None,
                      key_file=Path(args.key_file) if args.key_file else None, progress=not args.quiet)
    print(f"{out.predicted} studies predicted: {out.predictions_csv}")
    for reason, n in out.skipped.items():
        print(f"left out: {n} studies ({reason})")
    if out.masks:
        print(f"{out.masks} masks in {out.output_dir / 'masks'}")
    if out.skipped_segs:
        print(f"{out.skipped_segs} DICOM inputs got no DICOM SEG (their NIfTI masks were written; the warnings say why)")
    if out.dicom_segs:
        print(f"{out.dicom_segs} DICOM SEG objects in {out.output_dir / 'dicom_seg'}: they carry the source's patient "
              f"and study identifiers (DICOM requires them); keep them local")
    return _store_segs(args, out.output_dir / "dicom_seg") if args.store_to else 0


def _store_segs(args: argparse.Namespace, folder: Path) -> int:
    """`medtl predict --store-to URL`: the DICOM SEG objects the predictions wrote, sent to the PACS."""
    from medtl.data.pacs import store
    from medtl.errors import InputError

    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise InputError("--store-to must come with DICOM SEG objects to store, not none: only a segmentation model "
                         "on DICOM series writes them (the predictions were written); leave --store-to out")
    result = store(args.store_to, files, progress=not args.quiet, auth_file=Path(args.netrc) if args.netrc else None)
    print(f"stored {result.stored} DICOM SEG objects to the PACS, {result.n_failed} failed")
    return _failures(result.failed, "run the same command again to retry them (storing an object twice is harmless)")


def _audit_summary(status: str | None, passed: bool | None, audit_json: Path, registered: str) -> str:
    """"audit passed; registered ...", "audit FAILED: ...; ..." or "audit INCONCLUSIVE: ..." with why and what helps."""
    status = status or ("passed" if passed else "failed")
    try:
        unevaluated = json.loads(audit_json.read_text()).get("unevaluated_attributes") or []
    except (OSError, ValueError, AttributeError):
        unevaluated = []
    left_out = (f" ({len(unevaluated)} attribute(s) not evaluated, see audit.json: unevaluated_attributes)"
                if unevaluated else "")
    if status == "passed":
        return f"audit passed; {registered}{left_out}"
    if status == "failed":
        return f"audit FAILED: subgroup gaps beyond tolerance, see report.html; {registered}{left_out}"
    unpromotable = ", which cannot be promoted" if registered.startswith("registered") else ""
    lines = [f"audit INCONCLUSIVE: no subgroup gap could be decided, so nothing was checked; {registered}"
             f"{unpromotable} (audit.json: unevaluated_attributes)"]
    by_remedy: dict[str, list[dict]] = {}
    for entry in (u for u in unevaluated if isinstance(u, dict)):
        by_remedy.setdefault(str(entry.get("remedy")), []).append(entry)
    for remedy, entries in by_remedy.items():
        names = [str(e.get("attribute")) for e in entries]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        if len(names) == 1:
            lines.append(f"  {shown}: {entries[0].get('reason')}; to make it evaluable: {remedy}")
        else:
            lines.append(f"  {shown}; e.g. {names[0]}: {entries[0].get('reason')}; to make them evaluable: {remedy}")
    return "\n".join(lines)


def _cmd_report(args: argparse.Namespace) -> int:
    from medtl.workflow.report import rerender_report

    path = rerender_report(args.run_id, Path(args.output or f"report-{args.run_id[:8]}.html"), pdf=args.pdf)
    print(f"report written to {path}" + (f" and {path.with_suffix('.pdf')}" if args.pdf else ""))
    return 0


def _cmd_study_transfer_benefit(args: argparse.Namespace) -> int:
    from medtl.studies import run_transfer_benefit
    from medtl.workflow.config import load_config

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
    from medtl.studies.few_shot import few_shot_summary, run_few_shot
    from medtl.workflow.config import load_config

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
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks of errors and log records (they may show file paths)")
    # --debug also after the command (`medtl run W.yaml --debug`), as users add it to a failed command;
    # SUPPRESS keeps a global --debug from being reset by the command's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks of errors (they may show file paths)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_data_commands, _add_run_commands, _add_study_commands, _add_registry_commands):
        add(sub, common)
    return parser


def _add_data_commands(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo-data", parents=[common], help="write fully synthetic hospital-like demo studies and labels.csv")
    p.add_argument("dir", help="output folder")
    p.add_argument("--patients", type=int, default=200, help="number of synthetic patients (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_cmd_demo_data, step="writing the demo studies")

    manifest = sub.add_parser("manifest", help="build or verify a privacy-aware data manifest")
    msub = manifest.add_subparsers(dest="manifest_command", metavar="ACTION")
    b = msub.add_parser("build", parents=[common], help="list every study under ROOT with pseudonyms, hashes, subgroups and splits")
    b.add_argument("root", help="data root folder (paths in the labels CSV are relative to it)")
    b.add_argument("--labels", required=True, help="labels CSV: path, label and/or mask, optional patient_id, split, ...")
    b.add_argument("--out", required=True, help="manifest CSV to write, e.g. data_manifests/NAME.csv")
    b.add_argument("--key-file", help="project key file (default: $MEDTL_KEY_FILE, else created in the config folder)")
    b.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    b.add_argument("--subgroups", help="extra subgroup columns of the labels CSV, comma-separated")
    b.add_argument("--fractions", default="0.7,0.15,0.15", help="train,val,test fractions (default 0.7,0.15,0.15)")
    b.add_argument("--k-min", type=int, default=11, help="warn when k-anonymity is below this (default 11)")
    b.add_argument("--segment-map", metavar="NAME=INDEX,...",
                   help="classes of DICOM SEG segments / RTSTRUCT ROIs, e.g. liver=1,tumour=2 (or a YAML/JSON file)")
    b.add_argument("--masks-from-dicom", action="store_true",
                   help="a row without a mask gets the SEG/RTSTRUCT under ROOT that references its series")
    b.set_defaults(func=_cmd_manifest_build, step="building the manifest")
    v = msub.add_parser("verify", parents=[common], help="re-hash the files of a manifest; exit 1 when anything changed")
    v.add_argument("manifest", help="manifest CSV")
    v.add_argument("--root", required=True, help="data root folder")
    v.add_argument("--key-file", help="project key file (default: $MEDTL_KEY_FILE or the config folder)")
    v.set_defaults(func=_cmd_manifest_verify, step="verifying the manifest")

    pl = sub.add_parser("pull", parents=[common],
                        help="copy the studies matching a query from a PACS (DICOMweb) into a folder; resumable")
    pl.add_argument("--dicomweb", required=True, metavar="URL",
                    help="DICOMweb root, e.g. https://pacs.hospital.example/dicom-web")
    pl.add_argument("--query", required=True,
                    help="study filters joined by '&', e.g. 'Modality=CR,DX&StudyDate=20240101-20241231'")
    pl.add_argument("--out", required=True, help="folder for <study hash>/<instance hash>.dcm; run again to continue")
    pl.add_argument("--netrc", metavar="FILE",
                    help="netrc file with the PACS credentials (default ~/.netrc); the environment's "
                         "MEDTL_DICOMWEB_USER/MEDTL_DICOMWEB_PASSWORD or MEDTL_DICOMWEB_TOKEN come first")
    pl.set_defaults(func=_cmd_pull, step="pulling studies from the PACS")


def _add_run_commands(sub, common: argparse.ArgumentParser) -> None:
    d = sub.add_parser("demo", parents=[common], help="the main job end to end on synthetic demo studies")
    d.add_argument("--output", default="demo_output", help="output folder (default demo_output)")
    d.add_argument("--patients", type=int, default=600, help="number of synthetic patients (default 600)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    d.set_defaults(func=_cmd_demo, step="running the demo")

    r = sub.add_parser("run", parents=[common], help="run a workflow: manifest -> train -> evaluate -> audit -> MLflow -> report")
    r.add_argument("workflow", help="workflow YAML, e.g. workflows/classify_2d.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in dotted form, e.g. --set train.epochs=3 (repeatable)")
    r.add_argument("--output", help="output folder (default outputs/<workflow name>)")
    r.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")
    r.set_defaults(func=_cmd_run, step="loading the workflow config")

    ev = sub.add_parser("evaluate", parents=[common],
                        help="external validation of a registered model on new labelled studies (frozen threshold)")
    ev.add_argument("model", metavar="MODEL", help="models:/NAME@ALIAS, models:/NAME/VERSION or an MLflow run id")
    ev.add_argument("--root", required=True, help="folder of the external studies")
    ev.add_argument("--labels", required=True, help="their labels CSV (path, label and/or mask, ...)")
    ev.add_argument("--output", help="output folder (default external_validation)")
    ev.add_argument("--train-manifest", help="the model's training manifest (default: where this machine recorded it)")
    ev.add_argument("--key-file", help="project key file (default: $MEDTL_KEY_FILE or the config folder)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an evaluation or audit key, e.g. --set evaluation.n_boot=500 (repeatable)")
    ev.set_defaults(func=_cmd_evaluate, step="validating the model on external data")

    pr = sub.add_parser("predict", parents=[common], help="a registered model on new studies (no labels needed)")
    pr.add_argument("model", metavar="MODEL", help="models:/NAME@ALIAS, models:/NAME/VERSION or an MLflow run id")
    pr.add_argument("--root", required=True, help="folder of the studies")
    pr.add_argument("--labels", help="optional CSV whose 'path' column picks the studies")
    pr.add_argument("--output", required=True, help="output folder (predictions.csv, masks/, dicom_seg/)")
    pr.add_argument("--key-file", help="project key file (default: $MEDTL_KEY_FILE or the config folder)")
    pr.add_argument("--store-to", metavar="URL",
                    help="store the DICOM SEG objects written to a PACS over DICOMweb (STOW-RS), e.g. "
                         "https://pacs.hospital.example/dicom-web; credentials as for `medtl pull`")
    pr.add_argument("--netrc", metavar="FILE", help="netrc file with the PACS credentials (default ~/.netrc)")
    pr.set_defaults(func=_cmd_predict, step="predicting")

    rep = sub.add_parser("report", parents=[common], help="render the audited evaluation report of an MLflow run again")
    rep.add_argument("run_id", help="MLflow run id (printed by `medtl run`)")
    rep.add_argument("--output", help="HTML file to write (default report-<run id>.html)")
    rep.add_argument("--pdf", action="store_true", help="also print a PDF with headless Chromium")
    rep.set_defaults(func=_cmd_report, step="writing the report")


def _add_study_commands(sub, common: argparse.ArgumentParser) -> None:
    st = sub.add_parser("study", help="studies built on a workflow (transfer benefit, few-shot)")
    ssub = st.add_subparsers(dest="study_command", metavar="STUDY")
    tb = ssub.add_parser("transfer-benefit", parents=[common], help="pretrained vs scratch at several label fractions and seeds")
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
    tb.set_defaults(func=_cmd_study_transfer_benefit, step="running the transfer-benefit study")

    fs = ssub.add_parser("few-shot", parents=[common], help="frozen-encoder prototype classifier and linear probe with k studies per class")
    fs.add_argument("workflow", help="workflow YAML")
    fs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    fs.add_argument("--k", help="studies per class, comma-separated (default fewshot.ks: 1,5,10,20)")
    fs.add_argument("--draws", type=int, help="random draws of the k studies per k (default fewshot.draws: 5)")
    fs.add_argument("--output", help="output folder (default outputs/<name>-few-shot)")
    fs.set_defaults(func=_cmd_study_few_shot, step="running the few-shot study")


def _add_registry_commands(sub, common: argparse.ArgumentParser) -> None:
    reg = sub.add_parser("registry", help="model registry actions")
    rsub = reg.add_subparsers(dest="registry_command", metavar="ACTION")
    pr = rsub.add_parser("promote", parents=[common], help="give a version the alias champion (its audit must have passed)")
    pr.add_argument("name", help="registered model name")
    pr.add_argument("version", help="version number")
    pr.set_defaults(func=_cmd_promote, step="promoting the model version")


class ConsoleFormatter(logging.Formatter):
    """`medtl: <message>`, without the traceback or stack of a record unless `debug`.

    Libraries log tracebacks (pydicom logs decoder failures with `LOGGER.exception`), and a
    traceback quotes file paths and values. Without --debug the record's message is kept and a
    short note says a traceback was left out.
    """

    def __init__(self, debug: bool = False) -> None:
        super().__init__("medtl: %(message)s")
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        if self.debug or not (record.exc_info or record.stack_info):
            return super().format(record)
        quiet = logging.makeLogRecord(record.__dict__)  # a copy: other handlers keep the traceback
        quiet.exc_info, quiet.exc_text, quiet.stack_info = None, None, None
        return super().format(quiet) + " (traceback left out; --debug shows it)"


def _setup_logging(debug: bool) -> None:
    if not debug:
        # MLflow installs its own stderr handler at import, which would print tracebacks; without
        # it, MLflow's records come through ConsoleFormatter like every other library's.
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter(debug))
    # force: a root logger that already has handlers (an embedding program, a notebook, a second
    # main() call) would otherwise keep them, and their tracebacks, and never get ours.
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


def _failed_step(args: argparse.Namespace) -> str:
    """The step an error came from: the run's own step when a workflow was running, else the command's."""
    from medtl.workflow.steps import current_step

    return current_step() or getattr(args, "step", None) or "running the command"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `medtl` console script.

    Returns:
        The exit status: 0, 1 (differences found), or ERROR_EXIT for any error.
    """
    # MLflow 3 sends usage telemetry unless told not to; hospital machines must not phone home.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.debug)
    if not getattr(args, "func", None):
        parser.print_help()
        return ERROR_EXIT
    from medtl.workflow.steps import set_step

    set_step(None)  # a step left over from an earlier call in this process
    try:
        return int(args.func(args) or 0)
    except MedtlError as err:
        if args.debug:
            traceback.print_exc()
        print(f"medtl: error: {err}", file=sys.stderr)
        return ERROR_EXIT
    except KeyboardInterrupt:
        resume = ("; the checkpoints of finished epochs are kept: run the same command with --resume to continue"
                  if args.command == "run" else "")
        if args.command == "pull":
            resume = "; the instances written are kept: run the same command again to continue"
        print(f"medtl: interrupted while {_failed_step(args)}{resume}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place any other error becomes a path-free line
        if args.debug:
            traceback.print_exc()
        hint = ("the traceback above shows where" if args.debug else
                "run again with --debug for the full traceback (it may show file paths)")
        print(f"medtl: error: unexpected {type(err).__name__} while {_failed_step(args)}; {hint}", file=sys.stderr)
        return ERROR_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
