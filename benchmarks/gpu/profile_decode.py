"""One decode launch per case, for a hardware-counter profile (Nsight Compute) on a GPU.

    ncu --clock-control none --set full -k regex:decode_ --launch-skip 3 --launch-count 2 \\
        python benchmarks/gpu/profile_decode.py [--variant v3] [--ratio 16]
    TRITON_INTERPRET=1 python benchmarks/gpu/profile_decode.py --smoke     # flow check, CPU

Builds a 4096x4096 (q/o of a 7B model) slot bank at the compressor's configuration for
--ratio, warms the kernel up (3 launches: the ones ncu skips), then launches the decode
kernel once for T=1 / N=1 and once for T=16 / N=4, each checked against the reference
rows (bench_gpu.verify). What the profile answers: is the decode kernel bound by DRAM
bytes, by L1 gathers of the activations, by instruction issue, or by latency (stall
reasons), which decides the next kernel change (benchmarks/kernels/NOTES.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "kernels"))

from bench_gpu import Dev, pick_config, random_encoding, verify  # noqa: E402

from deltadq_vllm.kernels import DeltaSlots, build_meta  # noqa: E402
from deltadq_vllm.kernels import triton_delta  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="v3")
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not triton_delta.interpreting():
        print("no CUDA device: TRITON_INTERPRET=1 --smoke on a CPU", file=sys.stderr)
        return 2
    dev = Dev(torch.device("cuda" if cuda else "cpu"))
    inp, rows = (64, 40) if args.smoke else (4096, 4096)
    cfg = pick_config(inp, args.ratio, 0)
    gen = torch.Generator().manual_seed(0)
    S = 4
    encs = [[random_encoding(rows, inp, cfg, gen, seed=101 + s)] for s in range(S)]
    slots = DeltaSlots(S, inp, [rows], device=dev.device, cpu_strategy=None)
    for s in range(S):
        slots.load(s, encs[s])
    print(f"config {cfg}, variant {args.variant}", flush=True)
    cases = [(1, 1), (16, 4)] if not args.smoke else [(1, 1), (5, 2)]
    for i, (T, N) in enumerate(cases):
        ids = torch.tensor([t % N for t in range(T)], dtype=torch.int32)
        meta = build_meta(ids, S, device=dev.device)
        x = torch.randn(T, inp, device=dev.device, dtype=torch.bfloat16)
        y = torch.zeros(T, rows, device=dev.device, dtype=torch.bfloat16)
        # the first case is launched 4 times (3 for ncu --launch-skip 3: compile + warm),
        # the second once: ncu --launch-count 2 profiles T=1/N=1, then T=16/N=4
        for _ in range(4 if i == 0 else 1):
            triton_delta.triton_apply_deltas(y, x, *meta.tensors(), slots, path="decode",
                                             num_entries=meta.num_active,
                                             max_seg_len=meta.max_seg_len, variant=args.variant)
        dev.sync()
        print(f"T={T} N={N}: launched", flush=True)
    for T, N in cases:  # then the reference check (more launches, after the profiled ones)
        w = verify(dev, slots, encs, inp, [rows], max(T, 2), min(N, 2), "decode",
                   torch.Generator().manual_seed(T), rows_per_slice=16)
        print(f"T={T} N={N}: reference check err/bound {w:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
