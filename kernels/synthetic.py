"""Realistic compressed deltas of real layer shapes, for kernel tuning and benchmarks.

No real fine-tune of a 7B/8B/70B model exists offline, and the kernels' speed depends on
the configuration (group size g, keep count k, bits, scale blocks), not on the values.
So: the compressor picks its own (g, k, bits, rows_per_scale) for a target ratio on a
256-row proxy of a realistic delta (low-rank part + row-scaled noise), and the timed
deltas get random codes and realistic scales in that configuration.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from deltadq_vllm.format.bitpack import packed_row_bytes
from deltadq_vllm.format.layouts import EncodedTensor

# name -> [(layer, in_features, [slice sizes])], tensor-parallel size 1
PRESETS = {
    "7b": [("qkv", 4096, [4096, 4096, 4096]), ("o", 4096, [4096]),
           ("gate_up", 4096, [11008, 11008]), ("down", 11008, [4096])],
    "8b": [("qkv", 4096, [4096, 1024, 1024]), ("o", 4096, [4096]),
           ("gate_up", 4096, [14336, 14336]), ("down", 14336, [4096])],
    "70b": [("qkv", 8192, [8192, 1024, 1024]), ("o", 8192, [8192]),
            ("gate_up", 8192, [28672, 28672]), ("down", 28672, [8192])],
}


def model_shapes(model_dir: str | Path) -> list[tuple[str, int, list[int]]]:
    """The four linear-layer shapes of a Llama-like model folder's config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    try:
        h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
        nq = int(cfg["num_attention_heads"])
    except KeyError as e:
        raise ValueError(f"{model_dir}/config.json lacks {e}: not a Llama-like decoder") from None
    nkv = int(cfg.get("num_key_value_heads") or nq)
    hd = int(cfg.get("head_dim") or h // nq)
    return [("qkv", h, [nq * hd, nkv * hd, nkv * hd]), ("o", nq * hd, [h]),
            ("gate_up", h, [inter, inter]), ("down", inter, [h])]


def realistic_delta(out: int, inp: int, gen: torch.Generator, scale: float = 1e-3,
                    rank: int = 8) -> torch.Tensor:
    """float32 [out, in]: rank-`rank` structure plus noise, per-row log-normal scales."""
    u = torch.randn(out, rank, generator=gen)
    v = torch.randn(rank, inp, generator=gen)
    low = (u @ v) / math.sqrt(rank)
    noise = torch.randn(out, inp, generator=gen)
    rows = torch.exp(0.5 * torch.randn(out, 1, generator=gen))
    return (0.5 * low + noise) * rows * scale


@functools.lru_cache(maxsize=None)
def pick_config(inp: int, ratio: float, seed: int = 0, bits=None, proxy_rows: int = 256) -> dict:
    """The compressor's (g, k, bits, rows_per_scale) for a realistic delta with `inp` inputs
    at `ratio` (per-row budget; the row count only matters through scale blocks)."""
    from deltadq_vllm.tools.methods import Calibration, MethodOptions, compress_deltadq
    gen = torch.Generator().manual_seed(seed + inp)
    d = realistic_delta(proxy_rows, inp, gen)
    ch = compress_deltadq(f"proxy.{inp}", d, Calibration(), proxy_rows * inp * 2 / ratio,
                          MethodOptions(bits=bits), seed=seed)
    p = ch.enc.params
    return {"group_size": p["group_size"], "keep": p["keep"], "bits": p["bits"],
            "rows_per_scale": p["rows_per_scale"]}


def random_encoding(out: int, inp: int, cfg: dict, gen: torch.Generator, seed: int) -> EncodedTensor:
    """A hash_groupwise delta in configuration cfg with random codes and realistic scales."""
    g, k, bits, rps = cfg["group_size"], cfg["keep"], cfg["bits"], cfg["rows_per_scale"]
    n_kept = inp // g * k
    rb = packed_row_bytes(n_kept, bits)
    codes = torch.randint(0, 256, (out, rb), generator=gen, dtype=torch.uint8)
    pad = rb * 8 - n_kept * bits
    if pad:  # keep the padding bits zero, as pack_bits writes them
        codes[:, -1] &= (1 << (8 - pad)) - 1
    nb = (out + rps - 1) // rps
    span = 2e-3 * (g / k) * torch.exp(0.5 * torch.randn(nb, generator=gen))
    step = (span / ((1 << bits) - 1)).to(torch.bfloat16)
    minv = (-span / 2).to(torch.bfloat16)
    params = {"group_size": g, "keep": k, "bits": bits, "seed": seed & 0xFFFFFFFF,
              "rows_per_scale": rps, "row_offset": 0, "group_offset": 0,
              "n_groups_total": inp // g, "n_rows_total": out}
    return EncodedTensor("hash_groupwise", (out, inp), params,
                         {"codes": codes, "step": step, "minv": minv})
