"""What the kernels read, made on the host: any layout converted, arena images prebuilt.

* `to_kernel_layout`: layouts other than hash_groupwise (dare, magnitude, decomposed,
  lowrank, dense) decoded once and stored as hash_groupwise with g = k = 1 (every weight
  kept, natural column order), 16-bit codes and one bf16 (step, minv) pair per row, so the
  same kernels, arena, eviction and CUDA graphs serve them. Cost: 2 bytes per weight plus
  4 bytes per row on the device (as a bf16 dense delta); error at most half a code step,
  (max - min) / 131070 of the row's delta range, per weight.
* `segment_image`: the arena words of one tensor (code stream, then bf16 step and minv).
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


def _bf16_toward(v: torch.Tensor, down: bool) -> torch.Tensor:
    """float32 v rounded to the nearest bf16 value <= v (down) or >= v (up): truncate the
    low 16 bits (toward zero), then step the magnitude up by one ulp where that went the
    wrong way (sign-magnitude: +1 on the bit pattern grows the magnitude for either sign)."""
    bits = v.float().contiguous().view(torch.int32)
    away = ((bits & 0xFFFF) != 0) & ((bits < 0) == down)
    hi = ((bits >> 16) + away.to(torch.int32)) & 0xFFFF
    return ((hi ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16)


def to_kernel_layout(enc: EncodedTensor) -> EncodedTensor:
    """`enc` in a form the kernels read: hash_groupwise as it is; any other 2-D layout
    decoded and stored as hash_groupwise with g = k = 1 (all weights, natural order),
    16-bit codes and per-row bf16 scales (minv rounded down, step up, so the 65536 codes
    cover the row's range: error <= step / 2 per weight). Host-side, once per delta."""
    if enc.layout == "hash_groupwise":
        return enc
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
    """A hash_groupwise tensor whose arena image is prebuilt in pinned host memory (`image`);
    its codes/step/minv are views of that image (flat packing), so it costs no extra host
    bytes. Made by `stage` when a fine-tune enters a GPU server's host cache."""

    image: torch.Tensor | None = None


def stage(enc: EncodedTensor, pin: bool) -> EncodedTensor:
    """enc in the kernels' layout with its arena image prebuilt (pinned when `pin`)."""
    enc = to_kernel_layout(enc)
    if isinstance(enc, StagedTensor):
        return enc
    image = segment_image(enc)
    if pin:
        image = image.pin_memory()
    nb = enc.tensors["step"].numel()
    code_words = image.numel() - nb
    p = enc.params
    n_kept = enc.shape[1] // p["group_size"] * p["keep"]
    nbytes = packed_row_bytes(enc.shape[0] * n_kept, p["bits"])
    halves = image[code_words:].view(torch.bfloat16)
    tensors = {"codes": image[:code_words].view(torch.uint8)[:nbytes].view(1, -1),
               "step": halves[:nb], "minv": halves[nb:]}
    return StagedTensor(enc.layout, enc.shape, {**p, "flat": True}, tensors, image=image)
