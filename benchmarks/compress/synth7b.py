"""A 7B-shaped synthetic base + fine-tune pair (Llama-2-7B shapes), written once, atomically.

    .venv/bin/python benchmarks/compress/synth7b.py [--out /work/data/synth-7b]

Shapes: 32 decoder layers, hidden 4096, 32 heads of 128 (MHA), MLP 11008, vocab 32000,
untied LM head, bf16, sharded safetensors (~2 GB shards + HF index): 6.74e9 parameters,
13.5 GB per checkpoint. Both folders carry the fixture tokenizer (ids < 384 valid), so
`deltadq compress` calibrates on them as it would on a real model.

The fine-tune is base + a delta of relative Frobenius norm 0.01 per tensor, so every tensor
differs. Since the seventeenth session the pair is built to behave like a real fine-tune
under the whole-model check (the pairs before it had none of the three properties below,
and their delta came out further from the "fine-tune" than the base, so every run paid
the check's shrink, minutes at 7B; real fine-tunes pass without it):
- **Activation-aligned delta** (`--rank8` turns it off): each decoder linear's and the LM
  head's delta is the sum of 512 outer products `g_t x_t^T` over the base layer's inputs
  `x_t` on generated text (not the compressor's calibration or check text), random `g_t`,
  plus 30% dense noise: what gradient steps add up to, so the delta acts on the directions
  the layer's inputs occupy. Embedding and norms: rank 8 plus 30% noise (as before).
- **Anisotropic hidden states** (`--subspace`, default 256; 0 = isotropic): every
  embedding row is a random mix (norm 2) of the same 256 of 4096 directions plus the
  token's own part (norm 1), as the hidden states of trained LLMs concentrate in few
  directions. (One direction shared by every token instead made every position's logits
  nearly the same: 13 distinct argmaxes in 1024 tokens.)
- **Peaked next-token distributions** (`--logit-std`, default 4): the LM head is scaled so
  that logits have a standard deviation of ~4 (entropy ~3.9 nats, top token ~0.27, like a
  trained model on text; at 1, every distribution was nearly uniform, 9.9 of 10.4 nats).

Values come from one shared pool of 2^24 Gaussian numbers read at a per-tensor offset
(13.5e9 fresh Gaussian draws took hours on a shared 2-core machine; the compressor's work
does not depend on them), each matrix row from its own window (`_from_pool`).

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
SUBSPACE_NORM = 2.0   # norm of an embedding row's shared part (its own part: ~1)


POOL_BITS = 24
_POOL: dict[int, torch.Tensor] = {}


def _pool(seed: int) -> torch.Tensor:
    if seed not in _POOL:
        _POOL[seed] = torch.randn(1 << POOL_BITS, generator=torch.Generator().manual_seed(seed))
    return _POOL[seed]


def _from_pool(shape, seed: int, salt: str) -> torch.Tensor:
    """Gaussian-looking values from the pool, from a per-tensor offset. A matrix's rows
    start `cols + 1` (odd) values apart, so no two rows of one tensor are the same window of
    the pool. (Read as one flat run, as before the seventeenth session, a 32000 x 4096 head
    repeated every 4096th row: tokens r and r + 4096 had the same logit up to the delta, and
    a top-1 comparison measured which copy the delta favoured.)"""
    import zlib

    pool = _pool(seed)
    size = pool.numel()
    start = zlib.crc32(salt.encode()) % size
    if len(shape) == 1:
        n = shape[0]
        reps = (start + n) // size + 1
        flat = pool.repeat(reps)[start:start + n] if reps > 1 else pool[start:start + n]
        return flat.clone()
    rows, cols = shape
    assert cols < size
    stride = cols + 1 if cols % 2 == 0 else cols + 2   # odd: the offsets cycle through all
    ext = torch.cat([pool, pool[:cols]])               # any window of `cols` is contiguous
    out = torch.empty(shape)
    i, off = 0, start
    while i < rows:
        k = min(rows - i, (size - 1 - off) // stride + 1)   # rows before the offset wraps
        out[i:i + k] = ext.as_strided((k, cols), (stride, 1), off)
        i, off = i + k, (off + k * stride) % size
    return out


def _tensor(name: str, shape, seed: int, subspace: int = 0, logit_std: float = 1.0,
            subspace_norm: float = SUBSPACE_NORM) -> torch.Tensor:
    """Base weight: norms ~1, matrices ~N(0, 1/fan_in); embedding rows plus a random mix
    (norm `subspace_norm`) of `subspace` shared directions (each row's own part has norm
    ~1); the LM head times `logit_std` (its inputs have RMS ~1 after the final norm)."""
    t = _from_pool(shape, seed, name)
    if len(shape) == 1:
        return t.mul_(0.02).add_(1.0)
    t.mul_(1.0 / math.sqrt(shape[1]))
    if subspace and name == "model.embed_tokens.weight":
        basis = _from_pool((subspace, shape[1]), seed, "subspace").div_(math.sqrt(shape[1]))
        mix = _from_pool((shape[0], subspace), seed, "subspace mix")
        t.add_(mix @ basis, alpha=subspace_norm / math.sqrt(subspace))
    if name == "lm_head.weight":
        t.mul_(logit_std)
    return t


def _delta(name: str, w: torch.Tensor, seed: int, rel: float = 0.01,
           inputs: torch.Tensor | None = None) -> torch.Tensor:
    """Relative Frobenius norm `rel`: rank 8 plus 30% noise; with `inputs` ([T, in]: the
    base layer's inputs on training text), the rank-8 part is replaced by the sum of T
    outer products g_t x_t^T with random g_t (what gradient steps add up to)."""
    if w.dim() == 1:
        d = _from_pool(w.shape, seed, name + "/d")
    else:
        g = torch.Generator().manual_seed(seed + zlib_crc(name))
        if inputs is None:
            d = torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1], generator=g)
        else:
            d = torch.randn(w.shape[0], inputs.shape[0], generator=g) @ inputs.float()
        d.div_(d.norm()).add_(_from_pool(w.shape, seed, name + "/d"),
                              alpha=0.3 / math.sqrt(w.numel()))
    return d.mul_(rel * w.norm() / d.norm())


def _training_inputs(base_dir: Path, seed: int):
    """name -> [T, in] inputs of every decoder linear and the LM head of the base, on 512
    tokens of generated text (not the compressor's calibration or check text), one layer
    at a time in checkpoint order (deltadq's own layer-wise calibrator)."""
    import random

    from deltadq_vllm.checkpoint import Checkpoint
    from deltadq_vllm.testing.tasks import _corpus_line
    from deltadq_vllm.tools.calibration import LayerwiseCalibrator, layer_index

    rng = random.Random(seed + 17)
    text = "\n".join(_corpus_line(rng) for _ in range(600))
    cal = LayerwiseCalibrator(Checkpoint(base_dir), text, n_seqs=4, seq_len=128, max_rows=512)

    def inputs(name: str) -> torch.Tensor | None:
        if name == "lm_head.weight":
            return cal.final_inputs()
        i = layer_index(name)
        if i is None:
            return None   # the embedding: rank 8 + noise
        x = cal.inputs_for_layer(i).get(name)
        if x is None:
            raise KeyError(f"no calibrated inputs for {name}: the aligned delta cannot be made")
        return x
    return inputs


def zlib_crc(s: str) -> int:
    import zlib
    return zlib.crc32(s.encode())


def build(out: Path, seed: int = 0, layers: int | None = None, subspace: int = 256,
          logit_std: float = 4.0, aligned: bool = True) -> Path:
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
                return _tensor(n, sh, seed, subspace, logit_std)
        else:
            inputs = _training_inputs(tmp / "base", seed) if aligned else lambda n: None

            def make(n, sh):
                w = _tensor(n, sh, seed, subspace, logit_std)
                return w.add_(_delta(n, w, seed, inputs=inputs(n) if len(sh) == 2 else None))
        _write_sharded(d, table, make, torch.bfloat16, SHARD_BYTES)
        config.save_pretrained(d)
        for f in tok_dir.iterdir():
            if f.name != INFO_FILE:
                shutil.copy(f, d / f.name)
        print(f"{kind}: {time.time() - t0:.0f} s", flush=True)
    (tmp / "README.json").write_text(json.dumps(
        {"what": "7B-shaped synthetic pair (benchmarks/compress/synth7b.py)", **s,
         "dtype": "bfloat16",
         "delta": ("activation-aligned" if aligned else "rank 8")
         + " + 30% noise, relative norm 0.01 per tensor",
         "subspace": subspace, "subspace_norm": SUBSPACE_NORM, "logit_std": logit_std,
         "seed": seed}, indent=1))
    os.replace(tmp, out)  # atomic publish (out must not exist)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer decoder layers (same shapes otherwise): a quick pair whose "
                         "compress time per layer extrapolates to the full model")
    ap.add_argument("--subspace", type=int, default=256,
                    help="embedding rows mix this many shared directions (norm 2; each row's "
                         "own part ~1); 0 = isotropic, the pairs before the seventeenth session")
    ap.add_argument("--logit-std", type=float, default=4.0,
                    help="scale of the LM head: standard deviation of the logits (1 = the "
                         "pairs before the seventeenth session)")
    ap.add_argument("--rank8", action="store_true",
                    help="the decoder linears' and LM head's delta: rank 8 + noise (as before "
                         "the seventeenth session) instead of activation-aligned + noise")
    args = ap.parse_args(argv)
    build(args.out, layers=args.layers, subspace=args.subspace,
          logit_std=args.logit_std, aligned=not args.rank8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
