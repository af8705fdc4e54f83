"""How much of the CPUs other processes used while something was timed.

A throughput figure taken while other work ran on the same CPUs says more about that work than
about the code timed: a Sparse FF decode once measured 25 tokens/s against the dense model's
550 because training runs shared the machine. :class:`LoadMeter` measures, over an interval,
the CPU time that every *other* process used, as a share of the CPUs this process may run on,
so that each figure can carry it and each report can say when a figure is not to be trusted.

On Linux the share is exact to the clock tick: the busy time of this process's CPUs, read from
``/proc/stat`` at both ends of the interval, less the CPU time this process and its
descendants used (inductor's compile workers are descendants: their work is ours), over wall
time x CPUs. Elsewhere it falls back to the 1-minute load average less this process's own
average use (the load average counts our threads too); that average lags by up to a minute,
so it is a rough guide. Where neither can be read the share is unknown (``None``): measuring
the machine never stops a benchmark.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Above this share of the CPUs used by other processes an interval counts as busy. PyTorch runs
# an op on every usable core at once and waits for its slowest thread, so another process that
# takes a quarter of the CPU time (half a core of two) already stretches step times far beyond
# run-to-run noise, while an idle machine measures a few percent (daemons, tick rounding).
BUSY_SHARE = 0.25

# /proc/stat's CPU columns, in clock ticks: user nice system idle iowait irq softirq steal
# (then guest and guest_nice, which are already counted in user and nice). Steal is time a
# hypervisor gave other machines: it slows us as another process would, so it counts as busy.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)
_CPU_COLUMNS = 8


def _clock_ticks_per_s() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100  # Linux's USER_HZ everywhere it matters


def usable_cpu_ids() -> set[int]:
    """The CPUs this process may run on (its affinity; all of them where that is unknown)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def busy_cpu_s(stat_text: str, cpu_ids: set[int]) -> float:
    """Seconds the CPUs ``cpu_ids`` have been busy since boot, from the text of /proc/stat.

    The per-CPU lines (``cpu0``, ``cpu1``, ...) are summed over ``cpu_ids`` only, so that a
    process pinned to a few CPUs of a large machine is not charged the others' work; without
    per-CPU lines, the aggregate ``cpu`` line stands for all of them.
    """
    per_cpu: float | None = None
    aggregate: float | None = None
    for line in stat_text.splitlines():
        if not line.startswith("cpu"):
            continue
        name, *fields = line.split()
        ticks = [int(v) for v in fields[:_CPU_COLUMNS]]
        ticks += [0] * (_CPU_COLUMNS - len(ticks))  # old kernels have fewer columns
        busy = sum(ticks[i] for i in _BUSY_COLUMNS)
        if name == "cpu":
            aggregate = busy
        elif int(name[3:]) in cpu_ids:
            per_cpu = (per_cpu or 0) + busy
    ticks_busy = per_cpu if per_cpu is not None else aggregate
    if ticks_busy is None:
        raise ValueError("no cpu line in /proc/stat")
    return ticks_busy / _clock_ticks_per_s()


def _live_descendants_cpu_s() -> float:
    """CPU seconds of this process's live descendants (and of their reaped children), read
    from /proc; 0 where /proc cannot be read. Our reaped children are in ``os.times``."""
    parent_of: dict[int, int] = {}
    ticks_of: dict[int, int] = {}
    try:
        entries = [e for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return 0.0
    for entry in entries:
        try:
            text = Path(entry.path, "stat").read_text()
            # "pid (comm) state ppid ... utime stime cutime cstime ...": comm may hold spaces
            # and parentheses, so the fields are counted from the last ")".
            fields = text[text.rindex(")") + 2:].split()
            parent_of[int(entry.name)] = int(fields[1])
            ticks_of[int(entry.name)] = sum(int(v) for v in fields[11:15])
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we read
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        total += ticks_of[pid]
        todo += children.get(pid, [])
    return total / _clock_ticks_per_s()


def own_cpu_s() -> float:
    """CPU seconds used so far by this process (every thread), its reaped children and its
    live descendants: everything a measurement of *other* processes must leave out."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + _live_descendants_cpu_s()


def _read_proc_stat() -> str:
    return Path("/proc/stat").read_text()


def _load_average() -> float:
    return os.getloadavg()[0]


@dataclass(frozen=True)
class MachineLoad:
    """Other processes' use of the CPUs over one interval."""

    other_cpu_share: float | None  # of the usable CPUs' time, 0..1; None: could not be measured
    cpus: int  # the CPUs this process may run on
    wall_s: float
    method: str  # "proc_stat", "loadavg" or "unknown"

    @property
    def verdict(self) -> str:
        """``busy``, ``idle`` or ``unknown``."""
        if self.other_cpu_share is None:
            return "unknown"
        return "busy" if is_busy(self.other_cpu_share) else "idle"

    def as_dict(self) -> dict[str, Any]:
        return {"other_cpu_share": self.other_cpu_share, "cpus": self.cpus,
                "wall_s": self.wall_s, "method": self.method, "verdict": self.verdict,
                "busy_share": BUSY_SHARE}

    def excluding(self, cpu_s: float) -> MachineLoad:
        """This interval's load with ``cpu_s`` CPU seconds taken out of the other processes':
        the work of the job's other ranks on this machine (``torchrun`` starts them as
        siblings, not descendants), which is part of what was measured, not load on it."""
        if self.other_cpu_share is None or self.wall_s <= 0:
            return self
        share = max(0.0, self.other_cpu_share - cpu_s / (self.wall_s * self.cpus))
        return MachineLoad(share, self.cpus, self.wall_s, self.method)

    def warning(self) -> str | None:
        """One line for under a table of figures timed in this interval, when it was busy."""
        if self.verdict != "busy":
            return None
        return (f"warning: other processes used {self.other_cpu_share:.0%} of the {self.cpus} "
                "CPUs while this ran; the times above are not reliable, rerun on an idle "
                "machine")


def is_busy(other_cpu_share: float | None) -> bool:
    return other_cpu_share is not None and other_cpu_share > BUSY_SHARE


@dataclass(frozen=True)
class _Sample:
    wall_s: float
    busy_s: float | None  # None: /proc/stat could not be read
    own_s: float


class LoadMeter:
    """Measures other processes' use of the CPUs from its creation (or its last :meth:`lap`).

    ``meter = LoadMeter()``, run the work, ``meter.lap()`` is the :class:`MachineLoad` of that
    interval and starts the next. The readers are parameters so that tests can feed them.
    """

    def __init__(self, read_stat: Callable[[], str] = _read_proc_stat,
                 own_cpu: Callable[[], float] = own_cpu_s,
                 load_average: Callable[[], float] | None = _load_average,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_ids: set[int] | None = None) -> None:
        self._read_stat, self._own_cpu, self._load_average = read_stat, own_cpu, load_average
        self._clock = clock
        self._cpu_ids = cpu_ids if cpu_ids is not None else usable_cpu_ids()
        self._start = self._sample()

    def _sample(self) -> _Sample:
        try:
            busy: float | None = busy_cpu_s(self._read_stat(), self._cpu_ids)
        except (OSError, ValueError):
            busy = None
        try:
            own = self._own_cpu()
        except OSError:
            own = 0.0
        return _Sample(self._clock(), busy, own)

    def lap(self) -> MachineLoad:
        """The load since the last lap (or the start); the next lap starts now."""
        start, end = self._start, self._sample()
        self._start = end
        cpus = len(self._cpu_ids)
        wall = end.wall_s - start.wall_s
        own = end.own_s - start.own_s
        share, method = None, "unknown"
        if wall <= 0:
            pass
        elif start.busy_s is not None and end.busy_s is not None:
            share, method = (end.busy_s - start.busy_s - own) / (wall * cpus), "proc_stat"
        elif self._load_average is not None:
            try:
                share = (self._load_average() - own / wall) / cpus
                method = "loadavg"
            except OSError:
                pass
        if share is not None:  # tick rounding can take a share a little past either end
            share = min(1.0, max(0.0, share))
        return MachineLoad(share, cpus, wall, method)


def mean_share(shares_and_seconds: Iterable[tuple[float | None, float]]) -> float | None:
    """The time-weighted mean of several intervals' shares, those not measured left out;
    ``None`` when none was measured."""
    measured = [(s, w) for s, w in shares_and_seconds if s is not None and w > 0]
    total = sum(w for _, w in measured)
    return sum(s * w for s, w in measured) / total if total else None
