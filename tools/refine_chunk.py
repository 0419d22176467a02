"""One chunk of a matrix's rows in refinement (tools/refine.py): its projections onto what
errors are measured on (_Chunk), and the grid variants of one set of its codes (as
encoded, shrunk, refit) with their errors (set_variants).

A chunk is whole scale blocks (refine._chunks), because a block's shrink factor and refit
grid are fitted over all its rows. At extreme ratios one block can be all the rows of a
7B embedding or LM head (rows_per_scale 32000): projected whole, each float32 temporary
of that 32000 x 4096 chunk was 524 MB, about six at once (the 2-layer 7B-shaped pair
peaked at 4.4-4.8 GB at --ratio 2048). A chunk above SLICE_ABOVE elements is therefore
measured a slice of rows at a time: the blocks' fits from per-row sums gathered over the
slices, then each variant's error summed over them. A chunk up to SLICE_ABOVE elements
(every matrix of SmolLM2-135M, whose 49152 x 576 embedding is 28M) is one slice and
computed exactly as before slicing existed.
"""

from __future__ import annotations

import torch

from deltadq_vllm.format.quant import SCALE_DTYPE

from .calibrated import refit_from_sums, refit_row_sums

SLICE_ABOVE = 1 << 25
# Slices of 16M elements: each float32 temporary of a slice is 64 MB, above the largest
# mmap threshold glibc's malloc adapts to (32 MB), so it is unmapped when freed. Slices of
# 4M elements (16 MB temporaries) were served from the heap once the threshold had risen,
# and the heap kept them: the 7B-shaped pair's error-alone fit at --ratio 2048 peaked at
# 3167 MB with them, 2336 MB with these (4400 MB unsliced).
SLICE_ELEMENTS = 1 << 24


def rows_of(t: torch.Tensor, rps: int, s: slice) -> torch.Tensor:
    """Per-row values [len] of the per-block t for rows s of a chunk (chunks start on a
    block boundary)."""
    return t.float()[torch.arange(s.start, s.stop) // rps]


class _Chunk:
    """Projections of one chunk of rows onto what its errors are measured on.

    Every variant of a chunk decodes to `minv_row * mask + step_row * codes` (codes zero
    off the mask), and the projections are linear, so the delta, the mask and each set of
    codes are projected once and every grid variant's error and fit is a per-row linear
    combination of those: 2 matrix products per set of codes instead of 8 (the
    projections dominate refinement when the sweep is cheap).

    held(m): [*, R'] what the held-out error is measured on (the last dim is the chunk's
    rows, or the calibration rows `held_rows` of it); fit(m): [*, R] what the scale fits
    (shrinkage, refit) use: the fit rows x_stats, else the held-out rows, else weight space.
    """

    def __init__(self, calib, d: torch.Tensor, r0: int):
        self.calib, self.r0, self.n = calib, r0, d.shape[0]
        self.held_rows = None
        if calib.x is None and calib.rows is not None:
            sel = calib.rows[(calib.rows >= r0) & (calib.rows < r0 + d.shape[0])] - r0
            self.held_rows = sel
        self.x_fit = calib.x_stats if calib.x_fit is not None else calib.x
        self.a_held = self.held(d)
        self.a_fit = self.fit(d)
        self._mask = None

    def held(self, m: torch.Tensor) -> torch.Tensor:
        c = self.calib
        if c.x is not None:
            return c.x @ m.T
        if self.held_rows is not None:
            return m[self.held_rows].T
        return m.T

    def fit(self, m: torch.Tensor) -> torch.Tensor:
        return self.x_fit @ m.T if self.x_fit is not None else m.T

    def row_vec(self, v: torch.Tensor) -> torch.Tensor:
        """A per-row vector of the chunk, restricted to the rows `held` keeps."""
        return v if self.held_rows is None else v[self.held_rows]

    def mask_projections(self, mask: torch.Tensor, keep: bool = True):
        """(held, fit) projections of the mask; kept for every set on the same positions
        (keep=False: a slice's, projected again for each set rather than held: one float
        copy of its mask per slice would add up to the whole chunk's)."""
        if self._mask is not None and self._mask[0] is mask:
            return self._mask[1], self._mask[2]
        m = mask.float()
        got = (mask, self.held(m), self.fit(m))
        if keep:
            self._mask = got
        return got[1], got[2]


def sub_chunks(ch: _Chunk, d: torch.Tensor) -> list[tuple[slice, _Chunk]]:
    """[(rows of the chunk, their _Chunk)]: the chunk itself where it is one slice."""
    n, inp = d.shape
    if n * inp <= SLICE_ABOVE:
        return [(slice(0, n), ch)]
    rows = max(1, SLICE_ELEMENTS // max(inp, 1))
    return [(slice(i, min(n, i + rows)), _Chunk(ch.calib, d[i:i + rows], ch.r0 + i))
            for i in range(0, n, rows)]


def _block_sum(v: torch.Tensor, rps: int, nb: int) -> torch.Tensor:
    return torch.zeros(nb, dtype=v.dtype).index_add_(0, torch.arange(v.shape[0]) // rps, v)


def _grid_variants(fits: list, st, mn, rps):
    """[(suffix, step, minv)]: the grid as is, shrunk (optimal factor per scale block,
    in [0, 2]), and refitted (min and step by least squares with the codes fixed; blocks
    where that is singular keep their grid). fits: per slice (num, den, refit sums), the
    per-row sums the blocks' fits take (_fit_sums)."""
    nb = st.numel()
    num = _block_sum(torch.cat([f[0] for f in fits]).double(), rps, nb)
    den = _block_sum(torch.cat([f[1] for f in fits]).double(), rps, nb)
    alpha = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(den))
    alpha = alpha.clamp_(0.0, 2.0).float()
    out = [("", st, mn), ("shrunk", (st.float() * alpha).to(SCALE_DTYPE),
                          (mn.float() * alpha).to(SCALE_DTYPE))]
    m2, s2 = refit_from_sums([torch.cat([f[2][i] for f in fits]) for i in range(5)], rps, nb)
    bad = torch.isnan(m2) | torch.isnan(s2)
    out.append(("refit", torch.where(bad, st.float(), s2).to(SCALE_DTYPE),
                torch.where(bad, mn.float(), m2).to(SCALE_DTYPE)))
    return out


def _fit_sums(sub: _Chunk, fp, fq, mrow, srow):
    """Per-row sums of one slice for _grid_variants: <a, b>, <b, b> of the decoded values'
    fit projection b, and refit_grid's."""
    b = fp * mrow + fq * srow                      # fit projection of the decoded values
    return (sub.a_fit * b).sum(0), (b * b).sum(0), refit_row_sums(sub.a_fit, fp, fq)


def set_variants(subs, d, mask, dense_codes, st, mn, rps, rows_role: bool):
    """[(suffix, step, minv, err, dot, err_w, dot_w)] of one set of codes of a chunk (its
    slices subs: sub_chunks): each grid variant's squared held-out error, its dot with the
    delta's held-out output, and (rows_role: a tied embedding's rows) both in weight space
    (else None)."""
    one = len(subs) == 1

    def projections(s, sub):
        m = mask if one else mask[s]
        hp, fp = sub.mask_projections(m, keep=one)
        cf = (dense_codes if one else dense_codes[s]).float()
        return m, hp, fp, cf, sub.held(cf), sub.fit(cf)

    kept, fits = None, []
    for s, sub in subs:
        pr = projections(s, sub)
        fits.append(_fit_sums(sub, pr[2], pr[5], rows_of(mn, rps, s), rows_of(st, rps, s)))
        if one:
            kept = pr   # (one slice: its projections serve the errors too)
    variants = _grid_variants(fits, st, mn, rps)
    sums = [[0.0, 0.0, 0.0, 0.0] for _ in variants]
    for s, sub in subs:
        m, hp, _, cf, hq, _ = kept if one else projections(s, sub)
        for acc, (_, s2, m2) in zip(sums, variants):
            mper, sper = rows_of(m2, rps, s), rows_of(s2, rps, s)
            resid = sub.a_held - hp * sub.row_vec(mper) - hq * sub.row_vec(sper)
            acc[0] += float(resid.square().sum())
            # <X d, X d^> = <a, a - resid>: the candidate's gain along the true delta
            acc[1] += float((sub.a_held * (sub.a_held - resid)).sum())
            if rows_role:
                dec = m * mper.unsqueeze(1) + cf * sper.unsqueeze(1)
                acc[2] += float((d[s] - dec).square().sum())
                acc[3] += float((d[s] * dec).sum())
    return [(suffix, s2, m2, e, dt, ew if rows_role else None, dw if rows_role else None)
            for (suffix, s2, m2), (e, dt, ew, dw) in zip(variants, sums)]
