"""Precision of the prefill path (T > DECODE_MAX_TOKENS) in the serving layer stack, bf16.

    python benchmarks/gpu/prefill_precision.py          # on a GPU (about a minute)

The first H100 run of graph_check.py (2026-11-26) found the 64-token batches further from
the float64 reference (0.040-0.047, max-norm relative, over the logits) than every batch of
1-16 tokens (<= 0.019) and than base-only rows at 64 tokens (0.007); the same stack in float32
through the interpreter is exact (~5e-7). This script measures, on the stack graph_check
builds (same seeds, same deltas), for 64 tokens of one fine-tune, two others and a mix:

  decode   the decode kernel forced (DECODE_MAX_TOKENS raised): fp32 delta values
  prefill  the prefill kernel with its delta tile rounded to bf16 before tl.dot (before)
  split    the prefill kernel with the tile as two bf16 tiles, hi + lo (PREFILL_SPLIT_W)
  merged   the user's merged checkpoint in bf16: W + delta rounded once to bf16, the same
           stack computed in bf16 (graph_stack.reference(dtype=bfloat16))

Measured on an H100 (2026-11-26, before `merged` ran in bf16: it rounded the linear weights
only): the single-tile prefill was 1.05-1.19x the decode path's distance (slot 1: 1.05e-2
vs 8.83e-3; slot 3: 0.148 vs 0.124) and the split equal to decode's to 3 digits; the large
distances are the stack's (decode too), not the prefill kernel's.

Results: benchmarks/results/gpu/prefill_precision-<device>.json and a table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import graph_check as gc  # noqa: E402  (makes the package importable without installing it)
from graph_stack import Stack  # noqa: E402

from deltadq_vllm.kernels import triton_delta as td  # noqa: E402

def rows_at(scale, cuda, device, dims, T=64) -> dict:
    rng = random.Random(0)
    stack = Stack("triton", n_slots=4, n_layers=2, max_tokens=T, seed=0, device=device,
                  dtype=torch.bfloat16, dims=dims, arena_mb=64 if cuda else 4)
    deltas = {s: stack.load_random(s, rng, partial=(s == 2), scale=scale) for s in range(4)}
    gen = random.Random(1)
    routes = [("slot 1", [1] * T), ("slot 3", [3] * T), ("slot 0", [0] * T),
              ("mixed", [gen.choice([-1, 0, 1, 2, 3]) for _ in range(T)]), ("base", [-1] * T)]
    modes = {"decode": (10 ** 6, False), "prefill": (td.DECODE_MAX_TOKENS, False),
             "split": (td.DECODE_MAX_TOKENS, True)}
    saved = td.DECODE_MAX_TOKENS, td.PREFILL_SPLIT_W
    ids = torch.randint(0, stack.BASE_VOCAB + stack.EXTRA, (T,))
    out = {}
    try:
        for name, slots in routes:
            want = gc.expected(stack, ids, slots, deltas)
            row = {}
            for mode, (limit, split) in modes.items():
                td.DECODE_MAX_TOKENS, td.PREFILL_SPLIT_W = limit, split
                stack.route(slots, T)
                with torch.no_grad():
                    got = stack(ids.to(stack.device))
                row[mode] = gc.ref_error(got, want)
            row["merged"] = gc.merged_error(stack, ids, slots, deltas, want)
            out[name] = row
    finally:
        td.DECODE_MAX_TOKENS, td.PREFILL_SPLIT_W = saved
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delta-scales", default="1,0.1",
                    help="delta sizes (1: as large as the base weights; 0.1: a tenth)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dims = ("cuda", gc.MID) if cuda else ("cpu", gc.SMOKE)
    T = 64
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu-interpreter",
              "dims": dims, "tokens": T, "by_delta_scale": {}}
    for scale in (float(v) for v in args.delta_scales.split(",")):
        report["by_delta_scale"][scale] = rows_at(scale, cuda, device, dims, T)
    out = ROOT / "benchmarks" / "results" / "gpu" / (
        f"prefill_precision-{report['device'].replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"{T} tokens, {report['device']}: max |logit error| / max |logit| vs float64")
    print("| delta scale | rows | decode | prefill | split | merged bf16 |")
    for scale, rows in report["by_delta_scale"].items():
        for name, row in rows.items():
            print(f"| {scale} | {name} | " + " | ".join(f"{v:.2e}" for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
