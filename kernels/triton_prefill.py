"""Prefill-path Triton kernels: many tokens per delta, tensor-core dot on rebuilt tiles.

Grid: (token tiles x row tiles, output slices, entries). A dense [BLOCK_N, BLOCK_K]
tile of the delta is rebuilt in registers by the *inverse* map j = (p - offset) *
stride^-1 mod g (kept iff j < k), scaled per row into [-1, 1] and fed to tl.dot with a
[BLOCK_M, BLOCK_K] tile of the slot's tokens.

Variants:

* "v0": the first kernel: per group of the K tile, offset and inverse stride selected
  into two [N, K] int32 tiles, int64 code indices (compiled for sm_90 with Triton 3.6
  every config used 255 registers and spilled).
A second variant with fewer live tiles (one [N, K] tile of j per column) compiled to more
instructions and more spills than v0 for sm_90 (benchmarks/kernels/NOTES.md) and was removed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import fastmod, group_hash, load_codes, load_codes_f32


@triton.jit
def prefill_v0(
    y_ptr, x_ptr, words_ptr, halves_ptr, meta_ptr,
    order_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    stride_ym, stride_xm, IN, N_SLICES, MAX_ROWS, META_F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STRADDLE: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
    SPLIT_W: tl.constexpr,
):
    pid = tl.program_id(0)
    sl = tl.program_id(1)
    ent = tl.program_id(2)
    n_tiles_n = tl.cdiv(MAX_ROWS, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    slot = tl.load(seg_slot_ptr + ent)
    if slot < 0:
        return
    cnt = tl.load(seg_len_ptr + ent)
    mb = meta_ptr + (slot * N_SLICES + sl) * META_F
    valid = tl.load(mb + 0)
    n_rows = tl.load(mb + 12)
    row0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    if (valid != 1) | (row0 >= n_rows) | (m0 >= cnt):
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
    nu_u = tl.load(mb + 11).to(tl.uint32, bitcast=True)
    out_off = tl.load(mb + 13)
    g_u = g.to(tl.uint32, bitcast=True)
    bits_u = bits.to(tl.uint32, bitcast=True)
    cmask_u = ((1 << bits) - 1).to(tl.uint32, bitcast=True)
    inv_g = 1.0 / g.to(tl.float32)

    code_base = tl.load(mb + 14).to(tl.int64) * 4
    nb = tl.load(mb + 16)
    ubase = words_ptr + tl.load(mb + 17).to(tl.int64) * 4
    n_kept = tl.load(mb + 10) * k
    rows = row0 + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    sc = (code_base + tl.load(mb + 15)) * 2 + (sro + rows) // rps
    step = tl.load(halves_ptr + sc, mask=rmask, other=0.0).to(tl.float32)
    minv = tl.load(halves_ptr + sc + nb, mask=rmask, other=0.0).to(tl.float32)
    # every value of a row lies in [minv, minv + step * (2^bits - 1)]: scale rows into
    # [-1, 1] before the low-precision dot (fp16 would flush tiny deltas), undo after
    top = minv + step * ((1 << bits) - 1).to(tl.float32)
    rscale = tl.maximum(tl.abs(minv), tl.abs(top))
    rscale = tl.where(rscale > 0, rscale, 1.0)
    rinv = 1.0 / rscale
    minv_s = minv * rinv
    step_s = step * rinv
    row_e = rows.to(tl.int64) * n_kept
    rows_u = (row_off + rows).to(tl.uint32, bitcast=True)

    seg0 = tl.load(seg_start_ptr + ent)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mvalid = offs_m < cnt
    toks = tl.load(order_ptr + seg0 + offs_m, mask=mvalid, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for c0 in range(0, IN, BLOCK_K):
        cols = c0 + offs_k
        cmask = cols < IN
        gi_c = cols // g                                                   # [K]
        p_c = cols - gi_c * g
        g_first = c0 // g
        g_last = (tl.minimum(c0 + BLOCK_K, IN) - 1) // g
        off2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
        inv2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
        for gg in range(g_first, g_last + 1):                              # groups in tile
            h1, h2 = group_hash(rows_u, (group_off + gg).to(tl.uint32, bitcast=True),
                                ngt_u, seed_u)
            off_r = (h1 % g_u).to(tl.int32)
            uv = tl.load(ubase + (h2 % nu_u).to(tl.int32), mask=rmask, other=1)
            sel = (gi_c == gg)[None, :]
            off2 = tl.where(sel, off_r[:, None], off2)
            inv2 = tl.where(sel, ((uv >> 16) & 0xFFFF)[:, None], inv2)
        d = p_c[None, :] - off2
        d = tl.where(d < 0, d + g, d)
        jj = fastmod(d * inv2, g, inv_g)                                   # j of column
        kept = (jj < k) & rmask[:, None] & cmask[None, :]
        e = row_e[:, None] + (gi_c[None, :] * k + jj)
        code = load_codes(words_ptr, code_base, e, bits, bits_u, cmask_u, kept, STRADDLE)
        w = minv_s[:, None] + step_s[:, None] * code.to(tl.float32)
        w = tl.where(kept, w, 0.0)
        xt = tl.load(x_ptr + toks[:, None] * stride_xm + cols[None, :],
                     mask=mvalid[:, None] & cmask[None, :], other=0.0)
        # a 16-bit dot rounds the tile to 8 (bf16) or 11 (fp16) bits: with SPLIT_W the
        # rounding error goes in as a second tile (hi + lo), so the values reach the dot at
        # ~16 bits, as accurate as the decode path's fp32 values (one bf16 tile put 64-token
        # batches 5-10x further from the float64 reference than the decode path on an H100)
        wh = w.to(xt.dtype)
        if DOT_F32:  # interpreter: its bf16 dot is wrong, so multiply in fp32 what the GPU's
            wq = wh.to(tl.float32)  # dot would see (the same rounded tiles)
            if SPLIT_W:
                wq += (w - wq).to(xt.dtype).to(tl.float32)
            acc += tl.dot(xt.to(tl.float32), tl.trans(wq), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(wh), input_precision=DOT_PREC)
            if SPLIT_W:
                wl = (w - wh.to(tl.float32)).to(xt.dtype)
                acc += tl.dot(xt, tl.trans(wl), input_precision=DOT_PREC)
    acc = acc * rscale[None, :]
    yp = y_ptr + toks[:, None] * stride_ym + (out_off + rows)[None, :]
    ym = mvalid[:, None] & rmask[None, :]
    yv = tl.load(yp, mask=ym, other=0.0)
    tl.store(yp, (yv.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ym)


PREFILL_KERNELS = {"v0": prefill_v0}
