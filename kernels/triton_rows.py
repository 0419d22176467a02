"""Triton kernel: embedding rows of the delta, decoded on the device from the arena.

    out[t, :] += D_slot(t)[ids[t], :]        for slot(t) >= 0 and ids[t] < rows of the delta

An embedding delta is a [vocab, dim] hash_groupwise matrix held in the arena like any
linear layer's (a tied LM head's segment is read as it is). A lookup is the transpose of
what the delta kernels compute (a row of D, not x @ D^T), so it has its own small
kernel: one program per (token, block of columns) decodes the kept elements of the
groups that start in its columns (hash once per (row, group), k codes, scatter-add into
out: positions inside a group are distinct, and each group belongs to one program, so
nothing is written twice). Tokens on slot -1, slots without a delta and ids past the
delta's rows (an extended vocabulary's tokens) exit at once. Grid and shapes depend only
on T and dim: CUDA-graph safe; nothing is read back to the host.

Position hashing and code reads are the delta kernels' own jit helpers (shared, so the
bit-exact position check of tests/test_kernels.py covers them).
"""

from __future__ import annotations

import torch

from .slots import META_FIELDS

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

if HAS_TRITON:
    try:   # the kernels' shared helpers (kernels/triton_common.py once the kernels are split)
        from .triton_common import fastmod as _fastmod
        from .triton_common import group_hash as _group_hash
        from .triton_common import load_codes as _load_codes
    except ImportError:
        from .triton_delta import _fastmod, _group_hash, _load_codes

    @triton.jit
    def _embedding_rows_kernel(out_ptr, ids_ptr, slot_ptr, words_ptr, halves_ptr, meta_ptr,
                               stride_out, DIM, META_F: tl.constexpr, BLOCK_C: tl.constexpr,
                               BG: tl.constexpr, KP: tl.constexpr, STRADDLE: tl.constexpr):
        t = tl.program_id(0)
        pc = tl.program_id(1)
        slot = tl.load(slot_ptr + t)
        if slot < 0:
            return
        mb = meta_ptr + slot * META_F          # slice 0 of (slot): the embedding matrix
        valid = tl.load(mb + 0)
        n_rows = tl.load(mb + 12)
        row = tl.load(ids_ptr + t).to(tl.int32)
        if (valid != 1) | (row >= n_rows) | (row < 0):
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
        g_u = g.to(tl.uint32, bitcast=True)
        bits_u = bits.to(tl.uint32, bitcast=True)
        cmask_u = ((1 << bits) - 1).to(tl.uint32, bitcast=True)
        inv_g = 1.0 / g.to(tl.float32)
        code_base = tl.load(mb + 14).to(tl.int64) * 4
        nb = tl.load(mb + 16)
        ubase = words_ptr + tl.load(mb + 17).to(tl.int64) * 4
        sc = (code_base + tl.load(mb + 15)) * 2 + (sro + row) // rps
        step = tl.load(halves_ptr + sc).to(tl.float32)
        minv = tl.load(halves_ptr + sc + nb).to(tl.float32)
        row_u = (row_off + row).to(tl.uint32, bitcast=True)
        row_e = row.to(tl.int64) * (n_groups * k)
        # groups whose first column lies in [c0, c0 + BLOCK_C)
        c0 = pc * BLOCK_C
        g_first = (c0 + g - 1) // g
        g_end = tl.minimum((c0 + BLOCK_C + g - 1) // g, n_groups)
        offs_g = tl.arange(0, BG)
        offs_j = tl.arange(0, KP)
        orow = out_ptr + t.to(tl.int64) * stride_out
        for g0 in range(g_first, g_end, BG):
            gi = g0 + offs_g
            gm = gi < g_end
            h1, h2 = _group_hash(row_u, (group_off + gi).to(tl.uint32, bitcast=True), ngt_u, seed_u)
            off = (h1 % g_u).to(tl.int32)
            uv = tl.load(ubase + (h2 % nu_u).to(tl.int32), mask=gm, other=1)
            stride = uv & 0xFFFF
            for j0 in range(0, k, KP):
                j = j0 + offs_j
                m2 = gm[:, None] & (j < k)[None, :]
                pos = _fastmod(off[:, None] + j[None, :] * stride[:, None], g, inv_g)
                col = gi[:, None] * g + pos
                e = row_e + (gi[:, None] * k + j[None, :]).to(tl.int64)
                code = _load_codes(words_ptr, code_base, e, bits, bits_u, cmask_u, m2, STRADDLE)
                val = minv + step * code.to(tl.float32)
                cur = tl.load(orow + col, mask=m2, other=0.0)
                tl.store(orow + col, (cur.to(tl.float32) + val).to(out_ptr.dtype.element_ty),
                         mask=m2)


BLOCK_C = 64
BG = 8


def triton_embedding_rows(out: torch.Tensor, ids: torch.Tensor, slot_ids: torch.Tensor,
                          words: torch.Tensor, halves: torch.Tensor, meta: torch.Tensor,
                          *, kp: int = 8, straddle: bool = True) -> None:
    """out [T, dim] += the delta rows ids[t] of slot slot_ids[t] (meta: [S, n_slices, F] of
    the DeltaSlots holding the embedding delta in slice 0). In place, unit column stride."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    T, dim = out.shape
    if T == 0:
        return
    if out.stride(1) != 1:
        raise ValueError("out needs unit column stride")
    if ids.shape[0] < T or slot_ids.shape[0] < T:
        raise ValueError(f"{ids.shape[0]} ids / {slot_ids.shape[0]} slot ids for {T} rows")
    kp = max(1, min(1 << max(0, int(kp) - 1).bit_length(), 32))
    grid = (T, triton.cdiv(dim, BLOCK_C))
    _embedding_rows_kernel[grid](out, ids, slot_ids, words, halves, meta, out.stride(0), dim,
                                 META_F=META_FIELDS * meta.shape[1], BLOCK_C=BLOCK_C, BG=BG,
                                 KP=kp, STRADDLE=bool(straddle))
