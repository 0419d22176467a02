"""Refining a dropout method's kept values: calibrated solve and per-block shrinkage.

Given the plain encoding a method chose (positions, bits, scale blocks), this tries, at the
same positions and the same bytes:

* `shrunk`: the plain values times the optimal scale of each scale block
  (alpha = <X d, X d^> / ||X d^||^2 on the fit rows), stored by scaling the block's bf16
  step and minimum: a delta whose plain estimate overshoots (large deltas, extreme ratios)
  is pulled toward zero, and a block can never be worse than storing nothing on the rows
  it was fitted on;
* `calibrated` (and `calibrated+shrunk`): kept values solved on calibration inputs with the
  OBS/GPTQ sweep of calibrated.py.

and keeps whichever has the smallest relative output error on the *held-out* calibration
rows (so a solve that overfits the fit rows is never taken over the plain values). The
decoder is unchanged: every variant is the same layout with other codes and scales.
"""

from __future__ import annotations

import math

import torch

from deltadq_vllm.bitpack import pack_bits
from deltadq_vllm.layouts import (decode, encode_bernoulli, encode_hash_groupwise,
                                  hash_groupwise_codes, wants_flat)
from deltadq_vllm.positions import bernoulli_mask, kept_columns
from deltadq_vllm.quant import SCALE_DTYPE, dequantize, quantize

from .calibrated import refit_grid, shrink_factors, sweep

# rows solved together: a multiple of the scale block; about this many delta elements
SWEEP_ELEMENTS = 1 << 22
# the unquantized first sweep (which picks the grid for the calibrated values) is run on
# matrices up to this size; larger ones quantize on the plain encoding's grid (one sweep)
TWO_PASS_ELEMENTS = 1 << 24


def _chunks(out: int, inp: int, rps: int) -> list[tuple[int, int]]:
    unit = math.lcm(rps, 8)
    rows = max(unit, SWEEP_ELEMENTS // max(inp, 1) // unit * unit)
    return [(r0, min(out, r0 + rows)) for r0 in range(0, out, rows)]


def _row_grid(t: torch.Tensor, rps: int, r0: int, r1: int) -> torch.Tensor:
    blk = torch.arange(r0, r1) // rps
    return t.float()[blk].unsqueeze(1)


def _fit_rows(calib):
    """Inputs the shrink factors are fitted on (None: weight space / selected rows)."""
    return calib.x_fit if calib.x_fit is not None else calib.x


def _shrink(calib, delta, approx, rps, step, minv):
    """(step, minv) scaled by the optimal factor per block, or None if no block changes."""
    x = _fit_rows(calib)
    if x is not None:
        alpha = shrink_factors(x, delta, approx, rps)
    else:
        d, a = (delta[calib.rows], approx[calib.rows]) if calib.rows is not None else (delta, approx)
        rows = calib.rows if calib.rows is not None else torch.arange(delta.shape[0])
        blk = rows // rps
        nb = step.numel()
        num = torch.zeros(nb).index_add_(0, blk, (d * a).sum(1))
        den = torch.zeros(nb).index_add_(0, blk, (a * a).sum(1))
        alpha = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den))
        alpha = alpha.clamp_(0.0, 2.0)
    if torch.all((alpha - 1).abs() < 1e-3):
        return None
    return ((step.float() * alpha).to(SCALE_DTYPE), (minv.float() * alpha).to(SCALE_DTYPE))


def _refit(calib, delta, mask, codes_dense, rps, step, minv):
    """(step, minv) refitted by least squares on the fit rows for fixed codes, or None."""
    x = _fit_rows(calib)
    if x is None and calib.rows is not None:
        return None
    m2, s2 = refit_grid(x, delta, mask, codes_dense, rps)
    bad = torch.isnan(m2) | torch.isnan(s2)
    m2 = torch.where(bad, minv.float(), m2)
    s2 = torch.where(bad, step.float(), s2)
    return s2.to(SCALE_DTYPE), m2.to(SCALE_DTYPE)


def _best(calib, delta, plain, variants):
    """The variant [(label, enc, approx)] with the smallest held-out error, as a Choice."""
    from .methods import Choice

    best = plain
    for label, enc, approx in variants:
        err = calib.relative_error(delta, approx)
        if err < best.error:
            best = Choice(enc, err, plain.value_bits, plain.n_values,
                          plain_error=plain.plain_error, values=label)
    return best


# ---------------------------------------------------------------- hash_groupwise (deltadq)


def _hash_enc(plain_enc, codes, step, minv):
    p = plain_enc.params
    flat = bool(p.get("flat"))
    packed = pack_bits(codes.reshape(1, -1) if flat else codes, p["bits"])
    return encode_hash_groupwise(plain_enc.shape, packed, step, minv,
                                 group_size=p["group_size"], keep=p["keep"], bits=p["bits"],
                                 seed=p["seed"], rows_per_scale=p["rows_per_scale"],
                                 flat=flat, packed=True)


def _scatter(shape, cols, codes, step, minv, rps):
    return torch.zeros(shape).scatter_(1, cols, dequantize(codes, step, minv, rps))


def refine_hash_groupwise(delta, calib, plain, opt):
    enc = plain.enc
    p = enc.params
    out, inp = enc.shape
    g, k, bits, rps = p["group_size"], p["keep"], p["bits"], p["rows_per_scale"]
    levels = (1 << bits) - 1
    codes = hash_groupwise_codes(enc)
    step, minv = enc.tensors["step"], enc.tensors["minv"]
    cols = kept_columns(p["seed"], out, inp, g, k)
    variants = []
    sets = [("plain", codes, step, minv)]
    if calib.x_fit is not None and opt.calibrated:
        factors = calib.sweep_factors()
        c_codes, c_steps, c_minvs = [], [], []
        two_pass = out * inp <= TWO_PASS_ELEMENTS
        for r0, r1 in _chunks(out, inp, rps):
            d = delta[r0:r1]
            cc = cols[r0:r1]
            mask = torch.zeros(d.shape, dtype=torch.bool).scatter_(1, cc, True)
            b0, b1 = r0 // rps, (r1 - 1) // rps + 1
            if two_pass:
                v = torch.gather(sweep(d, mask, factors), 1, cc)
                _, st, mn = quantize(v, bits, rps, opt.clip)
            else:
                st, mn = step[b0:b1], minv[b0:b1]
            mrow, srow = _row_grid(mn, rps, 0, r1 - r0), _row_grid(st, rps, 0, r1 - r0)
            q = torch.gather(sweep(d, mask, factors, mrow, srow, levels), 1, cc)
            c_codes.append(torch.round((q - mrow) / srow).clamp_(0, levels).to(torch.int64))
            c_steps.append(st)
            c_minvs.append(mn)
        sets.append(("calibrated", torch.cat(c_codes), torch.cat(c_steps), torch.cat(c_minvs)))
    mask = torch.zeros(out, inp, dtype=torch.bool).scatter_(1, cols, True)
    for label, cds, st, mn in sets:
        approx = _scatter((out, inp), cols, cds, st, mn, rps)
        if label != "plain":
            variants.append((label, _hash_enc(enc, cds, st, mn), approx))
        pre = "" if label == "plain" else label + "+"
        shrunk = _shrink(calib, delta, approx, rps, st, mn)
        if shrunk is not None:
            s2, m2 = shrunk
            variants.append((pre + "shrunk", _hash_enc(enc, cds, s2, m2),
                             _scatter((out, inp), cols, cds, s2, m2, rps)))
        dense_codes = torch.zeros(out, inp).scatter_(1, cols, cds.float())
        refit = _refit(calib, delta, mask, dense_codes, rps, st, mn)
        if refit is not None:
            s2, m2 = refit
            variants.append((pre + "refit", _hash_enc(enc, cds, s2, m2),
                             _scatter((out, inp), cols, cds, s2, m2, rps)))
    return _best(calib, delta, plain, variants)


# ---------------------------------------------------------------- bernoulli (dare)


def refine_bernoulli(delta, calib, plain, opt):
    from .methods import _quantize_ragged

    enc = plain.enc
    p = enc.params
    out, inp = enc.shape
    bits, rps, keep = p["bits"], p["rows_per_scale"], p["keep_prob"]
    levels = (1 << bits) - 1
    step, minv = enc.tensors["step"], enc.tensors["minv"]
    mask = bernoulli_mask(p["seed"], out, inp, keep)
    approx0 = decode(enc)
    rows_all = mask.nonzero()[:, 0]
    codes0 = torch.round((approx0[mask] - minv.float()[rows_all // rps])
                         / step.float()[rows_all // rps]).clamp_(0, levels).to(torch.int64)
    sets = [("plain", codes0, step, minv, approx0)]
    if calib.x_fit is not None and opt.calibrated:
        factors = calib.sweep_factors()
        cs, sts, mns = [], [], []
        approx = torch.zeros(out, inp)
        two_pass = out * inp <= TWO_PASS_ELEMENTS
        for r0, r1 in _chunks(out, inp, rps):
            d, m = delta[r0:r1], mask[r0:r1]
            rows = m.nonzero()[:, 0]
            b0, b1 = r0 // rps, (r1 - 1) // rps + 1
            if two_pass:
                v = sweep(d, m, factors)[m]
                _, st, mn = _quantize_ragged(v, rows, r1 - r0, bits, rps, opt.clip)
            else:
                st, mn = step[b0:b1], minv[b0:b1]
            mrow, srow = _row_grid(mn, rps, 0, r1 - r0), _row_grid(st, rps, 0, r1 - r0)
            q = sweep(d, m, factors, mrow, srow, levels)
            c = torch.round((q - mrow) / srow).clamp_(0, levels)[m].to(torch.int64)
            cs.append(c)
            sts.append(st)
            mns.append(mn)
            approx[r0:r1] = q
        sets.append(("calibrated", torch.cat(cs), torch.cat(sts), torch.cat(mns), approx))
    variants = []

    def make(cds, st, mn):
        return encode_bernoulli((out, inp), cds, st, mn, keep_prob=keep, bits=bits,
                                seed=p["seed"], rows_per_scale=rps)

    for label, cds, st, mn, approx in sets:
        if label != "plain":
            variants.append((label, make(cds, st, mn), approx))
        pre = "" if label == "plain" else label + "+"
        shrunk = _shrink(calib, delta, approx, rps, st, mn)
        if shrunk is not None:
            e2 = make(cds, *shrunk)
            variants.append((pre + "shrunk", e2, decode(e2)))
        dense_codes = torch.zeros(out, inp)
        dense_codes[mask] = cds.float()
        refit = _refit(calib, delta, mask, dense_codes, rps, st, mn)
        if refit is not None:
            e2 = make(cds, *refit)
            variants.append((pre + "refit", e2, decode(e2)))
    return _best(calib, delta, plain, variants)
