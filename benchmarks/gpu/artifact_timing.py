"""What real compressed fine-tunes cost per decode step on a GPU: every linear of SmolLM2
(30 layers: fused qkv, o, fused gate_up, down; the tied LM head) with the deltas of
`deltadq compress` artifacts in the slots, against the base GEMMs of the same shapes.

    python benchmarks/gpu/artifact_timing.py --data .gpucarry [--out timing.json]

The data folder is artifact_check.py's (--prepare; only its `art/` artifacts are read).
One CUDA graph per (routing, T) replays every layer's delta launches (the serving op,
`apply_deltas(graph_safe=True)`, the kernels' own configs, after the backend's warmup);
another replays the base GEMMs (bf16 weights of the same shapes, random: timing only).
Routings: all T tokens on one fine-tune, and the T tokens spread over all of them.
The byte floor is the slot bytes the step must read (the arena segments of the active
fine-tunes) over the measured copy bandwidth. Prints a table; times are medians of
triton.testing.do_bench over graph replays.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from artifact_check import EMBED, GROUPS   # (this folder: the layer groups it checks)


def copy_bandwidth(dev) -> float:
    import triton.testing as tt
    a = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()                       # compile / first use outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out")
    ap.add_argument("--tokens", default="1,16,64")
    args = ap.parse_args()
    import triton.testing as tt
    from deltadq_vllm.format.artifact import DeltaArtifact
    from deltadq_vllm.kernels import apply_deltas, build_meta
    from deltadq_vllm.kernels.arena import DeltaArena
    from deltadq_vllm.kernels.backends import select_backend

    dev = torch.device("cuda")
    data = Path(args.data)
    tags = json.loads((data / "manifest.json").read_text())["artifacts"]
    art = {t: DeltaArtifact(data / "art" / t) for t in tags}
    a0 = art[tags[0]]
    n_layers = 1 + max(int(n.split(".")[2]) for n in a0.entries if n.startswith("model.layers."))
    backend = select_backend("triton", dev)
    arena = DeltaArena(2 << 30, dev)
    S = len(tags)
    layers = []        # (slots, base weight, in_features)
    t0 = time.time()
    for L in range(n_layers):
        for ms in GROUPS.values():
            names = [f"model.layers.{L}.{m}.weight" for m in ms]
            shapes = [a0.encoded(n).shape for n in names]
            sizes, inp = [s[0] for s in shapes], shapes[0][1]
            slots = backend.make_slots(S, inp, sizes, device=dev, arena=arena)
            for s, t in enumerate(tags):
                slots.load(s, [art[t].encoded(n) if n in art[t].entries else None for n in names])
            w = torch.randn(sum(sizes), inp, device=dev, dtype=torch.bfloat16) * 0.02
            layers.append((slots, w, inp))
    V, H = a0.encoded(EMBED).shape
    head = backend.make_slots(S, H, [V], device=dev, arena=arena, lowrank=True)
    for s, t in enumerate(tags):
        head.load(s, [art[t].encoded(EMBED)])
    layers.append((head, torch.randn(V, H, device=dev, dtype=torch.bfloat16) * 0.02, H))
    torch.cuda.synchronize()
    print(f"{len(layers)} layers loaded for {S} fine-tunes in {time.time() - t0:.1f}s", flush=True)
    max_t = max(int(t) for t in args.tokens.split(","))
    backend.warmup([sl for sl, _, _ in layers], max_t, torch.bfloat16)
    bw = copy_bandwidth(dev)
    slot_bytes = [sum(sl.slot_bytes(s) for sl, _, _ in layers) for s in range(S)]
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        xs = {inp: torch.randn(T, inp, device=dev, dtype=torch.bfloat16) for _, _, inp in layers}
        ys = [torch.randn(T, w.shape[0], device=dev, dtype=torch.bfloat16) for _, w, _ in layers]

        def base():
            for (_, w, inp), y in zip(layers, ys):
                torch.matmul(xs[inp], w.T, out=y)
        base_ms = tt.do_bench(graph_of(base).replay, warmup=25, rep=200, return_mode="median")
        routings = [(t, torch.full((T,), s, dtype=torch.int32)) for s, t in enumerate(tags)]
        if T >= S:
            routings.append(("mixed", torch.arange(T, dtype=torch.int32) % S))
        for name, ids in routings:
            meta = build_meta(ids, S, device=dev)

            def deltas(meta=meta):
                for (sl, _, inp), y in zip(layers, ys):
                    apply_deltas(y, xs[inp], meta, sl, backend="triton", graph_safe=True)
            ms = tt.do_bench(graph_of(deltas).replay, warmup=25, rep=200, return_mode="median")
            active = sorted(set(ids.tolist()))
            nbytes = sum(slot_bytes[s] for s in active)
            row = {"fine_tune": name, "T": T, "base_ms": base_ms, "delta_ms": ms,
                   "delta_over_base": ms / base_ms, "slot_MB": nbytes / 1e6,
                   "floor_ms": nbytes / bw * 1e3, "delta_over_floor": ms / (nbytes / bw * 1e3)}
            rows.append(row)
            print(f"{name:>14} T={T:3d}  base {base_ms:.3f} ms  deltas {ms:.3f} ms "
                  f"({ms / base_ms:.2f}x base)  {nbytes / 1e6:.2f} MB read, floor {row['floor_ms']:.4f} ms "
                  f"({row['delta_over_floor']:.0f}x)", flush=True)
    out = {"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "layers": len(layers),
           "fine_tunes": tags, "slot_bytes": dict(zip(tags, slot_bytes)), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
