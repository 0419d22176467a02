"""Decode-path Triton kernels: few tokens per delta, work ~ kept elements (memory bound).

Grid: (row tiles, output slices, entries of the per-step metadata); a program owns
BLOCK_N rows of one (slot, slice) and loops over that slot's tokens BLOCK_M at a time,
over the groups of the row, and over the k kept elements of a group KP at a time. For
every kept element it regenerates the position, extracts the code, dequantises it and
multiplies it with the gathered activation x[tok, col] of each token.

Variants (selected at launch, `variant=` / the config table, timed side by side by
benchmarks/kernels/bench_gpu.py --variant):

* "v0": the first kernel. [BLOCK_N, BLOCK_G, KP] tiles; per element a fastmod (fp32
  reciprocal) position, int64 code indices, an I2F, and a tl.sum over the tile into
  the [BLOCK_M, BLOCK_N] accumulator every iteration.
* "v3" (default): [BLOCK_N, KP] tiles per group with the per-element work cut down:
  positions by recurrence (pos += KP * stride mod g as one fused add-min on uint32)
  instead of a fastmod; code offsets as int32 bits relative to a per-row word pointer;
  codes to fp32 by the 2^23 trick (OR + FADD) instead of I2F; an unmasked main loop (rows
  clamped, padded tokens pointed at token 0) with the tail chunk masked separately; one
  [BLOCK_N, KP] accumulator per token (BLOCK_M <= 4).
* "v4" (triton_decode_split.py): v3 split along the row, partial sums added atomically.

Two intermediate steps between v0 and v3 (v1: recurrence + int32 offsets with a 3-D
[M, N, KP] tile; v2: v1 unmasked) were removed after the H200 runs: offline SASS counts put
them between v0 and v3 and neither was ever the faster kernel (benchmarks/kernels/NOTES.md).

int32 safety of v3: bit offsets within a row are < 32 + (in_features // g) * k * bits
<= 32 + in_features * 16, which fits int32 for in_features < 2^26; positions are < g
<= 46340 (kernel_layout.MAX_GROUP_SIZE), stride * KP < 2^16 * 32; x columns < in_features.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import fastmod, group_hash, load_codes, load_codes_f32


@triton.jit
def decode_v0(
    y_ptr, x_ptr, words_ptr, halves_ptr, meta_ptr,
    order_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    stride_ym, stride_xm, IN, N_SLICES, MAX_ROWS, META_F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    KP: tl.constexpr, STRADDLE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    sl = tl.program_id(1)
    ent = tl.program_id(2)
    slot = tl.load(seg_slot_ptr + ent)
    if slot < 0:
        return
    cnt = tl.load(seg_len_ptr + ent)
    mb = meta_ptr + (slot * N_SLICES + sl) * META_F
    valid = tl.load(mb + 0)
    n_rows = tl.load(mb + 12)
    row0 = pid_n * BLOCK_N
    if (valid != 1) | (row0 >= n_rows) | (cnt == 0):
        return
    g = tl.load(mb + 1)
    k = tl.load(mb + 2)
    bits = tl.load(mb + 3)
    seed_u = tl.load(mb + 4).to(tl.uint32, bitcast=True)
    rps = tl.load(mb + 5)
    row_off = tl.load(mb + 6)
    group_off = tl.load(mb + 7)
    ngt_u = tl.load(mb + 8).to(tl.uint32, bitcast=True)
    sro = tl.load(mb + 9)
    n_groups = tl.load(mb + 10)
    nu_u = tl.load(mb + 11).to(tl.uint32, bitcast=True)
    out_off = tl.load(mb + 13)
    g_u = g.to(tl.uint32, bitcast=True)
    bits_u = bits.to(tl.uint32, bitcast=True)
    cmask_u = ((1 << bits) - 1).to(tl.uint32, bitcast=True)
    inv_g = 1.0 / g.to(tl.float32)

    # this (slot, slice)'s arena segment: code stream, then nb bf16 step, nb bf16 minv
    code_base = tl.load(mb + 14).to(tl.int64) * 4                         # words
    nb = tl.load(mb + 16)
    ubase = words_ptr + tl.load(mb + 17).to(tl.int64) * 4
    rows = row0 + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    sc = (code_base + tl.load(mb + 15)) * 2 + (sro + rows) // rps
    step = tl.load(halves_ptr + sc, mask=rmask, other=0.0).to(tl.float32)
    minv = tl.load(halves_ptr + sc + nb, mask=rmask, other=0.0).to(tl.float32)
    row_e = rows.to(tl.int64) * (n_groups * k)                             # [N] first code
    rows_u = (row_off + rows).to(tl.uint32, bitcast=True)

    seg0 = tl.load(seg_start_ptr + ent)
    offs_m = tl.arange(0, BLOCK_M)
    offs_gl = tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, KP)
    for m0 in range(0, cnt, BLOCK_M):
        mvalid = (m0 + offs_m) < cnt
        toks = tl.load(order_ptr + seg0 + m0 + offs_m, mask=mvalid, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g0 in range(0, n_groups, BLOCK_G):
            gi = g0 + offs_gl                                              # [G]
            m2 = rmask[:, None] & (gi < n_groups)[None, :]                 # [N, G]
            h1, h2 = group_hash(rows_u[:, None],
                                (group_off + gi).to(tl.uint32, bitcast=True)[None, :],
                                ngt_u, seed_u)
            off = (h1 % g_u).to(tl.int32)
            uv = tl.load(ubase + (h2 % nu_u).to(tl.int32), mask=m2, other=1)
            stride = uv & 0xFFFF
            for j0 in range(0, k, KP):
                j = j0 + offs_j                                            # [KP]
                m3 = m2[:, :, None] & (j < k)[None, None, :]               # [N, G, KP]
                pos = fastmod(off[:, :, None] + j[None, None, :] * stride[:, :, None],
                              g, inv_g)
                col = gi[None, :, None] * g + pos
                e = row_e[:, None, None] + (gi[None, :, None] * k + j[None, None, :])
                code = load_codes(words_ptr, code_base, e, bits, bits_u, cmask_u, m3,
                                  STRADDLE)
                val = minv[:, None, None] + step[:, None, None] * code.to(tl.float32)
                val2 = tl.reshape(val, [BLOCK_N, BLOCK_G * KP])
                col2 = tl.reshape(col, [BLOCK_N, BLOCK_G * KP])
                m3f = tl.reshape(m3, [BLOCK_N, BLOCK_G * KP])
                xp = x_ptr + toks[:, None, None] * stride_xm + col2[None, :, :]
                xv = tl.load(xp, mask=mvalid[:, None, None] & m3f[None, :, :], other=0.0)
                acc += tl.sum(xv.to(tl.float32) * val2[None, :, :], axis=2)
        yp = y_ptr + toks[:, None] * stride_ym + (out_off + rows)[None, :]
        ym = mvalid[:, None] & rmask[None, :]
        yv = tl.load(yp, mask=ym, other=0.0)
        tl.store(yp, (yv.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ym)


@triton.jit
def _v3_store(yrow, order_ptr, seg0, m, cnt, stride_ym, acc, rmask):
    """y[token m of the entry, rows] += sum_j acc[rows, j] when m < cnt."""
    if m < cnt:
        tok = tl.load(order_ptr + seg0 + m).to(tl.int64)
        yp = yrow + tok * stride_ym
        yv = tl.load(yp, mask=rmask, other=0.0)
        tl.store(yp, (yv.to(tl.float32) + tl.sum(acc, axis=1)).to(yp.dtype.element_ty),
                 mask=rmask)


@triton.jit
def decode_v3(
    y_ptr, x_ptr, words_ptr, halves_ptr, meta_ptr,
    order_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    stride_ym, stride_xm, IN, N_SLICES, MAX_ROWS, META_F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    KP: tl.constexpr, STRADDLE: tl.constexpr,
):
    """One [BLOCK_N, KP] accumulator per token (BLOCK_M <= 4, explicit variables) instead of
    a [BLOCK_M, BLOCK_N, KP] tile: a 3-D tile spreads tokens over threads, so every thread
    holding a token re-decodes the codes and positions (~8.5 instructions per extra token
    and element, SASS); here a thread decodes an element once and applies it to each token
    with one scalar-based load and one FFMA.

    Unmasked main loop: rows clamped to the slice and padded tokens pointed at
    token 0 make every address valid, so full chunks load without masks (no zeroing moves,
    no predicates; garbage rows / tokens are never stored). KP * bits is a multiple of 32
    (KP = 32), so a chunk advances every code pointer by `bits` words and the in-word shift
    of lane j is loop-invariant. Positions advance as umin(p + adv, p + adv - g) (uint32)."""
    tl.static_assert(KP == 32, "decode v3 needs KP == 32 (the launcher sets it)")
    tl.static_assert(BLOCK_M <= 4, "decode v3 holds at most 4 token accumulators")
    pid_n = tl.program_id(0)
    sl = tl.program_id(1)
    ent = tl.program_id(2)
    slot = tl.load(seg_slot_ptr + ent)
    if slot < 0:
        return
    cnt = tl.load(seg_len_ptr + ent)
    mb = meta_ptr + (slot * N_SLICES + sl) * META_F
    valid = tl.load(mb + 0)
    n_rows = tl.load(mb + 12)
    row0 = pid_n * BLOCK_N
    if (valid != 1) | (row0 >= n_rows) | (cnt == 0):
        return
    g = tl.load(mb + 1)
    k = tl.load(mb + 2)
    bits = tl.load(mb + 3)
    seed_u = tl.load(mb + 4).to(tl.uint32, bitcast=True)
    rps = tl.load(mb + 5)
    row_off = tl.load(mb + 6)
    group_off = tl.load(mb + 7)
    ngt_u = tl.load(mb + 8).to(tl.uint32, bitcast=True)
    sro = tl.load(mb + 9)
    n_groups = tl.load(mb + 10)
    nu_u = tl.load(mb + 11).to(tl.uint32, bitcast=True)
    out_off = tl.load(mb + 13)
    g_u = g.to(tl.uint32, bitcast=True)
    bits_u = bits.to(tl.uint32, bitcast=True)
    cmask_u = ((1 << bits) - 1).to(tl.uint32, bitcast=True)
    inv_g = 1.0 / g.to(tl.float32)

    code_base = tl.load(mb + 14).to(tl.int64) * 4                         # words
    nb = tl.load(mb + 16)
    ubase = words_ptr + tl.load(mb + 17).to(tl.int64) * 4
    rows = row0 + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    rows_c = tl.minimum(rows, n_rows - 1)                                  # valid addresses
    sc = (code_base + tl.load(mb + 15)) * 2 + (sro + rows_c) // rps
    step = tl.load(halves_ptr + sc).to(tl.float32)
    minv = tl.load(halves_ptr + sc + nb).to(tl.float32)
    row_bit = rows_c.to(tl.int64) * (n_groups * k * bits)
    row_ptr = words_ptr + code_base + (row_bit >> 5)                       # [N]
    row_sh = (row_bit & 31).to(tl.int32)                                   # [N]
    rows_u = (row_off + rows_c).to(tl.uint32, bitcast=True)
    k_full = (k // KP) * KP

    seg0 = tl.load(seg_start_ptr + ent)
    offs_m = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, KP)
    mk_tail = rmask[:, None] & ((k_full + offs_j) < k)[None, :]
    for m0 in range(0, cnt, BLOCK_M):
        # token rows as scalar pointers (padded tokens -> token 0: valid, never stored)
        x0 = x_ptr + tl.load(order_ptr + seg0 + m0).to(tl.int64) * stride_xm
        x1 = x0
        x2 = x0
        x3 = x0
        if BLOCK_M >= 2:
            x1 = x_ptr + tl.load(order_ptr + seg0 + tl.minimum(m0 + 1, cnt - 1)).to(tl.int64) * stride_xm
        if BLOCK_M >= 4:
            x2 = x_ptr + tl.load(order_ptr + seg0 + tl.minimum(m0 + 2, cnt - 1)).to(tl.int64) * stride_xm
            x3 = x_ptr + tl.load(order_ptr + seg0 + tl.minimum(m0 + 3, cnt - 1)).to(tl.int64) * stride_xm
        acc0 = tl.zeros([BLOCK_N, KP], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, KP], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, KP], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N, KP], dtype=tl.float32)
        for gi in range(0, n_groups):
            h1, h2 = group_hash(rows_u, (group_off + gi).to(tl.uint32, bitcast=True),
                                ngt_u, seed_u)
            off = (h1 % g_u).to(tl.int32)                                  # [N]
            uv = tl.load(ubase + (h2 % nu_u).to(tl.int32))
            stride = uv & 0xFFFF
            adv = ((stride * KP) % g).to(tl.uint32, bitcast=True)[:, None]  # [N, 1], < g
            pos = fastmod(off[:, None] + offs_j[None, :] * stride[:, None], g,
                          inv_g).to(tl.uint32, bitcast=True)               # [N, KP] in group
            x0g = x0 + gi * g                                              # group starts
            x1g = x1 + gi * g
            x2g = x2 + gi * g
            x3g = x3 + gi * g
            bit = row_sh[:, None] + (gi * k + offs_j)[None, :] * bits      # [N, KP]
            wp = row_ptr[:, None] + (bit >> 5)                             # [N, KP]
            sh = (bit & 31).to(tl.uint32, bitcast=True)                    # invariant
            for j0 in range(0, k_full, KP):
                w = tl.load(wp).to(tl.uint32, bitcast=True)
                code = w >> sh
                if STRADDLE:
                    hi = tl.load(wp + 1, mask=(sh + bits_u) > 32, other=0).to(tl.uint32,
                                                                             bitcast=True)
                    code = code | (hi << ((32 - sh) & 31))
                codef = ((code & cmask_u) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                val = minv[:, None] + step[:, None] * codef
                acc0 += tl.load(x0g + pos).to(tl.float32) * val
                if BLOCK_M >= 2:
                    acc1 += tl.load(x1g + pos).to(tl.float32) * val
                if BLOCK_M >= 4:
                    acc2 += tl.load(x2g + pos).to(tl.float32) * val
                    acc3 += tl.load(x3g + pos).to(tl.float32) * val
                p1 = pos + adv
                pos = tl.minimum(p1, p1 - g_u)                             # uint32: mod g
                wp += bits
            if k_full < k:
                bit_t = bit + (k_full * bits)
                codef = load_codes_f32(row_ptr[:, None], bit_t, bits_u, cmask_u, mk_tail,
                                       STRADDLE)
                val = minv[:, None] + step[:, None] * codef
                acc0 += tl.load(x0g + pos, mask=mk_tail, other=0.0).to(tl.float32) * val
                if BLOCK_M >= 2:
                    acc1 += tl.load(x1g + pos, mask=mk_tail, other=0.0).to(tl.float32) * val
                if BLOCK_M >= 4:
                    acc2 += tl.load(x2g + pos, mask=mk_tail, other=0.0).to(tl.float32) * val
                    acc3 += tl.load(x3g + pos, mask=mk_tail, other=0.0).to(tl.float32) * val
        yrow = y_ptr + out_off + rows
        _v3_store(yrow, order_ptr, seg0, m0 + 0, cnt, stride_ym, acc0, rmask)
        if BLOCK_M >= 2:
            _v3_store(yrow, order_ptr, seg0, m0 + 1, cnt, stride_ym, acc1, rmask)
        if BLOCK_M >= 4:
            _v3_store(yrow, order_ptr, seg0, m0 + 2, cnt, stride_ym, acc2, rmask)
            _v3_store(yrow, order_ptr, seg0, m0 + 3, cnt, stride_ym, acc3, rmask)


DECODE_KERNELS = {"v0": decode_v0, "v3": decode_v3}
