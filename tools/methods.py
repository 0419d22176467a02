"""Delta compression methods: DeltaDQ and the baselines, each fitted to a byte budget.

Every method gets, per matrix, the fp32 delta, the matrix's calibration inputs and a
budget in *stored bytes* (values + positions + scales), and returns an EncodedTensor
that fits it. Where a method has free parameters (bits, group size), it picks them
by the same calibrated output error, so baselines get the same tuning DeltaDQ gets.
This module holds the baselines and `COMPRESSORS` (every method by name); DeltaDQ's search
is in deltadq_search.py, what the methods share in method_base.py (both re-exported here).
"""

from __future__ import annotations

import math

import torch

from deltadq_vllm.format.bitpack import packed_row_bytes
from deltadq_vllm.format.layouts import (col_bits, decode, encode_bernoulli,
                                         encode_dense, encode_hash_groupwise, encode_lowrank,
                                         encode_sparse_rows, wants_flat)
from deltadq_vllm.format.positions import BernoulliMasks, kept_columns, kept_rows
from deltadq_vllm.format.quant import quantize, quantize_sign, search_ranges

from .deltadq_search import (  # noqa: F401  (re-exported)
    CHUNK_ELEMENTS, SCORE_SAMPLE_ABOVE, _max_kept_per_row, check_group_size, compress_deltadq,
    deltadq_bytes, deltadq_configs, deltadq_encode, most_kept, score_windows)
from .measure import Calibration  # noqa: F401  (re-exported)
from .method_base import (  # noqa: F401  (re-exported)
    DEFAULT_BITS, EXACT_SVD_ELEMENTS, MAX_GROUP_CANDIDATES, METHODS, MIN_GAIN,
    REFINE_ALL_BITS_ELEMENTS, REFINE_WIDTHS, SCALE_BYTES, WIDTH_MIN_GAIN, Choice, MethodOptions,
    ResultMemo, UnfitError, _aligned, _divisors, _memo_key, _rows_per_scale_options, _scale_blocks,
    _unfit, width_floor)


def dare_keep_prob(out, inp, budget, bits, rps) -> float:
    """DARE's keep probability for a byte budget (with a margin: the kept count is random)."""
    n = out * inp
    room = budget - SCALE_BYTES * _scale_blocks(out, rps)
    if room <= 0:
        return 0.0
    p = room * 8 / bits / n
    return p * (1 - 4 / math.sqrt(max(p * n, 1)))  # <= 0 when fewer than ~16 would be kept



# ---------------------------------------------------------------- baselines


def compress_dare(name, delta, calib, budget, opt, seed) -> Choice:
    """DARE: independent Bernoulli drop with rescale 1/p, kept values quantized (DARE-Qt)."""
    out, inp = delta.shape
    cands = []   # (plain choice, gain)
    masks = None   # (hashed once per matrix: every candidate's mask compares the same hash)
    for b in ([opt.bits] if opt.bits else list(DEFAULT_BITS)):
        for rps in ([1] if budget is None else _rows_per_scale_options(out, budget / out)):
            if opt.keep is not None:
                p = opt.keep
            else:
                p = dare_keep_prob(out, inp, budget, b, rps)
            if p <= 0:
                continue
            p = min(p, 1.0)
            if masks is None:
                masks = BernoulliMasks(seed, out, inp)
            mask = masks.mask(p)
            n_kept = int(torch.count_nonzero(mask))   # (mask.sum() widens a copy of the mask)
            cost = packed_row_bytes(n_kept, b) + SCALE_BYTES * _scale_blocks(out, rps)
            if budget is not None and cost > budget:
                continue
            enc, diff = _dare_encode(delta, mask, p, b, rps, opt.clip, seed)
            err, gain = calib.error_and_gain(delta, diff)
            cands.append((Choice(enc, err, b, n_kept, plain_error=err), gain))
            del mask, diff   # (each candidate's temporaries freed before the next one's)
    # as compress_deltadq's width choice: where no candidate beats storing nothing, those
    # whose plain values keep the delta (opt.width_gain) first
    if not cands:
        raise _unfit(name, "dare", packed_row_bytes(1, 2) + SCALE_BYTES, budget)
    floor = width_floor((c.error for c, _ in cands), opt.width_gain)
    best, gain = min(cands, key=lambda t: (floor is not None and t[1] < floor, t[0].error))
    # (the error alone would have taken values that lose the delta)
    moved = floor is not None and min(cands, key=lambda t: t[0].error)[1] < floor <= gain
    if opt.refine:
        from .refine import refine_bernoulli
        best = refine_bernoulli(delta, calib, best, opt, masks.mask(best.enc.params["keep_prob"]))
    best.width_rule = moved
    return best


def _dare_chunks(out: int, inp: int, rps: int) -> list[tuple[int, int]]:
    """[r0, r1) row ranges of whole scale blocks, about CHUNK_ELEMENTS delta elements each."""
    rows = max(rps, CHUNK_ELEMENTS // max(inp, 1) // rps * rps)
    return [(r0, min(out, r0 + rows)) for r0 in range(0, out, rows)]


def _pieces(r0: int, r1: int, inp: int) -> list[tuple[int, int]]:
    """Rows r0..r1 in ranges of about CHUNK_ELEMENTS elements (any row boundary)."""
    rows = max(1, CHUNK_ELEMENTS // max(inp, 1))
    return [(a, min(r1, a + rows)) for a in range(r0, r1, rows)]


def _dare_encode(delta, mask, p, bits, rps, clip, seed):
    """(DARE's encoding of the kept values delta[mask] / p, delta minus its decoded values),
    made a chunk of whole scale blocks at a time: a block's range and codes depend on its
    own values only (in their order), so the bytes are those of the whole matrix at once,
    without its whole-matrix temporaries (at 16x a 7B embedding keeps 65M values: their
    int64 rows, blocks and codes were 0.5 GB each, the peak 5.5 GB). The decoded values
    are decode_bernoulli's (the same arithmetic), subtracted at the kept positions only."""
    out, inp = delta.shape
    diff = torch.empty_like(delta)
    codes, steps, minvs = [], [], []
    for r0, r1 in _dare_chunks(out, inp, rps):
        # (kept values gathered and put back in pieces of rows: with 2 threads masked_select
        # makes an int64 prefix sum of its whole mask, 2 GB for a 7B embedding that is one
        # scale block at 2048x)
        pieces = _pieces(r0, r1, inp)
        parts = [delta[a:b].masked_select(mask[a:b]) for a, b in pieces]
        sizes = [t.numel() for t in parts]
        kept = torch.cat(parts)
        del parts
        rows = kept_rows(mask[r0:r1])
        c, st, mn = _quantize_ragged(kept / p, rows, r1 - r0, bits, rps, clip)
        blk = rows.floor_divide_(rps)
        kept.sub_(mn.float()[blk] + st.float()[blk] * c.float())   # delta - decoded
        for (a, b), part in zip(pieces, kept.split(sizes)):
            diff[a:b].copy_(delta[a:b]).masked_scatter_(mask[a:b], part)
        codes.append(c.to(torch.uint8 if bits <= 8 else torch.int64))
        steps.append(st)
        minvs.append(mn)
    enc = encode_bernoulli((out, inp), torch.cat(codes), torch.cat(steps), torch.cat(minvs),
                           keep_prob=p, bits=bits, seed=seed, rows_per_scale=rps)
    return enc, diff


def _quantize_ragged(vals, rows, out, bits, rps, clip=True):
    """Per-row-block min/step for a flat list of values with their row ids."""
    blk = rows // rps
    nb = _scale_blocks(out, rps)
    lo = torch.full((nb,), float("inf")).scatter_reduce(0, blk, vals, "amin")
    hi = torch.full((nb,), float("-inf")).scatter_reduce(0, blk, vals, "amax")
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    levels = (1 << bits) - 1

    def err_of(minv, step):
        m, st = minv.float()[blk], step.float()[blk]
        d = torch.round((vals - m) / st).clamp_(0, levels).mul_(st).add_(m).sub_(vals)
        return torch.zeros(nb).index_add_(0, blk, d.square_())

    cnt = torch.zeros(nb).index_add_(0, blk, torch.ones_like(vals)).clamp_min(1)
    mean = torch.zeros(nb).index_add_(0, blk, vals) / cnt
    minv, step = search_ranges(err_of, lo, hi, mean, bits, clip)  # as quantize's
    codes = torch.round((vals - minv.float()[blk]) / step.float()[blk]).clamp_(0, levels)
    return codes.to(torch.int64), step, minv


def compress_bitdelta(name, delta, calib, budget, opt, seed) -> Choice:
    """BitDelta: sign(delta) times one scale per matrix (mean |delta|). Above 16x, a random
    subset (one kept element per group of 1/keep, rescaled) carries the signs."""
    out, inp = delta.shape
    rps = out
    if opt.keep is not None:
        keep_max = opt.keep
    else:
        keep_max = _max_kept_per_row(out, inp, budget, 1, rps, 0) / inp
    groups = _aligned([g for g in _divisors(inp) if g * keep_max >= 1 - 1e-9], inp,
                      opt.tp_align)
    if not groups:
        raise _unfit(name, "bitdelta", deltadq_bytes(out, inp, inp, 1, 1, rps), budget)
    g = groups[0]
    k = min(g, math.floor(g * keep_max + 1e-9))
    cols = kept_columns(seed, out, inp, g, k)
    vals = torch.gather(delta, 1, cols) * (g / k)
    codes, step, minv = quantize_sign(vals, rps)
    enc = encode_hash_groupwise((out, inp), codes, step, minv, group_size=g, keep=k, bits=1,
                                seed=seed, rows_per_scale=rps,
                                flat=wants_flat(inp // g * k, 1))
    return Choice(enc, calib.relative_error(delta, decode(enc)), 1, out * (inp // g) * k)


def compress_magnitude(name, delta, calib, budget, opt, seed) -> Choice:
    """Keep the largest |delta| of every row (positions stored), values quantized."""
    out, inp = delta.shape
    best = None
    for b in ([opt.bits] if opt.bits else list(DEFAULT_BITS)):
        rps = 1
        if opt.keep is not None:
            k = max(1, round(opt.keep * inp))
        else:
            room = budget - SCALE_BYTES * _scale_blocks(out, rps)
            k = min(inp, math.floor(room / out * 8 / (col_bits(inp) + b)))
            while k > 0 and out * (packed_row_bytes(k, col_bits(inp)) + packed_row_bytes(k, b)) > room:
                k -= 1
        if k < 1:
            continue
        cols = delta.abs().topk(k, dim=1).indices.sort(dim=1).values
        codes, step, minv = quantize(torch.gather(delta, 1, cols), b, rps, opt.clip)
        enc = encode_sparse_rows((out, inp), cols, codes, step, minv, bits=b, decompose_bits=0,
                                 rows_per_scale=rps)
        c = Choice(enc, calib.relative_error(delta, decode(enc)), b, out * k)
        if best is None or c.error < best.error:
            best = c
    if best is None:
        raise _unfit(name, "magnitude", out * (packed_row_bytes(1, col_bits(inp)) + 1), budget)
    return best


def lowrank_bytes_per_rank(shape) -> int:
    """Bytes one rank of a low-rank encoding costs: bf16 factors [out, 1] and [1, in]."""
    out, inp = shape
    return (out + inp) * 2


def compress_lowrank(name, delta, calib, budget, opt, seed) -> Choice:
    """Truncated SVD, bf16 factors, rank chosen to fit the budget."""
    out, inp = delta.shape
    per_rank = lowrank_bytes_per_rank(delta.shape)
    if opt.keep is not None:
        r = max(1, round(opt.keep * min(out, inp)))
    else:
        r = int(budget // per_rank)
    r = min(r, min(out, inp))
    if r < 1:
        raise _unfit(name, "lowrank", per_rank, budget)
    if min(out, inp) <= 4096 and out * inp <= EXACT_SVD_ELEMENTS:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:  # randomized SVD keeps 7B/70B-size matrices tractable on a CPU
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=min(r + 16, min(out, inp)), niter=4)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    root = s.sqrt()
    enc = encode_lowrank(u * root, root.unsqueeze(1) * vh)
    return Choice(enc, calib.relative_error(delta, decode(enc)), 16, r * (out + inp))


def compress_dense(name, delta, calib, budget, opt, seed) -> Choice:
    """Uncompressed reference: the exact delta in float64 (fine-tune - base is exact in
    float64 for fp32/bf16/fp16 checkpoints, so merge reproduces the fine-tune bit for bit)."""
    enc = encode_dense(delta, torch.float64)
    return Choice(enc, 0.0, 64, delta.numel())


COMPRESSORS = {
    "deltadq": compress_deltadq,
    "dare": compress_dare,
    "bitdelta": compress_bitdelta,
    "magnitude": compress_magnitude,
    "lowrank": compress_lowrank,
    "dense": compress_dense,
}
