"""A run's metrics: ``metrics.jsonl`` rows and TensorBoard scalars, written by one process."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from condcomp.errors import storage_error
from condcomp.runs import METRICS_FILE, TB_DIR, parse_metrics, write_atomically
from condcomp.tb_events import EventWriter


class MetricsLog:
    """JSONL rows plus TensorBoard scalars. On resume, rows after the checkpoint (written by
    the interrupted process) are dropped, and TensorBoard purges them too, so no step is logged
    twice; a line cut short by a crash is dropped with them."""

    def __init__(self, run_dir: Path, resume_step: int | None,
                 log: Callable[[str], None] = print) -> None:
        self.path = run_dir / METRICS_FILE
        if resume_step is not None:
            rows = parse_metrics(self.path, warn=lambda m: log(f"warning: {m}"))
            write_atomically(self.path, "".join(json.dumps(row) + "\n" for row in rows
                                                if row["step"] <= resume_step))
        else:
            self.path.unlink(missing_ok=True)
        try:
            self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
            # Events after the checkpoint's step, logged by the interrupted process, are hidden.
            self._tb = EventWriter(run_dir / TB_DIR,
                                   purge_step=None if resume_step is None else resume_step + 1)
        except OSError as exc:
            raise storage_error(exc, f"cannot write the metrics of {run_dir}") from None

    def record(self, row: dict[str, Any]) -> None:
        """Append ``row`` to metrics.jsonl only (a note such as a config change, no scalars)."""
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as exc:
            raise storage_error(exc, f"cannot write {self.path}") from None

    def write(self, row: dict[str, Any]) -> None:
        self.record(row)
        try:
            for key, value in row.items():
                if key in ("step", "kind"):
                    continue
                if isinstance(value, (int, float)):
                    self._tb.scalar(key, value, row["step"])
                elif isinstance(value, list):  # e.g. tokens per expert: one bar per expert
                    self._tb.histogram_raw(key, row["step"], value)
        except OSError as exc:
            where = self.path.parent / TB_DIR
            raise storage_error(exc, f"cannot write the TensorBoard events in {where}") from None

    def close(self) -> None:
        # Every row was flushed when written, and write() reported any failure then: a failure
        # to close loses nothing, and must not hide the error that ended the run.
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._tb.close()


def loggable_stats(stats: dict[str, Any]) -> dict[str, float | list[float]]:
    """Layer statistics as JSON values: scalars as floats, vectors (tokens per expert) as
    lists, so the report can draw them over training."""
    out: dict[str, float | list[float]] = {}
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.detach().float().cpu().tolist()
        out[key] = value if isinstance(value, list) else float(value)
    return out


