"""Issue 14's regime on the benchmark's model of its shape: `xsum-qwen2-gqa` edited so that
mean-pooling its two KV heads is nearly lossless (KV head 1 reads head 0's keys and values)
and head 0's keys carry a large constant at their `--slow` slowest RoPE frequencies (a
k_proj bias, 20x the key rows' mean norm). Held-out perplexity of the edited original, the
seed's SVD, mean-pooling and the default (per-layer choice), 2 -> 1 KV heads, XSum
calibration; the same evaluation as run.py.

    .venv/bin/python benchmarks/kv_heads/issue14_regime.py [--slow 6] [--windows 64]

Writes benchmarks/results/kv_heads/issue14_regime.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402
import run  # noqa: E402

from deltadq_vllm.tools.kv_compress import KVCompressOptions, kv_compress  # noqa: E402


def edit(src: Path, out: Path, slow: int) -> Path:
    shutil.copytree(src, out)
    w = load_file(str(out / "model.safetensors"))
    d = 32
    half = d // 2
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn."
        for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            w[p + name][d:2 * d] = w[p + name][:d]
        size = 20 * w[p + "k_proj.weight"][:d].norm(dim=1).mean()
        bias = w[p + "k_proj.bias"]
        bias[half - slow:half] += size * (1 + torch.rand(slow, generator=g))
        bias[d - slow:d] -= size * (1 + torch.rand(slow, generator=g))
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slow", type=int, default=6)
    ap.add_argument("--windows", type=int, default=64)
    a = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()
    st = run.SETTINGS["xsum-qwen2-gqa"]
    work = Path(tempfile.mkdtemp(prefix="kv-regime-", dir=assets.cache_root()))
    try:
        model = edit(assets.xsum_qwen2_gqa(), work / "edited", a.slow)
        windows = run.eval_windows(model, a.windows, st["eval_len"])
        orig = run.evaluate(model, windows, None)
        rows = {"original (edited)": {"ppl": orig["ppl"]}}
        for label, method, grouping in (("seed SVD", "svd-uncentred", "adjacent"),
                                        ("SVD", "svd", "adjacent"),
                                        ("mean-pool", "meanpool", "adjacent"),
                                        ("chosen", "auto", "auto")):
            out = work / method
            s = kv_compress(model, out, KVCompressOptions(
                kv_heads=1, method=method, grouping=grouping, progress=False,
                calibration=str(assets.calibration_file()), calib_seqs=st["calib_seqs"],
                calib_seq_len=st["calib_len"]))
            ev = run.evaluate(out, windows, orig["top1"])
            rows[label] = {"ppl": ev["ppl"], "agreement": ev["agreement"],
                           "per_layer": run._per_layer(s)}
            print(f"{label:<10} ppl {ev['ppl']:.3f}  top-1 agreement {ev['agreement']:.3f}  "
                  f"chosen per layer {[r['chosen'] for r in s['per_layer']]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"original (edited) ppl {orig['ppl']:.3f}, {orig['tokens']} held-out tokens")
    doc = {"slow_frequencies": a.slow, "eval_tokens": orig["tokens"], "rows": rows,
           "command": " ".join(["benchmarks/kv_heads/issue14_regime.py", *sys.argv[1:]]),
           "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                       "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "loadavg_1_5_15_start": [round(x, 2) for x in load0],
                       "loadavg_1_5_15_end": [round(x, 2) for x in os.getloadavg()]},
           "seconds": round(time.time() - t0, 1)}
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    (run.RESULTS / "issue14_regime.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
