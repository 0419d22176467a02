"""Where a base-only step goes in a graph that holds the delta launches (GPU, no vLLM).

    python benchmarks/gpu/base_step_profile.py        # about 30 s on an H100

graph_check.py measured a captured step whose rows all use the base at 1.49-1.55x the plain
base stack's step (2 layers of 7B shapes, H100, 2026-11-26): vLLM captures one graph per
batch size, so the delta launches are in it whatever the routing. This profiles one eager
step of each (the plain base stack; the wrapped stack with every row on -1; with 4 deltas)
with torch.profiler and prints the GPU time per kernel name, summed, with the launch count:
which of the delta kernels' early-exit grids and the vector-delta torch ops cost what.

Results: benchmarks/results/gpu/base_step_profile-<device>.json and a table.
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import graph_check as gc  # noqa: E402  (makes the package importable without installing it)
from graph_stack import Stack  # noqa: E402


def profile(stack, ids, reps=5) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof
    with torch.no_grad():
        for _ in range(3):
            stack(ids)
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(reps):
                stack(ids)
            torch.cuda.synchronize()
    by = defaultdict(lambda: [0, 0.0])
    for e in p.events():
        if e.device_type.name == "CUDA":
            by[e.name][0] += 1
            by[e.name][1] += e.time_range.elapsed_us()
    return {k: {"launches_per_step": v[0] / reps, "us_per_step": v[1] / reps}
            for k, v in sorted(by.items(), key=lambda kv: -kv[1][1])}


def main() -> int:
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    rng = random.Random(0)
    base = Stack("triton", n_slots=4, n_layers=2, max_tokens=16, seed=0, device="cuda",
                 dtype=torch.bfloat16, dims=gc.SEVEN_B, wrap=False)
    wrapped = Stack("triton", n_slots=4, n_layers=2, max_tokens=16, seed=0, device="cuda",
                    dtype=torch.bfloat16, dims=gc.SEVEN_B, arena_mb=768)
    for s in range(4):
        wrapped.load_random(s, rng, fixed=gc.RATIO16, dense=False)
    ids = torch.randint(0, gc.SEVEN_B[4], (T,), device="cuda")
    report = {"device": torch.cuda.get_device_name(), "T": T, "layers": 2, "dims": gc.SEVEN_B}
    report["base"] = profile(base, ids)
    wrapped.route([-1] * T, T)
    report["wrapped_all_base"] = profile(wrapped, ids)
    wrapped.route([t % 4 for t in range(T)], T)
    report["wrapped_N4"] = profile(wrapped, ids)
    out = ROOT / "benchmarks" / "results" / "gpu" / (
        f"base_step_profile-{report['device'].replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    for key in ("base", "wrapped_all_base", "wrapped_N4"):
        rows = report[key]
        total = sum(r["us_per_step"] for r in rows.values())
        n = sum(r["launches_per_step"] for r in rows.values())
        print(f"\n{key}: {total:.1f} us of kernels per step, {n:.0f} launches")
        for name, r in list(rows.items())[:14]:
            print(f"  {r['us_per_step']:8.1f} us  x{r['launches_per_step']:4.0f}  {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
