"""Peak RSS of the whole-model check alone (no shrink) on a compressed 7B-shaped pair: the
embedding streams reading only their tokens' rows (default) against the whole-table read
before 0dd2fd0 (`--whole-table`: the calibrator's embed patched back, for attribution).

    .venv/bin/python benchmarks/compress/synth7b.py --out /tmp/s2 --layers 2
    .venv/bin/deltadq compress --base /tmp/s2/base --finetune /tmp/s2/finetune \\
        --ratio 16 --check off --out /tmp/s2-16x
    .venv/bin/python benchmarks/compress/check_rss.py --pair /tmp/s2 --delta /tmp/s2-16x

Each mode runs in its own process (a sampler thread records the resident size every 5 ms
and the main thread's stack at each new high). Prints a table and saves
benchmarks/results/check_rss[-<L>L].json (atomically), with the CPU capability.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(pair: Path, delta: Path, whole_table: bool) -> dict:
    import torch

    from deltadq_vllm.checkpoint import Checkpoint
    from deltadq_vllm.format.artifact import DeltaArtifact
    from deltadq_vllm.tools import calibration
    from deltadq_vllm.tools.check_publish import read_check_text
    from deltadq_vllm.tools.model_check import ModelCheck

    if whole_table:
        def embed(self, source=None):
            weight = (source or self.base.get)(self.embedding_name())
            rows = weight[self.input_ids].float()
            return rows * self.input_scale if self.input_scale is not None else rows
        calibration.LayerwiseCalibrator.embed = embed
    text, _ = read_check_text(None)
    check = ModelCheck(Checkpoint(pair / "base"), Checkpoint(pair / "finetune"), text)
    art = DeltaArtifact(delta)
    best, main_id, stop = [0.0, None], threading.main_thread().ident, threading.Event()

    def sample():
        while not stop.is_set():
            r = _rss_mb()
            if r > best[0]:
                frame = sys._current_frames().get(main_id)
                best[:] = [r, traceback.format_stack(frame)[-3:] if frame else None]
            time.sleep(0.005)

    before = _rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    res = check.run(art, shrink="never")
    stop.set()
    sampler.join()
    return {"mode": "whole table" if whole_table else "rows alone",
            "rss_before_mb": round(before), "peak_mb": round(best[0]),
            "seconds": round(time.time() - t0, 1), "base": res.base.as_dict(),
            "unscaled": res.unscaled.as_dict(), "where": "".join(best[1] or []),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", type=Path, required=True)
    ap.add_argument("--delta", type=Path, required=True)
    ap.add_argument("--one", choices=("rows", "whole"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.pair, args.delta, args.one == "whole")))
        return 0
    rows = []
    for mode in ("whole", "rows"):
        out = subprocess.run([sys.executable, __file__, "--pair", str(args.pair), "--delta",
                              str(args.delta), "--one", mode], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'mode':12s} {'peak MB':>8s} {'s':>6s}  KL / top-1 (base + delta)")
    for r in rows:
        print(f"{r['mode']:12s} {r['peak_mb']:8d} {r['seconds']:6.1f}  "
              f"{r['unscaled']['kl']} / {r['unscaled']['top1']}")
    cfg = json.loads((args.pair / "base" / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    name = "check_rss" + (f"-{layers}L" if layers < 32 else "") + ".json"
    doc = {"pair": str(args.pair), "layers": layers, "rows": rows, "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    tmp = RESULTS / (name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, RESULTS / name)
    print("wrote", RESULTS / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
