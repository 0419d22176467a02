"""The README's main job, runnable on a fresh CPU machine in a few minutes.

Builds a tiny Llama base with two real fine-tunes (arithmetic, upper-casing),
compresses each delta with DeltaDQ at a 16x true ratio, merges it back onto the
base, and compares task accuracy and answers of the original and the rebuilt
fine-tunes on the same prompts. (Serving the deltas from one vLLM server replaces
the merge step once the plugin lands, issue #4.)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .tools.compress import CompressOptions, compress, format_summary
from .tools.fixtures import TASKS, build_fixture, greedy_complete, load_tokenizer, task_accuracy
from .tools.inspect_delta import describe, format_description
from .tools.merge import merge

PROMPTS = ["Q: 23+45=? A:", "Q: upper cat A:"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--workdir", default=None, help="keep artifacts here (default: temp dir)")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    print("building the tiny base and its fine-tunes (cached after the first run)...")
    base = build_fixture("llama-gqa")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deltadq-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(base)
    rows = []
    for task in ("math", "code"):
        ft = build_fixture(f"llama-gqa--{task}")
        delta, merged = work / f"{task}-delta", work / f"{task}-merged"
        print(f"\n== {task}: compress at {args.ratio:g}x true ==")
        s = compress(base, ft, delta, CompressOptions(ratio=args.ratio, force=True,
                                                       progress=False))
        print(format_summary(s))
        print(format_description(describe(delta)))
        merge(base, delta, merged, force=True, progress=False)
        for label, path in (("fine-tune", ft), ("rebuilt from delta", merged)):
            model = AutoModelForCausalLM.from_pretrained(path)
            acc = task_accuracy(model, tok, task)
            answers = greedy_complete(model, tok, PROMPTS, TASKS[task].max_new_tokens)
            rows.append((task, label, acc, answers))
        base_model = AutoModelForCausalLM.from_pretrained(base)
        rows.append((task, "base", task_accuracy(base_model, tok, task),
                     greedy_complete(base_model, tok, PROMPTS, TASKS[task].max_new_tokens)))
    print(f"\n{'task':<6} {'model':<20} {'accuracy':>8}   " + " | ".join(PROMPTS))
    for task, label, acc, answers in rows:
        print(f"{task:<6} {label:<20} {acc:>8.2f}   " + " | ".join(a.strip() for a in answers))
    print(f"\nartifacts in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
