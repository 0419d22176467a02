"""Offline SASS report of the Triton delta kernels for a GPU target, without a GPU.

    PYTHONPATH=/work/triton36 python benchmarks/kernels/sass_report.py [--arch 90] [--json OUT]

Compiles every kernel variant (tuning.VARIANTS) at the configs the launcher can
pick (tuning.candidates + heuristics) with triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32)) -- the Triton of PYTHONPATH (3.6 on the GPU machine:
`pip install --target /work/triton36 triton==3.6.0 --no-deps`), whose wheel ships ptxas
and nvdisasm -- then reports per config: registers and spill bytes (ptxas -v), the
instruction count of every innermost loop of the SASS (backward branches), and for the
hot loop the thread-instructions per kept element (decode: loop instructions x warps x 32 /
(BLOCK_N x KP) per token tile; prefill: per dense element of the [BLOCK_N, BLOCK_K] tile).
Also the compile time of each kernel (what a config costs the tuner on a GPU machine).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from deltadq_vllm.kernels import tuning
from deltadq_vllm.kernels.triton_decode import DECODE_KERNELS
from deltadq_vllm.kernels.triton_prefill import PREFILL_KERNELS

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
PTR_ARGS = ["y_ptr", "x_ptr", "words_ptr", "halves_ptr", "meta_ptr", "order_ptr",
            "seg_slot_ptr", "seg_start_ptr", "seg_len_ptr"]
INT_ARGS = ["stride_ym", "stride_xm", "IN", "N_SLICES", "MAX_ROWS"]


def signature(fn, dtype: str):
    ty = {"y_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "words_ptr": "*i32", "halves_ptr": "*bf16",
          "meta_ptr": "*i32", "order_ptr": "*i32", "seg_slot_ptr": "*i32",
          "seg_start_ptr": "*i32", "seg_len_ptr": "*i32"}
    sig = {}
    for name in fn.arg_names:
        sig[name] = ty.get(name, "i32" if name in INT_ARGS else "constexpr")
    # pointers and strides 16-divisible, as torch allocations and hidden sizes give
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in PTR_ARGS + ["stride_ym", "stride_xm", "IN"]}
    return sig, attrs


def compile_one(path, cfg: tuning.KernelConfig, kp, straddle, dtype, arch):
    fn = (DECODE_KERNELS if path == "decode" else PREFILL_KERNELS)[cfg.variant]
    sig, attrs = signature(fn, dtype)
    const = {"META_F": 20, "STRADDLE": straddle, **dict(cfg.blocks)}
    if path == "decode":
        const["KP"] = kp
    else:
        const["DOT_PREC"] = "tf32"
        const["DOT_F32"] = False
        const["SPLIT_W"] = True
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return k, time.perf_counter() - t0


def ptxas_stats(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        r = subprocess.run([str(BIN / "ptxas"), "-v", f"--gpu-name={gpu}", str(p), "-o",
                            str(Path(d) / "k.o")], capture_output=True, text=True)
        log = r.stderr
    regs = re.search(r"Used (\d+) registers", log)
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_B": int(st.group(1)) if st else None,
            "spill_load_B": int(st.group(2)) if st else None,
            "stack_B": int(stack.group(1)) if stack else None}


def sass_loops(cubin: bytes) -> list[dict]:
    """Innermost loops of the SASS: [{"n": instructions, "ops": Counter}]."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.cubin"
        p.write_bytes(cubin)
        text = subprocess.run([str(BIN / "nvdisasm"), "-c", str(p)], capture_output=True,
                              text=True, check=True).stdout
    ins, labels = [], {}
    for line in text.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            body = m.group(2).strip()
            op = re.sub(r"^@!?U?P\w+\s+", "", body).split()[0]
            tgt = re.search(r"`\((\.L_x_\d+)\)", body)
            ins.append((op, tgt.group(1) if tgt else None))
    loops = []
    for i, (op, tgt) in enumerate(ins):
        if op.startswith("BRA") and tgt in labels and labels[tgt] <= i:
            loops.append((labels[tgt], i))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b)
                                                 for c, d in loops)]
    out = []
    for a, b in inner:
        ops = collections.Counter(op.split(".")[0] for op, _ in ins[a:b + 1])
        out.append({"start": a, "n": b - a + 1, "ops": dict(ops.most_common())})
    return sorted(out, key=lambda l: -l["n"]), len(ins)


def per_element(path, cfg, kp, loop_n):
    b = dict(cfg.blocks)
    if path == "decode":
        return loop_n * cfg.num_warps * 32 / (b["BLOCK_N"] * kp)
    return loop_n * cfg.num_warps * 32 / (b["BLOCK_N"] * b["BLOCK_K"])


def configs():
    """(path, config, kp, straddle): every tuner candidate and heuristic, both variants."""
    seen, out = set(), []
    for path in ("decode", "prefill"):
        for tb in (1, 2, 4, 8, 16, 32, 64, 128, 512):
            if (path == "decode" and tb > 32) or (path == "prefill" and tb < 16):
                continue
            cands = tuning.candidates(path, tb, 32, 8, tuning.VARIANTS[path]) + \
                [tuning.heuristic(path, tb, 32, v) for v in tuning.VARIANTS[path]]
            for c in cands:
                key = (path, c.variant, c.blocks, c.num_warps, c.num_stages)
                if key not in seen:
                    seen.add(key)
                    out.append((path, c, 32 if path == "decode" else 0, False))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--only", default=None, help="path:variant filter, e.g. decode:v3")
    ap.add_argument("--straddle", action="store_true", help="STRADDLE=True (3/5/7-bit codes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, STRADDLE={args.straddle}")
    print(f"{'path':8} {'var':3} {'M':>3} {'N':>3} {'G/K':>3} {'w':>2} {'st':>2} {'regs':>4} "
          f"{'spill':>9} {'loop':>5} {'/elem':>6} {'compile':>7}  hot-loop ops")
    for path, cfg, kp, _ in configs():
        if args.only and f"{path}:{cfg.variant}" != args.only:
            continue
        k, dt = compile_one(path, cfg, kp, args.straddle, args.dtype, args.arch)
        st = ptxas_stats(k.asm["ptx"], args.arch)
        loops, n_total = sass_loops(k.asm["cubin"])
        hot = loops[0] if loops else {"n": 0, "ops": {}}
        b = dict(cfg.blocks)
        pe = per_element(path, cfg, kp, hot["n"])
        rows.append({"path": path, **cfg.to_json(), "KP": kp, "STRADDLE": args.straddle, **st,
                     "sass_total": n_total, "loops": loops, "hot_loop": hot["n"],
                     "thread_instr_per_elem": pe, "compile_s": dt, "triton": triton.__version__,
                     "arch": args.arch})
        top = " ".join(f"{o}:{n}" for o, n in list(hot["ops"].items())[:8])
        print(f"{path:8} {cfg.variant:3} {b['BLOCK_M']:>3} {b['BLOCK_N']:>3} "
              f"{b.get('BLOCK_G', b.get('BLOCK_K')):>3} {cfg.num_warps:>2} {cfg.num_stages:>2} "
              f"{st['registers']:>4} {st['spill_store_B']:>4}/{st['spill_load_B']:<4} "
              f"{hot['n']:>5} {pe:>6.2f} {dt:>6.1f}s  {top}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
