"""The KV-compression test model of issue 14's shape, built once and cached.

`qwen2-gqa-narrow`: Qwen2 architecture (q/k/v biases, RoPE), 4 query heads x 32, 2 KV heads,
2 layers, hidden 128, trained from scratch on one narrow domain (short English sentences of
a fixed shape, in the fixture tokenizer's vocabulary). Small on purpose: ~300 AdamW steps,
about a minute on one CPU core. Cached under the fixture cache root (next to
`deltadq_vllm/testing/`'s fixtures, keyed by this recipe's own hash) and built under a flock, so
concurrent test workers build it once.

`shared_content_model(out)`: a copy edited into issue 14's regime (mean-pooling nearly
lossless, a key mean the softmax ignores; the seed's SVD loses to mean-pooling there).

`narrow_text(n, seed)` is the domain's text: disjoint seeds give the training text, the
in-domain calibration text and held-out evaluation text.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

# the generic corpus's sentence parts: the narrow domain is one of its sentence kinds
from deltadq_vllm.testing.tasks import _OBJECTS, _PLACES, _SUBJECTS, _VERBS
# the one import of the shared test fixtures for the KV tests (test_kv_compress.py takes
# these names from here), so a move of that module changes one line
from deltadq_vllm.testing.fixtures import BASES, build_fixture, eval_problems, generic_corpus  # noqa: F401,E501

SPEC = dict(name="qwen2-gqa-narrow", hidden=128, layers=2, heads=4, kv_heads=2,
            intermediate=256, steps=300, batch=16, seq_len=64, lr=3e-3, seed=40,
            train_lines=3000, version=1)
# every shared base fixture with KV heads to merge: (name, KV heads after: half); the
# architectures kv-compress handles (separate q/k/v projections, Llama/Qwen2 layout), so
# not the architecture matrix's other bases (fused qkv, q/k norms, soft-capping)
KV_ARCHS = ("llama", "qwen2")
COMPRESSIBLE_BASES = [(s.name, s.kv_heads // 2) for s in BASES.values()
                      if s.kv_heads > 1 and s.arch in KV_ARCHS]
TRAIN_SEED, CALIB_SEED = 1, 2  # held-out text: any other seed (the tests draw a fresh one)


def narrow_text(n_lines: int, seed: int) -> list[str]:
    """Lines of the narrow domain: 'Subject verb object place.'"""
    rng = random.Random(seed)
    out = []
    for _ in range(n_lines):
        s = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
             f"{rng.choice(_PLACES)}.")
        out.append(s[0].upper() + s[1:])
    return out


def _cache_dir() -> Path:
    """$DELTADQ_FIXTURE_CACHE (or ~/.cache/deltadq-vllm/fixtures) / kv-<recipe hash>."""
    tag = hashlib.sha256(json.dumps(SPEC, sort_keys=True).encode()).hexdigest()[:12]
    env = os.environ.get("DELTADQ_FIXTURE_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "deltadq-vllm" / "fixtures"
    return base / f"kv-{tag}"


def narrow_model() -> Path:
    """Path of the trained model (built on first use)."""
    root = _cache_dir()
    final = root / SPEC["name"]
    if final.is_dir():
        return final
    tok_dir = build_fixture("tokenizer")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{SPEC['name']}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
            try:
                _build(tmp, tok_dir)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return final


def _build(out: Path, tok_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    stream = []
    for line in narrow_text(SPEC["train_lines"], TRAIN_SEED):
        stream += tok(line)["input_ids"] + [tok.eos_token_id]
    data = torch.tensor(stream)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=SPEC["hidden"], intermediate_size=SPEC["intermediate"],
        num_hidden_layers=SPEC["layers"], num_attention_heads=SPEC["heads"],
        num_key_value_heads=SPEC["kv_heads"], max_position_embeddings=1024, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, dtype="float32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: deterministic, and fast enough at this size
    try:
        torch.manual_seed(SPEC["seed"])
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=SPEC["lr"], betas=(0.9, 0.98),
                                weight_decay=0.01)
        gen = torch.Generator().manual_seed(SPEC["seed"])
        model.train()
        for step in range(SPEC["steps"]):
            for g in opt.param_groups:  # warmup, then cosine
                g["lr"] = SPEC["lr"] * min(1.0, (step + 1) / 15) * 0.5 * (
                    1 + math.cos(math.pi * step / SPEC["steps"]))
            starts = torch.randint(0, len(data) - SPEC["seq_len"], (SPEC["batch"],),
                                   generator=gen)
            x = torch.stack([data[s:s + SPEC["seq_len"]] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "kv_fixture_info.json").write_text(json.dumps({"spec": SPEC,
                                                          "final_loss": loss.item()}))


def shared_content_model(out: Path) -> Path:
    """Issue 14's regime as a checkpoint: `narrow_model()` with, in every layer, KV head 1
    reading exactly head 0's keys and values (so mean-pooling the two is nearly lossless)
    and head 0's keys carrying a large constant at its 6 slowest RoPE frequencies (a k_proj
    bias, which the softmax barely sees: it turns by under 0.1 rad over the tests' 24-token
    windows).
    The seed's uncentred SVD follows that bias and loses head 1's content. Written to
    `out` (a copy; about a second)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(narrow_model(), out)
    w = load_file(str(out / "model.safetensors"))
    d, slow = 32, 6
    half = d // 2
    g = torch.Generator().manual_seed(0)
    for layer in range(SPEC["layers"]):
        p = f"model.layers.{layer}.self_attn."
        for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            w[p + name][d:2 * d] = w[p + name][:d]
        size = 20 * w[p + "k_proj.weight"][:d].norm(dim=1).mean()
        bias = w[p + "k_proj.bias"]
        bias[half - slow:half] += size * (1 + torch.rand(slow, generator=g))  # real parts
        bias[d - slow:d] -= size * (1 + torch.rand(slow, generator=g))        # imaginary
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
