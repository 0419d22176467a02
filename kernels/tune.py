"""Offline tuning of the Triton delta kernels: writes the config table the launcher reads.

    python -m deltadq_vllm.kernels.tune --out FILE [--preset 7b,8b,70b] [--model-dir DIR ...]
        [--ratios 16,32,64,128] [--tokens 1,2,4,8,16,32,64,128,256,512] [--budget-s S]
        [--merge-into FILE] [--variants v3,v0] [--deltas N] [--reps R]
    deltadq tune-kernels ...        (the same flags)

For every layer shape of the presets / model folders (deduplicated by the table's key,
in_features x largest slice), every ratio (the compressor's own g, k, bits for it,
synthetic.pick_config) and every token count t per delta (--deltas distinct deltas, t
tokens each), each candidate config (tuning.candidates) is

1. run once on a batch whose y is a window of a NaN-poisoned buffer, with one extra
   base-only token, and checked against a float64 reference of sampled rows (rows decoded
   with layouts.decode) within the derived rounding bound; base-only rows bit-exact. A
   failing or crashing config is rejected, never timed;
2. timed: one CUDA graph of L launches, each on a different window of a slot bank larger
   than 3x the L2 and different x / y buffers (so L2 does not serve the deltas), replayed
   --reps times between CUDA events; the median per launch.

Per bucket key the config with the best geometric mean of (time / best time) over the
ratios is kept. Work runs smallest token counts first (the decode path, T <= 16, first),
then the ratios in the order given; when --budget-s runs out it stops between candidates
and writes what it has. The table is written atomically after every finished bucket
(temp file + rename) with the GPU name, compute capability, torch / Triton / CUDA versions
and every measured time. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import tuning
from .synthetic import PRESETS, model_shapes, pick_config, random_encoding

POW2_BITS = (1, 2, 4, 8, 16)
U_BF16 = 2.0 ** -8
FP32_U = 2.0 ** -24


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m deltadq_vllm.kernels.tune",
                                 description=__doc__.split("\n\n")[0],
                                 epilog="example:\n  deltadq tune-kernels --out h100.json "
                                        "--preset 7b,8b --budget-s 1800",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="table to write (JSON)")
    ap.add_argument("--preset", default=None, help="comma-separated: " + ",".join(PRESETS)
                    + " (default 7b,8b unless --model-dir is given)")
    ap.add_argument("--model-dir", action="append", default=[],
                    help="HF model folder whose config.json gives the layer shapes (repeatable)")
    ap.add_argument("--ratios", default="16,32,64,128",
                    help="compression ratios to tune for, comma-separated (default 16,32,64,128)")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512",
                    help="tokens per delta to tune (power-of-two buckets)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new work after this many seconds and write the table")
    ap.add_argument("--merge-into", default=None,
                    help="also merge the new entries into this table (created if missing)")
    ap.add_argument("--variants", default=None,
                    help="kernel variants to time, e.g. v3,v0,v4 (default: tuning.TUNE_VARIANTS: "
                         "decode v3 and v0, prefill v0)")
    ap.add_argument("--deltas", type=int, default=4, help="distinct deltas per launch")
    ap.add_argument("--reps", type=int, default=15, help="graph replays per timing (median)")
    ap.add_argument("--windows", type=int, default=12, help="launches per graph")
    ap.add_argument("--l2-factor", type=float, default=3.0, help="slot bank >= this x L2")
    ap.add_argument("--decode-max-t", type=int, default=32, help="largest t tuned on decode")
    ap.add_argument("--prefill-min-t", type=int, default=16, help="smallest t tuned on prefill")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="activation dtype of the timed launches (default bfloat16)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random deltas (default 0)")
    ap.add_argument("--no-progress", action="store_true",
                    help="no per-bank progress lines (the summary is still printed)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on a CPU with TRITON_INTERPRET=1: checks the whole flow "
                         "(verification, selection, table writing); its times mean nothing")
    return ap


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def layer_shapes(args) -> list[tuple[str, int, list[int]]]:
    """(label, in_features, slices) per distinct (in_features, largest slice); the layer
    with most output rows represents a key (qkv over o)."""
    presets = args.preset.split(",") if args.preset else ([] if args.model_dir else ["7b", "8b"])
    found = []
    if args.smoke:
        presets, found = [], [("smoke.qkv", 64, [40, 24, 24]), ("smoke.down", 96, [32])]
    for p in presets:
        if p not in PRESETS:
            raise SystemExit(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}")
        found += [(f"{p}.{n}", i, s) for n, i, s in PRESETS[p]]
    for d in args.model_dir:
        found += [(f"{Path(d).name}.{n}", i, s) for n, i, s in model_shapes(d)]
    best: dict[tuple, tuple] = {}
    for label, inp, sizes in found:
        key = (inp, max(sizes))
        if key not in best or sum(sizes) > sum(best[key][2]):
            best[key] = (label, inp, sizes)
    return list(best.values())


# ---------------------------------------------------------------- slot banks and batches


class Bank:
    """n_bank slots of one shape at one ratio (n_distinct encodings repeated)."""

    def __init__(self, dev, label, inp, sizes, ratio, args, l2: int):
        from .slots import DeltaSlots
        t0 = time.monotonic()
        self.cfg = pick_config(inp, float(ratio), args.seed)
        gen = torch.Generator().manual_seed(args.seed * 31 + inp)
        self.n_distinct = args.deltas
        self.encs = [[random_encoding(s, inp, self.cfg, gen, seed=1000 * d + i)
                      for i, s in enumerate(sizes)] for d in range(self.n_distinct)]
        self.per_delta = sum(e.nbytes() for e in self.encs[0])
        self.true_ratio = sum(sizes) * inp * 2 / self.per_delta
        n_bank = max(self.n_distinct * 2, math.ceil(args.l2_factor * l2 / self.per_delta))
        self.n_bank = min(n_bank, 512)
        self.slots = DeltaSlots(self.n_bank, inp, sizes, device=dev, cpu_strategy=None,
                                min_ratio=min(float(ratio), self.true_ratio) * 0.999)
        for s in range(self.n_bank):
            self.slots.load(s, self.encs[s % self.n_distinct])
        self.label, self.inp, self.sizes, self.ratio = label, inp, sizes, ratio
        self.kp = tuning.kp_for(self.cfg["keep"])
        self.straddle = self.cfg["bits"] not in POW2_BITS
        self.n_groups = inp // self.cfg["group_size"]
        self.build_s = time.monotonic() - t0


def reference_rows(bank: Bank, x, ids, y0, rows_per_block: int = 8):
    """float64 reference (and the |x| @ magnitude sums of the bound) at sampled rows."""
    from deltadq_vllm.format.layouts import (decode, hash_groupwise_columns, hash_groupwise_values,
                                      slice_hash_groupwise)
    out, off = [], 0
    xd = x.double()
    for i, size in enumerate(bank.sizes):
        mid = size // 2
        for a, b in {(0, min(size, rows_per_block)), (max(0, mid - rows_per_block // 2),
                     min(size, mid + rows_per_block // 2)), (max(0, size - rows_per_block), size)}:
            ref = y0[:, off + a:off + b].double().clone()
            A = torch.zeros_like(ref)
            for s in sorted(set(ids.tolist()) - {-1}):
                enc = slice_hash_groupwise(bank.encs[s % bank.n_distinct][i], rows=(a, b))
                d = decode(enc).double()
                p = enc.params
                blk = (p.get("scale_row_offset", 0) + torch.arange(b - a)) // p["rows_per_scale"]
                mrow = enc.tensors["minv"].double()[blk].unsqueeze(1)
                mag = torch.zeros(b - a, bank.inp, dtype=torch.float64)
                mag.scatter_(1, hash_groupwise_columns(enc),
                             mrow.abs() + (hash_groupwise_values(enc).double() - mrow).abs())
                rows = (ids == s).nonzero().squeeze(1)
                ref[rows] += xd[rows] @ d.T
                A[rows] = xd[rows].abs() @ mag.T
            out.append((off + a, off + b, ref, A))
        off += size
    return out


def check_output(got, y0, ids, refs, path: str, inp: int) -> float:
    """Max err/bound over the sampled rows; raises AssertionError on any violation."""
    assert not torch.isnan(got).any(), "NaN in y: unwritten element or poisoned read"
    base = ids < 0
    assert torch.equal(got[base], y0[base]), "base-only tokens modified"
    c_w = 1 if path == "prefill" else 0
    u = U_BF16 / (1 - U_BF16)
    worst = 0.0
    for a, b, ref, A in refs:
        g = got[:, a:b].double()
        bound = u * (g.abs() + ref.abs()) + (c_w * u + 2 * (inp + 2) * FP32_U) * A
        r = ((g - ref).abs() / bound.clamp_min(1e-300)).max().item()
        assert r <= 1.0, f"rows [{a}, {b}): max err/bound {r:.3g}"
        worst = max(worst, r)
    return worst


class Unit:
    """One (bank, t) workload: launch windows, buffers, the verification batch."""

    def __init__(self, bank: Bank, t: int, dev, dtype, args, gen):
        from .metadata import build_meta
        N = min(args.deltas, bank.n_bank)
        self.bank, self.t, self.N, self.T = bank, t, N, N * t
        n_win = max(1, min(args.windows, bank.n_bank // N))
        self.metas = []
        for w in range(n_win):
            ids = torch.tensor([w * N + (j % N) for j in range(self.T)], dtype=torch.int32)
            ids = ids[torch.randperm(self.T, generator=gen)]
            self.metas.append(build_meta(ids, bank.n_bank, device=dev))
        out_total = sum(bank.sizes)
        self.xs = [torch.randn(self.T, bank.inp, generator=gen).to(dev, dtype) for _ in range(4)]
        self.ys = [torch.randn(self.T, out_total, generator=gen).to(dev, dtype) for _ in range(4)]
        # verification: window 0's tokens plus one base-only token, y inside NaN poison
        ids = torch.cat([torch.tensor([j % N for j in range(self.T)], dtype=torch.int32),
                         torch.tensor([-1], dtype=torch.int32)])
        self.v_ids = ids[torch.randperm(self.T + 1, generator=gen)]
        self.v_x = torch.randn(self.T + 1, bank.inp, generator=gen).to(dtype)
        self.v_y0 = torch.randn(self.T + 1, out_total, generator=gen).to(dtype)
        self.v_meta = build_meta(self.v_ids, bank.n_bank, device=dev)
        self.refs = reference_rows(bank, self.v_x, self.v_ids, self.v_y0)
        self.dev, self.dtype = dev, dtype

    def verify(self, cfg: "tuning.KernelConfig") -> float:
        from .triton_delta import triton_apply_deltas
        b = self.bank
        out_total = sum(b.sizes)
        big = torch.full((self.T + 1, out_total + 8), float("nan"), dtype=self.dtype, device=self.dev)
        big[:, 4:4 + out_total] = self.v_y0.to(self.dev)
        y = big[:, 4:4 + out_total]
        m = self.v_meta
        triton_apply_deltas(y, self.v_x.to(self.dev), *m.tensors(), b.slots, path=cfg.path,
                            num_entries=m.num_active, max_seg_len=m.max_seg_len, config=cfg)
        got = big.cpu()
        assert torch.isnan(got[:, :4]).all() and torch.isnan(got[:, -4:]).all(), "wrote outside y"
        return check_output(got[:, 4:4 + out_total], self.v_y0, self.v_ids, self.refs, cfg.path,
                            b.inp)

    def time(self, cfg: "tuning.KernelConfig", reps: int) -> float:
        """Median microseconds per launch (CUDA graph of one launch per window)."""
        from .triton_delta import triton_apply_deltas
        b = self.bank

        def run_all():
            for j, m in enumerate(self.metas):
                triton_apply_deltas(self.ys[j % 4], self.xs[j % 4], *m.tensors(), b.slots,
                                    path=cfg.path, num_entries=m.num_active,
                                    max_seg_len=m.max_seg_len, config=cfg)
        if self.dev.type != "cuda":  # --smoke on a CPU (interpreter): host clock, 1 rep
            t0 = time.perf_counter()
            run_all()
            return (time.perf_counter() - t0) * 1e6 / len(self.metas)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run_all()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_all()
        graph.replay()
        ts = []
        for _ in range(reps):
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            st.record()
            graph.replay()
            en.record()
            en.synchronize()
            ts.append(st.elapsed_time(en) * 1e3 / len(self.metas))
        del graph
        ts.sort()
        return ts[len(ts) // 2]


# ---------------------------------------------------------------- the table


def write_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def select(entry: dict) -> dict | None:
    """The candidate with the best geometric mean of time / best time over the ratios whose
    unit finished (every candidate tried), among candidates timed at all of them."""
    ratios = set(entry.get("complete_ratios", []))
    if not ratios:
        return None
    full = [c for c in entry["candidates"] if ratios <= set(c["us"])]
    if not full:
        return None
    best_at = {r: min(c["us"][r] for c in full) for r in ratios}
    score = lambda c: sum(math.log(c["us"][r] / best_at[r]) for r in ratios)  # noqa: E731
    return min(full, key=score)


def table_header(args, dev) -> dict:
    import triton
    if dev.type == "cuda":
        name, cap = torch.cuda.get_device_name(dev), torch.cuda.get_device_capability(dev)
    else:
        name, cap = "cpu-interpreter", (0, 0)
    return {"version": tuning.TABLE_VERSION, "gpu": name, "capability": list(cap),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv), "entries": {}}


def finalize(table: dict) -> dict:
    for entry in table["entries"].values():
        best = select(entry)
        if best is not None:
            entry["config"] = best["config"]
            entry["best_us"] = best["us"]
    return table


def merge_into(path: Path, table: dict) -> None:
    path = Path(path)
    if path.exists():
        old = tuning.read_table(path)
        if old["gpu"] != table["gpu"]:
            raise SystemExit(f"--merge-into {path}: table of {old['gpu']!r}, this GPU is "
                             f"{table['gpu']!r}; write a separate file per GPU")
        old["entries"].update({k: v for k, v in table["entries"].items() if "config" in v})
        old.update({k: table[k] for k in ("torch", "triton", "cuda", "created", "command")})
        table = old
    write_atomic(path, table)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .triton_delta import HAS_TRITON, interpreting
    if not HAS_TRITON:
        print("tune: triton is not installed", file=sys.stderr)
        return 2
    if args.smoke:
        if not interpreting():
            print("tune --smoke: set TRITON_INTERPRET=1 before python starts", file=sys.stderr)
            return 2
        dev, l2 = torch.device("cpu"), 4096
        args.deltas, args.windows, args.reps = min(args.deltas, 2), 2, 1
    elif not torch.cuda.is_available():
        print("tune: needs a CUDA GPU (the table is per GPU model); --smoke checks the flow "
              "on a CPU", file=sys.stderr)
        return 2
    else:
        dev = torch.device("cuda", torch.cuda.current_device())
        l2 = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 50 * 2**20)
    t_start = time.monotonic()
    budget = args.budget_s if args.budget_s is not None else float("inf")
    dtype = getattr(torch, args.dtype)
    variants = tuple(args.variants.split(",")) if args.variants else None
    shapes = layer_shapes(args)
    ratios, tokens = _ints(args.ratios), sorted(set(tuning.t_bucket(t) for t in _ints(args.tokens)))
    table = table_header(args, dev)
    table["budget_s"] = args.budget_s
    out = Path(args.out)
    # work list: (t, ratio, shape, path) with the smallest t first, then ratios as given
    work = []
    for t in tokens:
        for ri, r in enumerate(ratios):
            for si, sh in enumerate(shapes):
                for path in ("decode", "prefill"):
                    if (path == "decode" and t <= args.decode_max_t) or \
                            (path == "prefill" and t >= args.prefill_min_t):
                        work.append((t, ri, si, path))
    print(f"tune: {table['gpu']} sm_{table['capability'][0]}{table['capability'][1]}, "
          f"{len(shapes)} shapes x {len(ratios)} ratios x {len(tokens)} token buckets = "
          f"{len(work)} units, budget {budget:g} s", flush=True)
    banks: dict[tuple, Bank] = {}
    gen = torch.Generator().manual_seed(args.seed)
    stopped = False
    n_done = 0
    for t, ri, si, path in work:
        if time.monotonic() - t_start > budget:
            stopped = True
            break
        label, inp, sizes = shapes[si]
        r = ratios[ri]
        if (si, r) not in banks:
            banks[(si, r)] = Bank(dev, label, inp, sizes, r, args, l2)
            b = banks[(si, r)]
            if not args.no_progress:
                print(f"[{time.monotonic() - t_start:6.1f}s] bank {label} @{r}x: {b.cfg}, "
                      f"{b.per_delta / 2**20:.2f} MiB/delta, {b.n_bank} slots, "
                      f"{b.build_s:.1f}s", flush=True)
        bank = banks[(si, r)]
        unit = Unit(bank, t, dev, dtype, args, gen)
        key = tuning.bucket_key(path, inp, max(sizes), t, bank.kp, bank.straddle,
                                tuning.dtype_name(dtype))
        entry = table["entries"].setdefault(key, {"shape": label, "deltas": unit.N,
                                                  "candidates": [], "rejected": [], "ratios": {}})
        entry["ratios"][str(r)] = {**bank.cfg, "true_ratio": round(bank.true_ratio, 2),
                                   "bytes_per_launch": unit.N * bank.per_delta}
        for cfg in tuning.candidates(path, t, bank.kp, bank.n_groups, variants):
            if time.monotonic() - t_start > budget:
                stopped = True
                break
            cj = cfg.to_json()
            rec = next((c for c in entry["candidates"] if c["config"] == cj), None)
            if any(rj["config"] == cj for rj in entry["rejected"]):
                continue
            t0 = time.monotonic()
            try:
                worst = unit.verify(cfg)
                us = unit.time(cfg, args.reps)
            except Exception as e:  # wrong or unlaunchable config: rejected, never used
                entry["rejected"].append({"config": cj, "ratio": r, "reason": f"{type(e).__name__}: {e}"[:300]})
                if rec is not None:
                    entry["candidates"].remove(rec)
                print(f"    REJECTED {cj}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            if rec is None:
                rec = {"config": cj, "us": {}, "err_over_bound": {}}
                entry["candidates"].append(rec)
            rec["us"][str(r)] = round(us, 3)
            rec["err_over_bound"][str(r)] = round(worst, 4)
            print(f"[{time.monotonic() - t_start:6.1f}s] {key} @{r}x {label}: {cj} "
                  f"{us:8.2f} us (err/bound {worst:.2f}, {time.monotonic() - t0:.1f}s)", flush=True)
        if stopped:
            break
        entry.setdefault("complete_ratios", []).append(str(r))
        n_done += 1
        finalize(table)
        table["complete"] = False
        table["elapsed_s"] = round(time.monotonic() - t_start, 1)
        write_atomic(out, table)
        del unit
    finalize(table)
    table["entries"] = {k: v for k, v in table["entries"].items() if v["candidates"]}
    table["complete"] = not stopped
    table["units_done"], table["units_total"] = n_done, len(work)
    table["elapsed_s"] = round(time.monotonic() - t_start, 1)
    write_atomic(out, table)
    if args.merge_into:
        merge_into(Path(args.merge_into), table)
    n_cfg = sum(1 for e in table["entries"].values() if "config" in e)
    print(f"tune: {'stopped by the budget' if stopped else 'done'} after {table['elapsed_s']} s: "
          f"{n_done}/{len(work)} units, {n_cfg} bucket configs -> {out}"
          + (f" (merged into {args.merge_into})" if args.merge_into else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
