"""Compress time and peak memory on a 7B-shaped pair (issue #13, target: <= 30 min and
<= 4 GB peak RSS on the 2-core CI-class machine).

    .venv/bin/python benchmarks/compress/synth7b.py                 # the pair, once (27 GB)
    .venv/bin/python benchmarks/compress/run7b.py [--pair /work/data/synth-7b] [--ratio 16]
    .venv/bin/python benchmarks/compress/synth7b.py --out /tmp/s2 --layers 2
    .venv/bin/python benchmarks/compress/run7b.py --pair /tmp/s2    # quick: extrapolated
        [--extra='--check off']    # the compression alone, without the whole-model check

Runs the real CLI (`deltadq compress --json`) in a child process with DELTADQ_RSS_TRACE=1.
Peak RSS is the child's own VmHWM; wall and CPU seconds per phase come from the trace. With
a pair of fewer layers than the 32 of Llama-2-7B, the full model's time is extrapolated:
measured total + (32 - L) x the mean time of one decoder layer (calibration + its seven
matrices); peak memory does not grow with the layer count (one layer resident at a time).
Saves benchmarks/results/compress_7b[-<L>L].json with the machine, load average and
torch's CPU capability.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
FULL_LAYERS = 32


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", type=Path, default=Path("/work/data/synth-7b"))
    ap.add_argument("--ratio", type=float, default=16)
    ap.add_argument("--method", default="deltadq")
    ap.add_argument("--extra", default="", help="more `deltadq compress` flags, one string "
                    "(e.g. --extra='--check warn')")
    args = ap.parse_args(argv)
    import torch

    cfg = json.loads((args.pair / "base" / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"deltadq-7b-{os.getpid()}"
    env = {**os.environ, "DELTADQ_RSS_TRACE": "1"}
    load0 = os.getloadavg()
    t0 = time.time()
    ru0 = os.times()
    proc = subprocess.run([sys.executable, "-m", "deltadq_vllm.cli", "compress", "--base",
                           str(args.pair / "base"), "--finetune", str(args.pair / "finetune"),
                           "--out", str(out), "--method", args.method, "--ratio",
                           str(args.ratio), "--json", "--force", *args.extra.split()],
                          capture_output=True, text=True, env=env)
    wall = time.time() - t0
    ru1 = os.times()
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        return proc.returncode
    s = json.loads(proc.stdout)
    phases = s.get("rss_phases", [])
    starts = {int(r["phase"].split()[-1]): r for r in phases
              if r["phase"].startswith("calibrated layer")}
    per_layer = None
    if len(starts) >= 2:
        idx = sorted(starts)
        per_layer = (starts[idx[-1]]["seconds"] - starts[idx[0]]["seconds"]) / (len(idx) - 1)
        per_layer_cpu = (starts[idx[-1]]["cpu_seconds"] - starts[idx[0]]["cpu_seconds"]) / (
            len(idx) - 1)
    res = {
        "pair": str(args.pair), "layers": layers, "hidden": cfg["hidden_size"],
        "intermediate": cfg["intermediate_size"], "vocab": cfg["vocab_size"],
        "method": args.method, "ratio": args.ratio, "true_ratio": s["true_ratio"],
        "wall_seconds": round(wall, 1),
        "child_cpu_seconds": round((ru1.children_user - ru0.children_user)
                                   + (ru1.children_system - ru0.children_system), 1),
        "peak_rss_mb": s["peak_rss_mb"], "target_seconds": 1800, "target_peak_mb": 4096,
        "load_average_start": load0, "load_average_end": os.getloadavg(),
        "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "unsafe": len(s.get("unsafe", [])), "by_class": s["by_class"], "rss_phases": phases,
        # the whole-model check (--check; on by default): its own seconds, and its verdict
        "model_check": {k: v for k, v in (s.get("model_check") or {}).items()
                        if k != "layer_scale"},
    }
    check_s = (s.get("model_check") or {}).get("seconds") or 0.0
    if per_layer is not None and layers < FULL_LAYERS:
        res["seconds_per_layer"] = round(per_layer, 1)
        res["cpu_seconds_per_layer"] = round(per_layer_cpu, 1)
        # the check runs every layer ~8 times: scaled by the layer count (an overestimate:
        # its LM-head part does not grow with the layers)
        res["extrapolated_full_wall_seconds"] = round(
            wall + (FULL_LAYERS - layers) * per_layer + (FULL_LAYERS / layers - 1) * check_s)
        res["check_seconds"] = check_s
        res["extrapolated_check_seconds"] = round(FULL_LAYERS / layers * check_s)
        res["extrapolated_full_cpu_seconds"] = round(
            res["child_cpu_seconds"] + (FULL_LAYERS - layers) * per_layer_cpu)
    name = "compress_7b" + (f"-{layers}L" if layers < FULL_LAYERS else "") + ".json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("rss_phases", "by_class")},
                     indent=1))
    subprocess.run(["rm", "-rf", str(out)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
