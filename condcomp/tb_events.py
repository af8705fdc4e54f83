"""TensorBoard event files, written in the calling thread.

tensorboardX's ``SummaryWriter`` hands events to a thread of its own. On a write error (a full
disk) that thread dies with a traceback, and every later event blocks on its full queue, so the
training run hangs, and so does the interpreter's exit. Written here, in the caller's thread, a
failed write is an ``OSError`` where it happens, which the train loop reports in one line. The
event records and their file format are still tensorboardX's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog

FLUSH_SECONDS = 30.0


class EventWriter:
    """Scalars and raw histograms into a new event file under ``logdir``.

    ``purge_step``: TensorBoard hides the events of the folder's earlier files from this step
    on (those an interrupted process logged after the checkpoint a run resumes from).
    """

    def __init__(self, logdir: Path, purge_step: int | None = None) -> None:
        Path(logdir).mkdir(parents=True, exist_ok=True)
        # The pid keeps two processes starting within one second (a quick resume) from writing
        # one file name, whose second opening would truncate the first's events.
        self._writer = EventsWriter(str(Path(logdir) / "events"), f".{os.getpid()}")
        self._flushed = time.monotonic()
        if purge_step is not None:
            self._add(Event(step=purge_step, file_version="brain.Event:2"))
            self._add(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._add(Event(summary=summary.scalar(tag, value), step=step))

    def histogram_raw(self, tag: str, step: int, values: list[float]) -> None:
        """One bar per entry of ``values`` (e.g. the tokens each expert received)."""
        n = len(values)
        self._add(Event(step=step, summary=summary.histogram_raw(
            tag, min=0, max=n, num=n, sum=float(sum(values)),
            sum_squares=float(sum(v * v for v in values)),
            bucket_limits=list(range(1, n + 1)), bucket_counts=values)))

    def flush(self) -> None:
        self._writer.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        try:
            self._writer.flush()
        finally:  # the file is closed even when the last flush fails (EventsWriter.close is not)
            self._writer._py_recordio_writer.close()

    def _add(self, event: Event) -> None:
        event.wall_time = time.time()
        self._writer.write_event(event)
        if time.monotonic() - self._flushed > FLUSH_SECONDS:
            self.flush()
