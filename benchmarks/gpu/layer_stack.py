"""A 7B-shaped decoder stack with delta layers: CUDA-graph safety and decode-step cost.

    python benchmarks/gpu/layer_stack.py                     # on a GPU (~13 GB base + deltas)
    TRITON_INTERPRET=1 python benchmarks/gpu/layer_stack.py --smoke   # tiny, on a CPU

The stack has the linear layers of Llama-2-7B (32 layers of fused qkv 4096->3x4096, o
4096->4096, fused gate_up 4096->2x11008, down 11008->4096, bf16, random weights), RMSNorms,
SiLU-and-multiply and residuals. Attention is the one-token case (the output of attention
over a single key is its value: o_proj reads the v slice), so a step costs what the linear
layers cost, which is what deltas change. Every linear layer adds the deltas of its slots
with the kernel launcher; the per-step metadata lives in fixed buffers that
`build_meta(out=...)` rewrites in place, and one CUDA graph is captured per number of
active deltas N (the launches' grid covers N metadata entries, tokens per delta left open:
vLLM captures its LoRA graphs per active-adapter count the same way; N = 0 launches none).

Checks (fresh random slot maps, several N, base-only tokens and all -1 steps included):
  * graphs captured once per (T, N), replayed with changing slot maps and inputs: equal to
    the same launches run eagerly (bit for bit, except split-K kernels, whose atomic fp32
    partial sums make them equal up to summation order), and within bf16 rounding of the
    eager forward whose launches use the host's counts (other grid, other tile choice);
  * a step whose tokens all map to -1 equals the base-only stack bit for bit.
Timing (CUDA-graph replays, median): base-only step vs base + N distinct deltas (tokens
spread evenly over the N deltas), T in --tokens, at the compressor's configuration for
--ratio; the byte floor of the step (base weights + N compressed deltas read once, over the
measured copy bandwidth) beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "kernels"))

from deltadq_vllm.format.bitpack import packed_row_bytes  # noqa: E402
from deltadq_vllm.kernels import DeltaSlots, build_meta  # noqa: E402
from deltadq_vllm.kernels.triton_delta import triton_apply_deltas  # noqa: E402
from deltadq_vllm.kernels.arena import DeltaArena  # noqa: E402
from deltadq_vllm.kernels.slots import slot_capacity_bytes  # noqa: E402
from deltadq_vllm.format.layouts import EncodedTensor  # noqa: E402

DTYPE = torch.bfloat16


def shapes(hidden: int, inter: int):
    """(name, in_features, slice sizes) of one decoder layer's linear layers."""
    return [("qkv", hidden, [hidden] * 3), ("o", hidden, [hidden]),
            ("gate_up", hidden, [inter, inter]), ("down", inter, [hidden])]


def flat_random_delta(out: int, inp: int, cfg: dict, gen: torch.Generator, seed: int) -> EncodedTensor:
    """A hash_groupwise delta in configuration cfg: random codes (one flat bit stream, as the
    arena holds it) and realistic scales; the kernel's speed depends on g/k/bits only."""
    g, k, bits, rps = cfg["group_size"], cfg["keep"], cfg["bits"], cfg["rows_per_scale"]
    n_kept = inp // g * k
    codes = torch.randint(0, 256, (1, packed_row_bytes(out * n_kept, bits)), generator=gen,
                          dtype=torch.uint8)
    nb = (out + rps - 1) // rps
    span = 2e-3 * (g / k) * torch.exp(0.5 * torch.randn(nb, generator=gen))
    params = {"group_size": g, "keep": k, "bits": bits, "seed": seed & 0xFFFFFFFF,
              "rows_per_scale": rps, "row_offset": 0, "group_offset": 0,
              "n_groups_total": inp // g, "n_rows_total": out, "flat": True}
    return EncodedTensor("hash_groupwise", (out, inp), params,
                         {"codes": codes, "step": (span / ((1 << bits) - 1)).to(torch.bfloat16),
                          "minv": (-span / 2).to(torch.bfloat16)})


class Stack:
    def __init__(self, layers: int, hidden: int, inter: int, n_slots: int, n_distinct: int,
                 cfgs: dict, device, seed: int = 0):
        self.device, self.hidden = device, hidden
        self.shapes = shapes(hidden, inter)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.W = [{n: (torch.randn(sum(sz), inp, generator=gen, device=device, dtype=DTYPE)
                       * inp ** -0.5) for n, inp, sz in self.shapes} for _ in range(layers)]
        self.norms = [(1 + 0.1 * torch.randn(2, hidden, generator=gen, device=device)).to(DTYPE)
                      for _ in range(layers)]
        cgen = torch.Generator().manual_seed(seed + 1)
        # n_distinct fine-tunes; every layer holds its own copy in its own arena segments (so
        # the bytes a step reads are those of n_distinct x layers distinct deltas), the codes
        # are shared between layers only on the host, to build the stack quickly
        self.deltas = {n: [[flat_random_delta(s, inp, cfgs[n], cgen, seed=1000 * d + 10 * i + 7)
                            for i, s in enumerate(sz)] for d in range(n_distinct)]
                       for n, inp, sz in self.shapes}
        per_slot = sum(slot_capacity_bytes(inp, sz, math.ceil(
            max(e.nbytes() for row in self.deltas[n] for e in row) / min(sz)))
            for n, inp, sz in self.shapes)
        self.arena = DeltaArena(layers * n_slots * per_slot, device)
        self.slots = []
        for _ in range(layers):
            lay = {}
            for n, inp, sz in self.shapes:
                sl = DeltaSlots(n_slots, inp, sz, device=device, cpu_strategy=None, arena=self.arena)
                for s in range(n_slots):
                    sl.load(s, self.deltas[n][s % n_distinct])
                lay[n] = sl
            self.slots.append(lay)
        self.n_slots = n_slots
        self.delta_bytes = {n: sum(e.nbytes() for e in self.deltas[n][0]) for n, _, _ in self.shapes}

    def base_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for lay in self.W for w in lay.values())

    def bytes_per_delta(self) -> int:
        return len(self.W) * sum(self.delta_bytes.values())

    def forward(self, x: torch.Tensor, meta=None, n_cap: int | None = None) -> torch.Tensor:
        """One decode step. meta: the step's slot metadata (None: base only). n_cap: the
        number of active deltas this (captured) step is specialised for: the launches'
        grid covers n_cap entries and max_seg_len is left open, as under a CUDA graph
        captured per active-delta count (vLLM captures LoRA graphs per active count);
        None: eager launches sized by the host's own counts."""
        H = self.hidden
        h = x
        for W, nw, sl in zip(self.W, self.norms, self.slots):
            def lin(name, a):
                y = F.linear(a, W[name])
                if meta is not None and (n_cap is None or n_cap > 0):
                    s = sl[name]
                    if n_cap is None:
                        triton_apply_deltas(y, a, *meta.tensors(), s,
                                            num_entries=meta.num_active,
                                            max_seg_len=meta.max_seg_len)
                    else:
                        triton_apply_deltas(y, a, *meta.tensors(), s, num_entries=n_cap)
                return y
            a = F.rms_norm(h, (H,), nw[0])
            qkv = lin("qkv", a)
            h = h + lin("o", qkv[:, 2 * H:].contiguous())   # attention over one key = v
            a = F.rms_norm(h, (H,), nw[1])
            gu = lin("gate_up", a)
            inter = gu.shape[1] // 2
            h = h + lin("down", F.silu(gu[:, :inter]) * gu[:, inter:])
        return h


def slot_map(T: int, N: int, S: int, rng: random.Random, base_share: float = 0.0) -> torch.Tensor:
    """T tokens spread evenly over N distinct slots (random ones), some base-only."""
    if N == 0:
        return torch.full((T,), -1, dtype=torch.int32)
    chosen = rng.sample(range(S), N)
    ids = [chosen[t % N] for t in range(T)]
    for t in range(T):
        if rng.random() < base_share:
            ids[t] = -1
    rng.shuffle(ids)
    return torch.tensor(ids, dtype=torch.int32)


def median(xs):
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def time_graph(graph, reps: int, cuda: bool) -> float:
    ts = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            graph()
            ts.append(time.perf_counter() - t0)
    return median(ts)


def copy_bandwidth(device, cuda: bool) -> float:
    if not cuda:
        return float("nan")
    a = torch.randn(512 * 2 ** 20, device=device)   # 2 GiB
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * 512 * 2 ** 20 * 4 / median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--tokens", default="1,8,16,32")
    ap.add_argument("--N", default="0,1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--checks", type=int, default=4, help="random slot maps checked per T")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    from deltadq_vllm.kernels import triton_delta
    if not cuda and not triton_delta.interpreting():
        print("no CUDA device: run with TRITON_INTERPRET=1 --smoke on a CPU", file=sys.stderr)
        return 2
    if args.smoke:
        args.layers, args.hidden, args.inter, args.slots = 2, 64, 96, 4
        args.tokens, args.N, args.reps, args.checks = "1,5", "0,1,2", 2, 2
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.time()
    from bench_gpu import pick_config  # the compressor's (g, k, bits) at this ratio
    cfgs = {n: pick_config(inp, args.ratio, 0) for n, inp, _ in shapes(args.hidden, args.inter)}
    Ns = [int(n) for n in args.N.split(",") if int(n) <= args.slots]
    Ts = [int(t) for t in args.tokens.split(",")]
    stack = Stack(args.layers, args.hidden, args.inter, args.slots, max(max(Ns), 1), cfgs, device)
    bw = copy_bandwidth(device, cuda)
    res = {"env": {"gpu": torch.cuda.get_device_name(0) if cuda else None,
                   "torch": torch.__version__, "copy_bandwidth_GBps": bw / 1e9},
           "args": vars(args), "cfgs": cfgs, "base_bytes": stack.base_bytes(),
           "bytes_per_delta": stack.bytes_per_delta(),
           "true_ratio": {n: sum(sz) * inp * 2 / stack.delta_bytes[n]
                          for n, inp, sz in stack.shapes},
           "build_s": round(time.time() - t0, 1), "checks": [], "timing": []}
    print(f"stack built in {res['build_s']} s: base {res['base_bytes'] / 1e9:.2f} GB, "
          f"{res['bytes_per_delta'] / 1e9:.3f} GB per delta, cfgs {cfgs}", flush=True)
    rng = random.Random()
    H = args.hidden
    for T in Ts:
        x_static = torch.zeros(T, H, device=device, dtype=DTYPE)
        meta_static = build_meta(torch.full((T,), -1, dtype=torch.int32), args.slots, device=device)
        caps = [n for n in Ns if n <= T]
        graphs, outs = {}, {}
        x_static.copy_(torch.randn(T, H, device=device, dtype=DTYPE))
        for n in caps:  # warm up (compiles), then one graph per active-delta count
            stack.forward(x_static, meta_static, n_cap=n)
        if cuda:
            torch.cuda.synchronize()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for n in caps:
                    stack.forward(x_static, meta_static, n_cap=n)
            torch.cuda.current_stream().wait_stream(s)
            for n in caps:
                graphs[n] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graphs[n]):
                    outs[n] = stack.forward(x_static, meta_static, n_cap=n)
            g_base = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_base):
                out_base = stack.forward(x_static)
            replay = {n: graphs[n].replay for n in caps}
            replay_base = g_base.replay
        else:  # smoke: no graphs on a CPU; the same static buffers, re-run
            def make(n):
                def run():
                    outs[n] = stack.forward(x_static, meta_static, n_cap=n)
                return run
            replay = {n: make(n) for n in caps}

            def replay_base():
                outs["base"] = stack.forward(x_static)
        # ---- checks: replay with changing slot maps == eager (same grid / host-sized grid)
        for c in range(args.checks):
            N = caps[c % len(caps)]
            ids = slot_map(T, N, args.slots, rng, base_share=0.25 if c % 2 else 0.0)
            x = torch.randn(T, H, device=device, dtype=DTYPE)
            x_static.copy_(x)
            build_meta(ids, args.slots, device=device, out=meta_static)
            replay[N]()
            replay_base()
            got = outs[N].clone()
            base = (out_base if cuda else outs["base"]).clone()
            eager_same = stack.forward(x, build_meta(ids, args.slots, device=device), n_cap=N)
            eager_host = stack.forward(x, build_meta(ids, args.slots, device=device))
            eager_base = stack.forward(x)

            def rel(a, b):
                return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
            chk = {"T": T, "N": N, "ids": ids.tolist(),
                   "graph_equals_eager": bool(torch.equal(got, eager_same)),
                   "rel_err_vs_eager": rel(got, eager_same),
                   "base_graph_equals_eager": bool(torch.equal(base, eager_base)),
                   "rel_err_vs_host_grid": rel(got, eager_host),
                   "delta_effect_rel": rel(eager_host, eager_base),
                   "all_base_equals_base": (bool(torch.equal(got, base)) if N == 0 else None),
                   "finite": bool(torch.isfinite(got).all())}
            # split-K kernels (v4) add partial sums atomically: equal up to fp32 summation
            # order, not bit for bit; every other path must be bit-exact
            chk["ok"] = (chk["base_graph_equals_eager"] and chk["finite"]
                         and chk["rel_err_vs_eager"] < 1e-2 and chk["rel_err_vs_host_grid"] < 2e-2
                         and (N == 0 or chk["delta_effect_rel"] > 10 * chk["rel_err_vs_host_grid"])
                         and chk["all_base_equals_base"] in (None, True))
            res["checks"].append(chk)
            print(f"check T={T} N={N}: graph==eager {chk['graph_equals_eager']} (rel "
                  f"{chk['rel_err_vs_eager']:.1e}), vs host-grid eager {chk['rel_err_vs_host_grid']:.1e} "
                  f"(delta effect {chk['delta_effect_rel']:.1e}), {'ok' if chk['ok'] else 'FAILED'}",
                  flush=True)
        # ---- timing: the graph of each active count, the step's tokens over N deltas
        t_base = time_graph(g_base if cuda else replay_base, args.reps, cuda)
        for N in caps:
            ids = slot_map(T, N, args.slots, rng)
            x_static.copy_(torch.randn(T, H, device=device, dtype=DTYPE))
            build_meta(ids, args.slots, device=device, out=meta_static)
            t = time_graph(graphs[N] if cuda else replay[N], args.reps, cuda)
            floor = (res["base_bytes"] + N * res["bytes_per_delta"]) / bw if cuda else float("nan")
            row = {"T": T, "N": N, "base_ms": t_base * 1e3, "step_ms": t * 1e3,
                   "x_base": t / t_base, "floor_ms": floor * 1e3,
                   "base_floor_ms": res["base_bytes"] / bw * 1e3 if cuda else float("nan")}
            res["timing"].append(row)
            print(f"T={T:>3} N={N:>2}: base {t_base * 1e3:7.3f} ms, with deltas {t * 1e3:7.3f} ms "
                  f"= {t / t_base:5.2f}x base (byte floor {row['floor_ms']:.3f} ms)", flush=True)
        if cuda:
            del graphs, g_base
            torch.cuda.synchronize()
    res["ok"] = all(c["ok"] for c in res["checks"])
    res["seconds"] = round(time.time() - t0, 1)
    print(f"layer stack: checks {'ok' if res['ok'] else 'FAILED'} "
          f"({sum(c['ok'] for c in res['checks'])}/{len(res['checks'])}), {res['seconds']} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        tmp.replace(args.out)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
