"""Study (issue #13): at a fixed byte budget, which kept positions and code widths keep the task?

    .venv/bin/python benchmarks/fidelity/bits_density.py [--finetune arith-light]

Every linear of the fine-tune gets its delta replaced by a sparse estimate (embeddings,
norms: the fine-tune's own), and the model is evaluated in float32 through transformers:
task accuracy on the fine-tune's held-out problems (build.evaluate), and top-1 agreement and
KL with the fine-tune on held-out WikiText (the fidelity benchmark's text). Estimates:

  * positions: `groupwise` (DeltaDQ's seeded k-of-g dropout, k = 1), `bernoulli` (DARE's),
    `act` / `sqrt-act` (Bernoulli with keep probabilities tiered by each input channel's
    activation norm, or its square root, on the calibration rows: the channel-tier idea of
    keep_tiers.py, same expected count);
  * values: unbiased (delta / keep probability at the kept positions), unquantized, or
    quantized to `bits` with one (min, step) per matrix and the range search, as the
    compressor's plain values at 1024x are (`quantize(..., rows_per_scale=out, clip=True)`).

A row's cost is density x bits (+ one scale per matrix): 1 bit at 1/96 and 2 bits at 1/192
are the same bytes (what `deltadq compress --ratio 1024` spends on SmolLM2's linears:
0.011 bits per element). Writes benchmarks/results/bits-density/<finetune>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "finetunes"))
sys.path.insert(0, str(HERE))
import build as FT  # noqa: E402
from deltadq_vllm.checkpoint import Checkpoint  # noqa: E402
from deltadq_vllm.format.positions import kept_columns, tensor_seed  # noqa: E402
from deltadq_vllm.format.quant import dequantize, quantize  # noqa: E402
from deltadq_vllm.tools.calibration import LayerwiseCalibrator, default_text  # noqa: E402
from keep_tiers import tiered, write_result  # noqa: E402

# (positions, bits (0: unquantized), 1 / density)
VARIANTS = [("none", 0, 0),
            ("groupwise", 0, 96), ("bernoulli", 0, 96), ("act", 0, 96), ("sqrt-act", 0, 96),
            ("groupwise", 1, 96), ("groupwise", 2, 192), ("groupwise", 1, 192),
            ("groupwise", 4, 384)]


def estimate(d, x_fit, name, positions, bits, inv_density, gen):
    """The sparse estimate of one delta [out, in]."""
    out, inp = d.shape
    if positions == "none":
        return torch.zeros_like(d)
    if positions == "groupwise":
        g = inv_density
        while inp % g:        # (a group size must divide the row: 384 -> 288 on 576)
            g -= 1
        cols = kept_columns(tensor_seed(0, name), out, inp, g, 1)
        vals = torch.gather(d, 1, cols) * g
        if bits:
            codes, step, minv = quantize(vals, bits, out, True)
            vals = dequantize(codes, step, minv, out)
        return torch.zeros_like(d).scatter_(1, cols, vals)
    if bits:
        raise ValueError("quantized values are measured on groupwise positions only")
    density = 1.0 / inv_density
    norm = x_fit.norm(dim=0)
    p = {"bernoulli": torch.full((inp,), density), "act": tiered(norm, density),
         "sqrt-act": tiered(norm.sqrt(), density)}[positions]
    keep = torch.rand(out, inp, generator=gen) < p
    return torch.where(keep, d / p, torch.zeros_like(d))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetune", default="arith-light")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import sweep_common as R   # the fidelity sweep: its held-out text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    ftd = FT.finetune_dir(args.finetune)
    ft, base = Checkpoint(str(ftd)), Checkpoint(str(FT.base_dir()))
    tok = AutoTokenizer.from_pretrained(str(ftd))
    task = next(iter(FT.SPECS[args.finetune]["mix"]))
    texts = R.heldout_text(16)

    def log_probs(m):
        with torch.no_grad():
            return torch.cat([torch.log_softmax(m(tok(t, return_tensors="pt")["input_ids"])
                                                .logits[0].float(), -1) for t in texts])

    model = AutoModelForCausalLM.from_pretrained(str(ftd), dtype=torch.float32).eval()
    ref_lp = log_probs(model)
    ft_acc = FT.evaluate(model, tok, task)["accuracy"]
    params = dict(model.named_parameters())
    cal = LayerwiseCalibrator(ft, default_text())
    layers = []   # [(name, delta, fit rows, held rows)]
    for layer in range(model.config.num_hidden_layers):
        for name, x in cal.inputs_for_layer(layer).items():
            x = x.float()
            hold = torch.arange(x.shape[0]) % 4 == 0
            layers.append((name, ft.get(name).float() - base.get(name).float(), x[~hold], x[hold]))

    def top1_kl(lp):
        return (float((lp.argmax(-1) == ref_lp.argmax(-1)).float().mean()),
                float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean()))

    rows = []
    print(f"fine-tune accuracy {ft_acc:.3f}")
    print(f"{'positions':10s} {'bits':>4s} {'density':>8s} {'accuracy':>8s} {'kept':>6s} "
          f"{'top-1':>6s} {'KL':>7s} {'out err':>7s}")
    for positions, bits, inv in VARIANTS:
        gen = torch.Generator().manual_seed(0)
        errs = []
        with torch.no_grad():
            for name, d, x_fit, x_held in layers:
                est = estimate(d, x_fit, name, positions, bits, inv, gen)
                ref = float((x_held @ d.T).norm())
                errs.append(float((x_held @ (d - est).T).norm()) / ref if ref > 0 else 0.0)
                params[name].copy_(base.get(name).float() + est)
        acc = FT.evaluate(model, tok, task)["accuracy"]
        top1, kl = top1_kl(log_probs(model))
        row = {"positions": positions, "bits": bits, "density": round(1 / inv, 5) if inv else 0,
               "accuracy": acc, "kept": round(acc / ft_acc, 3), "top1": round(top1, 4),
               "kl": round(kl, 4), "mean_output_error": round(statistics.mean(errs), 3)}
        rows.append(row)
        print(f"{positions:10s} {bits or '-':>4} {row['density']:8.4f} {acc:8.3f} "
              f"{row['kept']:6.2f} {top1:6.3f} {kl:7.4f} {row['mean_output_error']:7.2f}",
              flush=True)
    del model
    base_model = AutoModelForCausalLM.from_pretrained(str(FT.base_dir()),
                                                      dtype=torch.float32).eval()
    b_top1, b_kl = top1_kl(log_probs(base_model))
    print(f"the base model: top-1 {b_top1:.3f}, KL {b_kl:.4f}")
    doc = {"finetune": args.finetune, "finetune_accuracy": ft_acc, "rows": rows,
           "base_top1": round(b_top1, 4), "base_kl": round(b_kl, 4),
           "eval": "transformers float32, greedy, the fine-tune's held-out problems; top-1 / "
                   "KL vs the fine-tune on 16 held-out WikiText texts (fidelity/run.py)",
           "calibration": "builtin:calibration.txt through the fine-tune, 3 of 4 rows fit "
                          "(tier probabilities), 1 of 4 held out (output error)",
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "seconds": round(time.time() - t0, 1)}
    write_result(HERE.parent / "results" / "bits-density" / f"{args.finetune}.json", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
