"""Refining a dropout method's kept values: calibrated solve, grid refit and shrinkage.

Given the plain encoding a method chose (positions, bits, scale blocks), this tries, at the
same positions and the same bytes:

* `shrunk`: the plain values times the optimal scale of each scale block
  (alpha = <X d, X d^> / ||X d^||^2 on the fit rows), stored by scaling the block's bf16
  step and minimum: a delta whose plain estimate overshoots (large deltas, extreme ratios)
  is pulled toward zero, so a block is never worse than storing nothing on its fit rows;
* `refit`: the block's minimum and step re-solved by least squares for the fixed codes
  (decoded values are linear in both; shrinkage is the special case of one factor);
* `calibrated` (+ `shrunk` / `refit`): kept values solved on calibration inputs with the
  OBS/GPTQ sweep of calibrated.py (or, where rows keep few values, the exact least-squares
  solve on each row's kept set, quantized with the same error feedback), their grid from
  the range search; a solve that cannot carry --min-gain of the delta is given up early
  (solve_hope.py: the exact solve judged on a sample of rows before it runs; either
  judged after its first block);

and keeps whichever has the smallest relative output error on the *held-out* calibration
rows (a solve that overfits its fit rows is never taken over the plain values). Everything
is row-local, so a matrix is processed a block of rows at a time (bounded memory on a
32000 x 4096 LM head) and the errors are summed over the blocks. The decoder is unchanged:
every variant is the same layout with other codes and scales.
"""

from __future__ import annotations

import math

import torch

from deltadq_vllm.format.bitpack import pack_bits
from deltadq_vllm.format.layouts import (encode_bernoulli, encode_hash_groupwise, hash_groupwise_codes)
from deltadq_vllm.format.positions import bernoulli_mask, kept_columns, kept_rows
from deltadq_vllm.format.quant import SCALE_DTYPE, quantize

from .calibrated import exact_cheaper, solve_kept, sweep
from .refine_chunk import _Chunk, set_variants, sub_chunks
from .solve_hope import Hope

# rows refined together: whole scale blocks, about this many delta elements. The sweep's
# per-column ops work on one chunk's rows, and at 1024 rows they cost little more than
# their call overhead: measured here (2 threads, 4096-wide input, quantized sweep) 0.17 ms
# per row in chunks of 1024 rows, 0.11 ms in chunks of 4096. Matrices up to
# SWEEP_WIDE_UP_TO elements (a 7B model's attention and MLP matrices) take the larger
# chunks (~400 MB more temporaries); larger ones (LM heads, embeddings: where the peak RSS
# is) the small ones.
SWEEP_ELEMENTS = 1 << 22
SWEEP_WIDE_ELEMENTS = 1 << 24
SWEEP_WIDE_UP_TO = 1 << 26
# the unquantized first sweep (which picks the grid of the calibrated values) is run on
# matrices up to this size; larger ones quantize on the plain encoding's grid (one sweep)
TWO_PASS_ELEMENTS = 1 << 24
# the exact solve on each row's kept set where it is cheaper (calibrated.exact_cheaper);
# False: always the sweep (for comparisons)
EXACT = True
# the most plain codes' scales are raised by to meet min_gain (_rescaled): a projection far
# below it means the codes hardly follow the delta, and amplifying them is amplifying noise
RESCALE_MAX = 4.0
# a configuration whose calibrated solve was given up (Hope) where refine_together.py solved
# it beside the matrix's other configurations
GAVE_UP = "gave up"
# CALIBRATED_GRID: that grid always comes from the range search: solved values carry
# outliers that min-max ranges would spend the few levels on (measured on the
# llama-gqa--light fixture at 16x: every matrix then preferred its plain values), whatever
# --quant-range says about the plain values' grid.


def _chunks(out: int, inp: int, rps: int) -> list[tuple[int, int]]:
    unit = math.lcm(rps, 8)
    size = SWEEP_WIDE_ELEMENTS if out * inp <= SWEEP_WIDE_UP_TO else SWEEP_ELEMENTS
    rows = max(unit, size // max(inp, 1) // unit * unit)
    return [(r0, min(out, r0 + rows)) for r0 in range(0, out, rows)]


def _row_grid(t: torch.Tensor, rps: int, n: int) -> torch.Tensor:
    return t.float()[torch.arange(n) // rps].unsqueeze(1)


def _calibrated_grid(kept: torch.Tensor, bits: int, rps: int):
    """(step, minv, step per row [n, 1], minv per row [n, 1]) of the grid the calibrated
    values are quantized on, from their unquantized solution at the kept columns [n, kept]
    (the range search: CALIBRATED_GRID)."""
    _, st2, mn2 = quantize(kept, bits, rps, True)
    n = kept.shape[0]
    return st2, mn2, _row_grid(st2, rps, n), _row_grid(mn2, rps, n)


def _code_dtype(levels: int) -> torch.dtype:
    """Codes held until the encoding is packed: one byte each up to 8 bits (int64 codes of a
    7B LM head's calibrated values were 0.5 GB of the compressor's peak)."""
    return torch.uint8 if levels < 256 else torch.int64


def _kept_codes(q_kept: torch.Tensor, mrow, srow, levels: int, cc: torch.Tensor, inp: int):
    """(codes [n, kept] (_code_dtype), codes at the kept columns cc of an [n, inp] zero
    matrix) of the quantized calibrated values q_kept [n, kept] on the grid (mrow, srow)."""
    c2 = torch.round((q_kept - mrow) / srow).clamp_(0, levels)
    return c2.to(_code_dtype(levels)), torch.zeros(cc.shape[0], inp).scatter_(1, cc, c2)


def _label(base: str, suffix: str) -> str:
    if not suffix:
        return base
    return suffix if base == "plain" else f"{base}+{suffix}"


def _refine(delta, calib, plain, opt, chunk_sets, make_enc, chunk=None):
    """Common driver. chunk_sets(r0, r1, d, ch) -> [(set label, codes chunk, step, minv,
    mask, codes_dense)] for a chunk (codes_dense: codes at the kept positions, zero
    elsewhere; ch: the chunk's _Chunk); make_enc(codes list, step list, minv list) -> enc.
    A set not produced for every chunk (a solve given up on, _Hope) is no candidate.
    chunk: the matrix's _Chunk where it is one chunk, made by the caller (shared by the
    configurations refine_together.py refines)."""
    from .methods import Choice

    ref, err, dot = 0.0, {}, {}
    # a tied embedding (calib.input_rows) is also judged row by row in weight space
    rows_role = calib.input_rows and calib.x is not None
    ref_w, err_w, dot_w = 0.0, {}, {}
    pieces: dict[str, tuple[list, list, list]] = {}
    rps = plain.enc.params["rows_per_scale"]
    chunks = _chunks(*delta.shape, rps)
    produced: dict[str, int] = {}
    for r0, r1 in chunks:
        d = delta[r0:r1]
        ch = chunk if chunk is not None and len(chunks) == 1 else _Chunk(calib, d, r0)
        subs = sub_chunks(ch, d)
        for s, sub in subs:
            ref += float(sub.a_held.square().sum())
            if rows_role:
                ref_w += float(d[s].float().square().sum())
        for base, codes, st, mn, mask, dense_codes in chunk_sets(r0, r1, d, ch):
            for suffix, s2, m2, e, dt, ew, dw in set_variants(subs, d, mask, dense_codes,
                                                              st, mn, rps, rows_role):
                label = _label(base, suffix)
                produced[label] = produced.get(label, 0) + 1
                err[label] = err.get(label, 0.0) + e
                dot[label] = dot.get(label, 0.0) + dt
                if rows_role:
                    err_w[label] = err_w.get(label, 0.0) + ew
                    dot_w[label] = dot_w.get(label, 0.0) + dw
                p = pieces.setdefault(label, ([], [], []))
                p[0].append(codes)
                p[1].append(s2)
                p[2].append(m2)

    for label in [k for k in err if produced[k] < len(chunks)]:
        del err[label], dot[label], pieces[label]
        err_w.pop(label, None), dot_w.pop(label, None)
    if "plain" not in err and (not err or opt.plain_gain > 0):
        return plain   # (chunk_sets without the plain set, and no other set made)

    def relative(label):
        e = err[label] ** 0.5
        rel = e / ref ** 0.5 if ref > 0 else e
        if rows_role:   # the worse of the two roles (methods.Calibration.input_rows)
            ew = err_w[label] ** 0.5
            rel = max(rel, ew / ref_w ** 0.5 if ref_w > 0 else ew)
        return rel

    def gain(label):
        return dot[label] / ref if ref > 0 else 1.0

    # MIN_GAIN: a candidate that carries less than this fraction of the true delta's output
    # (its projection on it, on the held-out rows) has bought its lower error by shrinking
    # the delta toward zero. Plain rescaled values are unbiased in expectation and always
    # eligible by default, but on a clipped grid (the range search, default from 512x) they
    # carry less: 0.45 (median) at 1024x on a real SmolLM2 fine-tune. With --plain-gain G
    # > 0, plain values short of G are stored with their scales raised to carry G ("rescaled",
    # _rescaled) and are not eligible themselves. A trade-off, so off by default: at 1024x
    # G = 0.9 raised arith-light's task from 69% to 86% of the fine-tune's (reverse-light
    # 79% -> 97%) but put top-1 agreement with the fine-tune on held-out WikiText below the
    # base's (0.801 vs 0.854; G = 0.7: 83%, 0.838). See docs/compression.md.
    plain_short = opt.plain_gain > 0 and ref > 0 and 0 < gain("plain") < opt.plain_gain
    if plain_short:
        _rescaled(err, dot, err_w, dot_w, pieces, ref, ref_w,
                  min(opt.plain_gain / gain("plain"), RESCALE_MAX))
    eligible = [k for k in err if (k == "plain" and not plain_short) or k == "rescaled"
                or gain(k) >= opt.min_gain * (1 - 1e-6)]
    if not eligible:   # (only without the plain set)
        return plain
    best = min(eligible, key=relative)
    best_err = relative(best)
    if best == "plain" or not plain_short and best_err >= plain.error:
        return plain
    codes, steps, minvs = pieces[best]
    return Choice(make_enc(codes, steps, minvs), best_err, plain.value_bits, plain.n_values,
                  plain_error=plain.plain_error, values=best)


def _rescaled(err, dot, err_w, dot_w, pieces, ref, ref_w, alpha):
    """Add the "rescaled" candidate: the plain codes with every scale block's step and
    minimum times alpha (decoded values times alpha). Its errors follow from the plain
    ones: with P the plain prediction, |a - alpha P|^2 = |a|^2 - 2 alpha <a, P> +
    alpha^2 |P|^2, where |P|^2 = 2 <a, P> - |a|^2 + |a - P|^2 (likewise in weight space)."""
    def scaled(e, dt, r):
        p2 = 2 * dt - r + e
        return r - 2 * alpha * dt + alpha * alpha * p2, alpha * dt

    err["rescaled"], dot["rescaled"] = scaled(err["plain"], dot["plain"], ref)
    if "plain" in err_w:
        err_w["rescaled"], dot_w["rescaled"] = scaled(err_w["plain"], dot_w["plain"], ref_w)
    codes, steps, minvs = pieces["plain"]
    pieces["rescaled"] = (codes, [(t.float() * alpha).to(SCALE_DTYPE) for t in steps],
                          [(t.float() * alpha).to(SCALE_DTYPE) for t in minvs])


# ---------------------------------------------------------------- hash_groupwise (deltadq)


def refine_hash_groupwise(delta, calib, plain, opt, shared=None, calibrated_only=False):
    """shared: what refine_together.py prepared for this configuration of a matrix that is
    one chunk (its _Chunk, kept columns and mask, and maybe its calibrated set); None:
    everything is computed here. calibrated_only: the plain values' variants (shrunk,
    refit) are no candidates; the result is plain unless a calibrated candidate wins."""
    enc = plain.enc
    p = enc.params
    out, inp = enc.shape
    g, k, bits, rps = p["group_size"], p["keep"], p["bits"], p["rows_per_scale"]
    levels = (1 << bits) - 1
    step, minv = enc.tensors["step"], enc.tensors["minv"]
    solve = calib.x_fit is not None and opt.calibrated
    factors = calib.sweep_factors() if solve else None
    two_pass = out * inp <= TWO_PASS_ELEMENTS
    exact = EXACT and exact_cheaper(inp // g * k, inp)   # kept per row: fixed
    hope = Hope(opt.min_gain, other_width=calibrated_only)

    def chunk_sets(r0, r1, d, ch):
        n = r1 - r0
        if shared is not None and (r0, n) == (0, out):   # (shared: one chunk, all rows)
            cc, mask = shared.cols, shared.mask
        else:
            cc = kept_columns(p["seed"], n, inp, g, k, row_offset=r0)
            mask = torch.zeros(n, inp, dtype=torch.bool).scatter_(1, cc, True)
        b0, b1 = r0 // rps, (r1 - 1) // rps + 1
        st, mn = step[b0:b1], minv[b0:b1]
        # (unpacked chunk by chunk: all of a 7B LM head's int64 codes were 0.5 GB)
        codes = hash_groupwise_codes(enc, (r0, r1)).to(_code_dtype(levels))
        dense = torch.zeros(n, inp).scatter_(1, cc, codes.float())
        sets = [("plain", codes, st, mn, mask, dense)]
        if shared is not None and shared.calibrated is not None:   # solved with others
            if shared.calibrated is not GAVE_UP:
                sets.append(("calibrated", *shared.calibrated[:3], mask, shared.calibrated[3]))
            return sets
        if not (solve and hope.alive):
            return sets
        if exact:
            def solved(i):   # rows i's exact solution: (kept values, zero off the mask)
                z = solve_kept(d[i], cc[i], factors)
                return z, torch.zeros(z.shape[0], inp).scatter_(1, cc[i], z)
            if not hope.prejudge(ch, lambda i: solved(i)[1]):
                return sets
            z, z_dense = solved(slice(None))
            if not hope.judge(ch, z_dense):
                return sets
            st2, mn2, srow, mrow = _calibrated_grid(z, bits, rps)
            q = solve_kept(d, cc, factors, None, mrow, srow, levels)
            c2, dense2 = _kept_codes(q, mrow, srow, levels, cc, inp)
            sets.append(("calibrated", c2, st2, mn2, mask, dense2))
        else:   # (no sample first: see solve_hope.PREJUDGE_ROWS)
            if two_pass:
                v = sweep(d, mask, factors)
                if not hope.judge(ch, v):
                    return sets
                st2, mn2, srow, mrow = _calibrated_grid(torch.gather(v, 1, cc), bits, rps)
            else:
                st2, mn2 = st, mn
                mrow, srow = _row_grid(mn2, rps, n), _row_grid(st2, rps, n)
            q = sweep(d, mask, factors, mrow, srow, levels)
            if not two_pass and not hope.judge(ch, q):
                return sets    # (the later chunks of a large matrix are spared)
            c2, dense2 = _kept_codes(torch.gather(q, 1, cc), mrow, srow, levels, cc, inp)
            sets.append(("calibrated", c2, st2, mn2, mask, dense2))
        return sets

    def make_enc(codes, steps, minvs):
        codes = torch.cat(codes)
        flat = bool(p.get("flat"))
        packed = pack_bits(codes.reshape(1, -1) if flat else codes, bits)
        return encode_hash_groupwise(enc.shape, packed, torch.cat(steps), torch.cat(minvs),
                                     group_size=g, keep=k, bits=bits, seed=p["seed"],
                                     rows_per_scale=rps, flat=flat, packed=True)

    def solved_sets(r0, r1, d, ch):   # (calibrated_only)
        return [t for t in chunk_sets(r0, r1, d, ch) if t[0] != "plain"]

    return _refine(delta, calib, plain, opt, solved_sets if calibrated_only else chunk_sets,
                   make_enc, shared.chunk if shared is not None else None)


# ---------------------------------------------------------------- bernoulli (dare)


def _padded_columns(mask: torch.Tensor):
    """(cols [R, s], valid [R, s]): each row's kept columns in increasing order, padded
    to the longest row (padding: column 0, valid False)."""
    counts = mask.sum(1)
    s = max(int(counts.max()), 1)
    valid = torch.arange(s).unsqueeze(0) < counts.unsqueeze(1)
    cols = torch.zeros(mask.shape[0], s, dtype=torch.int64)
    cols[valid] = mask.nonzero()[:, 1]
    return cols, valid


def refine_bernoulli(delta, calib, plain, opt, mask=None):
    """mask: the plain encoding's bernoulli_mask where the caller has it (compress_dare),
    else regenerated from the seed."""
    from .methods import _quantize_ragged

    enc = plain.enc
    p = enc.params
    out, inp = enc.shape
    bits, rps, keep = p["bits"], p["rows_per_scale"], p["keep_prob"]
    levels = (1 << bits) - 1
    step, minv = enc.tensors["step"], enc.tensors["minv"]
    from deltadq_vllm.format.bitpack import unpack_bits
    full_mask = mask if mask is not None else bernoulli_mask(p["seed"], out, inp, keep)
    solve = calib.x_fit is not None and opt.calibrated
    factors = calib.sweep_factors() if solve else None
    two_pass = out * inp <= TWO_PASS_ELEMENTS
    cursor = [0]
    hope = Hope(opt.min_gain)

    def exact_dare(mask):
        # rows padded to the chunk's longest: decided on that length
        return EXACT and exact_cheaper(int(mask.sum(1).max()), inp)

    def chunk_sets(r0, r1, d, ch):
        n = r1 - r0
        mask = full_mask[r0:r1]
        cnt = int(torch.count_nonzero(mask))
        # (unpacked chunk by chunk: all of a 7B embedding's kept codes were 0.5 GB as int64)
        codes = unpack_bits(enc.tensors["codes"], bits, cnt, cursor[0])[0]
        cursor[0] += cnt
        b0, b1 = r0 // rps, (r1 - 1) // rps + 1
        st, mn = step[b0:b1], minv[b0:b1]
        dense = torch.zeros(n, inp)
        dense[mask] = codes.float()
        sets = [("plain", codes, st, mn, mask, dense)]
        if not (solve and hope.alive):
            return sets
        if exact_dare(mask):
            cols, valid = _padded_columns(mask)

            def solved(i):   # rows i's exact solution, zero off the mask
                out = torch.zeros(mask[i].shape[0], inp)
                out[mask[i]] = solve_kept(d[i], cols[i], factors, valid[i])[valid[i]]
                return out
            if not hope.prejudge(ch, solved):
                return sets
            z_dense = solved(slice(None))
            if not hope.judge(ch, z_dense):
                return sets
            # (z_dense[mask]: the kept values row by row, in the order cols lists them)
            _, st2, mn2 = _quantize_ragged(z_dense[mask], kept_rows(mask), n, bits, rps,
                                           True)  # CALIBRATED_GRID
            mrow, srow = _row_grid(mn2, rps, n), _row_grid(st2, rps, n)
            q = solve_kept(d, cols, factors, valid, mrow, srow, levels)
            c2 = torch.round((q - mrow) / srow).clamp_(0, levels)
            dense2 = torch.zeros(n, inp)
            dense2[mask] = c2[valid]      # both in row-major order of the kept positions
            sets.append(("calibrated", dense2[mask].to(torch.int64), st2, mn2, mask, dense2))
        else:   # (no sample first: see solve_hope.PREJUDGE_ROWS)
            if two_pass:
                rows = kept_rows(mask)
                v = sweep(d, mask, factors)
                if not hope.judge(ch, v):
                    return sets
                _, st2, mn2 = _quantize_ragged(v[mask], rows, n, bits, rps,
                                               True)  # CALIBRATED_GRID
            else:
                st2, mn2 = st, mn
            mrow, srow = _row_grid(mn2, rps, n), _row_grid(st2, rps, n)
            q = sweep(d, mask, factors, mrow, srow, levels)
            if not two_pass and not hope.judge(ch, q):
                return sets
            dense2 = torch.round((q - mrow) / srow).clamp_(0, levels) * mask
            sets.append(("calibrated", dense2[mask].to(torch.int64), st2, mn2, mask, dense2))
        return sets

    def make_enc(codes, steps, minvs):
        return encode_bernoulli((out, inp), torch.cat(codes), torch.cat(steps), torch.cat(minvs),
                                keep_prob=keep, bits=bits, seed=p["seed"], rows_per_scale=rps)

    return _refine(delta, calib, plain, opt, chunk_sets, make_enc)
