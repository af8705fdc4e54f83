"""What every benchmark shares: the record of where it ran, timing in turns, and writing the
figures out (a table, a warning when other work shared the machine, the JSON)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from condcomp.machine_load import MachineLoad
from condcomp.runtime import device_name


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it means it is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turns(steppers: Mapping[str, Callable[[], object]], steps: int,
                  device: torch.device, warmup: int = 0) -> dict[str, list[float]]:
    """Seconds of each of ``steps`` calls of every stepper, after ``warmup`` untimed calls each.

    The steppers take turns call by call, so that a change of load on a shared machine hits
    them all alike; on CUDA each call is timed to its last kernel.
    """
    for step in steppers.values():
        for _ in range(warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(steps):
        for name, step in steppers.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def median_seconds(seconds: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in seconds.items()}


def environment(device: torch.device) -> dict[str, Any]:
    """Where the figures were taken: the device, the CPU cores and threads, the versions."""
    env: dict[str, Any] = {"name": device_name(device), "type": device.type,
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cpu":
        env["name"] = device_name(device).rsplit(" (", 1)[0] + f" ({os.cpu_count()} cores)"
    if importlib.util.find_spec("transformers"):
        import transformers

        env["transformers"] = transformers.__version__
    return env


def command_line() -> str:
    """The command as typed, under the name users type it by."""
    return shlex.join(["condcomp", *sys.argv[1:]])


def si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{prefix}{unit}"
    return f"{x:.2f}{unit}"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """Aligned markdown table text."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def report(result: dict[str, Any], table: str, json_path: str | None,
           load: MachineLoad) -> None:
    """Print the table, and under it a warning if other processes were busy on the CPUs while
    the figures were taken; record that load in ``result`` and, if asked, write it as JSON."""
    result["machine_load"] = load.as_dict()
    print()
    print(table)
    warning = load.warning()
    if warning:
        print(warning)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {path}")
