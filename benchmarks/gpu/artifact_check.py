"""Real compressed fine-tunes through the GPU kernels, against `deltadq merge`'s checkpoint.

    # here (CPU, the bench cache): merge each artifact, keep a row sample of some matrices
    python benchmarks/gpu/artifact_check.py --prepare --data .gpucarry \
        --base BASE_DIR --artifact TAG=DELTA_DIR ...
    # on the GPU (carry .gpucarry):
    python benchmarks/gpu/artifact_check.py --data .gpucarry [--out results.json]

graph_check.py and kernel_sweep.py feed the kernels random deltas. This check feeds them
what `deltadq compress` writes for real SmolLM2 fine-tunes: the width mix's bit widths,
calibrated values, scale blocks, DARE's Bernoulli layout (converted for the kernels) and a
rank-r tied embedding / LM head, several fine-tunes in the slots of one layer and a mixed
batch (tokens of every fine-tune and base-only tokens). Per layer group (fused qkv, o,
fused gate_up, down; the tied head; the embedding lookup), with the serving op
(`apply_deltas`, the kernels' own configs) after the backend's warmup:

1. against the decoder (what the slots hold, the kernels' derived error bound of
   tests/kernel_checks.py; float32 and bf16, decode and prefill token counts);
2. against the user's truth, `deltadq merge`'s bf16 checkpoint (float32 activations):
   y - y0 vs x (W_merged - W_base)^T on a row sample, within

       u_bf16 * sum_{j in K} |x_j| |W_merged[o, j]|     merge's one rounding of W + D
     + sum_j |x_j| step_o / 2                           the 16-bit conversion (DARE, ...)
     + 2 (n + 2) 2^-24 * sum_j |x_j| (|W_merged| + |W_base|)   float32 arithmetic

   where K = the positions the delta changes (decoded non-zero, or merged != base). The
   reference values come from the merged checkpoint alone; the artifact only says where
   merge rounded.

Prints a table and PASS/FAIL; --out writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

LAYERS = (0, 29)
ROWS = 128           # output rows sampled per matrix (every row is computed; these compared)
EMBED_ROWS = 256     # token rows of the tied embedding / head
GROUPS = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
          "o": ["self_attn.o_proj"], "gate_up": ["mlp.gate_proj", "mlp.up_proj"],
          "down": ["mlp.down_proj"]}
EMBED = "model.embed_tokens.weight"
U_BF16 = 2.0 ** -8
FP32_U = 2.0 ** -24


def matrix_names() -> list[str]:
    return [f"model.layers.{L}.{m}.weight" for L in LAYERS for ms in GROUPS.values() for m in ms]


# ------------------------------------------------------------------ prepare (CPU, here)

def prepare(args) -> None:
    from safetensors.torch import save_file
    from deltadq_vllm.checkpoint import Checkpoint

    data = Path(args.data)
    (data / "art").mkdir(parents=True, exist_ok=True)
    base = Checkpoint(args.base)
    rng = random.Random(0)
    rows, base_rows = {}, {}
    for name in matrix_names() + [EMBED]:
        w = base.get(name)
        n = EMBED_ROWS if name == EMBED else ROWS
        idx = torch.tensor(sorted(rng.sample(range(w.shape[0]), n)))
        rows[name] = idx
        base_rows[name] = w[idx].contiguous()
    save_file({**{f"rows:{k}": v for k, v in rows.items()}, **base_rows},
              str(data / "base_rows.safetensors"))
    tags = []
    for spec in args.artifact:
        tag, path = spec.split("=", 1)
        shutil.copytree(path, data / "art" / tag)
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            out = Path(tmp) / "merged"
            subprocess.run([sys.executable, "-m", "deltadq_vllm.cli", "merge", "--base", args.base,
                            "--delta", path, "--out", str(out), "--no-progress"], check=True)
            merged = Checkpoint(out)
            save_file({k: merged.get(k)[rows[k]].contiguous() for k in rows},
                      str(data / f"merged_{tag}.safetensors"))
        tags.append(tag)
        print(f"prepared {tag}")
    (data / "manifest.json").write_text(json.dumps({"artifacts": tags, "layers": LAYERS}))


# ------------------------------------------------------------------ the check (GPU)

TOKENS = (1, 5, 16, 64, 300)    # decode (<= 32 tokens) and prefill; bucket edges included


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def merge_bound(xr, m, b, changed, step_half):
    """Per (token, sampled row) bound of |kernel delta - x (m - b)^T| (module docstring)."""
    xa = xr.double().abs()
    bound = U_BF16 * xa @ (m.double().abs() * changed).T
    bound += 2 * (xr.shape[1] + 2) * FP32_U * xa @ (m.double().abs() + b.double().abs()).T
    if step_half is not None:
        bound += xa.sum(1, keepdim=True) * step_half[None, :]
    return bound


def check_group(art, tags, names, sizes, inp, lowrank, dev, base_rows, merged, gen, rows_out):
    from deltadq_vllm.format.layouts import decode
    from deltadq_vllm.kernels import apply_deltas, build_meta
    from deltadq_vllm.kernels.arena import DeltaArena
    from deltadq_vllm.kernels.backends import select_backend
    from deltadq_vllm.kernels.kernel_layout import to_kernel_layout
    from deltadq_vllm.kernels.triton_delta import DECODE_MAX_TOKENS
    from kernel_checks import UNIT, poisoned_y, verify

    backend = select_backend("triton", dev)
    S = len(tags) + 1                              # the last slot stays empty
    slots = backend.make_slots(S, inp, sizes, device=dev, arena=DeltaArena(192 << 20, dev),
                               lowrank=lowrank)
    stored, encs = [], []    # per slot: as the artifact stores them, as the slots hold them
    for s, tag in enumerate(tags):
        stored.append([art[tag].encoded(n) for n in names])
        slots.load(s, stored[-1])
        encs.append([to_kernel_layout(e, lowrank=lowrank) for e in stored[-1]])
    encs.append(None)
    sync(dev)
    # per (artifact, slice): what merge's reference needs on the sampled rows
    aux = {}
    for s, tag in enumerate(tags):
        for i, n in enumerate(names):
            r = base_rows[f"rows:{n}"]
            m, b = merged[tag][n].float(), base_rows[n].float()
            changed = (m != b) | (decode(stored[s][i]).float()[r] != 0)
            conv = encs[s][i]
            step_half = (conv.tensors["step"].double()[r] / 2
                         if conv.layout == "hash_groupwise" and conv.params["bits"] == 16
                         and stored[s][i].layout != "hash_groupwise" else None)
            aux[(s, i)] = (r, m, b, changed.double(), step_half)
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    dense, absp = {}, {}
    if lowrank:   # one slice: the head; |x| |V|^T |U|^T (rank r) or |x| |D|^T
        for s in range(len(tags)):
            e = encs[s][0]
            dense[s] = decode(e).double()
            if e.layout == "lowrank":
                au, av = e.tensors["u"].double().abs(), e.tensors["v"].double().abs()
                absp[s] = lambda xa, au=au, av=av: (xa @ av.T) @ au.T
            else:
                absp[s] = lambda xa, d=dense[s].abs(): xa @ d.T
    name = names[0].replace(".weight", "") + (f" (+{len(names) - 1})" if len(names) > 1 else "")
    for dtype in (torch.float32, torch.bfloat16):
        backend.warmup([slots], 64, dtype)
        for T in TOKENS:
            ids = torch.tensor([t % S if t < S else random.Random(T + t).randint(-1, S - 1)
                                for t in range(T)], dtype=torch.int32)
            x = torch.randn(T, inp, generator=gen).to(dtype)
            big, y = poisoned_y(T, sum(sizes), dtype, gen, device=dev)
            y0 = y.clone()
            apply_deltas(y, x.to(dev), build_meta(ids, S, device=dev), slots, backend="triton")
            sync(dev)
            path = "decode" if T <= DECODE_MAX_TOKENS else "prefill"
            row = {"group": name, "dtype": str(dtype).split(".")[1], "T": T, "path": path}
            if not lowrank:
                row["dec_err_over_bound"] = verify(path, y, y0, x, ids, encs, sizes, dtype, big,
                                                   what=f"{name} {dtype} T={T}")
            else:   # factors (or codes) in lowrank slots: against U V in float64 (decode)
                ref = y0.cpu().double()
                A = torch.zeros_like(ref)
                xa = x.double().abs()
                for t, s in enumerate(ids.tolist()):
                    if 0 <= s < len(tags):
                        ref[t] += x[t].double() @ dense[s].T
                        A[t] = absp[s](xa[t:t + 1])[0]
                u = UNIT[dtype]
                # the final rounding of y, the dot variant's bf16 roundings of x and z
                # (2 u_bf16 |x| |V| |U|), fp32 sums
                bound = u * (y.cpu().double().abs() + ref.abs()) + (2 * U_BF16 + 2 * (inp + 2) * FP32_U) * A
                assert not torch.isnan(y).any(), f"{name}: NaN in y"
                assert torch.isnan(big[:, :3]).all() and torch.isnan(big[:, -4:]).all(), \
                    f"{name}: wrote outside y"
                base_only = [t for t, s in enumerate(ids.tolist()) if not 0 <= s < len(tags)]
                assert torch.equal(y[base_only].cpu(), y0[base_only].cpu()), \
                    f"{name}: a base-only token's output changed"
                row["dec_err_over_bound"] = float(((y.cpu().double() - ref).abs() / bound.clamp_min(1e-300)).max())
            if dtype == torch.float32:
                worst, num, den = 0.0, 0.0, 0.0
                d = y.cpu().double() - y0.cpu().double()
                for s in range(len(tags)):
                    tok = (ids == s).nonzero().flatten()
                    if tok.numel() == 0:
                        continue
                    for i in range(len(names)):
                        r, m, b, changed, step_half = aux[(s, i)]
                        want = x[tok].double() @ (m.double() - b.double()).T
                        got = d[tok][:, offs[i] + r]
                        err = (got - want).abs()
                        bnd = merge_bound(x[tok], m, b, changed, step_half)
                        if lowrank:   # the "dot" variant rounds x and z = x V^T to bf16
                            bnd += 2 * U_BF16 * x[tok].double().abs() @ (m.double() - b.double()).abs().T
                        worst = max(worst, float((err / bnd.clamp_min(1e-300)).max()))
                        num += float((got - want).pow(2).sum())
                        den += float(want.pow(2).sum())
                row["merge_err_over_bound"] = worst
                row["merge_rel_err"] = (num / den) ** 0.5 if den else 0.0
            rows_out.append(row)
            print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items()), flush=True)


def check_lookup(art, tags, dev, base_rows, merged, gen, rows_out):
    """The tied embedding's row lookup: out[t] += D_slot(t)[token t] vs merged - base rows."""
    from types import SimpleNamespace
    from deltadq_vllm.kernels.arena import DeltaArena
    from deltadq_vllm.kernels.backends import select_backend

    backend = select_backend("triton", dev)
    V, H = art[tags[0]].encoded(EMBED).shape
    S = len(tags) + 1
    store = backend.make_slots(S, H, [V], device=dev, arena=DeltaArena(192 << 20, dev), lowrank=True)
    embeds = [art[tag].encoded(EMBED) for tag in tags]
    for s, e in enumerate(embeds):
        store.load(s, [e])
    r = base_rows[f"rows:{EMBED}"]
    T = r.numel()
    slot_ids = torch.tensor([t % S for t in range(T)], dtype=torch.int32)
    out = torch.randn(T, H, generator=gen)
    out0 = out.clone()
    out = out.to(dev)
    backend.embedding(out, r.to(dev), SimpleNamespace(slot_ids=slot_ids.to(dev)), store)
    sync(dev)
    d = out.cpu().double() - out0.double()
    worst = 0.0
    for t, s in enumerate(slot_ids.tolist()):
        if s < len(tags):
            m, b = merged[tags[s]][EMBED][t].double(), base_rows[EMBED][t].double()
            # merge rounded W + D once to bf16 (u |m|); the lookup sums rank-r products
            # of bf16 factors in fp32 and adds them to out in fp32 ((r + 2) u32 terms)
            e = embeds[s]
            if e.layout == "lowrank":
                absd = e.tensors["u"][r[t]].double().abs() @ e.tensors["v"].double().abs()
                rank = e.tensors["u"].shape[1]
            else:
                absd, rank = (m - b).abs(), 1
            bnd = U_BF16 * m.abs() + (rank + 2) * FP32_U * (absd + out0[t].double().abs() + d[t].abs()) + 1e-300
            worst = max(worst, float(((d[t] - (m - b)).abs() / bnd).max()))
        else:
            assert torch.equal(out[t].cpu(), out0[t]), "base-only token's embedding changed"
    row = {"group": "embed lookup", "dtype": "float32", "T": T, "path": "rows",
           "merge_err_over_bound": worst}
    rows_out.append(row)
    print(row, flush=True)


def run(args) -> int:
    from safetensors.torch import load_file
    from deltadq_vllm.format.artifact import DeltaArtifact

    data = Path(args.data)
    man = json.loads((data / "manifest.json").read_text())
    tags = man["artifacts"]
    dev = torch.device(args.device)
    if args.smoke:   # the interpreter on a CPU: the flow, not the speed (one layer, 2 groups)
        global TOKENS, GROUPS
        TOKENS = (1,)
        GROUPS = {k: GROUPS[k] for k in ("o", "qkv")}
        man["layers"] = man["layers"][:1]
    art = {t: DeltaArtifact(data / "art" / t) for t in tags}
    base_rows = load_file(str(data / "base_rows.safetensors"))
    merged = {t: load_file(str(data / f"merged_{t}.safetensors")) for t in tags}
    gen = torch.Generator().manual_seed(int(time.time()))   # fresh inputs every run
    rows, failures = [], []
    groups = [[f"model.layers.{L}.{m}.weight" for m in ms] for L in man["layers"]
              for ms in GROUPS.values()]
    t0 = time.time()
    for names in groups:
        shapes = [art[tags[0]].entries[n].shape for n in names]
        try:
            check_group(art, tags, names, [sh[0] for sh in shapes], shapes[0][1], False, dev,
                        base_rows, merged, gen, rows)
        except AssertionError as e:
            failures.append(str(e))
            print("FAIL", e, flush=True)
    try:
        shape = art[tags[0]].encoded(EMBED).shape
        check_group(art, tags, [EMBED], [shape[0]], shape[1], True, dev, base_rows, merged, gen, rows)
        check_lookup(art, tags, dev, base_rows, merged, gen, rows)
    except AssertionError as e:
        failures.append(str(e))
        print("FAIL", e, flush=True)
    bad = [r for r in rows if r.get("dec_err_over_bound", 0) > 1 or r.get("merge_err_over_bound", 0) > 1
           or r.get("dec_rel_err", 0) > (1e-2 if r["dtype"] == "bfloat16" else 1e-5)]
    print(f"\n{len(rows)} rows in {time.time() - t0:.0f}s; worst dec err/bound "
          f"{max((r.get('dec_err_over_bound', 0) for r in rows), default=0):.3g}, worst merge "
          f"err/bound {max((r.get('merge_err_over_bound', 0) for r in rows), default=0):.3g}, "
          f"worst merge rel err {max((r.get('merge_rel_err', 0) for r in rows), default=0):.3g}")
    ok = not failures and not bad
    print("artifact_check:", "PASS" if ok else f"FAIL ({len(failures)} assertions, {len(bad)} rows)")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)",
                                              "artifacts": tags, "rows": rows,
                                              "failures": failures, "passed": ok}, indent=1))
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--base")
    ap.add_argument("--artifact", action="append", default=[])
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true",
                    help="with --device cpu and TRITON_INTERPRET=1: one layer, two groups")
    args = ap.parse_args()
    if args.prepare:
        prepare(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
