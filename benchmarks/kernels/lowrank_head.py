"""A low-rank LM head / embedding delta on the GPU: kept as factors vs the 16-bit conversion.

    python benchmarks/kernels/lowrank_head.py                     # on a GPU (~1 min)
    TRITON_INTERPRET=1 python benchmarks/kernels/lowrank_head.py --smoke   # CPU, tiny shapes

The compressor stores an LM head or embedding as rank r where its codes would be worse
than no delta (every published 1024x SmolLM2 fine-tune: its tied embedding at rank 1,
99 KB). Before kernels/triton_lowrank.py the GPU path converted such a matrix to the hash
kernels' layout with 16-bit codes (rows x cols x 2 bytes in the arena, all read every
step). Per shape and rank this prints and saves (results/kernels/lowrank_head-<device>.json):

* arena bytes per fine-tune: converted vs factors;
* host time to register one fine-tune's matrix (kernel_layout.stage): convert vs factors;
* LM-head delta time (deltadq::apply_deltas, median of triton.testing.do_bench) at
  T = 1 / 16 / 64 tokens spread over N = 1 / 4 fine-tunes, converted vs factors, beside the
  base head GEMM (bf16 x @ W^T) of the same shape;
* embedding-row lookup time for 256 tokens (deltadq::embedding_rows), both ways;
* every output checked against the float64 product x @ (U V)^T first (relative error).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, save_json  # noqa: E402

from deltadq_vllm.format.layouts import encode_lowrank  # noqa: E402
from deltadq_vllm.kernels.kernel_layout import stage  # noqa: E402
from deltadq_vllm.kernels.metadata import build_meta  # noqa: E402
from deltadq_vllm.kernels.ops import apply_deltas  # noqa: E402
from deltadq_vllm.kernels.slots import DeltaSlots  # noqa: E402
from deltadq_vllm.kernels.triton_lowrank import VARIANTS, triton_lowrank_apply  # noqa: E402

SHAPES = {"smollm2-tied": (49152, 576), "7b-head": (32000, 4096)}
SMOKE_SHAPES = {"tiny": (96, 40)}


def factors(rows, cols, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    return encode_lowrank(torch.randn(rows, rank, generator=gen) * 0.05,
                          torch.randn(rank, cols, generator=gen) * 0.05)


def bench(fn, smoke):
    """Median microseconds of one call, timed as CUDA-graph replays (as a server's decode
    step runs it: no Python dispatch in the number)."""
    if smoke:
        fn()
        return float("nan")
    import triton.testing
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3


def run_shape(name, rows, cols, rank, n_fts, tokens, device, dtype, smoke) -> dict:
    encs = [factors(rows, cols, rank, 100 * rank + i) for i in range(max(n_fts))]
    row = {"shape": name, "rows": rows, "cols": cols, "rank": rank}
    slots = {}
    for kind, lowrank in (("converted", False), ("factors", True)):
        t0 = time.perf_counter()
        staged = [stage(e, pin=device == "cuda", lowrank=lowrank) for e in encs]
        row[f"register_s_{kind}"] = (time.perf_counter() - t0) / len(encs)
        sl = DeltaSlots(len(encs), cols, [rows], device=device, cpu_strategy=None,
                        min_ratio=0.9, lowrank=lowrank)
        for s, e in enumerate(staged):
            sl.load(s, [e])
        row[f"arena_bytes_{kind}"] = sl.slot_bytes(0)
        slots[kind] = sl
    row["times_us"] = []
    # float64 reference from the factors (x V^T U^T = x (U V)^T; no dense 7B-sized matrix)
    uv = [(e.tensors["u"].double(), e.tensors["v"].double()) for e in encs]
    gen = torch.Generator().manual_seed(rank)
    w = (torch.randn(rows, cols, generator=gen) * 0.02).to(device, dtype)
    for N in n_fts:
        for T in tokens:
            x = torch.randn(T, cols, generator=gen).to(device, dtype)
            sid = torch.tensor([t % N for t in range(T)], device=device)
            meta = build_meta(sid, len(encs), device=device)
            want = torch.stack([(x[t].double().cpu() @ uv[t % N][1].T) @ uv[t % N][0].T
                                for t in range(T)])
            rec = {"N": N, "T": T}
            for kind, sl in slots.items():
                y = torch.zeros(T, rows, device=device, dtype=dtype)
                apply_deltas(y, x, sid, sl, backend="triton")
                rec[f"rel_err_{kind}"] = ((y.double().cpu() - want).norm() / want.norm()).item()
                y2 = torch.zeros_like(y)
                rec[f"us_{kind}"] = bench(lambda: apply_deltas(y2, x, meta, sl, backend="triton",
                                                                graph_safe=True), smoke)
            for variant in VARIANTS:   # the factors kernel's two variants, launched directly
                sl = slots["factors"]
                y = torch.zeros(T, rows, device=device, dtype=dtype)

                def call(y=y, sl=sl, variant=variant):
                    triton_lowrank_apply(y, x, *meta.tensors(), sl.arena.halves, sl.meta,
                                         sl.slice_sizes, variant=variant)
                call()
                rec[f"rel_err_factors_{variant}"] = (
                    (y.double().cpu() - want).norm() / want.norm()).item()
                y.zero_()
                rec[f"us_factors_{variant}"] = bench(call, smoke)
            rec["us_base_gemm"] = bench(lambda: x @ w.T, smoke)
            row["times_us"].append(rec)
    T = 16 if smoke else 256
    ids = torch.randint(0, rows, (T,), generator=gen).to(device)
    sid = torch.tensor([t % max(n_fts) for t in range(T)], device=device)
    want = torch.stack([uv[t % max(n_fts)][0][int(ids[t])] @ uv[t % max(n_fts)][1]
                        for t in range(T)])
    for kind, sl in slots.items():
        out = torch.zeros(T, cols, device=device, dtype=dtype)
        args = (ids, sid, sl.arena.words, sl.arena.halves, sl.meta, 8, True, sl.lowrank)
        torch.ops.deltadq.embedding_rows(out, *args)
        row[f"rows_rel_err_{kind}"] = ((out.double().cpu() - want).norm() / want.norm()).item()
        row[f"rows_us_{kind}"] = bench(lambda: torch.ops.deltadq.embedding_rows(out, *args), smoke)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ranks", default="1,8")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = SMOKE_SHAPES if not cuda else SHAPES
    tokens, n_fts = ((1, 5), (1, 2)) if not cuda else ((1, 16, 64), (1, 4))
    rows_out = []
    for name, (rows, cols) in shapes.items():
        for rank in [int(r) for r in args.ranks.split(",")]:
            r = run_shape(name, rows, cols, rank, n_fts, tokens, device, dtype, not cuda)
            rows_out.append(r)
            print(f"{name} rank {rank}: arena {r['arena_bytes_converted'] / 2**20:.2f} MiB "
                  f"-> {r['arena_bytes_factors'] / 2**20:.3f} MiB; register "
                  f"{r['register_s_converted']:.3f} s -> {r['register_s_factors']:.4f} s; rows "
                  f"{r['rows_us_converted']:.1f} us -> {r['rows_us_factors']:.1f} us "
                  f"(err {r['rows_rel_err_converted']:.1e} / {r['rows_rel_err_factors']:.1e})",
                  flush=True)
    print(f"\n{'shape':>13} {'r':>2} {'N':>2} {'T':>3} | {'conv us':>8} {'fact us':>8} "
          f"{'sum us':>7} {'dot us':>7} {'base us':>8} | {'err conv':>8} {'err fact':>8} "
          f"{'err dot':>8}")
    for r in rows_out:
        for t in r["times_us"]:
            print(f"{r['shape']:>13} {r['rank']:>2} {t['N']:>2} {t['T']:>3} | "
                  f"{t['us_converted']:8.1f} {t['us_factors']:8.1f} {t['us_factors_sum']:7.1f} "
                  f"{t['us_factors_dot']:7.1f} {t['us_base_gemm']:8.1f} | "
                  f"{t['rel_err_converted']:8.1e} {t['rel_err_factors']:8.1e} "
                  f"{t['rel_err_factors_dot']:8.1e}")
    dev = torch.cuda.get_device_name().replace(" ", "_") if cuda else "cpu-interpreter"
    if not cuda:   # the smoke run checks the script, its numbers are not results
        print("smoke run: nothing saved")
        return 0
    path = save_json(f"lowrank_head-{dev}.json", {"environment": environment(), "device": dev,
                                             "dtype": str(dtype), "rows": rows_out})
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
