"""An exclusive lock on a run folder while a process trains into it.

Two processes training into one folder would interleave its config.json, metrics.jsonl and
checkpoints until the record no longer matches the weights, and a ``--resume`` started while the
run still trains would do the same. :func:`condcomp.train.train` therefore holds a
:class:`RunLock` for the whole run (``condcomp compare`` too, through it), taken before anything
in the folder is written; a second process stops with one line naming the holder.

The lock is the operating system's: ``flock`` on ``<run>/.lock``. The kernel releases it when
the holder ends, however it ends (``kill -9`` included), so a crashed run never leaves its
folder locked. On NFS, Linux maps ``flock`` onto the NFS lock protocol (NFSv4, or NFSv3 with
lockd), so the lock holds across machines, and the server drops a dead client's lock when its
lease runs out.

The file also holds the holder's details (pid, host, command, start time) as JSON, for the
message that names it, and is removed at release. Details found under a free lock are therefore
those of a process that died holding it: the new holder says that it takes over.

Where the file system has no locks (``flock`` fails with ENOLCK or EOPNOTSUPP), the details are
the lock: a holder on this host whose pid is gone is taken over; a live one, or one on another
host (whose pid cannot be checked from here), stops the run, and the message says to delete the
file once that process is gone. Two starts within milliseconds are not told apart then.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from condcomp.errors import CondcompError, storage_error

LOCK_FILE = ".lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunLockedError(CondcompError):
    """Another process trains into the run folder."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder's lock."""

    pid: int
    host: str
    command: str
    since: str

    @classmethod
    def this_process(cls) -> Holder:
        program = Path(sys.argv[0]).name if sys.argv else "python"
        program = {"__main__.py": "python -m condcomp", "-c": "python -c"}.get(program, program)
        command = " ".join([program, shlex.join(sys.argv[1:])]).strip()
        if len(command) > 120:
            command = command[:117] + "..."
        return cls(os.getpid(), socket.gethostname(), command,
                   time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The details in a lock file; None when it holds none (or is damaged)."""
        try:
            raw = json.loads(text)
            return cls(int(raw["pid"]), str(raw["host"]), str(raw["command"]), str(raw["since"]))
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (`{self.command}`, since {self.since})"

    def is_gone(self) -> bool:
        """Whether this holder is known to have ended: a pid no longer alive on this host."""
        if self.host != socket.gethostname():
            return False  # another machine's pid cannot be checked from here
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir`` (created if needed) exclusively.

    A folder the lock created and that holds nothing else at release (a run that stopped
    before writing anything) is removed again, so a mistake leaves no empty run folder.
    """

    def __init__(self, run_dir: str | Path, log: Callable[[str], object] = print) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._log = log
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        self._created = not self.run_dir.is_dir()
        # A lock file removed by its previous holder between our open and our flock is no
        # longer the folder's lock: try again on the new one.
        for _ in range(10):
            fd = self._open()
            try:
                self._lock(fd)
                if self._still_the_lock_file(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        else:  # pragma: no cover - another process recreates the file again and again
            raise RunLockedError(f"run folder {self.run_dir} is in use by another process "
                                 "that keeps restarting; stop it, or train into another out_dir")
        self._fd = fd
        previous = Holder.parse(_read(fd))
        if previous is not None and previous.pid != os.getpid():
            self._log(f"note: run folder {self.run_dir} was last locked by {previous.describe()}, "
                      "which ended without releasing it; taking it over")
        _write(fd, json.dumps(asdict(Holder.this_process())) + "\n")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Removed while still held: a process that opened it meanwhile sees that its file is
            # no longer the lock file (_still_the_lock_file) and tries again.
            self.path.unlink(missing_ok=True)
            if self._created:
                try:
                    self.run_dir.rmdir()  # only succeeds when nothing else was written
                except OSError:
                    pass
        except OSError:
            pass
        finally:
            os.close(fd)

    # ---------------------------------------------------------------------------- helpers

    def _open(self) -> int:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise CondcompError(f"cannot create the run folder {self.run_dir}: a file of that "
                                "name exists; choose another out_dir") from None
        except OSError as exc:
            raise storage_error(exc, f"cannot create the run folder {self.run_dir}",
                                "set out_dir (or the run name) to a folder you can write"
                                ) from None
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(exc, f"cannot create the lock file {self.path}",
                                "make the run folder writable or choose another out_dir"
                                ) from None

    def _lock(self, fd: int) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming the holder."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = Holder.parse(_read(fd))
            who = holder.describe() if holder else "another process (it is starting up)"
            raise RunLockedError(
                f"run folder {self.run_dir} is in use by {who}; wait for it to end or stop "
                "it, or train into another out_dir") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise storage_error(exc, f"cannot lock {self.path}") from None
        # No locks on this file system: the details are the lock (see the module docstring).
        holder = Holder.parse(_read(fd))
        if holder is not None and not holder.is_gone() and holder.pid != os.getpid():
            raise RunLockedError(
                f"run folder {self.run_dir} is in use by {holder.describe()}; wait for it to "
                "end or stop it, or train into another out_dir (this file system has no file "
                f"locks: if that process is gone, delete {self.path})")

    def _still_the_lock_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _write(fd: int, text: str) -> None:
    # The details only serve the message that names the holder: failing to write them (a full
    # disk) must not stop the run; the folder's own files report that.
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8"), 0)
    except OSError:
        pass
