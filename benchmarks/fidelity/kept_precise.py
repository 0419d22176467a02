"""Kept task accuracy with a tighter interval than 200 problems give (issue #13's 16x / 64x rows).

    .venv/bin/python benchmarks/fidelity/kept_precise.py --finetune arith-light \\
        --artifact 16x=DIR [--artifact 64x=DIR2 ...] [--model TAG=DIR ...] [--extra 800]

(`--model TAG=DIR` evaluates a model folder as it is instead, e.g. positions_study.py's.)
Each artifact is merged onto the base (`deltadq merge`, the user's reference) and evaluated
in float32 through transformers (greedy, build.generate) on the same problems as the
fine-tune itself: the 200 held-out problems of every task of the fine-tune plus `--extra`
more (tasks.extended_eval_set: the held-out seed's next distinct questions, none in the
fine-tune's training set). Kept accuracy = artifact accuracy / fine-tune accuracy; its 95%
interval is a paired bootstrap over problems (the same problems for both models, so what
varies is only which problems are drawn). With 200 problems one standard error of a kept
share near 70% accuracy is ~3 points; with 1,000, ~1.4. For every two artifacts, the
difference of their kept shares and its interval (e.g. DeltaDQ against DARE at the same
bytes); the JSON keeps each model's per-problem correctness.

Writes benchmarks/results/kept-precise/<finetune>[-<tag>].json (atomically) and prints a table;
records the CPU capability (float32 by default: bf16 is slow on AVX2-only CPUs; `--dtype
bfloat16` evaluates the models as a bf16 server runs them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "finetunes"))
sys.path.insert(0, str(HERE))
import build as FT  # noqa: E402
import tasks as T  # noqa: E402
from keep_tiers import write_result  # noqa: E402

BOOTSTRAP = 2000


def problems_of(finetune: str, extra: int) -> dict[str, list]:
    """{task: held-out problems + `extra` more not in the fine-tune's training set}."""
    spec = FT.SPECS[finetune]
    trained = {p.question for p in FT._examples(spec)}
    out = {}
    for name in spec["mix"]:
        task = T.get_task(name)
        out[name] = task.eval_set() + T.extended_eval_set(task, extra, trained)
    return out


def merge_artifact(delta, out: Path) -> Path:
    """`deltadq merge` of the artifact onto the bench base into `out` (the user's
    reference: a plain model folder); out's parent must exist."""
    subprocess.run([sys.executable, "-m", "deltadq_vllm.cli", "merge", "--base",
                    str(FT.base_dir()), "--delta", str(delta), "--out", str(out),
                    "--no-progress"], check=True, capture_output=True)
    return out


def correct(model, tok, probs: dict[str, list]) -> dict[str, list[bool]]:
    out = {}
    for name, ps in probs.items():
        task = T.get_task(name)
        comps = FT.generate(model, tok, [p.prompt for p in ps], task.max_new_tokens)
        out[name] = [task.score(c, p) for c, p in zip(comps, ps)]
    return out


def ratio_interval(num: list[float], ft: list[bool], gen: torch.Generator):
    """(sum(num) / sum(ft), low, high): a per-problem score over the fine-tune's correct
    count (an artifact's correctness: its kept share; two artifacts' difference: the
    difference of their kept shares) and its 95% paired-bootstrap interval."""
    x = torch.tensor(num, dtype=torch.float64)
    f = torch.tensor(ft, dtype=torch.float64)
    point = float(x.sum() / f.sum()) if f.sum() > 0 else float("nan")
    idx = torch.randint(0, len(f), (BOOTSTRAP, len(f)), generator=gen)
    ratios = x[idx].sum(1) / f[idx].sum(1).clamp_min(1)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return point, float(lo), float(hi)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetune", required=True)
    ap.add_argument("--artifact", action="append", default=[], metavar="TAG=DIR")
    ap.add_argument("--model", action="append", default=[], metavar="TAG=DIR",
                    help="a model folder evaluated as it is (e.g. a study's merged model)")
    ap.add_argument("--extra", type=int, default=800)
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the models' dtype in transformers (bfloat16: as served on a GPU or "
                         "an AVX512-BF16 CPU; slow on AVX2-only CPUs)")
    args = ap.parse_args(argv)
    # (tag, path, a model folder as it is: no merge)
    arts = ([(*a.split("=", 1), False) for a in args.artifact]
            + [(*a.split("=", 1), True) for a in args.model])
    if not arts:
        ap.error("give at least one --artifact or --model")
    if len({a[0] for a in arts}) < len(arts):
        ap.error("every --artifact / --model needs its own TAG")
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    ftd = FT.finetune_dir(args.finetune)
    tok = AutoTokenizer.from_pretrained(str(ftd))
    probs = problems_of(args.finetune, args.extra)

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()

    ref = correct(load(ftd), tok, probs)
    rows = [{"model": "fine-tune", **{t: sum(v) / len(v) for t, v in ref.items()}}]
    gen = torch.Generator().manual_seed(0)
    answers = {}   # tag -> {task: per-problem correctness}
    for tag, path, as_is in arts:
        with tempfile.TemporaryDirectory(prefix="kept-precise-") as tmp:
            merged = Path(path) if as_is else merge_artifact(path, Path(tmp) / "merged")
            got = answers[tag] = correct(load(merged), tok, probs)
        row = {"model": tag, "artifact": path}
        for t in probs:
            kept, lo, hi = ratio_interval(got[t], ref[t], gen)
            row[t] = sum(got[t]) / len(got[t])
            row[f"{t} kept"] = [round(kept, 4), round(lo, 4), round(hi, 4)]
            row[f"{t} discordant"] = [sum(f and not a for f, a in zip(ref[t], got[t])),
                                      sum(a and not f for f, a in zip(ref[t], got[t]))]
        rows.append(row)
        print(row, flush=True)
    pairs = {f"{a} - {b}": {t: [round(v, 4) for v in ratio_interval(
        [float(x) - float(y) for x, y in zip(answers[a][t], answers[b][t])], ref[t], gen)]
        for t in probs}
        for i, (a, _, _) in enumerate(arts) for b, _, _ in arts[i + 1:]}
    for k, v in pairs.items():
        print("kept difference", k, v)
    doc = {"finetune": args.finetune, "kept_differences": pairs,
           "correct": {tag: {t: "".join("1" if c else "0" for c in v) for t, v in a.items()}
                       for tag, a in [("fine-tune", ref), *answers.items()]},
           "problems": {t: len(v) for t, v in probs.items()},
           "rows": rows, "bootstrap": BOOTSTRAP,
           "discordant": "[fine-tune right, artifact wrong], [artifact right, fine-tune wrong]",
           "eval": f"transformers {args.dtype}, greedy; held-out problems + extended_eval_set",
           "dtype": args.dtype,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "seconds": round(time.time() - t0, 1)}
    print(f"{'model':12s} " + " ".join(f"{t:>28s}" for t in probs))
    for r in rows:
        print(f"{r['model']:12s} " + " ".join(
            f"{r[t]:8.3f} kept {r[t + ' kept'][0]:.3f} [{r[t + ' kept'][1]:.3f}, "
            f"{r[t + ' kept'][2]:.3f}]" if t + " kept" in r else f"{r[t]:28.3f}" for t in probs))
    name = args.finetune + (f"-{args.tag}" if args.tag else "")
    write_result(HERE.parent / "results" / "kept-precise" / f"{name}.json", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
