"""Calibrated values at fixed positions: the kept values that minimise the layer-output error.

A dropout method (DeltaDQ's group-wise dropout, DARE's Bernoulli mask) fixes *which*
elements of a delta row are stored; their positions cost zero bytes (regenerated from a
seed). Plain rescaling stores `delta * g/k` there, an unbiased but noisy estimate. Here the
kept values are instead solved so the layer's output on calibration inputs X changes as
little as possible:

    min  || X (delta_r - w_r)^T ||^2 + damp * ||delta_r - w_r||^2     (w_r zero off the mask)

with `H = X^T X / N` the calibration Gram matrix. This is the OBS / SparseGPT sweep with a
fixed mask and GPTQ-style error feedback: columns are visited in order; a dropped element
is set to 0 and a kept one to its quantized value, and the error this makes is pushed onto
the columns not yet visited through the row of the upper Cholesky factor of H^-1. One
inverse Hessian serves every row of the matrix (rows differ only in their masks). Long rows
are swept in blocks of SUPER_BLOCK columns (H restricted to each block: cost out * in *
SUPER_BLOCK instead of out * in^2, and the in^3 inverse of a wide MLP input never forms).

Where each row keeps few values (EXACT_MAX_KEPT, high ratios) and the input is not too wide,
the sweep is replaced by the exact least-squares solution on each row's kept set
(`solve_kept`: H restricted to the kept columns, batched over rows), quantized with the
same error feedback on that reduced problem: no cheaper and no worse (see exact_cheaper).

The quantization grid (a bf16 min and step per block of rows) is chosen on the unquantized
calibrated values (a first sweep or solve), then the quantized sweep writes the codes; an optimal
per-block scale (shrinkage, `alpha = <X d, X d^> / ||X d^||^2`) is applied when it lowers
the error. Decoding is unchanged: a calibrated artifact reads exactly like a plain one.
"""

from __future__ import annotations

import numpy as np
import torch

DAMP = 0.01          # damping of H, as a share of its mean diagonal (SparseGPT's default)
SUPER_BLOCK = 1024   # columns swept with one inverse Hessian (long rows: block-diagonal H)
LAZY = 32            # columns updated together (GPTQ's lazy batch update; 32 measured
                     # fastest here on 576-4096-wide layers)


def gram(x: torch.Tensor) -> torch.Tensor:
    """H = X^T X / N in float32 (float64 accumulation for stability on long inputs)."""
    xd = x.double()
    return (xd.T @ xd / max(x.shape[0], 1)).float()


def _inv_chol_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag) I)^-1, more damping if needed."""
    h = h.double().clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    mean = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for scale in (1, 10, 100, 1000):
        try:
            l = torch.linalg.cholesky(h + eye * (damp * scale * mean))
            hinv = torch.cholesky_inverse(l)
            return torch.linalg.cholesky(hinv, upper=True).float()
        except RuntimeError:  # not positive definite at this damping
            continue
    raise RuntimeError("calibration Gram matrix could not be factored")


class SweepFactors:
    """The inverse-Hessian factors of one input (shared by every matrix reading it), from
    the fit rows x [N, in]; only the diagonal blocks of H are formed. The whole damped H
    (for the exact solve) is formed on first use, for inputs up to EXACT_COLS wide."""

    def __init__(self, x: torch.Tensor, damp: float = DAMP, super_block: int = SUPER_BLOCK):
        self.x, self.damp, self.super_block = x, damp, super_block
        self._h = None
        self._scaled = None

    def scaled_blocks(self) -> list:
        """[(c0, c1, U)] per block of columns: U the upper Cholesky factor of the damped
        H_block^-1 with each row divided by its diagonal entry (the sweep's error feedback
        uses u[i, j] / u[i, i]: scaled once per input, not once per column). Formed on
        first use: the exact solve, which is all that runs at high ratios, needs only
        damped_gram (the factors were a tenth of the compress time there)."""
        if self._scaled is None:
            n = self.x.shape[1]
            self._scaled = []
            for c0 in range(0, n, self.super_block):
                c1 = min(n, c0 + self.super_block)
                u = _inv_chol_upper(gram(self.x[:, c0:c1]), self.damp)
                self._scaled.append((c0, c1, u / u.diagonal().unsqueeze(1)))
        return self._scaled

    def damped_gram(self) -> torch.Tensor:
        """H + damp * mean(diag) I (inputs never active: diagonal 1), float64 [in, in]."""
        if self._h is None:
            h = gram(self.x).double()
            dead = torch.diag(h) <= 0
            h[dead, dead] = 1.0
            h += torch.eye(h.shape[0], dtype=h.dtype) * (self.damp * float(torch.diag(h).mean()))
            self._h = h
        return self._h


# ---------------------------------------------------------------- exact solve on the kept set

EXACT_COLS = 4096      # inputs up to this wide can be solved exactly (H: in^2 float64)
EXACT_BATCH = 1 << 22  # rows solved together: rows x kept x inputs <= this many elements
EXACT_MAX_KEPT = 24    # kept per row up to which the exact solve is used
GATHER_COLS = 2048     # wider inputs: (H d)_S by gathering H's kept rows (solve_kept)


def exact_cheaper(kept: int, inp: int) -> bool:
    """Whether the exact solve on `kept` columns per row costs no more than the sweep over
    all `inp`. Measured here (one thread, random 576-1536-wide layers): the quantized
    sweep takes 0.016 s for 576 x 576 and 0.046 s for 576 x 1536 at any kept count; the
    quantized exact solve 0.006 s at 9 kept of 576, 0.045 s at 24 of 1536, 0.23 s at 96
    of 1536 (batched float64 factorisations of kept x kept matrices grow as kept^3). Where
    it is used it is also the better solution: the sweep is sequential (a dropped
    column's error reaches only the columns after it), and for rows longer than
    SUPER_BLOCK it sees only the diagonal blocks of H."""
    return inp <= EXACT_COLS and 0 < kept <= EXACT_MAX_KEPT


def solve_kept(delta: torch.Tensor, cols: torch.Tensor, factors: SweepFactors,
               valid: torch.Tensor | None = None, minv: torch.Tensor | None = None,
               step: torch.Tensor | None = None, levels: int = 0) -> torch.Tensor:
    """Kept values [R, s] at columns cols [R, s] minimising (d - w)^T H (d - w) per row
    (H damped, w zero off the kept columns): the exact least-squares solution
    w_S = H_SS^-1 (H d)_S. With minv/step ([R, 1] per-row grid) they are quantized as
    GPTQ would on the reduced problem (Hessian H_SS, error feedback through the Cholesky
    factor of H_SS^-1): the same objective, the kept columns in their stored order.
    valid [R, s] marks the real entries of rows padded to a common length (DARE's kept
    counts vary per row): padded entries come out 0 and take no part in the solve.

    (H d)_S: from the product H d (rows x in^2, one fast GEMM) up to GATHER_COLS inputs;
    wider ones gather the kept rows of H ([r, s, in] per batch: rows x kept x in, far less
    at 7B widths, but slower than the GEMM on narrow inputs)."""
    h = factors.damped_gram()
    rows, s = cols.shape
    inp = h.shape[0]
    gather = inp > GATHER_COLS
    out = torch.zeros(rows, s)
    per = max(1, EXACT_BATCH // max(s * inp if gather else max(s * s, inp), 1))
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        c = cols[r0:r1]
        d = delta[r0:r1].double()
        if gather:
            hsel = h[c]                                        # [r, s, in]: rows S of H
            b = torch.bmm(hsel, d.unsqueeze(2)).squeeze(2)     # (H d)_S
            hs = torch.gather(hsel, 2, c.unsqueeze(1).expand(-1, s, -1))   # H_SS
            del hsel
        else:
            b = torch.gather(d @ h, 1, c)
            hs = h[c[:, :, None], c[:, None, :]]
        if valid is not None:
            pad = ~valid[r0:r1]
            hs.masked_fill_(pad.unsqueeze(2) | pad.unsqueeze(1), 0.0)
            hs.diagonal(dim1=1, dim2=2)[pad] = 1.0
            b[pad] = 0.0
        chol = torch.linalg.cholesky(hs)
        z = torch.cholesky_solve(b.unsqueeze(2), chol).squeeze(2)
        if minv is not None:
            u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
            mn = minv[r0:r1].reshape(-1).double()
            st = step[r0:r1].reshape(-1).double()
            ok = valid[r0:r1].double() if valid is not None else None
            for i in range(s):
                q = torch.round((z[:, i] - mn) / st).clamp_(0, levels).mul_(st).add_(mn)
                if ok is not None:
                    q.mul_(ok[:, i])
                e = (z[:, i] - q) / u[:, i, i]
                z[:, i] = q
                if i + 1 < s:
                    z[:, i + 1:] -= e.unsqueeze(1) * u[:, i, i + 1:]
        out[r0:r1] = z.float()
    return out


def sweep(delta: torch.Tensor, mask: torch.Tensor, factors: SweepFactors,
          minv: torch.Tensor | None = None, step: torch.Tensor | None = None,
          levels: int = 0) -> torch.Tensor:
    """The approximation [R, C] (zero where mask is False): kept values solved by the OBS
    sweep; with minv/step ([R, 1] per-row grid) quantized to `levels`+1 levels as they go
    (GPTQ error feedback). delta is not modified.

    Worked on transposed copies ([C, R]): the sweep visits columns one at a time, and a
    column of the row-major delta is a strided gather (about 2x slower here)."""
    w = delta.T.float().contiguous()        # [C, R]: one contiguous row per column
    keep = mask.T.to(w.dtype).contiguous()
    return _sweep_columns(w, keep, factors, minv, step, levels).T.contiguous()


def sweep_many(delta: torch.Tensor, jobs: list[tuple], factors: SweepFactors) \
        -> list[torch.Tensor]:
    """sweep() of one delta under several (mask[, minv, step, levels]) (all quantized, or
    none; one matrix's candidate configurations), as one sweep over their stacked rows.
    Rows are independent given the shared factors, so each result is its own sweep's (the
    same arithmetic per row; equal up to the rounding of vectorized loops whose tails fall
    elsewhere in the longer rows, bit for bit at multiples of 64 rows, as in every SmolLM2
    matrix); what is shared is the per-column call overhead, which dominates at small widths:
    measured here (2 threads, 576-wide input, 576 rows, 4-bit) three quantized sweeps of
    one matrix's configurations 3 x 40 ms alone, 50 ms together; 1536 rows 3 x 57 vs 129
    ms. The results are [R, C] views of the stacked output (not contiguous)."""
    rows = delta.shape[0]
    w = torch.cat([delta.T.float().contiguous()] * len(jobs), 1)
    keep = torch.cat([j[0].T for j in jobs], 1).float()
    if len(jobs[0]) > 1:
        mn = torch.cat([j[1] for j in jobs])
        st = torch.cat([j[2] for j in jobs])
        levels = jobs[0][3] if len({j[3] for j in jobs}) == 1 else \
            torch.cat([torch.full((rows,), float(j[3])) for j in jobs])
        out = _sweep_columns(w, keep, factors, mn, st, levels)
    else:
        out = _sweep_columns(w, keep, factors)
    return [out[:, i * rows:(i + 1) * rows].T for i in range(len(jobs))]


def _sweep_columns(w: torch.Tensor, keep: torch.Tensor, factors: SweepFactors,
                   minv: torch.Tensor | None = None, step: torch.Tensor | None = None,
                   levels: int | torch.Tensor = 0) -> torch.Tensor:
    """The sweep on w [C, R] (overwritten) with keep [C, R] (1.0 kept, 0.0 dropped): the
    approximation [C, R]. levels: an int, or a vector [R] (rows of several bit widths).

    The per-column work is on vectors of R values (a few hundred to a few thousand): at
    SmolLM2 sizes each op costs about its call overhead, so the loop body runs on numpy
    views of the same memory (about 1 us a call here against 2-4 us for torch's dispatch),
    with the fewest calls: within a lazy block a column's correction from the columns
    before it is one vector-matrix product over their errors (u[:i, i] . e[:i]) instead
    of a rank-1 update of every later column after each one; the block's update of the
    columns after it stays one torch GEMM, in place."""
    rows = w.shape[1]
    out = torch.zeros_like(w)
    ww, oo, kk = w.numpy(), out.numpy(), keep.numpy()
    quant = minv is not None
    if quant:
        mn = minv.reshape(-1).float()
        st = step.reshape(-1).float()
        inv = 1.0 / st
        shift = (-mn * inv).numpy()
        mn, st, inv = mn.numpy(), st.numpy(), inv.numpy()
        top = levels.float().numpy() if isinstance(levels, torch.Tensor) else float(levels)
    # e holds each visited column's raw error (corrected column - q); the factor rows are
    # pre-divided by their diagonal (scaled_blocks), so a column's correction is
    # sum_j<i u[j, i] e[j], and a block's, one GEMM
    e1 = torch.empty(LAZY, rows)
    ee = e1.numpy()
    col = np.empty(rows, dtype=np.float32)
    for c0, c1, us in factors.scaled_blocks():
        for i1 in range(c0, c1, LAZY):
            i2 = min(i1 + LAZY, c1)
            n = i2 - i1
            ut = us[i1 - c0:i2 - c0, i1 - c0:i2 - c0].T.contiguous().numpy()  # ut[i, :i] = u[:i, i]
            for i in range(n):
                q = oo[i1 + i]
                if i:
                    np.dot(ut[i, :i], ee[:i], out=col)
                    np.subtract(ww[i1 + i], col, out=col)
                else:
                    col[:] = ww[i1]
                if quant:   # q = (round((col - mn) / st) clamped) * st + mn, 0 if dropped
                    np.multiply(col, inv, out=q)
                    q += shift
                    np.rint(q, out=q)
                    np.maximum(q, 0.0, out=q)
                    np.minimum(q, top, out=q)
                    q *= st
                    q += mn
                    q *= kk[i1 + i]
                else:
                    np.multiply(col, kk[i1 + i], out=q)
                np.subtract(col, q, out=ee[i])
            if i2 < c1:
                w[i2:c1].addmm_(us[i1 - c0:i2 - c0, i2 - c0:c1 - c0].T, e1[:n], alpha=-1.0)
    return out


def refit_grid(a: torch.Tensor, p: torch.Tensor, q: torch.Tensor, rows_per_scale: int,
               n_blocks: int):
    """(minv, step) per scale block [n_blocks] minimising ||a - (minv_r * p + step_r * q)||^2
    over each block's rows r, the codes fixed: a, p, q [*, R] are the projections of the
    delta, the mask and the codes (zero off the mask) onto the fit rows (or weight space).
    Decoded values are linear in (minv, step), so this is a 2x2 least-squares problem per
    block; blocks where it is singular (all codes equal) get NaN (the caller keeps their
    grid)."""
    return refit_from_sums(refit_row_sums(a, p, q), rows_per_scale, n_blocks)


def refit_row_sums(a: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> list[torch.Tensor]:
    """Per-row sums [R] (fp32) of p.p, p.q, q.q, p.a, q.a: what refit_grid solves from (a
    chunk measured in row slices gathers them slice by slice: refine_chunk.py)."""
    return [(u * v).sum(0) for u, v in ((p, p), (p, q), (q, q), (p, a), (q, a))]


def refit_from_sums(sums: list[torch.Tensor], rows_per_scale: int, n_blocks: int):
    """refit_grid from its per-row sums (refit_row_sums) of the rows of whole blocks."""
    blk = torch.arange(sums[0].shape[0]) // rows_per_scale
    pp, pq, qq, pa, qa = (torch.zeros(n_blocks, dtype=torch.float64).index_add_(
        0, blk, s.double()) for s in sums)
    det = pp * qq - pq * pq
    ok = det > 1e-12 * (pp * qq).clamp_min(1e-300)
    minv = torch.where(ok, (qq * pa - pq * qa) / torch.where(ok, det, 1.0), torch.nan)
    step = torch.where(ok, (pp * qa - pq * pa) / torch.where(ok, det, 1.0), torch.nan)
    return minv.float(), step.float()
