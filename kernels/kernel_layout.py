"""What the kernels read, made on the host: any layout converted, arena images prebuilt.

* `to_kernel_layout`: layouts other than hash_groupwise (dare, magnitude, decomposed,
  lowrank, dense) decoded once and stored as hash_groupwise with g = k = 1 (every weight
  kept, natural column order), 16-bit codes and one bf16 (step, minv) pair per row, so the
  same kernels, arena, eviction and CUDA graphs serve them. Cost: 2 bytes per weight plus
  4 bytes per row on the device (as a bf16 dense delta); error at most half a code step,
  (max - min) / 131070 of the row's delta range, per weight.
  Slots built with `lowrank=True` (an LM head's, an embedding's) keep a low-rank delta as
  its bf16 factors instead (`lowrank=True` here): (rows + cols) x rank x 2 bytes, applied
  by kernels/triton_lowrank.py.
* `check_kernel_tensor`: what a slot accepts (shape; g / k / bits and byte sizes of codes).
* `segment_image`: the arena words of one tensor (code stream, then bf16 step and minv;
  for a low-rank delta U then V, `lowrank_words`).
* `stage`: both, done once when a fine-tune enters a GPU server's host cache, the image
  in pinned memory, so activating it into a slot is a few asynchronous copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltadq_vllm.format.bitpack import packed_row_bytes
from deltadq_vllm.format.layouts import EncodedTensor, decode, encode_hash_groupwise, flat_code_stream

CONVERTED_BITS = 16
MAX_GROUP_SIZE = 46340  # g*g must fit in int32 (kernel index arithmetic) and g < 2**16 (units table)


def _bf16_toward(v: torch.Tensor, down: bool) -> torch.Tensor:
    """float32 v rounded to the nearest bf16 value <= v (down) or >= v (up): truncate the
    low 16 bits (toward zero), then step the magnitude up by one ulp where that went the
    wrong way (sign-magnitude: +1 on the bit pattern grows the magnitude for either sign)."""
    bits = v.float().contiguous().view(torch.int32)
    away = ((bits & 0xFFFF) != 0) & ((bits < 0) == down)
    hi = ((bits >> 16) + away.to(torch.int32)) & 0xFFFF
    return ((hi ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16)


def lowrank_words(rows: int, cols: int, rank: int) -> tuple[int, int]:
    """(words of U, words of the segment) of a low-rank delta in the arena: U bf16
    [rows, rank] padded to whole words, then V bf16 [rank, cols]."""
    u_words = math.ceil(rows * rank / 2)
    return u_words, u_words + math.ceil(rank * cols / 2)


def lowrank_views(halves: torch.Tensor, rows: int, cols: int,
                  rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U [rows, rank] and V [rank, cols] as views of a low-rank segment's bf16 halves (from
    its first half): the one place the segment's layout is spelled out (`lowrank_words`)."""
    u_words, _ = lowrank_words(rows, cols, rank)
    return (halves[:rows * rank].view(rows, rank),
            halves[2 * u_words:2 * u_words + rank * cols].view(rank, cols))


def _lowrank_bf16(enc: EncodedTensor) -> EncodedTensor:
    """The factors as bf16 (what the arena holds; the compressor writes bf16 already)."""
    u, v = enc.tensors["u"], enc.tensors["v"]
    if u.dtype == torch.bfloat16 and v.dtype == torch.bfloat16:
        return enc
    return EncodedTensor("lowrank", enc.shape, dict(enc.params),
                         {"u": u.to(torch.bfloat16).contiguous(),
                          "v": v.to(torch.bfloat16).contiguous()})


def to_kernel_layout(enc: EncodedTensor, lowrank: bool = False) -> EncodedTensor:
    """`enc` in a form the kernels read: hash_groupwise as it is; a low-rank delta as its
    bf16 factors where the slots take them (`lowrank`); any other 2-D layout
    decoded and stored as hash_groupwise with g = k = 1 (all weights, natural order),
    16-bit codes and per-row bf16 scales (minv rounded down, step up, so the 65536 codes
    cover the row's range: error <= step / 2 per weight). Host-side, once per delta."""
    if enc.layout == "hash_groupwise":
        return enc
    if enc.layout == "lowrank" and lowrank:
        return _lowrank_bf16(enc)
    dense = decode(enc).float()
    if dense.dim() != 2:
        raise ValueError(f"layout {enc.layout!r}: expected a matrix, got shape {tuple(dense.shape)}")
    out, inp = dense.shape
    levels = (1 << CONVERTED_BITS) - 1
    lo, hi = dense.amin(1), dense.amax(1)
    minv = _bf16_toward(lo, down=True)
    step = _bf16_toward(((hi - minv.float()) / levels).clamp_min(2.0 ** -126), down=False)
    codes = torch.round((dense - minv.float()[:, None]) / step.float()[:, None]).clamp_(0, levels)
    return encode_hash_groupwise((out, inp), codes.to(torch.int64), step, minv, group_size=1,
                                 keep=1, bits=CONVERTED_BITS, seed=0, rows_per_scale=1)


def segment_image(enc: EncodedTensor) -> torch.Tensor:
    """The arena words of one hash_groupwise tensor: its codes as one bit stream (padded to
    whole words), then nb bf16 `step` and nb bf16 `minv` (nb words). A StagedTensor already
    carries it (pinned, made once when the delta entered the host cache)."""
    image = getattr(enc, "image", None)
    if image is not None:
        return image
    if enc.layout == "lowrank":
        rows, cols = enc.shape
        r = enc.params["rank"]
        out = torch.zeros(lowrank_words(rows, cols, r)[1], dtype=torch.int32)
        u, v = lowrank_views(out.view(torch.bfloat16), rows, cols, r)
        u.copy_(enc.tensors["u"])
        v.copy_(enc.tensors["v"])
        return out
    stream = flat_code_stream(enc)
    code_words = math.ceil(stream.numel() / 4)
    nb = enc.tensors["step"].numel()
    out = torch.zeros(code_words + nb, dtype=torch.int32)
    out[:code_words].view(torch.uint8)[:stream.numel()] = stream
    halves = out[code_words:].view(torch.bfloat16)
    halves[:nb] = enc.tensors["step"].to(torch.bfloat16).reshape(-1)
    halves[nb:] = enc.tensors["minv"].to(torch.bfloat16).reshape(-1)
    return out


@dataclass
class StagedTensor(EncodedTensor):
    """A hash_groupwise (or low-rank) tensor whose arena image is prebuilt in pinned host
    memory (`image`); its codes/step/minv (u/v) are views of that image (flat packing), so
    it costs no extra host bytes. Made by `stage` when a fine-tune enters a GPU server's
    host cache."""

    image: torch.Tensor | None = None


def stage(enc: EncodedTensor, pin: bool, lowrank: bool = False) -> EncodedTensor:
    """enc in the kernels' layout with its arena image prebuilt (pinned when `pin`);
    `lowrank`: for slots that keep low-rank factors (to_kernel_layout)."""
    enc = to_kernel_layout(enc, lowrank=lowrank)
    if isinstance(enc, StagedTensor):
        return enc
    image = segment_image(enc)
    if pin:
        image = image.pin_memory()
    if enc.layout == "lowrank":
        u, v = lowrank_views(image.view(torch.bfloat16), *enc.shape, enc.params["rank"])
        return StagedTensor(enc.layout, enc.shape, dict(enc.params), {"u": u, "v": v},
                            image=image)
    nb = enc.tensors["step"].numel()
    code_words = image.numel() - nb
    p = enc.params
    n_kept = enc.shape[1] // p["group_size"] * p["keep"]
    nbytes = packed_row_bytes(enc.shape[0] * n_kept, p["bits"])
    halves = image[code_words:].view(torch.bfloat16)
    tensors = {"codes": image[:code_words].view(torch.uint8)[:nbytes].view(1, -1),
               "step": halves[:nb], "minv": halves[nb:]}
    return StagedTensor(enc.layout, enc.shape, {**p, "flat": True}, tensors, image=image)


def check_kernel_tensor(enc: EncodedTensor, i: int, size: int, in_features: int) -> None:
    """Raise ValueError unless `enc` (slice i of a layer: [size, in_features]) is what the
    kernels can read: its shape, and for hash_groupwise its g / k / bits and byte sizes."""
    if tuple(enc.shape) != (size, in_features):
        raise ValueError(f"slice {i}: delta shape {tuple(enc.shape)} != {(size, in_features)}")
    if enc.layout != "hash_groupwise":
        # host slots expand any layout; kernel slots get to_kernel_layout's output
        return
    p = enc.params
    g, k, bits = p["group_size"], p["keep"], p["bits"]
    if in_features % g:
        raise ValueError(f"slice {i}: group size {g} does not divide {in_features}")
    if g > MAX_GROUP_SIZE:
        raise ValueError(f"slice {i}: group size {g} > {MAX_GROUP_SIZE} is not supported by the kernels")
    if not 1 <= k <= g:
        raise ValueError(f"slice {i}: keep {k} not in [1, {g}]")
    if not 1 <= bits <= 16:
        raise ValueError(f"slice {i}: bits {bits} not in [1, 16]")
    n_kept = in_features // g * k
    want = ((1, packed_row_bytes(size * n_kept, bits)) if p.get("flat")
            else (size, packed_row_bytes(n_kept, bits)))
    codes = enc.tensors["codes"]
    if tuple(codes.shape) != want or codes.dtype != torch.uint8:
        raise ValueError(f"slice {i}: codes {tuple(codes.shape)} {codes.dtype} != {want} uint8")
    nb = enc.tensors["step"].numel()
    rps, sro = p["rows_per_scale"], p.get("scale_row_offset", 0)
    need = (sro + size - 1) // rps + 1
    if nb < need or nb > size or enc.tensors["minv"].numel() != nb:
        raise ValueError(f"slice {i}: {nb} scale blocks, need {need} (<= {size})")
