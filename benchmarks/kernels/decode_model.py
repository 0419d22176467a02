"""The two numbers of the decode path (bytes that must be read, operations) for the 7B
shapes, and an issue-rate model of each decode variant from its offline SASS counts.

    python benchmarks/kernels/decode_model.py [--sass benchmarks/results/kernels/sass_sm90_triton36.json]

H200 figures used (from the lead's brief, not measured here): 4.3e12 B/s device copy
bandwidth (read + write), 67 TFLOP/s fp32 non-tensor (33.5e12 FMA/s = 132 SMs x 128
lanes x 1.98 GHz: also the thread-instruction issue rate), 790 TFLOP/s bf16 dense.

Per delta: bytes = packed codes + bf16 step/minv per scale block (the compressor's own
g, k, bits for the ratio: synthetic.pick_config); kept = rows x (in / g) x k.
Batch of T tokens over N distinct deltas (t = T / N each): bytes = N x bytes/delta,
FMAs = T x kept, byte floor = bytes / BW. A variant's instruction time is
N x kept x c(t) / issue rate with c(t) its SASS thread-instructions per kept element
(hot loop, best config) for t tokens: the model predicts max(byte floor, instruction time)
and ignores launch latency, L1 gather wavefronts and the per-row hash (so it is optimistic).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BW, ISSUE, FMA = 4.3e12, 33.5e12, 33.5e12
SHAPES = {"q/o 4096x4096": (4096, [4096]), "qkv 4096->3x4096": (4096, [4096] * 3),
          "gate_up 4096->2x11008": (4096, [11008] * 2), "down 11008->4096": (11008, [4096])}


def per_elem_costs(sass_json: Path) -> dict:
    """variant -> {M: best thread-instructions per kept element} (STRADDLE off)."""
    rows = json.loads(sass_json.read_text())
    best: dict = {}
    for r in rows:
        if r["path"] != "decode" or r["spill_store_B"]:
            continue
        d = best.setdefault(r["variant"], {})
        m = r["BLOCK_M"]
        d[m] = min(d.get(m, math.inf), r["thread_instr_per_elem"])
    return best


def cost(costs: dict, t: int) -> float:
    """Instructions per kept element for t tokens: passes of the largest tile <= t."""
    ms = sorted(costs)
    m = max([x for x in ms if x <= t] or [ms[0]])
    return math.ceil(t / m) * costs[m]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sass", default=str(Path(__file__).resolve().parents[1] / "results" /
                                          "kernels" / "sass_sm90_triton36.json"))
    args = ap.parse_args()
    from deltadq_vllm.kernels.synthetic import pick_config
    costs = per_elem_costs(Path(args.sass))
    print("instructions per kept element c(t):",
          {v: {t: round(cost(c, t), 1) for t in (1, 2, 4, 8, 16)} for v, c in sorted(costs.items())})
    print(f"{'shape':22} {'ratio':>5} {'g/k/bits':>14} {'MiB/delta':>9} {'kept M':>7} "
          f"{'T':>3} {'N':>3} {'floor us':>8} {'FMA us':>7} " +
          " ".join(f"{v + ' xfl':>8}" for v in sorted(costs)))
    out = []
    for name, (inp, sizes) in SHAPES.items():
        for ratio in (16, 32, 64, 128):
            cfg = pick_config(inp, float(ratio), 0)
            g, k, bits = cfg["group_size"], cfg["keep"], cfg["bits"]
            rows = sum(sizes)
            kept = rows * (inp // g) * k
            nbytes = math.ceil(kept * bits / 8) + 4 * math.ceil(rows / cfg["rows_per_scale"])
            for T in (1, 4, 16):
                for N in (1, 4, 16, 32):
                    if N > T:
                        continue
                    floor = N * nbytes / BW
                    fma = T * kept / FMA
                    rec = {"shape": name, "ratio": ratio, "cfg": cfg, "T": T, "N": N,
                           "bytes": N * nbytes, "fma": T * kept, "floor_us": floor * 1e6,
                           "fma_us": fma * 1e6}
                    for v, c in costs.items():
                        t_i = N * kept * cost(c, T / N if T % N == 0 else math.ceil(T / N)) / ISSUE
                        rec[f"{v}_x_floor"] = max(floor, t_i) / floor
                    out.append(rec)
                    print(f"{name:22} {ratio:>5} {f'{g}/{k}/{bits}':>14} {nbytes / 2**20:>9.2f} "
                          f"{kept / 1e6:>7.2f} {T:>3} {N:>3} {floor * 1e6:>8.2f} {fma * 1e6:>7.2f} "
                          + " ".join(f"{rec[f'{v}_x_floor']:>8.2f}" for v in sorted(costs)))
    res = Path(__file__).resolve().parents[1] / "results" / "kernels" / "decode_model.json"
    res.write_text(json.dumps({"bw": BW, "issue": ISSUE, "costs": costs, "points": out}, indent=1))
    print(f"saved {res}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
