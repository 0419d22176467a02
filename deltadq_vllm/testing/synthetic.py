"""A large (~1 GB) random Llama base + fine-tune pair, written shard by shard, for peak-RSS
measurements of the compressor (benchmarks/compress/rss.py); not part of the fixture cache."""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path
from typing import Callable

import torch

from .fixtures import build_fixture
from .vocab import INFO_FILE


def _synthetic_kv_heads(hidden: int) -> int:
    """GQA 4:1 when the head count allows it (9 heads of SmolLM2 shape: 3 KV heads)."""
    heads = hidden // 64
    for r in (4, 3):
        if heads % r == 0:
            return heads // r
    return heads


def llama_shapes(hidden: int, inter: int, vocab: int, layers: int,
                 kv_rows: int) -> list[tuple[str, tuple]]:
    """(name, shape) of every tensor of a Llama-layout checkpoint with an untied LM head
    (also benchmarks/compress/synth7b.py's 7B-shaped pair)."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_rows, hidden)),
            (p + "self_attn.v_proj.weight", (kv_rows, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def _synthetic_shapes(hidden: int, inter: int, vocab: int, layers: int) -> list[tuple[str, tuple]]:
    return llama_shapes(hidden, inter, vocab, layers, _synthetic_kv_heads(hidden) * 64)


def _synthetic_tensor(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """Base weight: norms ~1, matrices N(0, 1/fan_in). Seeded per tensor (order-free)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib_crc(name))
    if len(shape) == 1:
        return 1.0 + 0.02 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(shape[1])


def _synthetic_delta(name: str, w: torch.Tensor, seed: int, rel: float = 0.01) -> torch.Tensor:
    """Low-rank (rank 8) plus 10% noise, scaled to a relative Frobenius norm `rel`."""
    g = torch.Generator().manual_seed(seed * 7_919 + zlib_crc(name) + 1)
    if w.dim() == 1:
        d = torch.randn(w.shape, generator=g)
    else:
        r = 8
        d = torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w.shape[1], generator=g)
        d = d / d.norm() + 0.1 * torch.randn(w.shape, generator=g) / math.sqrt(w.numel())
    return d * (rel * w.norm() / d.norm())


def zlib_crc(s: str) -> int:
    return zlib.crc32(s.encode())


def _write_sharded(out_dir: Path, shapes, make: Callable[[str, tuple], torch.Tensor],
                   dtype: torch.dtype, shard_bytes: float) -> None:
    """Write tensors shard by shard (at most one shard in memory) + HF index json."""
    from safetensors.torch import save_file

    esize = torch.empty((), dtype=dtype).element_size()
    groups, cur, cur_bytes = [], [], 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * esize
        if cur and cur_bytes + nbytes > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    groups.append(cur)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: make(n, s).to(dtype).contiguous() for n, s in group}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        del shard
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def make_synthetic_pair(out_dir, target_bytes: float = 1.1e9, shard_bytes: float = 300e6,
                        dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                        hidden: int = 2048, vocab: int = 8192) -> tuple[Path, Path]:
    """Write a large Llama base + fine-tune (base + ~1% low-rank delta) without ever holding
    a whole model in memory. Returns (base_dir, ft_dir). For peak-RSS measurements."""
    from transformers import LlamaConfig

    out_dir = Path(out_dir)
    inter = hidden * 8 // 3 // 256 * 256
    esize = torch.empty((), dtype=dtype).element_size()
    per_layer = (2 * hidden * hidden + 2 * hidden * _synthetic_kv_heads(hidden) * 64
                 + 3 * hidden * inter) * esize
    fixed = 2 * vocab * hidden * esize
    layers = max(1, math.ceil((target_bytes - fixed) / per_layer))
    shapes = _synthetic_shapes(hidden, inter, vocab, layers)
    tok_dir = build_fixture("tokenizer")
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=_synthetic_kv_heads(hidden),
        head_dim=64,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
        dtype=str(dtype).replace("torch.", ""))
    config.architectures = ["LlamaForCausalLM"]
    dirs = []
    for kind in ("base", "ft"):
        d = out_dir / f"synthetic-{kind}"
        d.mkdir(parents=True, exist_ok=True)
        if kind == "base":
            make = lambda n, s: _synthetic_tensor(n, s, seed)  # noqa: E731
        else:
            def make(n, s):
                w = _synthetic_tensor(n, s, seed)
                return w + _synthetic_delta(n, w, seed)
        _write_sharded(d, shapes, make, dtype, shard_bytes)
        config.save_pretrained(d)
        for f in tok_dir.iterdir():  # tokenizer files (vocab is smaller: ids < 384 are valid)
            if f.name != INFO_FILE:
                shutil.copy(f, d / f.name)
        dirs.append(d)
    return dirs[0], dirs[1]
