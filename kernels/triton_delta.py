"""Triton kernels: y[t] += x[t] @ dequant(delta[slot(t)])^T straight from compressed bytes.

One launch covers every distinct delta of the batch (SGMV-style): the grid is
(row tiles, output slices, slot entries of the per-step metadata), and each
program reads only the packed codes, bf16 scales and the small units table of
its (slot, slice); kept positions are regenerated in registers from the hash of
(seed, global row, global group) with native uint32 arithmetic (positions.py).

Two paths:

* decode (few tokens per delta, memory bound): a [BLOCK_N rows, BLOCK_G groups, KP]
  tile of *kept elements* is decoded (hash once per (row, group), then k codes),
  flattened to [BLOCK_N, BLOCK_G*KP], and dotted with the gathered activations
  x[tok, col] of BLOCK_M tokens: work ~ kept elements, not dense elements.
* prefill (many tokens per delta): a dense [BLOCK_N, BLOCK_K] tile of the delta
  is rebuilt in registers by the *inverse* map j = (p - offset) * stride^-1 mod g
  (kept iff j < k), scaled per row into [-1, 1] and fed to tl.dot with a
  [BLOCK_M, BLOCK_K] tile of the slot's tokens.

Both are autotuned on a GPU (configs below); under TRITON_INTERPRET=1 (tests on a
CPU) a fixed small config is used. Only features present in Triton 3.6 and 3.9
are used. Importing this module without Triton works; calling it raises.
"""

from __future__ import annotations

import os

import torch

from .slots import (META_BITS, META_FIELDS, META_G, META_GROUP_OFF, META_K, META_NGROUPS,
                    META_NGT, META_NROWS, META_NUNITS, META_OUT_OFF, META_ROW_OFF, META_RPS,
                    META_SEED, META_SRO, META_VALID, DeltaSlots)

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

DECODE_MAX_TOKENS = 32   # T at or below this takes the decode path (tune on the GPU)
KP_MAX = 32              # cap on the kept-per-group chunk of the decode tile


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if HAS_TRITON:

    @triton.jit
    def _mix32(x):
        """lowbias32 on uint32 (wrapping multiplies), = positions.mix32."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        x = x ^ (x >> 16)
        return x

    @triton.jit
    def _group_hash(rows_u, groups_u, ngt_u, seed_u):
        """h1, h2 (uint32) of every (global row, global group) pair (broadcast)."""
        idx = rows_u * ngt_u + groups_u
        h1 = _mix32(_mix32(idx) ^ seed_u)
        h2 = _mix32(h1 ^ 0x9E3779B9)
        return h1, h2

    @triton.jit
    def _fastmod(a, g, inv_g):
        """a mod g for int32 0 <= a < g*g (g <= 46340): fp32 reciprocal, then fix +-1."""
        q = (a.to(tl.float32) * inv_g).to(tl.int32)
        r = a - q * g
        r = tl.where(r < 0, r + g, r)
        r = tl.where(r >= g, r - g, r)
        return r

    @triton.jit
    def _load_codes(words_ptr, base_word, e, bits, bits_u, cmask_u, mask, STRADDLE: tl.constexpr):
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
    def _delta_decode_kernel(
        y_ptr, x_ptr, words_ptr, halves_ptr, meta_ptr,
        order_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
        stride_ym, stride_xm, IN, N_SLICES, MAX_ROWS, T_KEY, META_F: tl.constexpr,
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
        if (valid == 0) | (row0 >= n_rows) | (cnt == 0):
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
                h1, h2 = _group_hash(rows_u[:, None],
                                     (group_off + gi).to(tl.uint32, bitcast=True)[None, :],
                                     ngt_u, seed_u)
                off = (h1 % g_u).to(tl.int32)
                uv = tl.load(ubase + (h2 % nu_u).to(tl.int32), mask=m2, other=1)
                stride = uv & 0xFFFF
                for j0 in range(0, k, KP):
                    j = j0 + offs_j                                            # [KP]
                    m3 = m2[:, :, None] & (j < k)[None, None, :]               # [N, G, KP]
                    pos = _fastmod(off[:, :, None] + j[None, None, :] * stride[:, :, None],
                                   g, inv_g)
                    col = gi[None, :, None] * g + pos
                    e = row_e[:, None, None] + (gi[None, :, None] * k + j[None, None, :])
                    code = _load_codes(words_ptr, code_base, e, bits, bits_u, cmask_u, m3,
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
    def _delta_prefill_kernel(
        y_ptr, x_ptr, words_ptr, halves_ptr, meta_ptr,
        order_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
        stride_ym, stride_xm, IN, N_SLICES, MAX_ROWS, T_KEY, META_F: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        STRADDLE: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
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
        if (valid == 0) | (row0 >= n_rows) | (m0 >= cnt):
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
                h1, h2 = _group_hash(rows_u, (group_off + gg).to(tl.uint32, bitcast=True),
                                     ngt_u, seed_u)
                off_r = (h1 % g_u).to(tl.int32)
                uv = tl.load(ubase + (h2 % nu_u).to(tl.int32), mask=rmask, other=1)
                sel = (gi_c == gg)[None, :]
                off2 = tl.where(sel, off_r[:, None], off2)
                inv2 = tl.where(sel, ((uv >> 16) & 0xFFFF)[:, None], inv2)
            d = p_c[None, :] - off2
            d = tl.where(d < 0, d + g, d)
            jj = _fastmod(d * inv2, g, inv_g)                                  # j of column
            kept = (jj < k) & rmask[:, None] & cmask[None, :]
            e = row_e[:, None] + (gi_c[None, :] * k + jj)
            code = _load_codes(words_ptr, code_base, e, bits, bits_u, cmask_u, kept, STRADDLE)
            w = minv_s[:, None] + step_s[:, None] * code.to(tl.float32)
            w = tl.where(kept, w, 0.0)
            xt = tl.load(x_ptr + toks[:, None] * stride_xm + cols[None, :],
                         mask=mvalid[:, None] & cmask[None, :], other=0.0)
            if DOT_F32:  # interpreter only: its bf16 dot is wrong, so multiply in fp32
                acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(w.to(xt.dtype)), input_precision=DOT_PREC)
        acc = acc * rscale[None, :]
        yp = y_ptr + toks[:, None] * stride_ym + (out_off + rows)[None, :]
        ym = mvalid[:, None] & rmask[None, :]
        yv = tl.load(yp, mask=ym, other=0.0)
        tl.store(yp, (yv.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ym)

    # ------------------------------------------------------------------ autotuning

    def _decode_configs():
        cfgs = []
        for bm in (1, 4, 16):
            for bn in (16, 32, 64):
                for bg in (1, 2, 4, 8):
                    for nw in (4, 8):
                        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_G": bg},
                                                  num_warps=nw))
        return cfgs

    def _prune_decode(configs, named_args, **kwargs):
        """Keep tiles of <= 16K gathered elements and no wider in tokens than needed."""
        kp = kwargs.get("KP", named_args.get("KP", 8))
        t_key = named_args["T_KEY"]
        out = [c for c in configs
               if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_G"] * kp <= 16384
               and c.kwargs["BLOCK_M"] <= max(1, t_key)]
        return out or configs[:1]

    def _prefill_configs():
        cfgs = []
        for bm, bn, bk, nw, ns in ((16, 64, 64, 4, 2), (32, 64, 64, 4, 2), (64, 64, 64, 4, 2),
                                   (64, 128, 64, 8, 2), (128, 64, 64, 8, 2),
                                   (128, 128, 32, 8, 2), (64, 64, 128, 8, 2)):
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                                      num_warps=nw, num_stages=ns))
        return cfgs

    _decode_tuned = triton.autotune(
        configs=_decode_configs(), key=["MAX_ROWS", "IN", "T_KEY", "KP", "STRADDLE"],
        prune_configs_by={"early_config_prune": _prune_decode}, restore_value=["y_ptr"],
    )(_delta_decode_kernel)
    _prefill_tuned = triton.autotune(
        configs=_prefill_configs(), key=["MAX_ROWS", "IN", "T_KEY", "STRADDLE", "DOT_PREC"],
        restore_value=["y_ptr"],
    )(_delta_prefill_kernel)


DEFAULT_DECODE_CONFIG = {"BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_G": 2}
DEFAULT_PREFILL_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}


def triton_apply_deltas(y: torch.Tensor, x: torch.Tensor, token_order: torch.Tensor,
                        seg_slot: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                        slots: DeltaSlots, *, num_entries: int | None = None,
                        max_seg_len: int | None = None, path: str | None = None,
                        config: dict | None = None, kp: int | None = None) -> None:
    """Launch the delta kernel in place on y [T, out_total] (row stride free, unit column stride).

    num_entries: entries of the metadata that may be active (default: all S; pass the host
    count to shrink the grid outside CUDA graphs). max_seg_len: host bound on tokens per
    entry (default T). path: "decode" | "prefill" (default by T). config: fixed block sizes
    (and num_warps) instead of autotuning; always fixed under TRITON_INTERPRET=1.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    T, IN = x.shape
    if T == 0:
        return
    if IN != slots.in_features or y.shape != (T, slots.out_total):
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not match the slots "
                         f"(in {slots.in_features}, out {slots.out_total})")
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y need unit column stride")
    n_ent = slots.n_slots if num_entries is None else min(num_entries, slots.n_slots)
    if n_ent == 0:
        return
    path = path or ("decode" if T <= DECODE_MAX_TOKENS else "prefill")
    if slots.arena is None:
        raise ValueError("these slots serve the CPU path only (cpu_strategy set on a CPU "
                         "device); build them with cpu_strategy=None for the kernels")
    max_rows = max(slots.slice_sizes)
    maxseg = T if max_seg_len is None else max(1, max_seg_len)
    t_key = min(_next_pow2(maxseg), 1024)
    straddle = slots.straddle
    args = (y, x, slots.arena.words, slots.arena.halves, slots.meta,
            token_order, seg_slot, seg_start, seg_len,
            y.stride(0), x.stride(0), IN, slots.n_slices, max_rows, t_key, META_FIELDS)
    fixed = dict(config) if config is not None else None
    if fixed is None and interpreting():
        fixed = dict(DEFAULT_DECODE_CONFIG if path == "decode" else DEFAULT_PREFILL_CONFIG)
    if path == "decode":
        KP = kp or min(_next_pow2(slots.max_keep), KP_MAX)
        if fixed is not None:
            grid = (triton.cdiv(max_rows, fixed["BLOCK_N"]), slots.n_slices, n_ent)
            _delta_decode_kernel[grid](*args, KP=KP, STRADDLE=straddle, **fixed)
        else:
            grid = lambda meta: (triton.cdiv(max_rows, meta["BLOCK_N"]), slots.n_slices, n_ent)  # noqa: E731
            _decode_tuned[grid](*args, KP=KP, STRADDLE=straddle)
    elif path == "prefill":
        prec = "ieee" if x.dtype == torch.float32 else "tf32"
        dot_f32 = interpreting() and x.dtype == torch.bfloat16
        if fixed is not None:
            grid = (triton.cdiv(maxseg, fixed["BLOCK_M"]) * triton.cdiv(max_rows, fixed["BLOCK_N"]),
                    slots.n_slices, n_ent)
            _delta_prefill_kernel[grid](*args, STRADDLE=straddle, DOT_PREC=prec, DOT_F32=dot_f32,
                                        **fixed)
        else:
            grid = lambda meta: (triton.cdiv(maxseg, meta["BLOCK_M"])  # noqa: E731
                                 * triton.cdiv(max_rows, meta["BLOCK_N"]), slots.n_slices, n_ent)
            _prefill_tuned[grid](*args, STRADDLE=straddle, DOT_PREC=prec, DOT_F32=dot_f32)
    else:
        raise ValueError(f"unknown path {path!r}")


# ---------------------------------------------------------------- position check helper

if HAS_TRITON:

    @triton.jit(do_not_specialize=["n_rows", "n_groups", "g", "k", "seed", "row_off",
                                   "group_off", "ngt", "n_units"])
    def _positions_kernel(out_ptr, n_rows, n_groups, g, k, seed, row_off, group_off, ngt,
                          units_ptr, n_units, BLOCK_R: tl.constexpr, KP: tl.constexpr):
        """Kept columns [n_rows, n_groups*k] exactly as the decode kernel computes them."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        gi = tl.program_id(1)
        rmask = r < n_rows
        h1, h2 = _group_hash((row_off + r).to(tl.uint32, bitcast=True),
                             (group_off + gi).to(tl.uint32, bitcast=True),
                             ngt.to(tl.uint32, bitcast=True), seed.to(tl.uint32, bitcast=True))
        off = (h1 % g.to(tl.uint32)).to(tl.int32)
        uv = tl.load(units_ptr + (h2 % n_units.to(tl.uint32)).to(tl.int32), mask=rmask, other=1)
        stride = uv & 0xFFFF
        inv_g = 1.0 / g.to(tl.float32)
        for j0 in range(0, k, KP):
            j = j0 + tl.arange(0, KP)
            pos = _fastmod(off[:, None] + j[None, :] * stride[:, None], g, inv_g)
            m = rmask[:, None] & (j < k)[None, :]
            tl.store(out_ptr + r[:, None] * (n_groups * k) + gi * k + j[None, :],
                     gi * g + pos, mask=m)


def triton_kept_columns(seed: int, n_rows: int, in_features: int, group_size: int, keep: int,
                        row_offset: int = 0, group_offset: int = 0,
                        n_groups_total: int | None = None, device="cpu") -> torch.Tensor:
    """positions.kept_columns recomputed by the kernels' Triton code (for tests)."""
    from .slots import _i32, units_packed
    n_groups = in_features // group_size
    ngt = n_groups_total if n_groups_total is not None else n_groups + group_offset
    out = torch.full((n_rows, n_groups * keep), -1, dtype=torch.int32, device=device)
    table = torch.tensor(units_packed(group_size), dtype=torch.int32, device=device)
    BLOCK_R = 16
    grid = (triton.cdiv(n_rows, BLOCK_R), n_groups)
    _positions_kernel[grid](out, n_rows, n_groups, group_size, keep, _i32(seed), row_offset,
                            group_offset, _i32(ngt), table, table.numel(), BLOCK_R=BLOCK_R,
                            KP=min(_next_pow2(keep), 16))
    return out.to(torch.int64)


__all__ = ["HAS_TRITON", "DECODE_MAX_TOKENS", "triton_apply_deltas", "triton_kept_columns",
           "interpreting", "META_FIELDS", "META_VALID", "META_G", "META_K", "META_BITS",
           "META_SEED", "META_RPS", "META_ROW_OFF", "META_GROUP_OFF", "META_NGT", "META_SRO",
           "META_NGROUPS", "META_NUNITS", "META_NROWS", "META_OUT_OFF"]
