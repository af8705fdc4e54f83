"""User-facing errors.

Every error a user can cause (a bad config, unreadable data, a corrupt checkpoint, a prompt
that does not fit) is raised as a :class:`CondcompError` subclass whose message says what is
wrong and how to fix it. The CLI prints the message alone, without a traceback.
"""

import errno
import os
import re


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


class StoppedOnMain(CondcompError):
    """Raised on the other ranks of a torchrun job when rank 0 stopped on a user error; rank 0
    prints the error, so they stay quiet."""


class StorageError(CondcompError):
    """A file or folder cannot be written or read: not a directory, no permission, disk full."""


def os_reason(exc: BaseException) -> str:
    """The operating system's reason in ``exc`` in a few words ("No space left on device (the
    disk is full)"), for a one-line message. Also reads the reason out of errors that carry an
    OS error only in their text (safetensors: "I/O error: No space left on device (os error
    28)")."""
    code = getattr(exc, "errno", None)
    reason = getattr(exc, "strerror", None) or str(exc)
    found = re.search(r"os error (\d+)|code: (\d+)", reason)
    if code is None and found:
        code = int(found.group(1) or found.group(2))
        reason = os.strerror(code)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason} (the disk is full)"
    return reason


def storage_error(exc: BaseException, doing: str, fix: str = "") -> StorageError:
    """``exc`` (an OSError or alike) as one line: what was being done, the OS reason, the fix.
    ``doing`` names the path, e.g. "cannot create the run folder /dev/null/run"."""
    if not fix:
        code = getattr(exc, "errno", None)
        fix = {errno.EACCES: "make it writable or choose another folder",
               errno.EPERM: "make it writable or choose another folder",
               errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
               errno.EROFS: "the file system is read-only; choose another folder"}.get(
                   code, "free some disk space" if "disk is full" in os_reason(exc) else
                   "check the path")
    return StorageError(f"{doing}: {os_reason(exc)}; {fix}")
