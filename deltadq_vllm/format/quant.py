"""Uniform asymmetric quantization with scales shared by blocks of rows.

value = minv[block] + step[block] * code,   code in [0, 2**bits), block = row // rows_per_scale

`minv` and `step` are stored in bfloat16 (2 bytes each, wide exponent range: real
delta steps are ~1e-5, below fp16's normal range). Codes are computed against the
*stored* (rounded) minv/step, so decode(encode(v)) is the nearest grid point of
exactly the grid the reader sees.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.bfloat16

# Range search (the encoder only; decoding is unchanged): min-max ranges waste the few
# levels of 1-4 bit codes on outliers, and at extreme ratios (a handful of kept values
# per row, rescaled by g/k) they turn every value into +-max. For these widths each scale
# block tries its range shrunk toward the block mean by these factors and keeps the one
# with the smallest squared error (values past the range are clamped).
CLIP_FACTORS = (1.0, 0.85, 0.7, 0.55, 0.45, 0.35, 0.27, 0.2, 0.15, 0.1)
CLIP_MAX_BITS = 4


def _blocks(n_rows: int, rows_per_scale: int) -> int:
    return (n_rows + rows_per_scale - 1) // rows_per_scale


def _per_row(t: torch.Tensor, rows_per_scale: int, n_rows: int) -> torch.Tensor:
    return t.float().repeat_interleave(rows_per_scale)[:n_rows].unsqueeze(1)


def _grid(lo: torch.Tensor, hi: torch.Tensor, levels: int):
    minv = lo.to(SCALE_DTYPE)
    return minv, round_up_scale((hi - minv.float()) / levels)


def search_ranges(err_of, lo: torch.Tensor, hi: torch.Tensor, mean: torch.Tensor, bits: int,
                  clip: bool = True):
    """(minv, step) per block: min-max, or for <= CLIP_MAX_BITS the shrunk range with the
    smallest squared error; err_of(minv, step) -> per-block squared error."""
    levels = (1 << bits) - 1
    minv, step = _grid(lo, hi, levels)
    if not clip or bits > CLIP_MAX_BITS:
        return minv, step
    best = err_of(minv, step)
    for f in CLIP_FACTORS[1:]:
        m2, s2 = _grid(mean + f * (lo - mean), mean + f * (hi - mean), levels)
        e = err_of(m2, s2)
        better = e < best
        minv, step = torch.where(better, m2, minv), torch.where(better, s2, step)
        best = torch.minimum(e, best)
    return minv, step


def quantize(values: torch.Tensor, bits: int, rows_per_scale: int = 1, clip: bool = True):
    """Quantize float values [R, C] row-block-wise. Returns (codes int64, step, minv).
    clip: search the range of each block (CLIP_FACTORS) for <= CLIP_MAX_BITS bits."""
    rows, cols = values.shape
    if rows_per_scale < 1:
        raise ValueError("rows_per_scale must be >= 1")
    nb = _blocks(rows, rows_per_scale)
    pad = nb * rows_per_scale - rows
    v = values.float()
    if pad:
        # padding rows repeat the last row so they do not widen any block's range
        v = torch.cat([v, v[-1:].expand(pad, cols)], 0)
    blocks = v.reshape(nb, rows_per_scale * cols)
    lo = blocks.amin(1) if cols else torch.zeros(nb)
    hi = blocks.amax(1) if cols else torch.zeros(nb)
    levels = (1 << bits) - 1

    real = None
    if pad:  # the padding rows must not steer the range search
        real = (torch.arange(nb * rows_per_scale) < rows).repeat_interleave(cols)
        real = real.view(nb, rows_per_scale * cols)

    def err_of(minv, step):
        m, st = minv.float().unsqueeze(1), step.float().unsqueeze(1)
        q = torch.round((blocks - m) / st).clamp_(0, levels)
        e = q.mul_(st).add_(m).sub_(blocks).square_()
        return (e if real is None else e * real).sum(1)

    mean = blocks.mean(1) if cols else torch.zeros(nb)
    minv, step = search_ranges(err_of, lo, hi, mean, bits, clip and cols > 0)
    codes = torch.round((values.float() - _per_row(minv, rows_per_scale, rows)) /
                        _per_row(step, rows_per_scale, rows))
    return codes.clamp_(0, levels).to(torch.int64), step, minv


def round_up_scale(step: torch.Tensor) -> torch.Tensor:
    """bf16 step >= the exact one, so the top of the range is never clipped."""
    step = step.clamp_min(1e-30)
    return (step * (1 + 2**-7)).to(SCALE_DTYPE)


def quantize_sign(values: torch.Tensor, rows_per_scale: int):
    """BitDelta-style 1-bit: sign(v) * mean|v| per row block. Returns (codes, step, minv)."""
    rows, cols = values.shape
    nb = _blocks(rows, rows_per_scale)
    pad = nb * rows_per_scale - rows
    a = values.float().abs()
    if pad:
        a = torch.cat([a, a[-1:].expand(pad, cols)], 0)
    mag = a.reshape(nb, -1).mean(1)
    minv = (-mag).to(SCALE_DTYPE)
    step = (-2 * minv.float()).to(SCALE_DTYPE)  # code 0 -> -mag, code 1 -> +mag
    codes = (values > 0).to(torch.int64)
    return codes, step, minv


def dequantize(codes: torch.Tensor, step: torch.Tensor, minv: torch.Tensor,
               rows_per_scale: int, row_offset: int = 0) -> torch.Tensor:
    """codes [R, C] for rows row_offset.. of the matrix -> float32 values."""
    rows = codes.shape[0]
    blk = torch.arange(row_offset, row_offset + rows) // rows_per_scale
    return minv.float()[blk].unsqueeze(1) + step.float()[blk].unsqueeze(1) * codes.float()
