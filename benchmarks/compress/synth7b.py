"""A 7B-shaped synthetic base + fine-tune pair (Llama-2-7B shapes), written once, atomically.

    .venv/bin/python benchmarks/compress/synth7b.py [--out /work/data/synth-7b]

Shapes: 32 decoder layers, hidden 4096, 32 heads of 128 (MHA), MLP 11008, vocab 32000,
untied LM head, bf16, sharded safetensors (~2 GB shards + HF index): 6.74e9 parameters,
13.5 GB per checkpoint. The fine-tune is base + a delta of relative Frobenius norm 0.01 per
tensor (rank 8 plus 30% dense noise), so every tensor differs. Values come from one shared
pool of 2^24 Gaussian numbers read at a per-tensor offset (13.5e9 fresh Gaussian draws
took hours on this shared 2-core machine; the compressor's work does not depend on them). Both folders carry the fixture tokenizer (ids < 384 valid), so
`deltadq compress` calibrates on them as it would on a real model.

Atomic: both folders are written under a temporary sibling of --out and renamed into place
at the end, so a reader never sees a half-written pair; an existing --out is left alone.
Other benchmarks reuse the folder (e.g. timing a base content hash): treat it as read-only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from deltadq_vllm.testing.synthetic import llama_shapes

DEFAULT_OUT = Path("/work/data/synth-7b")
SHAPE = dict(hidden=4096, inter=11008, vocab=32000, layers=32, heads=32, head_dim=128)
SHARD_BYTES = 2e9


POOL_BITS = 24
_POOL: dict[int, torch.Tensor] = {}


def _pool(seed: int) -> torch.Tensor:
    if seed not in _POOL:
        _POOL[seed] = torch.randn(1 << POOL_BITS, generator=torch.Generator().manual_seed(seed))
    return _POOL[seed]


def _from_pool(shape, seed: int, salt: str) -> torch.Tensor:
    """Gaussian-looking values: the pool read cyclically from a per-tensor offset."""
    import zlib

    pool = _pool(seed)
    n = math.prod(shape)
    start = zlib.crc32(salt.encode()) % pool.numel()
    reps = (start + n) // pool.numel() + 1
    flat = pool.repeat(reps)[start:start + n] if reps > 1 else pool[start:start + n]
    return flat.reshape(shape).clone()


def _tensor(name: str, shape, seed: int) -> torch.Tensor:
    """Base weight: norms ~1, matrices ~N(0, 1/fan_in)."""
    t = _from_pool(shape, seed, name)
    if len(shape) == 1:
        return t.mul_(0.02).add_(1.0)
    return t.mul_(1.0 / math.sqrt(shape[1]))


def _delta(name: str, w: torch.Tensor, seed: int, rel: float = 0.01) -> torch.Tensor:
    """Rank 8 plus 30% noise, relative Frobenius norm `rel`."""
    if w.dim() == 1:
        d = _from_pool(w.shape, seed, name + "/d")
    else:
        g = torch.Generator().manual_seed(seed + zlib_crc(name))
        d = torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1], generator=g)
        d.div_(d.norm()).add_(_from_pool(w.shape, seed, name + "/d"),
                              alpha=0.3 / math.sqrt(w.numel()))
    return d.mul_(rel * w.norm() / d.norm())


def zlib_crc(s: str) -> int:
    import zlib
    return zlib.crc32(s.encode())


def build(out: Path, seed: int = 0, layers: int | None = None) -> Path:
    from transformers import LlamaConfig

    from deltadq_vllm.testing.fixtures import INFO_FILE, TOKENIZER, build_fixture
    from deltadq_vllm.testing.synthetic import _write_sharded

    if (out / "base" / "config.json").exists() and (out / "finetune" / "config.json").exists():
        print(f"{out}: already built", flush=True)
        return out
    s = dict(SHAPE, layers=layers or SHAPE["layers"])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"], head_dim=s["head_dim"], max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    tok_dir = build_fixture(TOKENIZER.name)
    table = llama_shapes(s["hidden"], s["inter"], s["vocab"], s["layers"], s["heads"] * s["head_dim"])
    for kind in ("base", "finetune"):
        t0 = time.time()
        d = tmp / kind
        d.mkdir()
        if kind == "base":
            def make(n, sh):
                return _tensor(n, sh, seed)
        else:
            def make(n, sh):
                w = _tensor(n, sh, seed)
                return w.add_(_delta(n, w, seed))
        _write_sharded(d, table, make, torch.bfloat16, SHARD_BYTES)
        config.save_pretrained(d)
        for f in tok_dir.iterdir():
            if f.name != INFO_FILE:
                shutil.copy(f, d / f.name)
        print(f"{kind}: {time.time() - t0:.0f} s", flush=True)
    (tmp / "README.json").write_text(json.dumps(
        {"what": "7B-shaped synthetic pair (benchmarks/compress/synth7b.py)", **s,
         "dtype": "bfloat16", "delta": "rank 8 + 30% noise, relative norm 0.01 per tensor",
         "seed": seed}, indent=1))
    os.replace(tmp, out)  # atomic publish (out must not exist)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer decoder layers (same shapes otherwise): a quick pair whose "
                         "compress time per layer extrapolates to the full model")
    args = ap.parse_args(argv)
    build(args.out, layers=args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
