"""Peak RSS of `deltadq compress` on a large sharded checkpoint (issue #2 target: < 40% of
the checkpoint's size).

    .venv/bin/python benchmarks/compress/rss.py [--gb 2.2] [--workdir DIR]

Writes a synthetic bf16 Llama base + fine-tune pair (sharded safetensors + index), runs the
real CLI in a child process with DELTADQ_RSS_TRACE=1, and takes the child's peak RSS from
its own VmHWM (the summary's peak_rss_mb) plus its per-phase RSS trace. Prints a table and
saves benchmarks/results/compress_rss.json.

Not getrusage(RUSAGE_CHILDREN): Linux carries ru_maxrss across exec, and Python spawns
children with vfork, so a child's ru_maxrss starts at the *parent's* peak, here the
generator's (a shard being written), not what `deltadq compress` used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.2, help="size of each checkpoint")
    ap.add_argument("--ratio", type=float, default=16)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    from deltadq_vllm.checkpoint import Checkpoint
    from deltadq_vllm.testing.synthetic import make_synthetic_pair

    work = Path(args.workdir or tempfile.mkdtemp(prefix="deltadq-rss-"))
    t0 = time.time()
    base, ft = make_synthetic_pair(work, target_bytes=args.gb * 1e9, shard_bytes=400e6)
    gen_s = time.time() - t0
    size = Checkpoint(ft).total_bytes()
    shards = len(list(Path(ft).glob("*.safetensors")))
    out = work / "delta"
    t0 = time.time()
    env = {**os.environ, "DELTADQ_RSS_TRACE": "1"}
    proc = subprocess.run([sys.executable, "-m", "deltadq_vllm.cli", "compress", "--base",
                           str(base), "--finetune", str(ft), "--out", str(out), "--ratio",
                           str(args.ratio), "--json", "--force"],
                          capture_output=True, text=True, env=env)
    secs = time.time() - t0
    if proc.returncode != 0:
        print(proc.stderr)
        return proc.returncode
    summary = json.loads(proc.stdout)
    peak = int(summary["peak_rss_mb"] * 2**20)
    phases = summary.get("rss_phases", [])
    # the peak was reached in the work just before the first mark showing it
    peak_phase = next((r["phase"] for r in phases if r["peak_mb"] >= summary["peak_rss_mb"]),
                      None)
    res = {"checkpoint_bytes": size, "shards": shards, "peak_rss_bytes": peak,
           "peak_rss_fraction": peak / size, "target_fraction": 0.40,
           "peak_reached_before_mark": peak_phase,
           "getrusage_children_maxrss_bytes": (
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024),
           "true_ratio": summary["true_ratio"], "compress_seconds": round(secs, 1),
           "generate_seconds": round(gen_s, 1), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "rss_phases": phases}
    print(f"{'checkpoint':>12} {'shards':>6} {'peak RSS':>10} {'fraction':>8} {'target':>6} "
          f"{'true ratio':>10} {'seconds':>7}")
    print(f"{size / 1e9:>10.2f}GB {shards:>6} {peak / 1e9:>8.2f}GB {peak / size:>8.1%} "
          f"{'<40%':>6} {res['true_ratio']:>9.2f}x {secs:>7.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compress_rss.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
