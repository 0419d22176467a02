"""Study (issue #13): where a compressed fine-tune loses its task, and what the same bytes could keep.

    .venv/bin/python benchmarks/fidelity/loss_parts.py --finetune spell-heavy --artifact DIR

DIR is a `deltadq compress` artifact of the fine-tune (e.g. `--ratio 1024`). The artifact is
merged onto the base (`deltadq merge`, the user's own reference) and the fine-tune's task is
evaluated in float32 through transformers (build.evaluate: every task of the fine-tune, the
first 200 held-out problems, greedy). Then, each on its own (everything else as named):

* parts: the fine-tune with ONE part of the merged artifact (its embedding / LM head, its
  attention matrices, its MLP matrices; norms and biases stay the fine-tune's): what
  compressing that part alone costs; and the merged artifact with the fine-tune's own
  embedding (what more bytes there could buy);
* values at the artifact's own positions (every `hash_groupwise` linear: the seeded kept
  columns, regenerated): the fine-tune's exact values rescaled by g/k, unquantized (the
  ceiling of any code at that density), and the same codes' width with unbiased stochastic
  rounding over the block's min-max range (carries the whole delta in expectation);
* low-rank at the same bytes: every such linear replaced by a truncated SVD whose factors
  are quantized to 1-4 bits (one scale per rank component, the least-squares refit of each
  factor on the other's codes), rank and width chosen by weight error within the matrix's
  stored bytes.

Writes benchmarks/results/loss-parts/<finetune>-<artifact name>.json (atomically) and prints
a table. CPU capability recorded (float32 throughout: bf16 is slow on AVX2-only CPUs).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "finetunes"))
sys.path.insert(0, str(HERE))
import build as FT  # noqa: E402
from deltadq_vllm.format.artifact import DeltaArtifact  # noqa: E402
from deltadq_vllm.format.layouts import decode  # noqa: E402
from deltadq_vllm.format.positions import kept_columns  # noqa: E402
from keep_tiers import write_result  # noqa: E402
from kept_precise import merge_artifact  # noqa: E402

RESULTS = HERE.parent / "results" / "loss-parts"
PARTS = {"embedding": ("embed_tokens", "lm_head"), "attention": ("self_attn",),
         "mlp": ("mlp",)}
LOWRANK_BITS = (1, 2, 3, 4)


def _in_part(name: str, part: str) -> bool:
    return any(s in name for s in PARTS[part])


def stochastic_round(vals: torch.Tensor, bits: int, rps: int, gen) -> torch.Tensor:
    """Unbiased b-bit codes of vals [out, n] over each block of rps rows' min-max range."""
    out = vals.shape[0]
    levels = (1 << bits) - 1
    blk = torch.arange(out) // rps
    nb = int(blk[-1]) + 1
    flat = vals.reshape(out, -1)
    lo = torch.stack([flat[blk == i].min() for i in range(nb)])[blk].unsqueeze(1)
    hi = torch.stack([flat[blk == i].max() for i in range(nb)])[blk].unsqueeze(1)
    st = ((hi - lo) / levels).clamp_min(1e-12)
    codes = torch.floor((vals - lo) / st + torch.rand(vals.shape, generator=gen))
    return lo + codes.clamp_(0, levels) * st


def _quantize_factor(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-column codes without a zero level (sign * mean |x| for 1 bit); the
    scale from a small grid of the max by squared error."""
    if bits == 1:
        return x.sign() * x.abs().mean(0, keepdim=True)
    half = (1 << (bits - 1)) - 0.5
    top = x.abs().amax(0, keepdim=True).clamp_min(1e-30) / half
    best = None
    for f in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5):
        st = top * f
        y = (torch.clamp(torch.round(x / st - 0.5), -half - 0.5, half - 0.5) + 0.5) * st
        e = float((y - x).square().sum())
        if best is None or e < best[0]:
            best = (e, y)
    return best[1]


def lowrank_quantized(d: torch.Tensor, nbytes: int) -> tuple[torch.Tensor, dict]:
    """The best (by weight error) rank-r, b-bit-factor approximation of d in nbytes (two
    bf16 scales per rank component); zero where not even rank 1 at 1 bit fits."""
    out, inp = d.shape
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    best = (1.0, torch.zeros_like(d), {"rank": 0})
    for bits in LOWRANK_BITS:
        r = min(int(nbytes // ((out + inp) * bits / 8 + 4)), min(out, inp))
        if r < 1:
            continue
        a = _quantize_factor(u[:, :r] * s[:r].sqrt(), bits)
        b = _quantize_factor(torch.linalg.lstsq(a, d.double()).solution.T, bits).T
        approx = a @ b
        err = float((d - approx).norm() / d.norm())
        if err < best[0]:
            best = (err, approx.float(), {"rank": r, "bits": bits})
    return best[1], {**best[2], "weight_error": round(best[0], 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetune", required=True)
    ap.add_argument("--artifact", required=True, type=Path)
    ap.add_argument("--only", default=None,
                    help="comma list of rows (artifact, ft+<part>, artifact+ft-embedding, "
                         "exact-values, stochastic, lowrank)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.time()
    ftd, based = FT.finetune_dir(args.finetune), FT.base_dir()
    tok = AutoTokenizer.from_pretrained(str(ftd))
    tasks = list(FT.SPECS[args.finetune]["mix"])
    art = DeltaArtifact(args.artifact)

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def accuracy(model) -> dict:
        return {t: FT.evaluate(model, tok, t)["accuracy"] for t in tasks}

    ft_model, base_model = load(ftd), load(based)
    ft_sd, base_sd = ft_model.state_dict(), base_model.state_dict()
    ft_acc = accuracy(ft_model)
    with tempfile.TemporaryDirectory(prefix="loss-parts-") as tmp:
        art_model = load(merge_artifact(args.artifact, Path(tmp) / "merged"))
    art_sd = {k: v.clone() for k, v in art_model.state_dict().items()}
    linears = {n: e for n, e in art.manifest["tensors"].items()
               if e["class"] == "linear" and n in ft_sd and art.encoded(n).layout ==
               "hash_groupwise"}

    def variant(start_sd, replace) -> torch.nn.Module:
        """art_model's module with start_sd's weights, then replace(name) where not None."""
        sd = art_model.state_dict()
        with torch.no_grad():
            for k, v in sd.items():
                new = replace(k)
                v.copy_(start_sd[k] if new is None else new)
        return art_model

    @functools.cache
    def kept_values(name: str):
        """(kept columns, the fine-tune's values there rescaled by g/k, params) of a linear,
        checked once against what the artifact stores."""
        enc = art.encoded(name)
        p = enc.params
        d = (ft_sd[name] - base_sd[name]).float()
        cols = kept_columns(p["seed"], *d.shape, p["group_size"], p["keep"])
        kept = torch.zeros(d.shape, dtype=torch.bool).scatter_(1, cols, True)
        if bool(decode(enc).reshape(d.shape)[~kept].any()):   # positions as stored?
            raise RuntimeError(f"{name}: the artifact stores values off the regenerated "
                               "positions (a row or group offset this study ignores)")
        return cols, torch.gather(d, 1, cols) * (p["group_size"] / p["keep"]), p

    def at_positions(values_of) -> torch.nn.Module:
        def replace(name):
            if name not in linears:
                return None
            cols, vals, p = kept_values(name)
            approx = torch.zeros(ft_sd[name].shape).scatter_(1, cols, values_of(vals, p))
            return base_sd[name] + approx
        return variant(art_sd, replace)

    gen = torch.Generator().manual_seed(0)
    lowrank_info = []

    def lowrank_replace(name):
        if name not in linears:
            return None
        d = (ft_sd[name] - base_sd[name]).float()
        approx, info = lowrank_quantized(d, art.encoded(name).nbytes())
        lowrank_info.append(info)
        return base_sd[name] + approx

    rows_plan = [("artifact", "the merged artifact", lambda: variant(art_sd, lambda n: None))]
    for part in PARTS:
        rows_plan.append((f"ft+{part}", f"the fine-tune with the artifact's {part}",
                          lambda part=part: variant(ft_sd, lambda n: art_sd[n]
                                                    if _in_part(n, part) else None)))
    rows_plan += [
        ("artifact+ft-embedding", "the artifact with the fine-tune's embedding / head",
         lambda: variant(art_sd, lambda n: ft_sd[n] if _in_part(n, "embedding") else None)),
        ("exact-values", "the artifact's positions, exact values (unquantized)",
         lambda: at_positions(lambda v, p: v)),
        ("stochastic", "the artifact's positions and widths, stochastic rounding",
         lambda: at_positions(lambda v, p: stochastic_round(v, p["bits"], p["rows_per_scale"],
                                                            gen))),
        ("lowrank", "low-rank with 1-4 bit factors in each linear's bytes",
         lambda: variant(art_sd, lowrank_replace)),
    ]
    only = set(args.only.split(",")) if args.only else None
    rows = []
    print(f"fine-tune accuracy {ft_acc}; {len(linears)} hash_groupwise linears")
    print(f"{'row':24s} {'accuracy':>9s} {'kept':>6s}  what")
    for key, what, build in rows_plan:
        if only and key not in only:
            continue
        t0 = time.time()
        acc = accuracy(build())
        kept = statistics.mean(acc[t] / ft_acc[t] for t in tasks if ft_acc[t] > 0)
        row = {"row": key, "what": what, "accuracy": acc, "kept": round(kept, 3),
               "seconds": round(time.time() - t0, 1)}
        if key == "lowrank":
            row["rank_bits"] = dict(sorted(Counter(
                f"rank {i['rank']}, {i.get('bits', 0)} bits" for i in lowrank_info).items()))
            row["mean_weight_error"] = round(statistics.mean(
                i["weight_error"] for i in lowrank_info), 4)
        rows.append(row)
        print(f"{key:24s} {statistics.mean(acc.values()):9.3f} {kept:6.2f}  {what}",
              flush=True)
    out = RESULTS / f"{args.finetune}-{args.artifact.name}.json"
    if out.exists():   # rows measured before (an --only run adds to them)
        done = {r["row"] for r in rows}
        rows = [r for r in json.loads(out.read_text())["rows"] if r["row"] not in done] + rows
        rows.sort(key=lambda r: [k for k, _, _ in rows_plan].index(r["row"]))
    write_result(out, json_summary(args, art, ft_acc, rows, time.time() - t_start))
    return 0


def json_summary(args, art, ft_acc, rows, seconds) -> dict:
    files = sum(f.stat().st_size for f in Path(args.artifact).iterdir() if f.is_file())
    return {"finetune": args.finetune, "artifact": str(args.artifact),
            "artifact_bytes": files, "method": art.manifest.get("method"),
            "finetune_accuracy": ft_acc, "rows": rows,
            "eval": "transformers float32, greedy, 200 held-out problems per task",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                time.gmtime()),
            "torch": torch.__version__, "threads": 1}


if __name__ == "__main__":
    sys.exit(main())
