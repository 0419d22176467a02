"""Random compressed deltas and the derived error bounds the delta kernels are checked against.

Test support shared by tests/test_kernels.py (CPU path and the Triton interpreter) and
benchmarks/gpu/kernel_sweep.py (the same checks on a CUDA GPU). Importing it sets no
environment variable and imports no Triton: the caller decides interpreter or GPU.

Every bound is derived from the roundings of what is actually computed, never a fudge
factor. With u(dt) the unit roundoff of a dtype and, per output element,

    A[t, o] = sum_j |x[t, j]| * M[slot(t)][o, j]      (the absolute-product sum)

where M = |minv| + |step * code| at kept positions (>= |delta|, and the size of the terms
the fp32 dequantisation adds), the reference is ref = fl(y0 + sum x*D) (fp32 sum, one
rounding to y's dtype) and a path computes y = fl(y0 + sum x*D~) with D~ the delta as that
path holds it. So

    |y - ref| <= u(dt) * (|y| + |ref|)                 the two final roundings
               + c_w * u_w * A                          the path's roundings of D (and of
                                                        intermediate GEMM outputs)
               + 2 * (n + 2) * 2^-24 * A                fp32 dequant + accumulation (both)

c_w * u_w per path: decode 0 (fp32 values in registers); prefill u(dt)^2 for 16-bit
activations (the tile enters tl.dot as two tiles of the activation dtype, its rounding
and the rounding error rounded again: |w - hi - lo| <= u |w - hi| <= u^2 |w|) plus, in
fp16, subnormals of the row-scaled tiles (<= 2^-25 * rowscale per element and tile); CPU
strategies in a 16-bit dtype: 2u (weights rounded + GEMM output rounded), and "merged" 3u
with M replaced by |W_base| + M, because it computes the delta as
fl(x (W_base + D)~) - fl(x W_base): its error scales with |W_base|, not |D|.
"""

from __future__ import annotations

import random

import torch

from deltadq_vllm.kernels import DeltaSlots, reference_apply_deltas
from deltadq_vllm.format.layouts import (EncodedTensor, encode_hash_groupwise, hash_groupwise_columns,
                                  hash_groupwise_values, slice_hash_groupwise)

UNIT = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FP32_U = 2.0 ** -24
# c_w of each path: how many times the delta (or an intermediate GEMM output) is rounded to
# the compute dtype before the final rounding (see above; prefill's one rounding is of
# size u^2, bound_for's u_w)
C_W = {"decode": 0, "prefill": 1, "cpu": 2, "dense": 2, "dequant": 2, "csr": 1, "merged": 3}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def random_enc(rng: random.Random, out: int, inp: int, *, g=None, k=None, bits=None, rps=None,
               seed=None, positive=False, flat=False) -> EncodedTensor:
    """A random hash_groupwise delta (random codes/scales), any g / k / bits / rows_per_scale;
    positive: every kept value > 0 (minv > 0); flat: codes as one bit stream."""
    g = g or rng.choice([d for d in divisors(inp) if d > 1] or [1])
    k = k or rng.randint(1, g)
    bits = bits or rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 16])
    rps = rps or rng.choice([1, 1, 2, 3, out])
    seed = rng.getrandbits(32) if seed is None else seed
    n_kept = inp // g * k
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    codes = torch.randint(0, 1 << bits, (out, n_kept), generator=gen)
    nb = (out + rps - 1) // rps
    step = ((torch.rand(nb, generator=gen) + 0.5) * 2.0 ** -bits * 0.04).to(torch.bfloat16)
    minv = (-torch.rand(nb, generator=gen) * 0.02).to(torch.bfloat16)
    if positive:
        minv = (-minv.float() + 1e-3).to(torch.bfloat16)
    return encode_hash_groupwise((out, inp), codes, step, minv, group_size=g, keep=k, bits=bits,
                                 seed=seed, rows_per_scale=rps, flat=flat)


def tp_slice(rng: random.Random, size: int, inp: int, **kw) -> EncodedTensor:
    """A row- or column-parallel shard of a bigger delta (global positions/scale offsets)."""
    if rng.random() < 0.5:  # column-parallel: a row range
        full = random_enc(rng, size * 3 + 1, inp, **kw)
        r0 = rng.randint(1, 2 * size)
        return slice_hash_groupwise(full, rows=(r0, r0 + size))
    g = kw.get("g") or rng.choice([d for d in divisors(inp) if d > 1])
    full = random_enc(rng, size, inp * 2, g=g, **{k: v for k, v in kw.items() if k != "g"})
    c0 = rng.choice([0, inp])
    return slice_hash_groupwise(full, cols=(c0, c0 + inp))


def make_slots(rng: random.Random, n_slots: int, inp: int, sizes, *, empty=(), partial=(),
               cpu_strategy=None, cpu_dtype=torch.float32, base_weight=None, tp=False,
               device="cpu", **enc_kw):
    """Slots with a random delta per (slot, slice); `empty` slots unloaded, `partial` slots
    miss their first slice. tp: deltas are tensor-parallel slices of bigger matrices."""
    slots = DeltaSlots(n_slots, inp, sizes, row_bytes=2 * inp + 16, cpu_strategy=cpu_strategy,
                       cpu_dtype=cpu_dtype, base_weight=base_weight, device=device)
    encs = []
    for s in range(n_slots):
        if s in empty:
            encs.append(None)
            continue
        row = []
        for i, size in enumerate(sizes):
            if s in partial and i == 0:
                row.append(None)
            elif tp:
                row.append(tp_slice(rng, size, inp, **enc_kw))
            else:
                row.append(random_enc(rng, size, inp, **enc_kw))
        slots.load(s, row)
        encs.append(row)
    return slots, encs


def poisoned_y(T: int, out_total: int, dtype, gen, zero=False, device="cpu"):
    """y as a column window of a NaN-filled wider tensor, holding random base outputs (or
    zeros): writes outside y and unwritten reads of poison both show."""
    big = torch.full((T, out_total + 7), float("nan"), dtype=dtype, device=device)
    y = big[:, 3:3 + out_total]
    vals = torch.zeros(T, out_total) if zero else torch.randn(T, out_total, generator=gen)
    y.copy_(vals.to(dtype))
    return big, y


def magnitudes(encs, sizes, inp):
    """Per slot, M [out_total, in] float64: |minv| + |step * code| at kept positions (>= |D|)."""
    out = []
    for slot_encs in encs:
        m = torch.zeros(sum(sizes), inp, dtype=torch.float64)
        off = 0
        for size, e in zip(sizes, slot_encs or [None] * len(sizes)):
            if e is not None:
                p = e.params
                blk = (p.get("scale_row_offset", 0) + torch.arange(size)) // p["rows_per_scale"]
                mrow = e.tensors["minv"].double()[blk].unsqueeze(1)
                vals = hash_groupwise_values(e).double()
                mag = mrow.abs() + (vals - mrow).abs()
                m[off:off + size].scatter_(1, hash_groupwise_columns(e), mag)
            off += size
        out.append(m)
    return out


def row_scales(encs, sizes):
    """Per slot, the largest prefill row scale max(|minv|, |minv + step * (2^b - 1)|)."""
    out = []
    for slot_encs in encs:
        r = 0.0
        for e in slot_encs or []:
            if e is not None:
                top = e.tensors["minv"].double() + e.tensors["step"].double() * ((1 << e.params["bits"]) - 1)
                r = max(r, float(torch.maximum(e.tensors["minv"].double().abs(), top.abs()).max()))
        out.append(r)
    return out


def abs_products(x, ids, mags, base=None):
    """A [T, out] float64: sum_j |x[t, j]| * W[o, j] with W = M[slot(t)] (+ |W_base| when
    given; base-only tokens then get |W_base| alone, else 0)."""
    xa = x.double().cpu().abs()
    wb = base.double().abs() if base is not None else None
    A = torch.zeros(x.shape[0], mags[0].shape[0], dtype=torch.float64)
    for t, s in enumerate(ids.tolist()):
        w = mags[s] if s >= 0 else None
        if wb is not None:
            w = wb if w is None else w + wb
        if w is not None:
            A[t] = xa[t] @ w.T
    return A


def bound_for(path, y, ref, x, ids, mags, dtype, base=None, rscales=None):
    """The derived bound of `path` (decode / prefill / cpu / a CPU strategy name) for
    y[t] = fl(y0[t] + x[t] @ D^T); base: |W_base| enters A (strategy "merged")."""
    inp = x.shape[1]
    u = UNIT[dtype] / (1 - UNIT[dtype])  # |fl(a) - a| <= u |fl(a)| as well as <= u |a|
    A = abs_products(x, ids, mags, base if path == "merged" else None)
    u_w = u * u if path == "prefill" else u   # prefill: hi + lo tiles (above)
    bound = u * (y.double().abs() + ref.double().abs()) + (C_W[path] * u_w + 2 * (inp + 2) * FP32_U) * A
    if path == "prefill" and dtype == torch.float16:  # subnormals of the two fp16 tiles
        l1 = x.double().cpu().abs().sum(1)
        bound += torch.tensor([2 * 2.0 ** -25 * rscales[s] * float(l1[t]) if s >= 0 else 0.0
                               for t, s in enumerate(ids.tolist())], dtype=torch.float64)[:, None]
    return bound


def untouched_mask(ids, mags):
    """[T, out] True where no delta applies: base-only tokens, empty slots, absent slices."""
    has = torch.stack([m.abs().sum(1) > 0 for m in mags])        # [S, out]
    ok = ids >= 0
    mask = torch.ones(ids.numel(), has.shape[1], dtype=torch.bool)
    mask[ok] = ~has[ids[ok].long()]
    return mask


def check(y, y0, ref, bound, untouched, big=None, what=""):
    """y within `bound` of ref, untouched elements bit-exact, nothing written outside y."""
    y, y0, ref = y.cpu(), y0.cpu(), ref.cpu()
    assert (ref != y0).any() or untouched.all(), "test case has no delta contribution"
    assert not torch.isnan(y).any(), f"{what}: NaN in y (poison read or unwritten)"
    err = (y.double() - ref.double()).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off; max err {err.max().item():.3g}, "
                           f"max err/bound {(err / bound.clamp_min(1e-300)).max().item():.3g}")
    # base-only tokens, empty slots and absent slices: bit-exact untouched
    assert torch.equal(y[untouched], y0[untouched]), f"{what}: elements without a delta modified"
    if big is not None:
        big = big.cpu()
        assert torch.isnan(big[:, :3]).all() and torch.isnan(big[:, -4:]).all(), \
            f"{what}: wrote outside y"


def verify(path, y, y0, x, ids, encs, sizes, dtype, big=None, base=None, what="") -> float:
    """y (after the op on y0) against the reference, within the path's derived bound.
    Returns the largest err / bound (<= 1 when it passes)."""
    ref = reference_apply_deltas(y0.detach().cpu().clone(), x.cpu(), ids.cpu(), encs, sizes)
    mags = magnitudes(encs, sizes, x.shape[1])
    bound = bound_for(path, y.cpu(), ref, x, ids.cpu(), mags, dtype, base, row_scales(encs, sizes))
    check(y, y0, ref, bound, untouched_mask(ids.cpu(), mags), big, what or path)
    err = (y.cpu().double() - ref.double()).abs()
    return float((err / bound.clamp_min(1e-300)).max())
