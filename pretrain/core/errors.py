"""User-facing errors.

Anything a user can fix (a config value, a missing file, a corrupt checkpoint) raises a subclass of
:class:`LMForgeError`. The CLI prints its message as one line and exits non-zero; a traceback is
shown only with ``--debug``. Internal invariants use plain ``assert`` and are bugs, not user errors.
"""


class LMForgeError(Exception):
    """Base class of errors a user can fix. The message is one actionable line."""

    exit_code = 2


class ConfigurationError(LMForgeError):
    """A config key, type or combination of values is wrong."""


class DataError(LMForgeError):
    """Input data is missing, empty, unreadable or inconsistent with the tokenizer."""


class CheckpointError(LMForgeError):
    """A checkpoint is missing, corrupt or does not match the run."""


class TrainingError(LMForgeError):
    """Training cannot go on (e.g. the loss became NaN/Inf)."""

    exit_code = 3
