"""Turn plain Python values into MLflow keys and values that cannot leak a local path.

MLflow stores whatever string it is given; nothing in it stops a config value such as
`/home/jdoe/scans/DOE_JOHN` from becoming a run parameter. Every value medtl sends to MLflow passes
through `safe_text`, which replaces anything that looks like an absolute path by a fixed marker.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

from medtl.errors import ConfigError

REDACTED_PATH = "<absolute path removed>"

# An absolute path starts a value or follows a separator: `/x` (POSIX), `~/` (home), `C:\`/`C:/`
# (Windows drive), `\\host` (UNC), `file:` URIs and `scheme:////abs` (e.g. an absolute SQLite URI).
# `a/b`, `1/2`, `https://...` and `sqlite:///relative.db` stay untouched.
_ABSOLUTE_PATH = re.compile(
    r"""(?:^|[\s"'=,;:(\[{<])(?:/(?=[^\s/])|~[/\\]|[A-Za-z]:[\\/]|\\\\)|(?:^|[^\w])file:|:////""",
    re.IGNORECASE,
)
# MLflow accepts alphanumerics, `_ - . space : /` in keys (mlflow.utils.validation); others -> `_`.
_KEY_CHARS = re.compile(r"[^\w\-. :/]")
MAX_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_LENGTH = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH


def looks_like_absolute_path(text: str) -> bool:
    """Tell whether a string is, or contains, an absolute local path.

    Args:
        text: Any string (a config value, a tag, a list rendered as JSON).

    Returns:
        True when the string holds an absolute POSIX/Windows/UNC path, a `~/` path, a `file:` URI
        or the current user's home folder.
    """
    if _ABSOLUTE_PATH.search(text):
        return True
    home = str(Path.home())
    return len(home) > 1 and home.casefold() in text.casefold()


def safe_text(value: Any, *, max_length: int = MAX_PARAM_LENGTH) -> str:
    """Render a value as the string MLflow will store, with absolute paths replaced.

    Args:
        value: A scalar, path, list/tuple or mapping. Containers are rendered as JSON.
        max_length: MLflow's limit for the field; longer text is cut and marked.

    Returns:
        The string, or `REDACTED_PATH` when it contains anything that looks like an absolute path.

    Example:
        >>> safe_text("/data/scans")
        '<absolute path removed>'
    """
    if isinstance(value, PurePath):
        text = value.as_posix()
    elif isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple | set | Mapping):
        text = json.dumps(_jsonable(value), sort_keys=isinstance(value, Mapping))
    else:
        text = str(value)
    if looks_like_absolute_path(text):
        return REDACTED_PATH
    if len(text) > max_length:
        marker = "...[truncated]"
        text = text[: max_length - len(marker)] + marker
    return text


def redact_tree(value: Any) -> Any:
    """Copy a JSON-like tree with every path-like string replaced (for JSON artifacts).

    Args:
        value: Nested mappings, sequences and scalars.

    Returns:
        The same structure with mapping keys as strings and path-like strings replaced.
    """
    if isinstance(value, Mapping):
        return {_safe_key_text(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [redact_tree(v) for v in value]
    if isinstance(value, str | PurePath):
        return safe_text(value, max_length=10**9)
    if value is None or isinstance(value, bool | int | float):
        return value
    return safe_text(value, max_length=10**9)


def safe_key(key: str) -> str:
    """Make a string a valid MLflow key (invalid characters become `_`, length capped).

    Args:
        key: A dotted parameter, metric or tag name.

    Returns:
        The key MLflow will accept.

    Raises:
        ConfigError: when the key is empty or itself looks like an absolute path.
    """
    text = _safe_key_text(key)
    if not text.strip():
        raise ConfigError("an MLflow key must be a non-empty name, not an empty string; name the entry")
    return _KEY_CHARS.sub("_", text)[:MAX_KEY_LENGTH]


def flatten(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings (or a dataclass) into dotted keys; sequences stay whole values.

    Args:
        config: A nested mapping such as a loaded YAML workflow, or a dataclass instance.
        prefix: Prepended to every key (with a dot).

    Returns:
        `{"train.lr": 0.001, "data.modalities": ["CR", "DX"], ...}`.

    Raises:
        ConfigError: when the config is not a mapping or a key looks like an absolute path.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"a config must be a mapping or a dataclass, not {type(config).__name__}; "
            "pass the loaded workflow dictionary"
        )
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{_safe_key_text(key, parent=prefix)}" if prefix else _safe_key_text(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _safe_key_text(key: Any, parent: str = "") -> str:
    text = key.as_posix() if isinstance(key, PurePath) else str(key)
    if looks_like_absolute_path(text):
        where = f"under {parent!r}" if parent else "at the top level"
        raise ConfigError(
            f"config keys {where} must be plain names, not absolute paths; "
            "move the path into a value (values that look like paths are never logged)"
        )
    return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, PurePath):
        return value.as_posix()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
