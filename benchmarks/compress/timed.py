"""One child command, timed: its wall seconds and its own CPU seconds (the children's
getrusage before and after it: the callers run one child at a time). Shared by
compress/time_vs.py and fidelity/compress_cost.py. Not its peak memory: Linux carries
ru_maxrss across exec (rss.py), so the compressor's own `--json` peak is read instead;
`children_maxrss_kb` (the largest child so far, an upper bound) is only a fallback."""

from __future__ import annotations

import resource
import subprocess
import time


def run_timed(cmd: list[str], env: dict | None = None
              ) -> tuple[subprocess.CompletedProcess, dict]:
    """(the finished process, its stdout and stderr captured as text; {wall_s, user_s,
    sys_s, children_maxrss_kb}), times unrounded."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, {"wall_s": wall, "user_s": ru.ru_utime - ru0.ru_utime,
                  "sys_s": ru.ru_stime - ru0.ru_stime, "children_maxrss_kb": ru.ru_maxrss}
