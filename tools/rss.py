"""Resident memory of the compressor: its peak (reported in every summary) and an optional
per-phase trace for the peak-RSS benchmark (benchmarks/compress/rss.py)."""

from __future__ import annotations

import os
import resource
import time

from deltadq_vllm.checkpoint import resident_bytes

RSS_TRACE_ENV = "DELTADQ_RSS_TRACE"


def _status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set. VmHWM belongs to the current address space only;
    getrusage's ru_maxrss (the fallback off Linux) survives exec, so a CLI spawned by a
    large parent would report the parent's peak as its own."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


def reset_peak_rss() -> bool:
    """Start this process's VmHWM again from its current resident set (Linux: "5" to
    /proc/self/clear_refs), so that peak_rss_bytes() measures what comes next (e.g. one
    compression of many in a benchmark process). False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


class RssTrace:
    """Resident memory at phase boundaries, recorded when DELTADQ_RSS_TRACE is set (a
    debugging aid for the peak-RSS benchmark; off by default, costs nothing when off)."""

    def __init__(self):
        self.rows: list[dict] | None = [] if os.environ.get(RSS_TRACE_ENV) else None
        self.t0, self.c0 = time.time(), time.process_time()

    def mark(self, phase: str) -> None:
        if self.rows is not None:
            rss, hwm = resident_bytes(), _status_kb("VmHWM")
            self.rows.append({"phase": phase, "rss_mb": round((rss or 0) / (1 << 20), 1),
                              "peak_mb": round((hwm or 0) / 1024, 1),
                              "seconds": round(time.time() - self.t0, 2),
                              "cpu_seconds": round(time.process_time() - self.c0, 2)})
