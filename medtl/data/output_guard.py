"""The PHI gate of a manifest build: write its outputs only if they carry no identifying value.

Internal helpers of `medtl.data.manifest`: medtl's log records and Python warnings are held
while the build runs; the manifest CSV and its sidecar are written to temporary files beside
their targets, then every cell, every sidecar field and every held message is scanned for the
data set's identifying values (`medtl.data.needles.Needles`). A hit deletes the temporary files
and stops the build with findings that name the row, column or field and the source of the
value (a file by its safe name, a labels-CSV row), never the value; an existing manifest is left
untouched. Otherwise both files replace their targets and the held messages are released.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from medtl.data.needles import Needles, scan_for_phi
from medtl.errors import InputError

_SHOWN_FINDINGS = 5


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


def _write_checked(out_csv: Path, sidecar_json: Path, table: pd.DataFrame, sidecar: dict, messages: list[str],
                   held_logs: list[logging.LogRecord], held_warnings: list[warnings.WarningMessage],
                   needles: Needles, label_rows: Sequence[int], free_text_columns: Sequence[str]) -> None:
    """Scan both outputs and every held message; write them only when nothing identifying is found.

    `free_text_columns` hold the user's own text (class names, extra subgroups): a finding there
    is fixed in the labels CSV, a finding anywhere else is a medtl bug.
    """
    csv_bytes = table.to_csv(index=False, lineterminator="\n").encode("utf-8")
    sidecar["manifest_sha256"] = hashlib.sha256(csv_bytes).hexdigest()
    sidecar_bytes = (json.dumps(sidecar, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    findings = _table_findings(out_csv.name, table, label_rows, needles)
    in_free_text = any(f"column '{c}':" in f for f in findings for c in free_text_columns)
    findings += _sidecar_findings(sidecar_json.name, sidecar, needles)
    texts = {f"log message {i + 1}": m for i, m in enumerate(messages)}
    texts.update({f"log record {i + 1}": r.getMessage() for i, r in enumerate(held_logs)})
    findings += scan_for_phi(texts, needles)
    if findings:
        raise InputError(_refusal(findings, in_free_text))
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(out_csv, csv_bytes)
    replace_atomically(sidecar_json, sidecar_bytes)
    _release(held_logs, held_warnings, messages, needles)


def _table_findings(name: str, table: pd.DataFrame, label_rows: Sequence[int], needles: Needles) -> list[str]:
    """Findings per manifest cell: "manifest.csv row 3 (labels CSV row 7), column 'label': ..."."""
    findings = []
    for column in table.columns:
        values = [str(v) for v in table[column]]
        if not scan_for_phi({"": "\n".join(values)}, needles):
            continue  # the common case: one scan of the whole column
        for index, value in enumerate(values):
            where = f"{name} row {index + 2} (labels CSV row {label_rows[index]}), column '{column}'"
            findings.extend(scan_for_phi({where: value}, needles))
    return findings


def _sidecar_findings(name: str, sidecar: dict, needles: Needles) -> list[str]:
    """Findings per sidecar field, named by its JSON path ("manifest.json field 'warnings[2]'")."""
    if not scan_for_phi({"": json.dumps(sidecar, ensure_ascii=False)}, needles):
        return []  # the common case: one scan of the whole document
    return scan_for_phi({f"{name} field '{path}'": text for path, text in _leaves(sidecar, "", needles)}, needles)


def _leaves(node: object, path: str, needles: Needles) -> Iterator[tuple[str, str]]:
    """(JSON path, text) of every key and value; a key that holds a needle is named by position."""
    if isinstance(node, dict):
        for number, (key, value) in enumerate(node.items()):
            shown = f"#{number + 1}" if scan_for_phi({"": str(key)}, needles) else str(key)
            where = f"{path}.{shown}" if path else shown
            yield f"{where} (key)", str(key)
            yield from _leaves(value, where, needles)
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{path}[{index}]", needles)
    else:
        yield path, "" if node is None else str(node)


def _refusal(findings: list[str], in_free_text: bool) -> str:
    advice = ("remove the identifying text from those labels CSV cells (class names, extra subgroup columns) and "
              "build again" if in_free_text else
              "this is a medtl bug: please report it with these findings (they name fields, never values)")
    more = f" (and {len(findings) - _SHOWN_FINDINGS} more)" if len(findings) > _SHOWN_FINDINGS else ""
    return (f"outputs must contain no identifying values, not: {'; '.join(findings[:_SHOWN_FINDINGS])}{more}; "
            f"the build stopped and wrote nothing (an existing manifest is unchanged); {advice}")


def replace_atomically(target: Path, data: bytes, *, mode_of: Path | None = None) -> None:
    """Write `data` to `target` atomically: a temporary file beside it, flushed to disk, then `os.replace`.

    A reader or a crash never sees a half-written file, and a failure leaves `target` as it was.

    Args:
        target: The file to write (its folder must exist).
        data: Its new content.
        mode_of: A file whose permission bits the new file takes (e.g. the copied original).
    """
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode_of is not None:
            shutil.copymode(mode_of, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _release(held_logs: list[logging.LogRecord], held_warnings: list[warnings.WarningMessage],
             messages: list[str], needles: Needles) -> None:
    """Emit the held log records, and the held warnings that quote no identifying value."""
    for record in held_logs:
        logging.getLogger(record.name).handle(record)
    # Library warnings (pydicom quotes invalid header values) are held back when they quote one.
    quoting = {f.split(":", 1)[0] for f in scan_for_phi({str(i): str(w.message) for i, w in enumerate(held_warnings)},
                                                       needles)}
    for i, caught in enumerate(held_warnings):
        if str(i) not in quoting:
            warnings.showwarning(caught.message, caught.category, caught.filename, caught.lineno)
    if withheld := len(quoting):
        messages.append(f"{withheld} library warnings were withheld because they quoted an identifying value")
