"""Benchmark: `medtl manifest build` intake against a plain read-decode-hash loop over the same files.

At two sizes of the synthetic demo data set (`write_demo_data`, DICOM radiographs and CT series
with NIfTI masks), in the same process and interleaved round by round:

(a) plain: every file under the root read once, its bytes hashed (SHA-256) and its pixels decoded
    (pydicom `dcmread` + `pixel_array` for DICOM, PIL for PNG/JPEG/TIFF/BMP, nibabel for NIfTI);
    nothing else. The floor a manifest build can be compared with.
(b) build: `medtl.data.manifest.build_manifest`, the function `medtl manifest build` calls (with
    a fixed key file in the work folder, no progress bars).

Reported per size: seconds (median of the rounds), files/s, the ratio build/plain, CPU seconds
(this process and its worker processes: on a shared machine the wall clock depends on the others'
load) and the peak resident memory of this process and of its worker processes
(`resource.getrusage`, the peak so far: a flat figure from the small to the large size means memory
does not grow with the file count).
MONAI (imported by `load_study`) is imported before the first timed round: its import is a fixed
cost of the first build in a process, printed separately.

Usage:
    .venv/bin/python benchmarks/intake.py [--work DIR] [--patients 580 2400] [--rounds 2] [--workers N] [--quick]

Prints markdown tables (for docs/benchmarks.md). The demo data, manifests and key are written under
the work folder (outside the repository); nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import resource
import secrets
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402  (the benchmarks folder is not a package)

_IMAGE2D = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_NOT_IMAGES = (".csv", ".txt", ".json", ".md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help=f"work folder outside the repo (default {_data.DEFAULT_WORK})")
    parser.add_argument("--patients", type=int, nargs="+", default=[580, 2400],
                        help="demo data sizes in patients (about 3 files each)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per size")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes of the build (default: build_manifest's own choice)")
    parser.add_argument("--quick", action="store_true", help="one small size, one round (smoke check)")
    return parser.parse_args(argv)


def demo_root(work: Path, patients: int) -> Path:
    """The demo data set of `patients` patients under the work folder (written once, then reused)."""
    from medtl.data.synthetic import write_demo_data

    root = work / f"intake-demo-{patients}"
    if not (root / "labels.csv").is_file():
        print(f"writing demo data ({patients} patients) to {root} ...", flush=True)
        write_demo_data(root, patients=patients, seed=0, progress=False)
    return root


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def plain_pass(files: list[Path]) -> int:
    """Read, hash and decode every file once; returns how many did not decode (non-images too)."""
    import nibabel as nib
    import numpy as np
    import pydicom
    from PIL import Image

    failed = 0
    warnings.simplefilter("ignore")  # pydicom warns about odd files; a plain loop does not care
    for path in files:
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        name = path.name.lower()
        try:
            if name.endswith((".nii", ".nii.gz")):
                image = nib.Nifti1Image.from_bytes(gzip.decompress(data) if name.endswith(".gz") else data)
                np.asanyarray(image.dataobj)
            elif name.endswith(_IMAGE2D):
                with Image.open(io.BytesIO(data)) as image:
                    np.asarray(image)
            elif name.endswith(_NOT_IMAGES):
                failed += 1
            else:
                pydicom.dcmread(io.BytesIO(data), force=True).pixel_array  # noqa: B018 - the decode is the work
        except Exception:  # noqa: BLE001 - a plain loop counts what it cannot decode
            failed += 1
    return failed


def build(root: Path, out: Path, key: Path, workers: int | None) -> int:
    from medtl.data.manifest import build_manifest

    extra = {} if workers is None else {"workers": workers}
    return build_manifest(root, root / "labels.csv", out, key_file=key, progress=False, **extra).rows


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished worker processes so far.

    On a shared machine the wall clock depends on the others' load; CPU time hardly does.
    """
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def peak_mb() -> tuple[float, float]:
    """Peak resident memory so far (MB) of this process and of its largest finished child."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.patients, args.rounds = [60], 1
    work = _data.work_folder(args.work)
    os.environ.setdefault("MEDTL_CONFIG_DIR", str(work / "config"))  # benchmark keys stay in the work folder
    key = work / "intake.key"
    if not key.is_file():
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
    print("machine:", _data.machine())
    roots = {n: demo_root(work, n) for n in args.patients}
    start = time.perf_counter()
    import medtl.data.reader  # noqa: F401  (MONAI: a fixed cost of the first build in a process)

    print(f"MONAI import (first build in a process pays it once): {time.perf_counter() - start:.1f} s")
    rows = []
    for patients, root in roots.items():
        files = files_under(root)
        out = work / "intake-manifests" / f"demo-{patients}.csv"
        times: dict[str, list[float]] = {"plain": [], "build": []}
        cpu: dict[str, list[float]] = {"plain": [], "build": []}
        loads = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for name in ("plain", "build"):
                start, used = time.perf_counter(), cpu_seconds()
                with warnings.catch_warnings():
                    plain_pass(files) if name == "plain" else build(root, out, key, args.workers)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(cpu_seconds() - used)
            loads.append(os.getloadavg()[0])
        plain, built = statistics.median(times["plain"]), statistics.median(times["build"])
        plain_cpu, build_cpu = statistics.median(cpu["plain"]), statistics.median(cpu["build"])
        own, children = peak_mb()
        rows.append([
            patients, len(files), f"{sum(p.stat().st_size for p in files) / 1e6:.0f}",
            f"{plain:.1f}", f"{len(files) / plain:.0f}", f"{built:.1f}", f"{len(files) / built:.0f}",
            f"{built / plain:.2f}", f"{plain_cpu:.1f} / {build_cpu:.1f}", f"{build_cpu / plain_cpu:.2f}",
            f"{own:.0f} / {children:.0f}", f"{min(loads):.1f}-{max(loads):.1f}",
            ", ".join(f"{p:.1f}/{b:.1f}" for p, b in zip(times["plain"], times["build"], strict=True)),
        ])
        print(f"{patients} patients: plain {plain:.1f} s, build {built:.1f} s", flush=True)
    _data.print_table(
        f"Manifest intake vs a plain read+decode+hash loop (median of {args.rounds} interleaved rounds, "
        f"workers {'default' if args.workers is None else args.workers})",
        ["patients", "files", "MB", "plain s", "plain files/s", "build s", "build files/s", "build / plain",
         "CPU s plain / build", "CPU build / plain", "peak RSS MB (main / worker)", "load avg",
         "rounds plain/build s"],
        rows,
    )
    print("machine after:", _data.machine())


if __name__ == "__main__":
    main()
