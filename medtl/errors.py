"""The small family of errors medtl raises at its public edge.

Messages follow "<what> must be <X>, not <Y>; <how to fix>" and name the file or key concerned
(never a patient identifier or an original path that could carry one).
"""


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
