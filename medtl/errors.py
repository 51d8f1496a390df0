"""The small family of errors medtl raises at its public edge, and the one "did you mean" helper.

Messages follow "<what> must be <X>, not <Y>; <how to fix>" and name the file or key concerned
(never a patient identifier or an original path that could carry one).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MedtlError(Exception):
    """Base class of medtl's own errors."""


class InputError(MedtlError, ValueError):
    """An input file, folder, table or value is unusable as given."""


class ConfigError(MedtlError, ValueError):
    """A workflow configuration key is missing or invalid."""


class LeakageError(MedtlError, ValueError):
    """A patient appears in more than one split."""


class WeightsError(MedtlError, RuntimeError):
    """Pretrained weights are missing, unsafe or do not fit the model."""


def did_you_mean(name: object, options: Iterable[str], *, prefix: str = "") -> str:
    """The end of an error about an unknown name: "did you mean X or Y?" or "choose from A, B, C".

    Args:
        name: The unknown name as given.
        options: The names that exist.
        prefix: Prepended to every name shown (e.g. "train." for a config section's keys).

    Example:
        >>> did_you_mean("finetun", ["finetune", "linear_probe"])
        "did you mean 'finetune'?"
    """
    options = [str(o) for o in options]
    close = difflib.get_close_matches(str(name), options, n=3, cutoff=0.5)
    # difflib breaks ties by reverse name ("lite2 or lite1 or lite0"); closest first, then by name.
    close.sort(key=lambda c: (-difflib.SequenceMatcher(None, str(name), c).ratio(), c))
    if close:
        return "did you mean " + " or ".join(repr(prefix + c) for c in close) + "?"
    return "choose from " + ", ".join(prefix + o for o in options)
