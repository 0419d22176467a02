"""Study: what the kept positions and their values cost a DeltaDQ artifact (issue #13, 64x).

    .venv/bin/python benchmarks/fidelity/positions_study.py --finetune spell-heavy \\
        --artifact DIR --out /tmp/study [--seeds 16]
    .venv/bin/python benchmarks/fidelity/kept_precise.py --finetune spell-heavy \\
        --model control=/tmp/study/control --model best16=/tmp/study/best16 \\
        --model exact=/tmp/study/exact --extra 1800 --dtype bfloat16

The artifact is merged (`deltadq merge`); then every hash_groupwise linear is rebuilt from the
fine-tune's exact delta with the artifact's group size, keep count, bit width and scale
blocks, and written as three merged models (the rest of the artifact, e.g. its embedding and
norms, as merged):

* control: plain values (delta * g / k, quantized with the range search: `quantize`) at the
  artifact's positions: what the compressor stores with `--values plain`;
* best<K>: the same, but each row (each scale block) regenerates its positions from the best
  of K seeds, chosen by the output error on the base's inputs on the built-in calibration
  text: what storing log2(K) bits per row to choose positions by data would buy (not in
  the format: a study);
* exact: the artifact's positions with the exact rescaled values (no quantization): the
  ceiling of these positions;
* with --gain-one / --denser, the arms their help describes (rows scaled to carry their
  whole delta; twice the keep count with exact values or 1-bit sign codes).

Prints the median over matrices of the relative output error (squared, on the calibration
text) and of the gain (the share of the delta's output carried along it) for every arm,
and writes each matrix's to <out>/errors.json. Evaluate the models with
kept_precise.py --model (the same problems as the fine-tune, paired bootstrap).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "finetunes"))
sys.path.insert(0, str(HERE))
import build as FT  # noqa: E402
from kept_precise import merge_artifact  # noqa: E402


def input_grams(base_dir: Path, names: list[str], text: str) -> dict[str, torch.Tensor]:
    """X^T X / n of every named linear's input in the base model (float32) on `text`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    ids = tok(text, return_tensors="pt").input_ids[:, :2048]
    grams = {}

    def hook(name):
        def record(_mod, inp, _out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            grams[name] = x.T @ x / len(x)
        return record

    for n in names:
        model.get_submodule(n.removesuffix(".weight")).register_forward_hook(hook(n))
    with torch.no_grad():
        model(ids)
    return grams


def plain_values(d: torch.Tensor, cols: torch.Tensor, g: int, k: int, bits: int | None,
                 rps: int) -> torch.Tensor:
    """The dense approximation: d * g / k at cols, quantized (bits) or exact (None)."""
    from deltadq_vllm.format.quant import dequantize, quantize

    vals = torch.gather(d, 1, cols) * (g / k)
    if bits is not None:
        vals = dequantize(*quantize(vals, bits, rps), rps)
    return torch.zeros_like(d).scatter_(1, cols, vals)


def sign_values(d: torch.Tensor, cols: torch.Tensor, g: int, k: int, rps: int) -> torch.Tensor:
    """d * g / k at cols as 1-bit sign codes with one magnitude per scale block,
    sum(v^2) / sum(|v|): the block's codes carry all of its values along them."""
    vals = torch.gather(d, 1, cols) * (g / k)
    blocks = torch.arange(len(d)) // rps
    nb = int(blocks[-1]) + 1
    sq = torch.zeros(nb).index_add_(0, blocks, (vals * vals).sum(1))
    ab = torch.zeros(nb).index_add_(0, blocks, vals.abs().sum(1))
    mag = (sq / ab.clamp_min(1e-30))[blocks].unsqueeze(1)
    return torch.zeros_like(d).scatter_(1, cols, torch.sign(vals) * mag)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetune", required=True)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--gain-one", action="store_true",
                    help="also write control-g1 (each row's values scaled so that it "
                         "carries all of its delta's output along it: free in the format "
                         "only where a row has its own scale, rows_per_scale 1) and "
                         "best<K>-cos-g1 (per row the seed whose output is best aligned "
                         "with the delta's, where rows share a scale the best<K> seed; then "
                         "scaled the same way)")
    ap.add_argument("--denser", action="store_true",
                    help="also write dense2-exact (twice the keep count, exact values) and "
                         "dense2-sign (twice the keep count, 1-bit sign codes: about the "
                         "bytes of 2-bit codes at the artifact's keep count, each scale "
                         "block's magnitude sum(v^2) / sum(|v|), so the block carries all of "
                         "its kept values along them)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file

    from deltadq_vllm.format.positions import kept_columns_of_rows, tensor_seed
    from deltadq_vllm.tools.calibration import default_text

    art, out, K = Path(args.artifact), Path(args.out), args.seeds
    base_dir, ft_dir = FT.base_dir(), FT.finetune_dir(args.finetune)
    merged = out / "artifact"
    out.mkdir(parents=True, exist_ok=True)
    if not merged.exists():
        merge_artifact(art, merged)
    man = json.load(gzip.open(art / "deltadq.json.gz"))
    linears = [n for n, e in man["tensors"].items()
               if e.get("layout") == "hash_groupwise" and e["class"] == "linear"]
    base = load_file(str(base_dir / "model.safetensors"))
    ft = load_file(str(ft_dir / "model.safetensors"))
    grams = input_grams(base_dir, linears, default_text())
    merged_sd = load_file(str(merged / "model.safetensors"))
    tags = (["control", f"best{K}", "exact"]
            + (["control-g1", f"best{K}-cos-g1"] if args.gain_one else [])
            + (["dense2-exact", "dense2-sign"] if args.denser else []))
    models = {t: dict(merged_sd) for t in tags}
    errors = {}
    for n in linears:
        p = man["tensors"][n]["params"]
        g, k, bits, rps = p["group_size"], p["keep"], p["bits"], p.get("rows_per_scale", 1)
        d = ft[n].float() - base[n].float()
        rows, G = torch.arange(d.shape[0]), grams[n]
        dG = d @ G
        cols = [kept_columns_of_rows(tensor_seed(man["seed"] + s, n), rows, d.shape[1], g, k)
                for s in range(K)]
        cands = [plain_values(d, c, g, k, bits, rps) for c in cols]
        row_err = torch.stack([(((c - d) @ G) * (c - d)).sum(1) for c in cands])
        blocks = rows // rps   # a scale block shares one seed
        per_block = torch.zeros(K, int(blocks[-1]) + 1).index_add_(1, blocks, row_err)
        pick = per_block.argmin(0)[blocks]
        best = torch.stack(cands).gather(0, pick.view(1, -1, 1).expand(1, *d.shape))[0]
        ref = float((dG * d).sum())
        arms = {"control": cands[0], f"best{K}": best,
                "exact": plain_values(d, cols[0], g, k, None, rps)}
        if args.gain_one:
            # per row: p = <X d_r, X a_r>, q = |X a_r|^2, r = |X d_r|^2; scaled by r / p the
            # row carries all of its delta's output along it and its error is r (r q / p^2 - 1):
            # least where the cosine p^2 / (q r) is largest
            ref_r = (dG * d).sum(1)
            p_ = torch.stack([(dG * c).sum(1) for c in cands])
            q_ = torch.stack([((c @ G) * c).sum(1) for c in cands])
            cos2 = torch.where(p_ > 0, p_ ** 2 / (q_ * ref_r).clamp_min(1e-30), 0.0)
            pick_cos = cos2.argmax(0) if rps == 1 else pick
            scale = lambda i: torch.where(p_[i, rows] > 0,  # noqa: E731
                                          ref_r / p_[i, rows].clamp_min(1e-30), 1.0)
            arms["control-g1"] = cands[0] * scale(torch.zeros_like(rows)).unsqueeze(1)
            chosen = torch.stack(cands).gather(0, pick_cos.view(1, -1, 1).expand(1, *d.shape))[0]
            arms[f"best{K}-cos-g1"] = chosen * scale(pick_cos).unsqueeze(1)
        if args.denser:
            k2 = min(g, 2 * k)
            c2 = kept_columns_of_rows(tensor_seed(man["seed"], n), rows, d.shape[1], g, k2)
            arms["dense2-exact"] = plain_values(d, c2, g, k2, None, rps)
            arms["dense2-sign"] = sign_values(d, c2, g, k2, rps)
        errors[n] = {}
        for tag, approx in arms.items():
            models[tag][n] = (base[n].float() + approx).to(base[n].dtype)
            # gain: the share of the delta's output carried along it, <X d, X a> / |X d|^2
            e = approx - d
            errors[n][tag] = float(((e @ G) * e).sum()) / ref
            errors[n]["gain " + tag] = float((dG * approx).sum()) / ref
    for tag in tags:
        print(f"{tag}: median relative output error (squared) "
              f"{statistics.median(e[tag] for e in errors.values()):.3f}, median gain "
              f"{statistics.median(e['gain ' + tag] for e in errors.values()):.3f}")
    for tag, sd in models.items():
        dst = out / tag
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(merged, dst, ignore=shutil.ignore_patterns("model.safetensors"))
        save_file({n: t.contiguous() for n, t in sd.items()}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
    (out / "errors.json").write_text(json.dumps(errors, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
