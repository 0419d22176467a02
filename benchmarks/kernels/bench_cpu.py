"""CPU path of the delta op (issue #3): strategies vs the base GEMM on SmolLM2-135M shapes.

    .venv/bin/python benchmarks/kernels/bench_cpu.py              # full run (~20 min on 2 cores)
    .venv/bin/python benchmarks/kernels/bench_cpu.py --quick      # T=64 only, few reps

For every linear layer of a SmolLM2-135M decoder block (o_proj 576->576, fused gate/up
576->2x1536, down 1536->576, fused qkv 576->576+192+192), T tokens spread evenly over N
active 16x deltas (made by the real compressor from a synthetic delta, see common.py),
bf16 activations, it times

  base            the base layer alone: vLLM's oneDNN GEMM with a prepacked weight (CpuGemm)
  apply.<s>       apply_deltas(y, x, meta, slots) with CPU strategy s: y += delta part only
  apply.gather    vLLM's CPU LoRA approach applied to full deltas: gather each token's
                  dense delta (stacked[ids], [T, out, in]), then einsum (the naive baseline)
  layer.<s>       linear_with_deltas(x, meta, slots): the whole layer, base + deltas

and reports time / base time ("x base"): for apply.* that is the delta overhead; for
layer.* the overhead is (x base - 1). Weights are cold as in serving (every other layer
of the model runs between two calls of this one): a buffer of 2x the last-level cache
is rewritten before every timed call, then x and y are touched (they are hot in
serving). Variants are interleaved call by call so machine noise hits all of them
alike; medians over --reps. Every variant's output is checked against a float64
reference before timing. Per-slot memory of each strategy is reported too.

Results: a table on stdout, benchmarks/results/kernels/cpu.json and cpu.png.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (compressed_deltas, environment, median, quantile,  # noqa: E402
                    save_json, RESULTS)

from deltadq_vllm.kernels import DeltaSlots, apply_deltas, build_meta, linear_with_deltas  # noqa: E402
from deltadq_vllm.kernels.cpu import CpuGemm, onednn_available  # noqa: E402
from deltadq_vllm.format.layouts import decode  # noqa: E402

# name: (in_features, output slices)
LAYERS = {
    "o_proj 576x576": (576, [576]),
    "gate_up 576->2x1536": (576, [1536, 1536]),
    "down 1536->576": (1536, [576]),
    "qkv 576->576+192+192": (576, [576, 192, 192]),
}
STRATEGIES = ("dense", "merged", "dequant", "csr")
DTYPE = torch.bfloat16
N_LAYERS_SMOLLM2 = 30
UNIT = 2.0 ** -8  # bf16 unit roundoff


class Flusher:
    """Evicts the caches by *reading* a buffer of `mb` MiB (default 2x the L3 of this
    machine): the caches then hold clean lines, as after the other layers' weights were
    streamed (writing would leave dirty lines whose write-back the next call would pay)."""

    def __init__(self, mb: int):
        self.buf = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.int32) if mb > 0 else None

    def __call__(self):
        if self.buf is not None:
            self.buf.sum()


def gather_apply(y, x, ids, stacked):
    """vLLM CPU LoRA style (vllm/lora/ops/torch_ops bgmv): per-token gather of the whole
    delta, then einsum. ids >= 0 here (every benchmark token has a delta)."""
    w = stacked.index_select(0, ids)                     # [T, out, in]
    y.add_(torch.einsum("ti,toi->to", x, w))


def make_layer(name, n_max, ratio, seed, bits, cfg_cache, strategies):
    inp, sizes = LAYERS[name]
    out_total = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(out_total, inp, generator=gen) * 0.02).to(DTYPE)
    per_slice, cfgs = [], []
    for i, size in enumerate(sizes):
        encs, cfg = compressed_deltas(size, inp, n_max, ratio, seed=seed + 17 * i, bits=bits,
                                      cache=cfg_cache)
        per_slice.append(encs)
        cfgs.append(cfg)
    slot_encs = [[per_slice[i][s] for i in range(len(sizes))] for s in range(n_max)]
    dense = torch.stack([torch.cat([decode(e) for e in row], 0) for row in slot_encs])  # fp32
    insts = []
    for copy in range(2):  # two copies of everything: one timed, one warms the code path
        b = base.clone()
        slots = {}
        for st in strategies:
            sl = DeltaSlots(n_max, inp, sizes, min_ratio=ratio, cpu_strategy=st, cpu_dtype=DTYPE,
                            base_weight=b)
            for s in range(n_max):
                sl.load(s, slot_encs[s])
            slots[st] = sl
        insts.append({"base_gemm": CpuGemm(b), "slots": slots, "stacked": dense.to(DTYPE)})
    return {"name": name, "in": inp, "sizes": sizes, "out": out_total, "base": base,
            "dense": dense, "insts": insts, "cfgs": cfgs, "slot_encs": slot_encs}


def reference(layer, x, ids):
    """float64 x D_slot(t)^T (0 for base-only tokens) and A = |x| (|W_base| + |D|)^T, the
    scale of the roundings of any path."""
    xd = x.double()
    base = layer["base"].double()
    y = torch.zeros(x.shape[0], layer["out"], dtype=torch.float64)
    A = xd.abs() @ base.abs().T
    for s in ids.unique().tolist():
        if s < 0:
            continue
        rows = (ids == s).nonzero().squeeze(1)
        d = layer["dense"][s].double()
        y[rows] = xd[rows] @ d.T
        A[rows] += xd[rows].abs() @ d.abs().T
    return y, A


def check(name, got, want, A, y_in=None):
    """bf16 sanity bound: |got - want| <= 4u (|want| + A) (the tests derive tight ones)."""
    err = (got.double() - want).abs()
    bound = 4 * UNIT * (want.abs() + A)
    if y_in is not None:
        bound += UNIT * y_in.double().abs()
    if torch.isnan(got).any() or not (err <= bound).all():
        raise AssertionError(f"{name}: max err/bound {(err / bound).max().item():.3g}")


def run_config(layer, T, N, args, flush, rng):
    inp = layer["in"]
    ids = torch.tensor([t % N for t in range(T)])
    ids = ids[torch.randperm(T, generator=torch.Generator().manual_seed(rng.getrandbits(31)))]
    n_base = int(round(args.base_frac * T))
    if n_base:
        ids[:n_base] = -1
    ids32 = ids.to(torch.int32)
    t0 = time.perf_counter_ns()
    meta = build_meta(ids32, args.n_max)
    meta_us = (time.perf_counter_ns() - t0) / 1e3
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    x = torch.randn(T, inp, generator=gen).to(DTYPE)
    insts = layer["insts"]
    y_base = insts[0]["base_gemm"](x)

    # ---- correctness of every variant (both copies) before timing
    ref_delta, A = reference(layer, x, ids)
    ref_full = (x.double() @ layer["base"].double().T) + ref_delta
    variants = {"base": lambda i: insts[i]["base_gemm"](x)}
    ys = [{}, {}]
    for i, inst in enumerate(insts):
        check("base", inst["base_gemm"](x), x.double() @ layer["base"].double().T, A)
        for st, sl in inst["slots"].items():
            y = y_base.clone()
            apply_deltas(y, x, meta, sl)
            check(f"apply.{st}", y, y_base.double() + ref_delta, A, y_base)
            out = linear_with_deltas(x, meta, sl)
            check(f"layer.{st}", out, ref_full, A)
            ys[i][st] = y_base.clone()
    for st in insts[0]["slots"]:
        variants[f"apply.{st}"] = (lambda i, st=st: apply_deltas(ys[i][st], x, meta, insts[i]["slots"][st]))
        variants[f"layer.{st}"] = (lambda i, st=st: linear_with_deltas(x, meta, insts[i]["slots"][st]))
    if args.gather and n_base == 0 and T * layer["out"] * inp * 2 <= args.gather_max_mb * 2**20:
        for i, inst in enumerate(insts):
            y = y_base.clone()
            gather_apply(y, x, ids, inst["stacked"])
            check("apply.gather", y, y_base.double() + ref_delta, A, y_base)
            ys[i]["gather"] = y_base.clone()
        variants["apply.gather"] = lambda i: gather_apply(ys[i]["gather"], x, ids, insts[i]["stacked"])

    # ---- timing: interleaved; weights cold, code and activations warm: after the cache
    # flush the same call runs untimed on the second copy (other weights), then timed on
    # the first one
    times = {k: [] for k in variants}
    reps = {k: args.reps for k in variants}
    clock = time.thread_time_ns if args.clock == "thread" else time.perf_counter_ns
    for k, fn in variants.items():  # warm-up (also sizes the reps of very slow variants)
        for _ in range(args.warmup):
            flush()
            fn(1)
            t0 = time.perf_counter_ns()
            fn(0)
            dt = (time.perf_counter_ns() - t0) / 1e9
        reps[k] = max(3, min(args.reps, int(args.max_variant_s / max(dt, 1e-6))))
    for r in range(args.reps):
        for k, fn in variants.items():
            if r >= reps[k]:
                continue
            flush()
            fn(1)
            for y in ys[0].values():
                y.sum()
            t0 = clock()
            fn(0)
            times[k].append((clock() - t0) / 1e3)
    base_us = median(times["base"])
    res = {"T": T, "N": N, "meta_us": meta_us, "variants": {}}
    for k, ts in times.items():
        m = median(ts)
        res["variants"][k] = {"median_us": m, "p25_us": quantile(ts, 0.25),
                              "p75_us": quantile(ts, 0.75), "n": len(ts),
                              "x_base": m / base_us}
    return res


def memory_table(layer):
    rows = {}
    for st, sl in layer["insts"][0]["slots"].items():
        e = sl.cpu_entry(0)
        rows[st] = {"bytes_per_slot": e.nbytes(), "compressed_bytes": sl.loaded_bytes[0]}
    inp, out = layer["in"], layer["out"]
    rows["gather"] = {"bytes_per_slot": out * inp * 2, "compressed_bytes": rows["dense"]["compressed_bytes"]}
    for r in rows.values():
        r["bytes_per_weight"] = r["bytes_per_slot"] / (out * inp)
    return rows


def print_tables(results):
    lines = []
    for lname, L in results["layers"].items():
        lines.append(f"\n## {lname}   (16x: g={L['cfgs'][0]['group_size']} k={L['cfgs'][0]['keep']} "
                     f"bits={L['cfgs'][0]['bits']}, true ratio {L['cfgs'][0]['true_ratio']:.2f})")
        allnames = sorted({k for run in L["runs"] for k in run["variants"] if k != "base"},
                          key=lambda k: (k.split(".")[0], k))
        hdr = f"{'T':>4} {'N':>2} {'base us':>9} " + " ".join(f"{k:>14}" for k in allnames)
        lines.append(hdr)
        for run in L["runs"]:
            v = run["variants"]
            cells = []
            for k in allnames:
                cells.append(f"{v[k]['x_base']:>13.2f}x" if k in v else f"{'-':>14}")
            lines.append(f"{run['T']:>4} {run['N']:>2} {v['base']['median_us']:>9.1f} " + " ".join(cells))
    s = results.get("summary", {})
    if s:
        lines.append("\n## Whole decoder block (sum of the 4 layers): time / base time")
        for row in s["block"]:
            cells = " ".join(f"{k}={v:.2f}x" for k, v in row["x_base"].items())
            lines.append(f"T={row['T']:>3} N={row['N']}: base {row['base_us']:.0f} us; {cells}")
    print("\n".join(lines))
    return "\n".join(lines)


def markdown(results) -> str:
    """The tables docs/kernels.md quotes: x base per variant for the whole block and per layer."""
    order = ["apply.dense", "apply.merged", "apply.dequant", "apply.csr", "apply.gather",
             "layer.dense", "layer.merged", "layer.dequant", "layer.csr"]
    out = ["Whole decoder block (sum over the 4 layers), time / base GEMM time:", "",
           "| T | N | base us | " + " | ".join(k for k in order) + " |",
           "|---|---|---|" + "---|" * len(order)]
    for r in results["summary"]["block"]:
        cells = [f"{r['x_base'][k]:.2f}" if k in r["x_base"] else "-" for k in order]
        out.append(f"| {r['T']} | {r['N']} | {r['base_us']:.0f} | " + " | ".join(cells) + " |")
    out += ["", "Per layer at T = 64 (time / base GEMM time):", "",
            "| layer | N | base us | " + " | ".join(order) + " |",
            "|---|---|---|" + "---|" * len(order)]
    for lname, L in results["layers"].items():
        for run in L["runs"]:
            if run["T"] != 64:
                continue
            v = run["variants"]
            cells = [f"{v[k]['x_base']:.2f}" if k in v else "-" for k in order]
            out.append(f"| {lname} | {run['N']} | {v['base']['median_us']:.0f} | " + " | ".join(cells) + " |")
    mem = results.get("memory_model", {})
    if mem:
        out += ["", "Memory per slot (30 blocks of SmolLM2-135M, linear layers):", "",
                "| strategy | MiB per slot | compressed MiB |", "|---|---|---|"]
        for st, m in mem.items():
            out.append(f"| {st} | {m['bytes_per_slot_model'] / 2**20:.1f} | "
                       f"{m['compressed_bytes_model'] / 2**20:.1f} |")
    return "\n".join(out)


def summarize(results):
    block = []
    runs_by_key = {}
    for lname, L in results["layers"].items():
        for run in L["runs"]:
            runs_by_key.setdefault((run["T"], run["N"]), []).append(run)
    for (T, N), runs in sorted(runs_by_key.items()):
        if len(runs) != len(results["layers"]):
            continue
        keys = set.intersection(*[set(r["variants"]) for r in runs])
        tot = {k: sum(r["variants"][k]["median_us"] for r in runs) for k in keys}
        base = tot["base"]
        x = {k: tot[k] / base for k in sorted(keys) if k != "base"}
        best_apply = min((k for k in x if k.startswith("apply.") and k != "apply.gather"),
                         key=lambda k: x[k])
        best_layer = min((k for k in x if k.startswith("layer.")), key=lambda k: x[k])
        block.append({"T": T, "N": N, "base_us": base, "x_base": x, "best_apply": best_apply,
                      "best_layer": best_layer,
                      "best_layer_overhead": x[best_layer] - 1,
                      "best_apply_overhead": x[best_apply]})
    return {"block": block}


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e .[bench])")
        return None
    layers = list(results["layers"])
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 7.5), squeeze=False)
    for j, lname in enumerate(layers):
        runs = results["layers"][lname]["runs"]
        for row, (fix, fixval, var) in enumerate((("N", 4, "T"), ("T", 64, "N"))):
            ax = axes[row][j]
            sel = [r for r in runs if r[fix] == fixval]
            if not sel:
                continue
            keys = sorted({k for r in sel for k in r["variants"] if k != "base"})
            for k in keys:
                pts = [(r[var], r["variants"][k]["x_base"] - (1 if k.startswith("layer.") else 0))
                       for r in sel if k in r["variants"]]
                ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker="o",
                        ls="--" if k.startswith("layer.") else "-", label=k)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(var)
            ax.set_title(f"{lname}\n{fix}={fixval}", fontsize=9)
            if j == 0:
                ax.set_ylabel("delta overhead / base GEMM time")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 9), fontsize=8)
    fig.suptitle("CPU delta overhead over the base GEMM (apply.*: t/t_base; layer.*, dashed: "
                 "t/t_base - 1); target <= 1 at T=64, N=4")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    return path


def finalize(results):
    """Summary over the block, the issue's target point, per-slot memory of the model."""
    results["summary"] = summarize(results)
    tgt = [r for r in results["summary"]["block"] if r["T"] == 64 and r["N"] == 4]
    if tgt:  # issue #3: 4 active 16x deltas, T = 64, SmolLM2 shapes: overhead <= 1.0x base
        r = tgt[0]["x_base"]
        results["target_T64_N4"] = {
            "apply_dense_overhead": r.get("apply.dense"),
            "layer_merged_overhead": r["layer.merged"] - 1 if "layer.merged" in r else None,
            "target": 1.0}
    # per-slot memory of the whole model (30 decoder blocks, linear layers only)
    mem = {}
    for lname, L in results["layers"].items():
        for st, r in L["memory"].items():
            m = mem.setdefault(st, {"bytes_per_slot_model": 0, "compressed_bytes_model": 0})
            m["bytes_per_slot_model"] += N_LAYERS_SMOLLM2 * r["bytes_per_slot"]
            m["compressed_bytes_model"] += N_LAYERS_SMOLLM2 * r["compressed_bytes"]
    results["memory_model"] = mem
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="1,8,64,256")
    ap.add_argument("--N", default="1,2,4,8")
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated layer names")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--bits", type=int, default=None, help="force the code bits (default: the compressor's choice)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-variant-s", type=float, default=3.0, help="time budget per variant and config")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine an OpenMP team stalls "
                         "whenever one of its threads is descheduled; 0 = torch's default)")
    ap.add_argument("--clock", choices=("auto", "thread", "wall"), default="auto",
                    help="thread: CPU time of this thread (immune to preemption by other "
                         "processes; only meaningful with 1 thread); auto: thread if --threads 1")
    ap.add_argument("--flush-mb", type=int, default=64, help="cache flush buffer (0: hot caches)")
    ap.add_argument("--base-frac", type=float, default=0.0, help="share of base-only tokens")
    ap.add_argument("--no-gather", dest="gather", action="store_false")
    ap.add_argument("--gather-max-mb", type=float, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="T=64 only, N=1,4, 7 reps")
    ap.add_argument("--out", default="cpu.json")
    ap.add_argument("--replot", action="store_true", help="redo table and plot from the saved JSON")
    ap.add_argument("--markdown", action="store_true", help="print the saved JSON as markdown tables")
    args = ap.parse_args()
    if args.markdown:
        import json
        print(markdown(json.loads((RESULTS / args.out).read_text())))
        return 0
    if args.replot:
        import json
        results = finalize(json.loads((RESULTS / args.out).read_text()))
        results["table"] = print_tables(results)
        save_json(args.out, results)
        print(plot(results, RESULTS / Path(args.out).with_suffix(".png").name))
        return 0
    if args.quick:
        args.T, args.N, args.reps = "64", "1,4", 7
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "auto":
        args.clock = "thread" if torch.get_num_threads() == 1 else "wall"
    Ts = [int(t) for t in args.T.split(",")]
    Ns = [int(n) for n in args.N.split(",")]
    args.n_max = max(Ns)
    strategies = [s for s in args.strategies.split(",") if s]
    layer_names = [s for s in args.layers.split(",") if s]
    flush = Flusher(args.flush_mb)
    rng = random.Random(args.seed)
    env = environment()
    env["onednn"] = onednn_available()
    results = {"benchmark": "cpu delta path", "env": env, "args": vars(args), "layers": {}}
    cfg_cache = {}
    t_start = time.time()
    for li, lname in enumerate(layer_names):
        t0 = time.time()
        layer = make_layer(lname, args.n_max, args.ratio, args.seed + 101 * li, args.bits,
                           cfg_cache, strategies)
        print(f"[{lname}] built in {time.time() - t0:.0f}s: {layer['cfgs']}", flush=True)
        L = {"in": layer["in"], "sizes": layer["sizes"], "cfgs": layer["cfgs"],
             "memory": memory_table(layer), "runs": []}
        for T in Ts:
            for N in Ns:
                if N > T:
                    continue
                run = run_config(layer, T, N, args, flush, rng)
                L["runs"].append(run)
                v = run["variants"]
                print(f"  T={T:>3} N={N}: base {v['base']['median_us']:.1f}us  " +
                      "  ".join(f"{k}={v[k]['x_base']:.2f}x" for k in v if k != "base"), flush=True)
        results["layers"][lname] = L
        del layer
        gc.collect()
    results["wall_s"] = time.time() - t_start
    results["env"]["loadavg_end"] = environment().get("loadavg")
    finalize(results)
    text = print_tables(results)
    print("\n## Memory per slot, SmolLM2-135M decoder linears (30 blocks)")
    for st, m in mem.items():
        print(f"  {st:8s} {m['bytes_per_slot_model'] / 2**20:8.1f} MiB "
              f"(compressed {m['compressed_bytes_model'] / 2**20:.1f} MiB)")
    if "target_T64_N4" in results:
        t = results["target_T64_N4"]
        print(f"\n## Target (T=64, N=4, whole block): delta overhead / base GEMM time: "
              f"apply_deltas (dense) {t['apply_dense_overhead']:.2f}x, "
              f"linear_with_deltas (merged) {t['layer_merged_overhead']:.2f}x; target <= 1.0x")
    results["table"] = text
    path = save_json(args.out, results)
    png = plot(results, RESULTS / Path(args.out).with_suffix(".png").name)
    print(f"\nsaved {path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
