"""Decode kernel v4: v3 split along the row (split-K), partial sums added atomically.

Why: on an H200 (benchmarks/results/gpu/, 2026-11-26) decode v3 ran at ~130 G kept
elements/s, far under its instruction bound: a program walks all n_groups * k / KP
chunks of its BLOCK_N rows one after another (64 chunks for a 4096-wide row at 16x, 172
for 11008), each waiting on a DRAM load of codes, and a layer has only a few hundred row
tiles. The time was one program's chain of load latencies, and the tuner preferred the
smallest row tiles. v4 gives each program a contiguous range of at most BLOCK_G chunks
of the row (a *unit* = KP = 32 kept elements of one group), so a layer launches SPLIT =
ceil(units per row / BLOCK_G) times more programs with chains that much shorter.

Grid: (row tiles * SPLIT, output slices, entries). A program decodes its units exactly as
v3 does (hash once per (row, group) it touches, positions by recurrence from the first
unit, unmasked full chunks, one accumulator per token), then adds its partial row sums
to an fp32 workspace with atomics; the launcher adds the workspace to y once (one
rounding to y's dtype, as in v3: the error bound is v3's; the fp32 summation order varies
from run to run, so results are not bit-reproducible across runs).

SPLIT is a runtime argument: any SPLIT covers every unit (the unit range of a program is
computed in the kernel from each slot's own g and k), so a CUDA graph captured with one
SPLIT stays correct for deltas loaded later; SPLIT only sets the parallelism.
BLOCK_G here counts units per program (v0 used it for groups per tile).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import fastmod, group_hash, load_codes_f32


@triton.jit
def _v4_add(ws_row, order_ptr, seg0, m, cnt, stride_wm, acc, rmask):
    """ws[token m of the entry, rows] += sum_j acc[rows, j] (atomic) when m < cnt."""
    if m < cnt:
        tok = tl.load(order_ptr + seg0 + m).to(tl.int64)
        tl.atomic_add(ws_row + tok * stride_wm, tl.sum(acc, axis=1), mask=rmask, sem="relaxed")


@triton.jit
def decode_v4(
    ws_ptr, x_ptr, words_ptr, halves_ptr, meta_ptr,
    order_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    stride_wm, stride_xm, IN, N_SLICES, MAX_ROWS, SPLIT, META_F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    KP: tl.constexpr, STRADDLE: tl.constexpr,
):
    tl.static_assert(KP == 32, "decode v4 needs KP == 32 (the launcher sets it)")
    tl.static_assert(BLOCK_M <= 4, "decode v4 holds at most 4 token accumulators")
    pid0 = tl.program_id(0)
    pid_n = pid0 // SPLIT
    sp = pid0 % SPLIT
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
    k = tl.load(mb + 2)
    n_groups = tl.load(mb + 10)
    nchunks = (k + KP - 1) // KP
    total = (n_groups * nchunks).to(tl.int64)
    u0 = (sp * total) // SPLIT                     # this program's units [u0, u1)
    u1 = ((sp + 1) * total) // SPLIT
    if u0 >= u1:
        return
    u0 = u0.to(tl.int32)
    u1 = u1.to(tl.int32)
    g = tl.load(mb + 1)
    bits = tl.load(mb + 3)
    seed_u = tl.load(mb + 4).to(tl.uint32, bitcast=True)
    rps = tl.load(mb + 5)
    row_off = tl.load(mb + 6)
    group_off = tl.load(mb + 7)
    ngt_u = tl.load(mb + 8).to(tl.uint32, bitcast=True)
    sro = tl.load(mb + 9)
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
    n_full = k // KP                                                       # full chunks
    k_full = n_full * KP
    g_first = u0 // nchunks
    g_last = (u1 - 1) // nchunks

    seg0 = tl.load(seg_start_ptr + ent)
    offs_j = tl.arange(0, KP)
    mk_tail = rmask[:, None] & ((k_full + offs_j) < k)[None, :]
    for m0 in range(0, cnt, BLOCK_M):
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
        for gi in range(g_first, g_last + 1):
            c0 = tl.maximum(u0 - gi * nchunks, 0)                          # chunks of group gi
            c1 = tl.minimum(u1 - gi * nchunks, nchunks)
            h1, h2 = group_hash(rows_u, (group_off + gi).to(tl.uint32, bitcast=True),
                                ngt_u, seed_u)
            off = (h1 % g_u).to(tl.int32)                                  # [N]
            uv = tl.load(ubase + (h2 % nu_u).to(tl.int32))
            stride = uv & 0xFFFF
            adv = ((stride * KP) % g).to(tl.uint32, bitcast=True)[:, None]  # [N, 1], < g
            # position of kept element c0 * KP: (off + c0 * KP * stride) mod g, in int64
            start = ((c0 * KP).to(tl.int64) * stride.to(tl.int64) % g).to(tl.int32)
            pos = fastmod(off[:, None] + start[:, None] + offs_j[None, :] * stride[:, None], g,
                          inv_g).to(tl.uint32, bitcast=True)               # [N, KP] in group
            x0g = x0 + gi * g
            x1g = x1 + gi * g
            x2g = x2 + gi * g
            x3g = x3 + gi * g
            bit = row_sh[:, None] + (gi * k + offs_j)[None, :] * bits      # [N, KP]
            # KP * bits is a multiple of 32: chunk c starts c * bits words further, same shift
            wp = row_ptr[:, None] + (bit >> 5) + c0 * bits
            sh = (bit & 31).to(tl.uint32, bitcast=True)
            for c in range(c0, tl.minimum(c1, n_full)):
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
            if c1 > n_full:                                                # the tail chunk
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
        wrow = ws_ptr + out_off + rows
        _v4_add(wrow, order_ptr, seg0, m0 + 0, cnt, stride_wm, acc0, rmask)
        if BLOCK_M >= 2:
            _v4_add(wrow, order_ptr, seg0, m0 + 1, cnt, stride_wm, acc1, rmask)
        if BLOCK_M >= 4:
            _v4_add(wrow, order_ptr, seg0, m0 + 2, cnt, stride_wm, acc2, rmask)
            _v4_add(wrow, order_ptr, seg0, m0 + 3, cnt, stride_wm, acc3, rmask)
