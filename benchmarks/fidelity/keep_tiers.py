"""Study (issue #13): would keep probabilities tiered by input channel beat uniform dropout?

    .venv/bin/python benchmarks/fidelity/keep_tiers.py [--finetune arith-light] [--density 0.012]

At 1024x a SmolLM2 linear keeps ~1.2% of its delta (the default artifact: 7 of 576 per row,
1-bit codes), and its plain (unbiased, rescaled) values have an output error of 2-6x the
delta's own output: noise that averages out over the network but costs the task. A few
input channels carry most of a layer's input energy (q/k/v inputs: the top 2% of channels
62-78% of it), and uniform dropout drops them as often as the rest. This measures, on the
real calibration inputs of a fine-tune (`--calibrate-on finetune`, the default), the
relative output error ||X (D - D^)^T|| / ||X D^T|| on held-out rows of the unbiased
estimate D^ = D / p at kept positions, for keep probabilities
  * uniform: p = density (DeltaDQ's and DARE's);
  * act: p_j proportional to the channel's activation norm on the fit rows (capped at 1, same
    expected count): information the decoder does not have, so a tier map would be stored;
  * base-proxy: p_j from the BASE weights only (free for a decoder that holds the base):
    q/k/v and gate/up by the input RMSNorm weight, down_proj by ||W_gate[j]|| ||W_up[j]||,
    o_proj by ||W_v[j]||;
mean of 3 random masks each. No quantization: the positions' effect alone. Prints a table and
writes benchmarks/results/keep-tiers/<finetune>-d<density>.json. Needs the fine-tune
(benchmarks/finetunes/build.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "finetunes"))
import build as FT  # noqa: E402
from deltadq_vllm.checkpoint import Checkpoint  # noqa: E402
from deltadq_vllm.tools.calibration import LayerwiseCalibrator, default_text  # noqa: E402

KINDS = ("q_proj", "o_proj", "gate_proj", "down_proj")


def tiered(weight: torch.Tensor, density: float) -> torch.Tensor:
    """p_j proportional to weight_j with mean `density`, capped at 1 (the excess spread)."""
    p = weight / weight.mean() * density
    for _ in range(8):
        p = p.clamp(max=1.0)
        p = p * (density * len(p) / p.sum())
    return p.clamp(max=1.0)


def proxy(base: Checkpoint, cfg: dict, name: str, layer: int) -> torch.Tensor:
    def g(n):
        return base.get(f"model.layers.{layer}.{n}").float()
    if "q_proj" in name:
        return g("input_layernorm.weight").abs()
    if "gate_proj" in name:
        return g("post_attention_layernorm.weight").abs()
    if "down_proj" in name:
        return g("mlp.gate_proj.weight").norm(dim=1) * g("mlp.up_proj.weight").norm(dim=1)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    v = g("self_attn.v_proj.weight").norm(dim=1).view(nkv, hd)
    return v.repeat_interleave(nh // nkv, 0).reshape(-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetune", default="arith-light")
    ap.add_argument("--density", type=float, default=0.012)
    ap.add_argument("--layers", default="2,6,10,14,20,24,28")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.time()
    ft = Checkpoint(str(FT.finetune_dir(args.finetune)))
    base = Checkpoint(str(FT.base_dir()))
    cfg = json.loads((Path(base.path) / "config.json").read_text())
    cal = LayerwiseCalibrator(ft, default_text())
    rows, sums = [], {}
    print(f"{'matrix':42s} {'top2% energy':>12s} {'uniform':>8s} {'act':>8s} {'base-proxy':>10s}")
    for layer in (int(v) for v in args.layers.split(",")):
        for name, x in cal.inputs_for_layer(layer).items():
            if not any(k in name for k in KINDS):
                continue
            x = x.float()
            fit, held = x[::2], x[1::2]
            d = ft.get(name).float() - base.get(name).float()
            ref = float((held @ d.T).norm())
            e2 = fit.norm(dim=0) ** 2
            top = float(e2.sort(descending=True).values[: max(1, len(e2) // 50)].sum() / e2.sum())
            row = {"matrix": name, "shape": list(d.shape), "top2pct_energy": round(top, 3)}
            for tag, p in (("uniform", torch.full((d.shape[1],), args.density)),
                           ("act", tiered(fit.norm(dim=0), args.density)),
                           ("base-proxy", tiered(proxy(base, cfg, name, layer), args.density))):
                errs = []
                for _ in range(3):
                    keep = torch.rand_like(d) < p
                    est = torch.where(keep, d / p, torch.zeros_like(d))
                    errs.append(float((held @ (d - est).T).norm()) / ref)
                row[tag] = round(statistics.mean(errs), 3)
                sums.setdefault(tag, []).append(row[tag])
            rows.append(row)
            print(f"{name:42s} {top:12.2f} {row['uniform']:8.2f} {row['act']:8.2f} "
                  f"{row['base-proxy']:10.2f}", flush=True)
    mean = {k: round(statistics.mean(v), 3) for k, v in sums.items()}
    print(f"{'mean':42s} {'':12s} {mean['uniform']:8.2f} {mean['act']:8.2f} {mean['base-proxy']:10.2f}")
    out = HERE.parent / "results" / "keep-tiers" / f"{args.finetune}-d{args.density:g}.json"
    doc = {"finetune": args.finetune, "density": args.density, "rows": rows, "mean": mean,
           "masks_per_cell": 3, "calibration": "builtin:calibration.txt, the fine-tune's "
           "activations, even rows fit / odd rows held out",
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "seconds": round(time.time() - t0, 1)}
    write_result(out, doc)
    return 0


def write_result(out: Path, doc: dict) -> None:
    """The study's JSON, written atomically (temp file, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
