"""The PHI gate of a manifest build: write its outputs only if they carry no identifying value.

Internal helpers of `medtl.data.manifest`: medtl's log records and Python warnings are held
while the build runs; the manifest CSV and its sidecar are written, then they and every held
message are scanned for the identifying values read from the inputs; a hit deletes both
outputs and stops the build, otherwise the held messages are released.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Iterator

from medtl.data.privacy import scan_for_phi
from medtl.errors import InputError


@contextlib.contextmanager
def _held_messages() -> Iterator[tuple[list[logging.LogRecord], list[warnings.WarningMessage]]]:
    """Hold medtl's log records and Python warnings until the outputs passed the PHI scan."""
    medtl_logger = logging.getLogger("medtl")
    records: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    saved = (medtl_logger.handlers[:], medtl_logger.propagate)
    medtl_logger.handlers, medtl_logger.propagate = [_Hold()], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield records, caught
    finally:
        medtl_logger.handlers, medtl_logger.propagate = saved


def _write_checked(out_csv, sidecar_json, table, sidecar, messages, held_logs, held_warnings, forbidden) -> None:
    """Write both outputs, scan them and every held message; delete everything on a hit."""
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    csv_bytes = table.to_csv(index=False, lineterminator="\n").encode("utf-8")
    out_csv.write_bytes(csv_bytes)
    sidecar["manifest_sha256"] = hashlib.sha256(csv_bytes).hexdigest()
    sidecar_json.write_text(json.dumps(sidecar, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    texts = {f"log message {i + 1}": m for i, m in enumerate(messages)}
    texts.update({f"log record {i + 1}": r.getMessage() for i, r in enumerate(held_logs)})
    findings = scan_for_phi([out_csv, sidecar_json], forbidden) + scan_for_phi(texts, forbidden)
    if findings:
        for path in (out_csv, sidecar_json):
            path.unlink(missing_ok=True)
        raise InputError(
            f"outputs must contain no identifying values, not: {'; '.join(findings)}; the build stopped and its "
            f"outputs were deleted; remove identifying text from the labels CSV (label names, extra subgroup "
            f"columns) or, if it came from a header, report a medtl bug"
        )
    for record in held_logs:
        logging.getLogger(record.name).handle(record)
    # Library warnings (pydicom quotes invalid header values) are held back when they quote one.
    quoting = {f.split(":", 1)[0] for f in scan_for_phi({str(i): str(w.message) for i, w in enumerate(held_warnings)},
                                                       forbidden)}
    for i, caught in enumerate(held_warnings):
        if str(i) not in quoting:
            warnings.showwarning(caught.message, caught.category, caught.filename, caught.lineno)
    if withheld := len(quoting):
        messages.append(f"{withheld} library warnings were withheld because they quoted an identifying value")
