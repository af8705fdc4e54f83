"""User-facing errors.

Every error a user can cause (a bad config, unreadable data, a corrupt checkpoint, a prompt
that does not fit) is raised as a :class:`CondcompError` subclass whose message says what is
wrong and how to fix it. The CLI prints the message alone, without a traceback.
"""


class CondcompError(Exception):
    """Base class of errors caused by user input; the message is shown as is."""


class ConfigError(CondcompError):
    """A config key has an impossible or malformed value."""


class DataError(CondcompError):
    """A corpus is missing, empty, binary or unreadable."""


class CheckpointError(CondcompError):
    """A checkpoint is missing, truncated or corrupt."""


class GenerationError(CondcompError):
    """A generation request cannot be served (for example, a prompt longer than the context)."""


class TrainingError(CondcompError):
    """Training had to stop (for example, too many non-finite losses in a row)."""
