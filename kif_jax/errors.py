"""User-facing errors: `main.py` prints their message as one line and exits non-zero."""


class KifError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class ConfigError(KifError):
    """A config file or field is missing, unknown or out of range."""


class DataError(KifError):
    """A data file or directory is missing or malformed."""


class ModelLoadError(KifError):
    """A model checkpoint cannot be read or does not match the model."""


class CheckpointError(KifError):
    """A training checkpoint is missing, corrupt, or from a different config."""


class NonFiniteError(KifError):
    """Training produced a non-finite loss or gradient."""
