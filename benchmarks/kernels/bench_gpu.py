"""GPU benchmark of the Triton delta kernel (issue #3), 7B Llama shapes.

    python benchmarks/kernels/bench_gpu.py                 # the full sweep on a CUDA GPU
    python benchmarks/kernels/bench_gpu.py --quick         # a subset that fits ~5 minutes
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_gpu.py --smoke   # tiny shapes, on a CPU

Shapes: 4096x4096 (q/o), fused gate/up 4096->2x11008, down 11008->4096, fused qkv
4096->3x4096; T tokens in {1, 8, 32, 128, 512} spread evenly over N distinct deltas in
{1, 2, 4, 8, 16, 32}; true ratios 16, 32, 64, 128 (the compressor's own choice of group
size, keep count and bits for that ratio, picked on a 256-row proxy of each matrix; the
timed deltas then get random codes and scales in that configuration: the kernel's speed
depends on the configuration, not on the values). bf16 activations.

For each point it reports the delta kernel's time, its effective bandwidth, time / byte
floor (floor = compressed bytes read / the measured device-to-device copy bandwidth,
bytes read + written), the speedup over dense bf16 deltas applied with F.linear per
delta (grouped tokens, index_add), and the delta time over the base GEMM's (F.linear
with the bf16 base weight, i.e. cuBLAS).

Launch configs come from the config table (kernels/configs/*.json or
$DELTADQ_KERNEL_CONFIGS, written by `python -m deltadq_vllm.kernels.tune`), else the
built-in heuristic: no autotuning. --variant v3,v0 times decode kernel variants side by
side (the first is reported; the JSON holds delta_<variant>_us and speedups).

Method (see the device tool's METHOD.md): every configuration (and every --variant) is
checked against the reference first (rows of the delta decoded by layouts.decode, float64
products; outputs poisoned with NaN around and base-only rows bit-exact) on fresh random
inputs; timing warms up (compiles), then captures one CUDA graph of L launches
that each use a different window of a slot bank larger than 4x the L2, and different
x / y buffers, so repeated runs do not read from cache; the graph is replayed --reps
times with CUDA events and the median per launch is reported. Dense deltas and the base
GEMM are timed the same way. Results are appended to the JSON as they come, so a run
cut short by a time limit still leaves its points.

Results: benchmarks/results/kernels/gpu.json (gpu_smoke.json for --smoke), a printed
table, and gpu.png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, quantile, realistic_delta, save_json, RESULTS  # noqa: E402

from deltadq_vllm.format.bitpack import packed_row_bytes  # noqa: E402
from deltadq_vllm.kernels import DeltaSlots, build_meta  # noqa: E402
from deltadq_vllm.kernels import synthetic, triton_delta, tuning  # noqa: E402
from deltadq_vllm.format.layouts import (EncodedTensor, decode, hash_groupwise_columns,  # noqa: E402
                                  hash_groupwise_values, slice_hash_groupwise)

SHAPES = {
    "q/o 4096x4096": (4096, [4096]),
    "gate_up 4096->2x11008": (4096, [11008, 11008]),
    "down 11008->4096": (11008, [4096]),
    "qkv 4096->3x4096": (4096, [4096, 4096, 4096]),
}
SMOKE_SHAPES = {
    "smoke 72->40+24+17": (72, [40, 24, 17]),
}
DTYPE = torch.bfloat16
U_BF16 = 2.0 ** -8
FP32_U = 2.0 ** -24


# ---------------------------------------------------------------- device helpers


class Dev:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def check_error(self):
        if self.cuda:
            torch.cuda.synchronize()  # surfaces asynchronous launch errors here


def copy_bandwidth(dev: Dev, mb: int, reps: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    n = mb * 2**20 // 4
    a = torch.randn(n, device=dev.device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(reps):
        if dev.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            b.copy_(a)
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            b.copy_(a)
            ts.append(time.perf_counter() - t0)
    assert torch.equal(a[:1000], b[:1000])
    return 2 * n * 4 / median(ts)


def l2_bytes(dev: Dev) -> int:
    if dev.cuda:
        p = torch.cuda.get_device_properties(dev.device)
        return int(getattr(p, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
    return 32 * 2**20


def time_fn_list(dev: Dev, fns, reps: int, use_graph: bool):
    """Median seconds per call of fns (a list run in order as one unit: L calls on L
    different input sets). CUDA: one graph of all L calls, replayed `reps` times between
    events. CPU: host clock around the L calls."""
    L = len(fns)
    for f in fns:  # warm-up (+ autotune) for every input set
        f()
    dev.check_error()
    if dev.cuda and use_graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        g.replay()
        dev.check_error()
        run = g.replay
    else:
        def run():
            for f in fns:
                f()
    ts = []
    for _ in range(reps):
        if dev.cuda:
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            st.record()
            run()
            en.record()
            en.synchronize()
            ts.append(st.elapsed_time(en) / 1e3 / L)
        else:
            t0 = time.perf_counter()
            run()
            ts.append((time.perf_counter() - t0) / L)
    dev.check_error()
    return median(ts), quantile(ts, 0.25), quantile(ts, 0.75)


# ---------------------------------------------------------------- deltas


# the compressor's (g, k, bits) per ratio and random codes in that configuration: shared
# with the tuner (python -m deltadq_vllm.kernels.tune), which times the same deltas
pick_config = synthetic.pick_config
random_encoding = synthetic.random_encoding


def enc_bytes(enc: EncodedTensor) -> int:
    return enc.nbytes()


# ---------------------------------------------------------------- correctness


def verify(dev, slots, encs_of_slot, inp, sizes, T, N, path, gen, rows_per_slice=48, variant=None):
    """Run the kernel once on poisoned y and check sampled rows against the reference."""
    S = slots.n_slots
    ids = torch.tensor([t % (N + 1) - 1 for t in range(T)], dtype=torch.int32)  # -1 included
    ids = ids[torch.randperm(T, generator=gen)]
    if (ids >= 0).sum() == 0:
        ids[0] = 0
    x = torch.randn(T, inp, generator=gen).to(DTYPE)
    out_total = sum(sizes)
    big = torch.full((T, out_total + 8), float("nan"), dtype=DTYPE)
    y0 = torch.randn(T, out_total, generator=gen).to(DTYPE)
    big[:, 4:4 + out_total] = y0
    bigd = big.to(dev.device)
    y = bigd[:, 4:4 + out_total]
    meta = build_meta(ids, S, device=dev.device)
    triton_delta.triton_apply_deltas(y, x.to(dev.device), *meta.tensors(), slots, path=path,
                                     num_entries=meta.num_active, max_seg_len=meta.max_seg_len,
                                     variant=variant if path == "decode" else None)
    dev.check_error()
    got = bigd.cpu()
    assert torch.isnan(got[:, :4]).all() and torch.isnan(got[:, -4:]).all(), "wrote outside y"
    got = got[:, 4:4 + out_total]
    assert not torch.isnan(got).any(), "NaN in y: unwritten or poisoned read"
    base = ids < 0
    assert torch.equal(got[base], y0[base]), "base-only rows modified"
    worst = 0.0
    off = 0
    g = torch.Generator().manual_seed(1)
    for i, size in enumerate(sizes):
        spans = [(0, min(size, rows_per_slice // 2))]
        r0 = max(0, size - rows_per_slice // 2)
        spans.append((r0, size))
        mid = int(torch.randint(0, max(1, size - 8), (1,), generator=g))
        spans.append((mid, min(size, mid + 8)))
        for a, b in spans:
            ref = y0[:, off + a:off + b].double().clone()
            A = torch.zeros_like(ref)
            for s in sorted(set(ids.tolist()) - {-1}):
                rows = (ids == s).nonzero().squeeze(1)
                enc = slice_hash_groupwise(encs_of_slot[s][i], rows=(a, b))
                d = decode(enc).double()
                p = enc.params
                blk = (p.get("scale_row_offset", 0) + torch.arange(b - a)) // p["rows_per_scale"]
                mrow = enc.tensors["minv"].double()[blk].unsqueeze(1)
                mag = torch.zeros(b - a, inp, dtype=torch.float64)
                mag.scatter_(1, hash_groupwise_columns(enc),
                             mrow.abs() + (hash_groupwise_values(enc).double() - mrow).abs())
                xs = x[rows].double()
                ref[rows] += xs @ d.T
                A[rows] = xs.abs() @ mag.T
            # derived bound (tests/kernel_checks.py): two final bf16 roundings, the prefill
            # tile's rounding (u^2: hi + lo tiles; u with --prefill-single-tile), fp32
            # dequantisation + accumulation
            u = U_BF16 / (1 - U_BF16)
            u_w = 0.0 if path != "prefill" else u * u if triton_delta.PREFILL_SPLIT_W else u
            gotb = got[:, off + a:off + b].double()
            bound = u * (gotb.abs() + ref.abs()) + (u_w + 2 * (inp + 2) * FP32_U) * A
            err = (gotb - ref).abs()
            contrib = (ref - y0[:, off + a:off + b].double()).abs()
            assert (contrib[~base] > 0).any(), "no delta contribution (zeros?)"
            r = (err / bound.clamp_min(1e-300)).max().item()
            worst = max(worst, r)
            if r > 1:
                raise AssertionError(f"slice {i} rows [{a},{b}) path {path}: max err/bound {r:.3g}")
        off += size
    return worst


# ---------------------------------------------------------------- one shape x ratio


def windows_of(n_bank: int, N: int, max_windows: int):
    """Slot windows [w*N, w*N + N) of the bank, at most max_windows of them."""
    return [list(range(w * N, w * N + N)) for w in range(min(max_windows, n_bank // N))]


def run_shape_ratio(dev, name, inp, sizes, ratio, args, bw, results, save):
    t0 = time.time()
    gen = torch.Generator().manual_seed(args.seed)
    cfg = dict(pick_config(inp, ratio, args.seed, args.bits))
    n_distinct = max(args.Ns)
    encs = []  # [distinct][slice]
    for s in range(n_distinct):
        row = [random_encoding(size, inp, cfg, gen, seed=args.seed * 7919 + s * 104729 + i)
               for i, size in enumerate(sizes)]
        encs.append(row)
    per_delta = sum(enc_bytes(e) for e in encs[0])
    true_ratio = sum(sizes) * inp * 2 / per_delta
    l2 = l2_bytes(dev)
    pool = max(args.pool_factor * l2, 1)
    n_bank = max(n_distinct, math.ceil(pool / per_delta))
    n_bank = min(n_bank, args.max_bank)
    slots = DeltaSlots(n_bank, inp, sizes, device=dev.device, min_ratio=min(ratio, true_ratio),
                       cpu_strategy=None)
    for s in range(n_bank):
        slots.load(s, encs[s % n_distinct])
    encs_of_slot = [encs[s % n_distinct] for s in range(n_bank)]
    print(f"[{name} @{ratio:g}x] cfg {cfg}, true ratio {true_ratio:.2f}, {per_delta / 2**20:.2f} MiB "
          f"per delta, bank of {n_bank} slots ({slots.nbytes() / 2**20:.0f} MiB), "
          f"built in {time.time() - t0:.1f}s", flush=True)

    # correctness first: decode path and prefill path, mixed batch with base-only tokens
    for T, N, path in args.verify_points:
        if N <= n_distinct and N < T:
            for variant in (args.variants if path == "decode" else [None]):
                w = verify(dev, slots, encs_of_slot, inp, sizes, T, N, path,
                           torch.Generator().manual_seed(args.seed + T * 31 + N), variant=variant)
                print(f"  verified T={T} N={N} {path} {variant or ''}: max err/bound {w:.3f}",
                      flush=True)

    out_total = sum(sizes)
    base_pool = max(1, min(args.max_base_copies, math.ceil(pool / (out_total * inp * 2))))
    W_base = [torch.randn(out_total, inp, device=dev.device, dtype=DTYPE) * 0.02
              for _ in range(base_pool)]
    dense_bytes = out_total * inp * 2
    n_dense = min(max(n_distinct, math.ceil(pool / dense_bytes)), args.max_dense_bank)
    dense = None
    if not args.no_dense:
        dense = torch.randn(n_dense, out_total, inp, device=dev.device, dtype=DTYPE) * 1e-3

    for T in args.Ts:
        n_xy = args.xy_pool
        xs = [torch.randn(T, inp, device=dev.device, dtype=DTYPE) for _ in range(n_xy)]
        ys = [torch.randn(T, out_total, device=dev.device, dtype=DTYPE) for _ in range(n_xy)]
        # base GEMM
        fns = [(lambda i=i: torch.nn.functional.linear(xs[i % n_xy], W_base[i % base_pool]))
               for i in range(max(base_pool, n_xy))]
        t_base = time_fn_list(dev, fns, args.reps, not args.no_graph)[0]
        for N in args.Ns:
            if N > T or N > n_distinct:
                continue
            wins = windows_of(n_bank, N, args.max_windows)
            metas = []
            for w in wins:
                ids = torch.tensor([w[t % N] for t in range(T)], dtype=torch.int32)
                ids = ids[torch.randperm(T, generator=gen)]
                metas.append(build_meta(ids, n_bank, device=dev.device))
            paths = ["auto"]
            if T in args.both_paths_T:
                paths = ["decode", "prefill"]
            auto_path = "decode" if T <= triton_delta.DECODE_MAX_TOKENS else "prefill"
            mseg = max(m.max_seg_len for m in metas)
            kp, straddle = triton_delta.slots_kernel_keys(slots)
            point = {"shape": name, "ratio": ratio, "cfg": cfg, "true_ratio": true_ratio,
                     "T": T, "N": N, "windows": len(wins), "base_us": t_base * 1e6}
            comp_bytes = N * per_delta
            io_bytes = T * inp * 2 + 2 * T * out_total * 2
            point["compressed_bytes"] = comp_bytes
            point["floor_us"] = comp_bytes / bw * 1e6
            point["floor_all_us"] = (comp_bytes + io_bytes) / bw * 1e6
            for path in paths:
                real = auto_path if path == "auto" else path
                for variant in (args.variants if real == "decode" else [None]):
                    cfg = triton_delta.resolve_config(real, xs[0], slots, mseg, kp, straddle,
                                                      variant=variant)
                    fns = [(lambda j=j, cfg=cfg: triton_delta.triton_apply_deltas(
                        ys[j % n_xy], xs[j % n_xy], *metas[j].tensors(), slots, path=real,
                        num_entries=metas[j].num_active, max_seg_len=metas[j].max_seg_len,
                        config=cfg)) for j in range(len(wins))]
                    m, q1, q3 = time_fn_list(dev, fns, args.reps, not args.no_graph)
                    key = "delta" if path == "auto" else f"delta_{path}"
                    if variant is not None and variant != args.variants[0]:
                        key += f"_{variant}"
                    point[f"{key}_us"] = m * 1e6
                    point[f"{key}_p25_us"], point[f"{key}_p75_us"] = q1 * 1e6, q3 * 1e6
                    point.setdefault("configs", {})[key] = {**cfg.to_json(), "source": cfg.source}
            if "delta_us" not in point:
                point["delta_us"] = min(point["delta_decode_us"], point["delta_prefill_us"])
                point["path"] = ("decode" if point["delta_decode_us"] <= point["delta_prefill_us"]
                                 else "prefill")
            else:
                point["path"] = "decode" if T <= triton_delta.DECODE_MAX_TOKENS else "prefill"
            for v in args.variants[1:]:
                for key in [k for k in list(point) if k.endswith(f"_{v}_us")]:
                    base = key[: -len(f"_{v}_us")] + "_us"
                    point[key.replace("_us", "_x_floor")] = point[key] / point["floor_us"]
                    point[base.replace("_us", f"_speedup_vs_{v}")] = point[key] / point[base]
            t = point["delta_us"] / 1e6
            point["eff_GBps"] = comp_bytes / t / 1e9
            point["eff_all_GBps"] = (comp_bytes + io_bytes) / t / 1e9
            point["x_floor"] = point["delta_us"] / point["floor_us"]
            point["x_floor_all"] = point["delta_us"] / point["floor_all_us"]
            point["x_base"] = point["delta_us"] / point["base_us"]
            if dense is not None:
                dwins = [[(j * N + s) % n_dense for s in range(N)] for j in range(len(wins))]
                groups = []
                for j, w in enumerate(wins):
                    ids = torch.tensor([t % N for t in range(T)])
                    gl = [(dwins[j][s], (ids == s).nonzero().squeeze(1).to(dev.device))
                          for s in range(N)]
                    groups.append(gl)

                def dense_apply(j):
                    y, x = ys[j % n_xy], xs[j % n_xy]
                    for d, idx in groups[j]:
                        y.index_add_(0, idx, torch.nn.functional.linear(x.index_select(0, idx), dense[d]))

                fns = [(lambda j=j: dense_apply(j)) for j in range(len(wins))]
                point["dense_us"] = time_fn_list(dev, fns, args.reps, not args.no_graph)[0] * 1e6
                point["speedup_vs_dense"] = point["dense_us"] / point["delta_us"]
            results["points"].append(point)
            print(f"  T={T:>3} N={N:>2} {point['path']:>7}: {point['delta_us']:8.1f} us  "
                  f"{point['eff_GBps']:7.1f} GB/s  x_floor {point['x_floor']:6.2f}  "
                  f"vs dense {point.get('speedup_vs_dense', float('nan')):6.1f}x  "
                  f"x_base {point['x_base']:.2f}"
                  + "".join(f"  {v}: {point[k]:.1f} us" for v in args.variants[1:]
                            for k in (f"delta_{v}_us",) if k in point), flush=True)
            save()
        del xs, ys
    del slots, dense, W_base
    if dev.cuda:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- report


def table(results) -> str:
    lines = [f"{'shape':>22} {'ratio':>5} {'T':>4} {'N':>3} {'path':>7} {'delta us':>9} {'GB/s':>7} "
             f"{'x floor':>8} {'vs dense':>9} {'x base':>7}"]
    for p in results["points"]:
        lines.append(f"{p['shape']:>22} {p['ratio']:>5g} {p['T']:>4} {p['N']:>3} {p['path']:>7} "
                     f"{p['delta_us']:>9.1f} {p['eff_GBps']:>7.1f} {p['x_floor']:>8.2f} "
                     f"{p.get('speedup_vs_dense', float('nan')):>8.1f}x {p['x_base']:>7.2f}")
    return "\n".join(lines)


def targets(results) -> dict:
    """Issue #3 targets: T <= 16 -> delta time <= 1.25x floor for N = 1..32, and >= 10x
    faster than dense bf16 deltas at 16x."""
    small = [p for p in results["points"] if p["T"] <= 16]
    floor_ok = [p for p in small if p["x_floor"] <= 1.25]
    at16 = [p for p in small if p["ratio"] == 16 and "speedup_vs_dense" in p]
    dense_ok = [p for p in at16 if p["speedup_vs_dense"] >= 10]
    return {"points_T_le_16": len(small), "within_1.25x_floor": len(floor_ok),
            "worst_x_floor": max((p["x_floor"] for p in small), default=None),
            "median_x_floor": median([p["x_floor"] for p in small]) if small else None,
            "points_16x": len(at16), "at_least_10x_vs_dense": len(dense_ok),
            "min_speedup_vs_dense_16x": min((p["speedup_vs_dense"] for p in at16), default=None)}


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e .[bench])")
        return None
    pts = results["points"]
    shapes = sorted({p["shape"] for p in pts})
    if not shapes:
        return None
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7.5), squeeze=False)
    for j, sh in enumerate(shapes):
        for ratio in sorted({p["ratio"] for p in pts}):
            for T in sorted({p["T"] for p in pts if p["T"] <= 16}):
                sel = sorted([p for p in pts if p["shape"] == sh and p["ratio"] == ratio and p["T"] == T],
                             key=lambda p: p["N"])
                if not sel:
                    continue
                axes[0][j].plot([p["N"] for p in sel], [p["x_floor"] for p in sel], marker="o",
                                label=f"{ratio:g}x T={T}")
                if all("speedup_vs_dense" in p for p in sel):
                    axes[1][j].plot([p["N"] for p in sel], [p["speedup_vs_dense"] for p in sel],
                                    marker="o", label=f"{ratio:g}x T={T}")
        axes[0][j].axhline(1.25, color="k", lw=0.8)
        axes[1][j].axhline(10, color="k", lw=0.8)
        for r in (0, 1):
            axes[r][j].set_xscale("log", base=2)
            axes[r][j].set_yscale("log")
            axes[r][j].set_xlabel("N distinct deltas")
        axes[0][j].set_title(sh, fontsize=9)
    axes[0][0].set_ylabel("delta time / byte floor")
    axes[1][0].set_ylabel("speedup vs dense bf16 F.linear")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"Triton delta kernel, {results['env'].get('gpu', 'CPU interpreter')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes and few reps (runs on a CPU with TRITON_INTERPRET=1)")
    ap.add_argument("--quick", action="store_true", help="a subset: ratios 16,64; T 1,8,128; N 1,4,32")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    ap.add_argument("--T", default="1,8,32,128,512")
    ap.add_argument("--N", default="1,2,4,8,16,32")
    ap.add_argument("--ratios", default="16,32,64,128")
    ap.add_argument("--bits", type=int, default=None, help="force code bits (default: compressor's choice)")
    ap.add_argument("--both-paths-T", default="32,128",
                    help="T values at which both kernel paths are timed (tunes DECODE_MAX_TOKENS)")
    ap.add_argument("--reps", type=int, default=30, help="graph replays per point (median)")
    ap.add_argument("--pool-factor", type=float, default=4.0, help="slot bank >= this x L2")
    ap.add_argument("--max-bank", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=32, help="launches per graph (input sets)")
    ap.add_argument("--max-base-copies", type=int, default=16)
    ap.add_argument("--max-dense-bank", type=int, default=64)
    ap.add_argument("--xy-pool", type=int, default=4)
    ap.add_argument("--variant", default=None,
                    help="decode kernel variant(s), comma-separated: the first is the one "
                         "reported (default: the config table's), the others are timed beside "
                         f"it and reported as delta_<v>_us (choices {tuning.VARIANTS['decode']})")
    ap.add_argument("--config-table", default=None,
                    help="kernel config table (file or folder) to use before the shipped ones "
                         "(= $DELTADQ_KERNEL_CONFIGS)")
    ap.add_argument("--prefill-single-tile", action="store_true",
                    help="the prefill tile as one bf16 tile (before the hi + lo split)")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--append", action="store_true", help="add to an existing JSON (split runs)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) on a CPU", file=sys.stderr)
        return 2
    if not cuda and not triton_delta.interpreting():
        print("on a CPU the Triton kernels need TRITON_INTERPRET=1 (set before python starts)",
              file=sys.stderr)
        return 2
    if not triton_delta.HAS_TRITON:
        print("triton is not installed", file=sys.stderr)
        return 2
    dev = Dev(torch.device("cuda" if cuda else "cpu"))
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.smoke:  # interpreter times mean nothing: this checks that everything runs
        args.T, args.N, args.ratios, args.reps = "1,5,40", "1,2", "16", 2
        args.both_paths_T, args.max_windows, args.max_bank = "5", 2, 8
        args.pool_factor, args.xy_pool, args.max_base_copies, args.max_dense_bank = 0.0, 2, 2, 8
        args.no_graph = True
    elif args.quick:
        args.ratios, args.T, args.N = "16,64", "1,8,128", "1,4,32"
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes.split(",")}
    if args.config_table:
        if not Path(args.config_table).exists():
            ap.error(f"--config-table {args.config_table} does not exist")
        prev = os.environ.get(tuning.ENV_VAR)
        os.environ[tuning.ENV_VAR] = os.pathsep.join(
            [str(Path(args.config_table).resolve())] + ([prev] if prev else []))
        tuning.reload_tables()
    args.variants = args.variant.split(",") if args.variant else [None]
    triton_delta.PREFILL_SPLIT_W = not args.prefill_single_tile
    bad = [v for v in args.variants if v is not None and v not in tuning.VARIANTS["decode"]]
    if bad:
        ap.error(f"unknown --variant {bad}; choose from {tuning.VARIANTS['decode']}")
    args.Ts = [int(t) for t in args.T.split(",")]
    args.Ns = [int(n) for n in args.N.split(",")]
    args.both_paths_T = [int(t) for t in args.both_paths_T.split(",") if t]
    ratios = [float(r) for r in args.ratios.split(",")]
    # correctness points: decode path and prefill path, mixed batches with -1 tokens
    args.verify_points = [(5, 2, "decode"), (5, 2, "prefill"), (40, 2, "prefill"), (40, 2, "decode")] \
        if args.smoke else [(16, 4, "decode"), (16, 4, "prefill"), (96, 3, "prefill")]

    out = args.out or ("gpu_smoke.json" if args.smoke else "gpu.json")
    env = environment()
    if cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, l2_bytes=l2_bytes(dev),
                   cuda=torch.version.cuda)
    import triton
    env["triton"] = triton.__version__
    env["interpreter"] = triton_delta.interpreting()
    env["prefill_split_w"] = triton_delta.PREFILL_SPLIT_W
    env["kernel_tables"] = [{"gpu": n, "capability": list(c), "entries": len(e)}
                            for n, c, e in tuning.tables()]
    bw = copy_bandwidth(dev, 16 if args.smoke else 2048, 5 if args.smoke else 20)
    env["copy_bandwidth_GBps"] = bw / 1e9
    print(f"device {env.get('gpu', 'cpu')}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    results = {"benchmark": "gpu delta kernel", "env": env,
               "args": {k: v for k, v in vars(args).items()}, "points": []}
    path = RESULTS / out
    if args.append and path.exists():
        import json
        old = json.loads(path.read_text())
        results["points"] = old.get("points", [])
        results.setdefault("previous_env", []).append(old.get("env"))

    def save():
        results["targets"] = targets(results)
        save_json(out, results)

    for name, (inp, sizes) in shapes.items():
        for ratio in ratios:
            run_shape_ratio(dev, name, inp, sizes, ratio, args, bw, results, save)
    save()
    print("\n" + table(results))
    print("\ntargets:", results["targets"])
    png = plot(results, RESULTS / Path(out).with_suffix(".png").name)
    print(f"saved {RESULTS / out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
