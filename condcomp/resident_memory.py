"""This process's resident set from ``/proc`` (Linux), for peak-memory measurements in
processes that must import nothing else of condcomp (``condcomp bench import-hf``'s children):
standard library only."""

from __future__ import annotations

from pathlib import Path


def rss_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in bytes (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_reset() -> None:
    """Reset this process's peak resident set (``VmHWM``) to its current size (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        peak_rss_reset.worked = True  # type: ignore[attr-defined]
    except OSError:
        peak_rss_reset.worked = False  # type: ignore[attr-defined]
