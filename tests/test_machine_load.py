"""Other processes' share of the CPUs over an interval (condcomp.machine_load): the arithmetic on
fed readings, the fallbacks, and a real busy interval."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from condcomp.machine_load import BUSY_SHARE, LoadMeter, MachineLoad, mean_share, own_cpu_s

REPO = Path(__file__).resolve().parents[1]


def stat_text(*per_cpu_busy_idle: tuple[int, int]) -> str:
    """A /proc/stat with one line per CPU: ``busy`` ticks split over user, system, irq, softirq
    and steal, ``idle`` ticks over idle and iowait, and guest ticks (inside user already)."""
    lines = []
    for i, (busy, idle) in enumerate(per_cpu_busy_idle):
        user, system, irq, softirq, steal = busy - 4, 1, 1, 1, 1
        lines.append(f"cpu{i} {user} 0 {system} {idle - 1} 1 {irq} {softirq} {steal} 7 0")
    total_busy = sum(b for b, _ in per_cpu_busy_idle)
    total_idle = sum(i for _, i in per_cpu_busy_idle)
    head = f"cpu  {total_busy} 0 0 {total_idle} 0 0 0 0 0 0"
    return "\n".join([head, *lines, "intr 1 2 3", "ctxt 99"]) + "\n"


def fed_meter(stats: list[str], own: list[float], clock: list[float], cpu_ids: set[int],
              load_average=None) -> LoadMeter:
    stats, own, clock = iter(stats), iter(own), iter(clock)

    def read_stat() -> str:
        text = next(stats)
        if text is None:
            raise OSError("no /proc/stat here")
        return text

    return LoadMeter(read_stat=read_stat, own_cpu=lambda: next(own), clock=lambda: next(clock),
                     cpu_ids=cpu_ids, load_average=load_average)


def test_the_share_is_the_busy_ticks_less_our_own_time_over_wall_time_and_cpus():
    # 2 s on 2 CPUs (USER_HZ 100): the CPUs were busy 150 + 130 ticks = 2.8 s, of which this
    # process used 1.2 s, so others used 1.6 s of the 4 CPU-seconds: 40%.
    meter = fed_meter([stat_text((1000, 5000), (2000, 5000)), stat_text((1150, 5050),
                                                                        (2130, 5070))],
                      own=[10.0, 11.2], clock=[100.0, 102.0], cpu_ids={0, 1})
    load = meter.lap()
    assert load.other_cpu_share == pytest.approx(0.4)
    assert (load.cpus, load.wall_s, load.method, load.verdict) == (2, 2.0, "proc_stat", "busy")
    assert "other processes used 40% of the 2 CPUs" in load.warning()


def test_only_the_cpus_this_process_may_run_on_count():
    # CPU 1 is someone else's (outside our affinity): its work is not charged to our interval.
    meter = fed_meter([stat_text((0, 0), (0, 0)), stat_text((10, 190), (200, 0))],
                      own=[0.0, 0.0], clock=[0.0, 2.0], cpu_ids={0})
    load = meter.lap()
    assert load.other_cpu_share == pytest.approx(0.05) and load.cpus == 1
    assert load.verdict == "idle" and load.warning() is None


def test_laps_measure_from_the_previous_lap_and_the_share_stays_between_0_and_1():
    meter = fed_meter([stat_text((0, 0)), stat_text((100, 0)), stat_text((100, 100))],
                      own=[0.0, 0.0, 0.02], clock=[0.0, 0.5, 1.5], cpu_ids={0})
    assert meter.lap().other_cpu_share == 1.0  # 1 s busy in 0.5 s: tick rounding, clamped
    assert meter.lap().other_cpu_share == 0.0  # idle, less our own 0.02 s: clamped


def test_without_proc_stat_the_load_average_less_our_own_use_stands_in():
    # Load average 1.5 on 2 CPUs, of which we kept 0.5 CPU busy on average: others 1.0 of 2.
    meter = fed_meter([None, None], own=[0.0, 1.0], clock=[0.0, 2.0], cpu_ids={0, 1},
                      load_average=lambda: 1.5)
    load = meter.lap()
    assert (load.other_cpu_share, load.method) == (pytest.approx(0.5), "loadavg")


def test_when_nothing_can_be_read_the_share_is_unknown_and_nothing_fails():
    def no_load_average() -> float:
        raise OSError("no load average here")

    meter = fed_meter([None, "garbage\n"], own=[0.0, 1.0], clock=[0.0, 2.0], cpu_ids={0},
                      load_average=no_load_average)
    load = meter.lap()
    assert (load.other_cpu_share, load.method, load.verdict) == (None, "unknown", "unknown")
    assert load.warning() is None
    assert load.as_dict()["verdict"] == "unknown"


def test_mean_share_weights_by_time_and_skips_unmeasured_intervals():
    assert mean_share([(0.5, 1.0), (0.0, 3.0), (None, 10.0)]) == pytest.approx(0.125)
    assert mean_share([(None, 1.0)]) is None and mean_share([]) is None


def test_a_machine_kept_busy_by_other_processes_is_flagged():
    """Spinning processes on every usable CPU, and a meter in another process (not their
    parent, so their work is not its own) that sleeps for a second: the CPUs were busy."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cpus)]
    try:
        time.sleep(0.3)  # let them start
        measure = textwrap.dedent("""
            import time
            from condcomp.machine_load import LoadMeter
            meter = LoadMeter()
            time.sleep(1.0)
            load = meter.lap()
            print(load.other_cpu_share, load.verdict)
        """)
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        out = subprocess.run([sys.executable, "-c", measure], capture_output=True, text=True,
                             env=env, check=True, timeout=60).stdout.split()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    share, verdict = float(out[0]), out[1]
    assert share > BUSY_SHARE and verdict == "busy"


def test_our_own_children_are_our_own_work():
    """A child spinning is this process's work, not another process's: own_cpu_s counts it
    while it runs (inductor's compile workers are such children)."""
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nend = time.time() + 1.5\nwhile time.time() < end: "
                              "pass\ntime.sleep(5)"])
    try:
        before = own_cpu_s()
        time.sleep(1.5)
        assert own_cpu_s() - before > 0.2  # it had at least a share of a core
    finally:
        child.kill()
        child.wait()


def test_a_busy_warning_names_the_share_and_the_cpus():
    load = MachineLoad(0.61, 2, 3.0, "proc_stat")
    assert load.warning() == ("warning: other processes used 61% of the 2 CPUs while this ran; "
                              "the times above are not reliable, rerun on an idle machine")
    assert load.as_dict() == {"other_cpu_share": 0.61, "cpus": 2, "wall_s": 3.0,
                              "method": "proc_stat", "verdict": "busy", "busy_share": BUSY_SHARE}
