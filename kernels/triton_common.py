"""Triton helpers shared by the decode and prefill kernels (import needs Triton).

Positions are regenerated from the hash of (seed, global row, global group) with
native uint32 arithmetic, bit for bit as positions.py computes them.
"""

from __future__ import annotations

import triton
import triton.language as tl

# load_codes_f32: 0x4B000000 is the bit pattern of 2^23 = 8388608.0, so (code | 0x4B000000)
# viewed as fp32 is exactly 2^23 + code for code < 2^23: one OR (fused with the mask into
# a LOP3) and one FADD turn a code into a float, instead of an I2F, which runs at 16
# results / clock / SM on sm_80 and sm_90 (1/8 of the FP32 rate)


@triton.jit
def mix32(x):
    """lowbias32 on uint32 (wrapping multiplies), = positions.mix32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def group_hash(rows_u, groups_u, ngt_u, seed_u):
    """h1, h2 (uint32) of every (global row, global group) pair (broadcast)."""
    idx = rows_u * ngt_u + groups_u
    h1 = mix32(mix32(idx) ^ seed_u)
    h2 = mix32(h1 ^ 0x9E3779B9)
    return h1, h2


@triton.jit
def fastmod(a, g, inv_g):
    """a mod g for int32 0 <= a < g*g (g <= 46340): fp32 reciprocal, then fix +-1."""
    q = (a.to(tl.float32) * inv_g).to(tl.int32)
    r = a - q * g
    r = tl.where(r < 0, r + g, r)
    r = tl.where(r >= g, r - g, r)
    return r


@triton.jit
def load_codes(words_ptr, base_word, e, bits, bits_u, cmask_u, mask, STRADDLE: tl.constexpr):
    """Code number e (int64) of the bit stream starting at word base_word (LSB-first)."""
    bitpos = e * bits
    word = bitpos >> 5
    sh = (bitpos & 31).to(tl.uint32)
    wp = words_ptr + base_word + word
    lo = tl.load(wp, mask=mask, other=0).to(tl.uint32, bitcast=True)
    code = lo >> sh
    if STRADDLE:
        need = mask & ((sh + bits_u) > 32)
        hi = tl.load(wp + 1, mask=need, other=0).to(tl.uint32, bitcast=True)
        code = code | (hi << ((32 - sh) & 31))
    return code & cmask_u


@triton.jit
def load_codes_f32(row_ptr, bit, bits_u, cmask_u, mask, STRADDLE: tl.constexpr):
    """Codes as exact fp32, from int32 bit offsets `bit` (< 2^31) relative to per-row word
    pointers row_ptr (broadcast); see the note on 0x4B000000 above."""
    wp = row_ptr + (bit >> 5)
    sh = (bit & 31).to(tl.uint32, bitcast=True)
    code = tl.load(wp, mask=mask, other=0).to(tl.uint32, bitcast=True) >> sh
    if STRADDLE:
        need = mask & ((sh + bits_u) > 32)
        hi = tl.load(wp + 1, mask=need, other=0).to(tl.uint32, bitcast=True)
        code = code | (hi << ((32 - sh) & 31))
    f = ((code & cmask_u) | 0x4B000000).to(tl.float32, bitcast=True)
    return f - 8388608.0
