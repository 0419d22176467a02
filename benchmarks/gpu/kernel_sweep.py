"""Correctness of the Triton delta kernels on a CUDA GPU: random configurations vs the reference.

    python benchmarks/gpu/kernel_sweep.py --budget-s 90            # on a GPU
    TRITON_INTERPRET=1 python benchmarks/gpu/kernel_sweep.py --smoke   # on a CPU (tiny)

Each case draws a fresh random layer (1-3 fused output slices of odd sizes, in_features up to
1024), 1-6 slots with random group size / keep / bits (1-8 and 16: codes straddling 32-bit
words included) / scale blocks, empty slots, slots missing a slice, tensor-parallel shards,
and a batch of T tokens (1 .. 300) mixing slots and base-only tokens; it runs the decode path,
the prefill path and the launcher's own choice (config table, no autotuning) in bf16, fp16 or
fp32 on a NaN-poisoned output window, and checks every element against the float64
reference within the derived rounding bound (tests/kernel_checks.py): no NaN read or left,
nothing written outside y, base-only tokens and empty slots bit-exact.

Cases run until --budget-s is spent (compilation dominates: every new specialisation is a
Triton compile); the JSON lists every case with its worst err/bound.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from kernel_checks import divisors, make_slots, poisoned_y, verify  # noqa: E402

from deltadq_vllm.kernels import apply_deltas, build_meta  # noqa: E402
from deltadq_vllm.kernels import triton_delta  # noqa: E402

DTYPES = [torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]


def draw_case(rng: random.Random, smoke: bool) -> dict:
    inp = rng.choice([24, 40, 72] if smoke else [64, 96, 128, 200, 256, 512, 1000, 1024])
    n_slices = rng.randint(1, 3)
    sizes = [rng.randint(1, 40 if smoke else 300) for _ in range(n_slices)]
    S = rng.randint(1, 3 if smoke else 6)
    T = rng.choice([1, 2, 5, 9] if smoke else [1, 2, 3, 7, 16, 17, 33, 64, 100, 300])
    gs = [d for d in divisors(inp) if d > 1]
    g = rng.choice(gs)
    k = rng.randint(1, min(g, rng.choice([2, 4, 8, 16, 64, g])))
    return {"inp": inp, "sizes": sizes, "S": S, "T": T, "g": g, "k": k,
            "bits": rng.choice([1, 2, 3, 4, 4, 5, 8, 16]),
            "dtype": str(rng.choice(DTYPES)).replace("torch.", ""),
            "tp": rng.random() < 0.25, "empty": rng.random() < 0.3 and S > 1,
            "partial": rng.random() < 0.3 and S > 1, "seed": rng.getrandbits(31)}


def run_case(case: dict, device: torch.device) -> dict:
    rng = random.Random(case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    S, T, inp, sizes = case["S"], case["T"], case["inp"], case["sizes"]
    empty = (S - 1,) if case["empty"] else ()
    partial = (0,) if case["partial"] else ()
    # every slot its own g / k / bits in half of the cases, the drawn one otherwise
    enc_kw = {} if rng.random() < 0.5 else {"g": case["g"], "k": case["k"], "bits": case["bits"]}
    slots, encs = make_slots(rng, S, inp, sizes, empty=empty, partial=partial, tp=case["tp"],
                             device=device, **enc_kw)
    ids = torch.tensor([rng.randint(-1, S - 1) for _ in range(T)], dtype=torch.int32)
    if (ids >= 0).sum() == 0:
        ids[0] = 0
    x = torch.randn(T, inp, generator=gen).to(dtype)
    out = {"worst": {}}
    variant = rng.choice(["v3", "v4", "v4"])  # the decode path's variant in this case
    out["variant"] = variant
    for how in ("decode", "prefill", "auto", "graph_safe"):
        big, y = poisoned_y(T, sum(sizes), dtype, gen, device=device)
        y0 = y.clone()
        xd = x.to(device)
        meta = build_meta(ids, S, device=device)
        if how in ("decode", "prefill"):
            triton_delta.triton_apply_deltas(y, xd, *meta.tensors(), slots, path=how,
                                             num_entries=meta.num_active,
                                             max_seg_len=meta.max_seg_len,
                                             variant=variant if how == "decode" else None)
            path = how
        else:  # the serving entry point: launcher's own path and config (table, no tuning)
            apply_deltas(y, xd, meta, slots, backend="triton", graph_safe=(how == "graph_safe"))
            path = "decode" if T <= triton_delta.DECODE_MAX_TOKENS else "prefill"
        if device.type == "cuda":
            torch.cuda.synchronize()
        out["worst"][how] = verify(path, y, y0, x, ids, encs, sizes, dtype, big,
                                   what=f"{how} {case}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=90.0)
    ap.add_argument("--max-cases", type=int, default=400)
    ap.add_argument("--seed", type=int, default=None, help="default: fresh random")
    ap.add_argument("--smoke", action="store_true", help="tiny cases (CPU, TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not triton_delta.interpreting():
        print("no CUDA device: run with TRITON_INTERPRET=1 --smoke on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(31)
    rng = random.Random(seed)
    t0 = time.time()
    cases, failures = [], []
    while time.time() - t0 < args.budget_s and len(cases) < args.max_cases:
        case = draw_case(rng, args.smoke)
        t1 = time.time()
        try:
            res = run_case(case, device)
            case.update(ok=True, **res)
        except Exception as e:  # noqa: BLE001 - record and go on: one report lists all failures
            case.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000],
                        trace=traceback.format_exc()[-3000:])
            failures.append(case)
            if cuda and "CUDA" in str(e):  # the context may be unusable after a device fault
                cases.append(case)
                break
        case["seconds"] = round(time.time() - t1, 3)
        cases.append(case)
        print(f"case {len(cases):3d} {'ok ' if case['ok'] else 'FAIL'} T={case['T']:>3} "
              f"in={case['inp']:>4} sizes={case['sizes']} S={case['S']} {case['dtype']:>8} "
              f"worst err/bound {max(case.get('worst', {}).values(), default=float('nan')):.3f} "
              f"({case['seconds']:.1f}s)", flush=True)
    summary = {"seed": seed, "cases": len(cases), "failed": len(failures),
               "seconds": round(time.time() - t0, 1), "device": str(device),
               "gpu": torch.cuda.get_device_name(0) if cuda else None,
               "worst_err_over_bound": max((max(c["worst"].values()) for c in cases if c["ok"]),
                                           default=None)}
    print("kernel sweep:", json.dumps(summary))
    for f in failures[:5]:
        print("FAILED:", f["error"][:500], "\n", f.get("trace", "")[-1500:])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps({"summary": summary, "cases": cases}, indent=1, default=str))
        tmp.replace(args.out)
    return 0 if not failures and cases else 1


if __name__ == "__main__":
    sys.exit(main())
