"""Which values count as absolute paths (never logged) and which stay as they are."""

from __future__ import annotations

from pathlib import Path, PureWindowsPath

import pytest

from medtl.tracking.values import REDACTED_PATH, flatten, safe_key, safe_text


@pytest.mark.parametrize(
    "value",
    [
        "/data/scans",
        "~/weights/resnet_18.pth",
        r"C:\Users\jdoe\scans",
        "D:/exports",
        r"\\pacs\share\study",
        "file:///srv/x",
        "sqlite:////srv/mlflow.db",
        "--root=/srv/scans",
        ["CR", "/srv/a"],
        {"nested": "/srv/b"},
        Path("/srv/c"),
        PureWindowsPath(r"C:\scans"),
        str(Path.home() / "x"),
    ],
)
def test_absolute_paths_are_replaced(value):
    assert safe_text(value) == REDACTED_PATH


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("demo_data/labels.csv", "demo_data/labels.csv"),
        ("relu/gelu", "relu/gelu"),
        ("https://mlflow.example.org/#/experiments", "https://mlflow.example.org/#/experiments"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        (0.001, "0.001"),
        (None, "None"),
        (["CR", "DX"], '["CR", "DX"]'),
        (Path("data/x.csv"), "data/x.csv"),
    ],
)
def test_relative_paths_urls_and_scalars_are_kept(value, expected):
    assert safe_text(value) == expected


def test_long_values_are_cut_to_the_mlflow_limit():
    text = safe_text("x" * 7000)
    assert len(text) == 6000 and text.endswith("[truncated]")


def test_flatten_uses_dotted_keys_and_keeps_lists_whole():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_invalid_key_characters_become_underscores():
    assert safe_key("val/auroc (sex=F)") == "val/auroc _sex_F_"
