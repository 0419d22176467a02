"""Fidelity on small trained pairs with LARGE deltas (issue #13's unseen-pair failures), CPU,
minutes: is a compressed fine-tune ever further from the fine-tune than the base is?

    .venv/bin/python benchmarks/fidelity/small_pairs.py [--ratios 16,64,256] [--methods ...]

Pairs (the test fixtures, deltadq_vllm/testing/: tiny bases pre-trained on a generated corpus,
fully fine-tuned on a new skill the base scores 0 on; relative delta norms 0.3-0.7, the
regime of the Qwen2/Qwen3 user pairs): qwen2 -> qwen2--math, llama-gqa -> llama-gqa--math,
llama-mha -> llama-mha--code, plus the light SFT-like llama-gqa -> llama-gqa--light.

For each pair x method x TRUE ratio the delta is compressed (`compress`, calibration reused
across the sweep, so `compress s` excludes the base's calibration), reconstructed exactly as
`deltadq merge` does, loaded into transformers, and measured against the fine-tune itself:
greedy task accuracy on the fixture's 50 held-out problems, top-1 next-token agreement and
KL(fine-tune || model) per token on held-out text (generated corpus lines from an unused seed
and held-out task examples). The base's row is the bar: a row whose agreement is below the
base's or whose KL is above it moved the model further from the fine-tune than storing no
delta. Results: benchmarks/results/fidelity-small/ (table.md, small_pairs.json).

Not through the server (that is benchmarks/fidelity/run.py on the real SmolLM2 fine-tunes):
these models are too small for vLLM's CPU attention, and the point here is the failure mode
of large deltas, which the light SmolLM2 fine-tunes do not provoke.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch

from deltadq_vllm.testing.closeness import closeness as _compare
from deltadq_vllm.testing.closeness import next_token_logprobs as _logprobs

RESULTS = Path(__file__).resolve().parents[1] / "results" / "fidelity-small"
PAIRS = (("qwen2", "qwen2--math"), ("llama-gqa", "llama-gqa--math"),
         ("llama-mha", "llama-mha--code"), ("llama-gqa", "llama-gqa--light"))
# method label -> (compress method, calibrated values). Bare names are the tool's defaults
# (plain values since the nineteenth session); results written before it name the calibrated
# rows bare and the plain ones "-plain" (table.md; the -s19-* files use these labels)
METHODS = {"deltadq": ("deltadq", False), "deltadq-calibrated": ("deltadq", True),
           "dare": ("dare", False), "dare-calibrated": ("dare", True),
           "lowrank": ("lowrank", False)}
TEXT_SEED = 424242


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, tok


def _merged_state(base_dir, delta_dir) -> dict[str, torch.Tensor]:
    """The fine-tune's tensors as `deltadq merge` writes them (float32 here)."""
    from deltadq_vllm.format.artifact import DeltaArtifact
    from deltadq_vllm.checkpoint import Checkpoint
    from deltadq_vllm.format.reconstruct import reconstruct

    art = DeltaArtifact(delta_dir)
    base = Checkpoint(base_dir)
    return {n: reconstruct(art, n, base.get(n) if not e.absolute else None).float()
            for n, e in art.entries.items()}


def _texts(task: str) -> list[str]:
    from deltadq_vllm.testing.fixtures import eval_problems, generic_corpus

    return generic_corpus(48, TEXT_SEED) + [f"{p} {a}" for p, a in eval_problems(task)[:48]]


def run_pair(base_name, ft_name, ratios, methods, work: Path, seeds=(0,)) -> list[dict]:
    from deltadq_vllm.tools.compress import CompressOptions, compress
    from deltadq_vllm.testing.fixtures import build_fixture, task_accuracy

    base_dir, ft_dir = build_fixture(base_name), build_fixture(ft_name)
    task = json.loads((ft_dir / "fixture_info.json").read_text())["task"]
    texts = _texts(task)
    model, tok = _load(ft_dir)
    ref = _logprobs(model, tok, texts)
    ft_acc = task_accuracy(model, tok, task)
    rows = [{"pair": ft_name, "method": "finetune", "accuracy": ft_acc, "top1_agreement": 1.0,
             "kl": 0.0}]
    model, tok = _load(base_dir)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows.append({"pair": ft_name, "method": "base", "accuracy": task_accuracy(model, tok, task),
                 **_compare(ref, _logprobs(model, tok, texts))})
    for ratio, seed, label in itertools.product(ratios, seeds, methods):
        method, cal = METHODS[label]
        out = work / f"{ft_name}-{label}-{ratio}"
        row = {"pair": ft_name, "method": label, "ratio_target": ratio, "seed": seed}
        try:
            s = compress(base_dir, ft_dir, out, CompressOptions(
                method=method, ratio=ratio, progress=False, force=True, calibrated=cal,
                reuse_calibration=True, seed=seed))
        except Exception as e:  # noqa: BLE001  (a ratio a method cannot reach: reported)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            rows.append(row)
            print(row, flush=True)
            continue
        row.update(true_ratio=s["true_ratio"], compress_seconds=s["seconds"],
                   unsafe_dropped=len(s["unsafe"]), dropped=len(s["tensors_dropped"]),
                   mean_error={c: v["mean_error"] for c, v in s["by_class"].items()})
        model.load_state_dict(base_state)
        sd = model.state_dict()
        for n, t in _merged_state(base_dir, out).items():
            sd[n].copy_(t.reshape(sd[n].shape))
        row["accuracy"] = task_accuracy(model, tok, task)
        row.update(_compare(ref, _logprobs(model, tok, texts)))
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
               if k != "mean_error"}, flush=True)
    return rows


def markdown(rows) -> str:
    head = ["pair", "method", "target", "seed", "true", "task acc.", "top-1 agr.", "KL",
            "vs base", "dropped (unsafe)", "compress s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["pair"]: r for r in rows if r["method"] == "base"}
    for r in rows:
        b = base[r["pair"]]
        if "error" in r:
            cells = [r["pair"], r["method"], str(r["ratio_target"]), str(r["seed"]),
                     *["-"] * 6, "FAILED: " + r["error"][:80]]
        else:
            worse = (r["method"] not in ("base", "finetune")
                     and (r["top1_agreement"] < b["top1_agreement"] or r["kl"] > b["kl"]))
            cells = [r["pair"], r["method"], str(r.get("ratio_target", "-")),
                     str(r.get("seed", "-")),
                     f"{r['true_ratio']:.1f}" if "true_ratio" in r else "-",
                     f"{r['accuracy']:.2f}", f"{r['top1_agreement']:.3f}", f"{r['kl']:.3f}",
                     "WORSE than base" if worse else ("-" if r["method"] in ("base", "finetune")
                                                      else "better"),
                     f"{r.get('dropped', 0)} ({r.get('unsafe_dropped', 0)})"
                     if "dropped" in r else "-",
                     f"{r['compress_seconds']:.1f}" if "compress_seconds" in r else "-"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", default="16,64,256",
                    help="true ratios; a pair whose fine-tune carries a tokenizer (qwen2--math: "
                         "at most ~55x) gets the ones it can reach and 8, 32 instead")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--pairs", default="qwen2--math,llama-gqa--math,llama-gqa--light")
    ap.add_argument("--work", type=Path, default=Path("/tmp/deltadq-small-pairs"))
    ap.add_argument("--seeds", default="0",
                    help="position seeds (comma list): one row per seed, to see how much one "
                         "artifact's draw moves the scores")
    ap.add_argument("--tag", default="", help="suffix of the result files (small_pairs-TAG)")
    args = ap.parse_args(argv)
    ratios = [int(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",")
    wanted = args.pairs.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.time(), os.getloadavg()
    rows = []
    for b, f in PAIRS:
        if f in wanted:
            rs = ratios if not f.startswith("qwen2") else sorted(
                {8, 32} | {r for r in ratios if r <= 32})
            rows += run_pair(b, f, rs, methods, args.work,
                             [int(x) for x in args.seeds.split(",")])
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"rows": rows, "seconds": round(time.time() - t0), "load_average_start": load0,
           "load_average_end": os.getloadavg(), "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    tag = f"-{args.tag}" if args.tag else ""
    (RESULTS / f"small_pairs{tag}.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / f"table{tag}.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
