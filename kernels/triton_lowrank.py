"""Triton kernels: low-rank deltas (D = U V) kept as their factors in the arena.

    y[t, slice] += (x[t] @ V^T) @ U^T          lowrank_apply (linear / LM head)
    out[t, :]   += U[ids[t], :] @ V            lowrank_rows  (embedding lookup)

Why: the compressor stores an LM head or an embedding as rank r where its own codes would
be worse than no delta (tools/choose.py); at 1024x every published SmolLM2 fine-tune holds
its tied embedding as rank 1 (99 KB). Converted to the hash kernels' 16-bit layout
(kernel_layout.to_kernel_layout) that matrix would take vocab x dim x 2 bytes of the arena
(57 MB for SmolLM2, 262 MB for a 32000 x 4096 head) and be read whole every step; as
factors it takes (rows + cols) x r x 2 bytes and a step reads that.

Segment (slots.py, `_load_lowrank_segment`): U bf16 [rows, r] row-major, then V bf16
[r, cols] row-major starting META_SCALE_REL words later; META_VALID = 2 (the hash kernels
skip it: they run entries whose META_VALID is 1), META_RANK = r. Both kernels exit at once
for slot -1 and for entries that are not low-rank, so the launch is the same for every
batch (CUDA-graph safe; nothing read back to the host). z = x V^T per token block, then
z U^T, accumulated in float32, two variants (`_blocks`): "sum", broadcast products on the
CUDA cores (exact float32), below DOT_MIN_TOKENS tokens per delta; "dot", the matrix units
with tf32 operands (they hold bf16 activations and factors exactly; z is rounded to tf32
for the second product) or "ieee" for float32 activations, from DOT_MIN_TOKENS. Each
program recomputes z for its tokens (no workspace, so no rank bound fixed at capture).
Measured on an H100: benchmarks/kernels/NOTES.md section 7.
"""

from __future__ import annotations

import torch

from .slots import META_FIELDS, META_LOWRANK

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

BLOCK_R = 4      # rank per step (a higher rank loops)
BLOCK_C = 128    # embedding columns per program
Z_TILE = 2048    # elements of the [BLOCK_M, BLOCK_R, BLOCK_K] product tile (registers)


VARIANTS = ("sum", "dot")
DOT_MIN_TOKENS = 9   # tokens per delta from which "dot" is launched (BLOCK_M 16)


def _blocks(tokens: int, variant: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R) for up to `tokens` tokens per delta.
    "sum": broadcast products on the CUDA cores; few tokens take long K steps (fewer serial
    iterations), more tokens wider row tiles (each program recomputes z = x V^T for its
    tokens). "dot": both products on the matrix units (16 x 64 x 16 and 16 x 16 x 128 tiles,
    rank padded to 16), for 16 tokens at a time."""
    if variant == "dot":
        return 16, 128, 64, 16
    block_m = min(16, triton.next_power_of_2(max(1, tokens)))
    block_k = max(16, min(256, Z_TILE // (block_m * BLOCK_R)))
    block_n = 64 if block_m <= 4 else 128
    return block_m, block_n, block_k, BLOCK_R


if HAS_TRITON:
    @triton.jit
    def _lowrank_apply_kernel(y_ptr, x_ptr, halves_ptr, meta_ptr, order_ptr, seg_slot_ptr,
                              seg_start_ptr, seg_len_ptr, stride_ym, stride_xm, IN, N_SLICES,
                              META_F: tl.constexpr, LOWRANK: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                              DOT: tl.constexpr, PREC: tl.constexpr):
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
        if (valid != LOWRANK) | (row0 >= n_rows) | (cnt == 0):
            return
        rank = tl.load(mb + 18)
        out_off = tl.load(mb + 13)
        ubase = tl.load(mb + 14).to(tl.int64) * 8                 # 16-byte units -> halves
        vbase = ubase + tl.load(mb + 15).to(tl.int64) * 2          # words -> halves
        rows = row0 + tl.arange(0, BLOCK_N)
        rmask = rows < n_rows
        seg0 = tl.load(seg_start_ptr + ent)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        for m0 in range(0, cnt, BLOCK_M):
            mvalid = (m0 + offs_m) < cnt
            toks = tl.load(order_ptr + seg0 + m0 + offs_m, mask=mvalid, other=0).to(tl.int64)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for r0 in range(0, rank, BLOCK_R):
                rr = r0 + offs_r
                rm = rr < rank
                if DOT:
                    # matrix units; PREC "tf32" holds bf16 operands exactly, "ieee" for fp32
                    z = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                    for k0 in range(0, IN, BLOCK_K):
                        kk = k0 + offs_k
                        km = kk < IN
                        xv = tl.load(x_ptr + toks[:, None] * stride_xm + kk[None, :],
                                     mask=mvalid[:, None] & km[None, :], other=0.0)
                        vv = tl.load(halves_ptr + vbase + rr[:, None].to(tl.int64) * IN
                                     + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
                        z += tl.dot(xv.to(tl.float32), tl.trans(vv.to(tl.float32)),
                                    input_precision=PREC)
                    uv = tl.load(halves_ptr + ubase + rows[:, None].to(tl.int64) * rank
                                 + rr[None, :], mask=rmask[:, None] & rm[None, :], other=0.0)
                    acc += tl.dot(z, tl.trans(uv.to(tl.float32)), input_precision=PREC)
                else:
                    # z = x V^T: products accumulated elementwise, reduced once after the
                    # loop (a reduction per step made the loop latency-bound: 80 us for one
                    # token on a 32000 x 4096 head, H100)
                    z3 = tl.zeros([BLOCK_M, BLOCK_R, BLOCK_K], dtype=tl.float32)
                    for k0 in range(0, IN, BLOCK_K):
                        kk = k0 + offs_k
                        km = kk < IN
                        xv = tl.load(x_ptr + toks[:, None] * stride_xm + kk[None, :],
                                     mask=mvalid[:, None] & km[None, :], other=0.0).to(tl.float32)
                        vv = tl.load(halves_ptr + vbase + rr[:, None].to(tl.int64) * IN
                                     + kk[None, :], mask=rm[:, None] & km[None, :],
                                     other=0.0).to(tl.float32)
                        z3 += xv[:, None, :] * vv[None, :, :]
                    z = tl.sum(z3, axis=2)                                         # [M, R]
                    uv = tl.load(halves_ptr + ubase + rows[:, None].to(tl.int64) * rank
                                 + rr[None, :], mask=rmask[:, None] & rm[None, :],
                                 other=0.0).to(tl.float32)
                    acc += tl.sum(z[:, None, :] * uv[None, :, :], axis=2)          # [M, N]
            yp = y_ptr + toks[:, None] * stride_ym + (out_off + rows)[None, :]
            ym = mvalid[:, None] & rmask[None, :]
            yv = tl.load(yp, mask=ym, other=0.0)
            tl.store(yp, (yv.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ym)

    @triton.jit
    def _lowrank_rows_kernel(out_ptr, ids_ptr, slot_ptr, halves_ptr, meta_ptr, stride_out, DIM,
                             META_F: tl.constexpr, LOWRANK: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        t = tl.program_id(0)
        pc = tl.program_id(1)
        slot = tl.load(slot_ptr + t)
        if slot < 0:
            return
        mb = meta_ptr + slot * META_F          # slice 0 of (slot): the embedding matrix
        valid = tl.load(mb + 0)
        n_rows = tl.load(mb + 12)
        row = tl.load(ids_ptr + t).to(tl.int64)
        if (valid != LOWRANK) | (row >= n_rows) | (row < 0):
            return
        rank = tl.load(mb + 18)
        ubase = tl.load(mb + 14).to(tl.int64) * 8
        vbase = ubase + tl.load(mb + 15).to(tl.int64) * 2
        cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = cols < DIM
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + offs_r
            rm = rr < rank
            u = tl.load(halves_ptr + ubase + row * rank + rr, mask=rm, other=0.0).to(tl.float32)
            v = tl.load(halves_ptr + vbase + rr[:, None].to(tl.int64) * DIM + cols[None, :],
                        mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(u[:, None] * v, axis=0)
        op = out_ptr + t.to(tl.int64) * stride_out + cols
        cur = tl.load(op, mask=cm, other=0.0)
        tl.store(op, (cur.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=cm)


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")


def triton_lowrank_apply(y: torch.Tensor, x: torch.Tensor, token_order: torch.Tensor,
                         seg_slot: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                         halves: torch.Tensor, meta: torch.Tensor, slice_sizes, *,
                         num_entries: int | None = None, max_seg_len: int | None = None,
                         variant: str | None = None) -> None:
    """y [T, out_total] += x @ (U V)^T of each token's slot, for the (slot, slice) entries of
    `meta` that hold a low-rank delta (the others are the hash kernels'). In place; the
    routing tensors are the step metadata's (metadata.DeltaBatchMeta.tensors()). variant:
    "sum" / "dot" (default: "dot" from DOT_MIN_TOKENS tokens per delta)."""
    _require_triton()
    T, IN = x.shape
    S, n_slices = meta.shape[0], meta.shape[1]
    n_ent = S if num_entries is None else min(num_entries, S)
    if T == 0 or n_ent == 0:
        return
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y need unit column stride")
    maxseg = T if max_seg_len is None else max(1, max_seg_len)
    variant = variant or ("dot" if maxseg >= DOT_MIN_TOKENS else "sum")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    block_m, block_n, block_k, block_r = _blocks(maxseg, variant)
    grid = (triton.cdiv(max(int(s) for s in slice_sizes), block_n), n_slices, n_ent)
    _lowrank_apply_kernel[grid](y, x, halves, meta, token_order, seg_slot, seg_start, seg_len,
                                y.stride(0), x.stride(0), IN, n_slices, META_F=META_FIELDS,
                                LOWRANK=META_LOWRANK, BLOCK_M=block_m, BLOCK_N=block_n,
                                BLOCK_K=block_k, BLOCK_R=block_r, DOT=variant == "dot",
                                PREC="ieee" if x.dtype == torch.float32 else "tf32")


def triton_lowrank_rows(out: torch.Tensor, ids: torch.Tensor, slot_ids: torch.Tensor,
                        halves: torch.Tensor, meta: torch.Tensor) -> None:
    """out [T, dim] += row ids[t] of slot_ids[t]'s low-rank embedding delta (slice 0 of
    `meta`); tokens whose slot holds another layout, or none, are left alone."""
    _require_triton()
    T, dim = out.shape
    if T == 0:
        return
    if out.stride(1) != 1:
        raise ValueError("out needs unit column stride")
    grid = (T, triton.cdiv(dim, BLOCK_C))
    _lowrank_rows_kernel[grid](out, ids, slot_ids, halves, meta, out.stride(0), dim,
                               META_F=META_FIELDS * meta.shape[1], LOWRANK=META_LOWRANK,
                               BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R)


def warmup_lowrank(slots_list, max_tokens: int, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Compile, before serving, every low-rank launch a step can make for the slots that
    keep factors (`lowrank=True`): the "sum" kernel for each BLOCK_M up to 8 and "dot"
    (what _blocks picks for 1 .. max_tokens tokens per delta), and the row lookup, each
    launched once on an all-empty batch (every entry -1: nothing read or written), so no
    Triton compile runs inside a step or a CUDA-graph capture."""
    _require_triton()
    from .triton_delta import empty_batch

    done, seen = [], set()
    for slots in slots_list:
        if not getattr(slots, "lowrank", False):
            continue
        dev = slots.meta.device
        key = (slots.in_features, tuple(slots.slice_sizes))
        if key in seen:
            continue
        seen.add(key)
        tokens = sorted({min(t, max(1, max_tokens)) for t in (1, 2, 4, 8, DOT_MIN_TOKENS)})
        for T in tokens:
            y, x, order, seg_slot, zeros = empty_batch(slots, T, dtype)
            triton_lowrank_apply(y, x, order, seg_slot, zeros, zeros, slots.arena.halves,
                                 slots.meta, slots.slice_sizes, max_seg_len=T)
            done.append({"kernel": "lowrank_apply", "tokens": T,
                         "in_features": slots.in_features, "dtype": str(dtype)})
        out = torch.zeros(1, slots.in_features, device=dev, dtype=dtype)
        ids = torch.zeros(1, device=dev, dtype=torch.int64)
        triton_lowrank_rows(out, ids, torch.full((1,), -1, device=dev, dtype=torch.int32),
                            slots.arena.halves, slots.meta)
        done.append({"kernel": "lowrank_rows", "in_features": slots.in_features,
                     "dtype": str(dtype)})
    return done
