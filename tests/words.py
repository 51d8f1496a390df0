"""Every word medtl writes by construction, read from its source: for the vocabulary tests."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

from medtl.data.manifest import MANIFEST_COLUMNS
from medtl.data.splits import SPLITS

PACKAGE = Path(__file__).resolve().parents[1] / "medtl"
# Not output templates: the synthetic demo's fake identities, the DICOM keyword list of the
# de-identification profile, and this list itself.
_NOT_TEMPLATES = {"data/synthetic.py", "data/deid.py", "vocabulary.py"}
_HEX = re.compile(r"(?<![0-9a-z])[0-9a-f]{8,}(?![0-9a-z])")


@functools.cache
def output_vocabulary() -> frozenset[str]:
    """Every word medtl can write by construction: columns, splits, codes, modality names, and the
    words of every string literal of the package (messages, templates, report text), docstrings
    and code identifiers (CamelCase DICOM keywords) left out."""
    words = {w for column in MANIFEST_COLUMNS for w in column.split("_")} | set(SPLITS)
    words |= {"M", "F", "O", "U", "unknown", "CT", "MR", "CR", "DX", "US", "PT", "NM", "MG", "OT", "dicom", "series",
              "image", "nifti", "quarantined", "skipped", "used"}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() in _NOT_TEMPLATES:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for word in re.findall(r"[^\W\d_]+", _HEX.sub(" ", node.value)):
                    if len(word) >= 3 and not re.search(r"[a-z][A-Z]", word):
                        words.add(word.casefold())
    return frozenset(w for w in words if len(w) >= 3 and not w.isdigit())
