"""Budget by sensitivity: how `deltadq compress` splits its byte budget across matrices.

`share` (the streaming rule, `--budget share`): each matrix gets the remaining budget times
its share of the remaining elements. Every matrix then pays the same bits per element,
whether its delta is easy to store (a few coherent directions: error falls fast with bytes)
or hard (noise-like products: error stays near 1 whatever it gets).

`sensitivity` (default for deltadq and dare): a cheap **probe pass** first estimates, per
matrix, its relative held-out output error at 1/4, 1/2, 1, 2 and 4 times its element share,
then the budget is allocated to minimise the sum over matrices of the squared relative
output errors (each matrix's error the summary reports), by equalising the marginal error
reduction per byte: a greedy walk over the lower convex hulls of the curves (the Lagrangian
solution of the separable problem; every matrix keeps >= 1/4 and <= 4 times its element
share: the curves are not probed outside). The element-share allocation is a feasible point
of the same problem, so on the probe's estimates the result is never worse than it. The real
pass then streams as before, with each matrix's planned bytes in place of its element count
(what a matrix leaves unspent flows to the rest in proportion to their plans).

The probe is built to be cheap next to the real pass (one thing it is not: a copy of the
real pass at several budgets):
* PROBE_ROWS output rows per matrix (a seeded sample, read from the checkpoints row by row:
  relative errors are sums over rows, so a row sample estimates both the error and the
  reference);
* calibration inputs from PROBE_SEQS sequences (one forward pass at a quarter of the
  tokens the real pass uses);
* the method's plain values (no sweep) at the configuration keeping the most elements per
  bit width, with each scale block's min and step refitted (as the real pass's `refit`)
  where that keeps >= `min_gain` of the delta's output along it, the plain values
  elsewhere: the same rule as the real pass (refine.py), so a matrix whose refitted error
  would only be low by shrinking its delta away is scored at the error it will really be
  stored with. With `min_gain` 0 (the error-only selection) errors are capped at 1 (what
  is worse is dropped). The calibrated sweep lowers every matrix's error further; the
  probe assumes it does so roughly in proportion.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from deltadq_vllm.checkpoint import release_freed_memory
from deltadq_vllm.format.positions import bernoulli_mask, kept_columns, kept_rows
from deltadq_vllm.format.quant import quantize

from .calibrated import refit_grid
from .calibration import RecordingCalibrator, layer_index, make_calibrator
from .methods import (DEFAULT_BITS, REFINE_ALL_BITS_ELEMENTS, REFINE_WIDTHS, MethodOptions,
                      width_floor, _quantize_ragged, _rows_per_scale_options,
                      dare_keep_prob, deltadq_configs, most_kept)

BUDGET_MODES = ("sensitivity", "share")
SENSITIVITY_METHODS = ("deltadq", "dare")
PROBE_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
PROBE_ROWS = 256
PROBE_SEQS = 2
# a budget rewrite within this factor of the probed budget reuses the curves; beyond, the
# allocation would leave the probed range for most matrices, and the probe runs again
PROBE_VALID = (0.7, 1.4)


@dataclass
class Curve:
    """Estimated relative error^2 of one matrix at several byte budgets (whole matrix)."""

    numel: int
    share: float                       # element-share bytes at the probed ratio
    points: list[tuple[float, float]]  # (bytes, relative error^2), bytes increasing

    def at(self, nbytes: float) -> float:
        """Error^2 at `nbytes`, linear between probed points (clamped at the ends)."""
        pts = self.points
        if not pts:
            return 1.0
        if nbytes <= pts[0][0]:
            return pts[0][1]
        for (b0, e0), (b1, e1) in zip(pts, pts[1:]):
            if nbytes <= b1:
                return e0 + (e1 - e0) * (nbytes - b0) / (b1 - b0)
        return pts[-1][1]


# ---------------------------------------------------------------- one matrix


def _refit_error2(a, p, q, minv, step, rps) -> tuple[float, float]:
    """(squared error, <a, approx>) of the encoding whose mask and codes project to p and
    q, with each scale block's min and step refitted by least squares (as the real pass's
    `refit`; the grid as encoded where that is singular); a, p, q are [*, R]."""
    n = a.shape[-1]
    nb = (n + rps - 1) // rps
    m2, s2 = refit_grid(a, p, q, rps, nb)
    m2 = torch.where(torch.isnan(m2), minv.float(), m2)
    s2 = torch.where(torch.isnan(s2), step.float(), s2)
    blk = torch.arange(n) // rps
    approx = p * m2[blk] + q * s2[blk]
    return float((a - approx).square().sum()), float((a * approx).sum())


def _encode_deltadq(sub, out_total, budget, bits, opt, seed):
    """Plain group-wise dropout codes of the sampled rows at the most-kept configuration
    for `bits` bits (geometry and bytes of the whole matrix): (mask, codes at the kept
    positions, minv, step, rows per scale), or None if nothing fits."""
    rows, inp = sub.shape
    cands = deltadq_configs(out_total, inp, budget, bits, opt)
    if not cands:
        return None
    g, k, rps = most_kept(cands)
    rps = min(rps, rows)
    cols = kept_columns(seed, rows, inp, g, k)
    codes, step, minv = quantize(torch.gather(sub, 1, cols).mul_(g / k), bits, rps, opt.clip)
    mask = torch.zeros_like(sub).scatter_(1, cols, 1.0)
    dense = torch.zeros_like(sub).scatter_(1, cols, codes.float())
    return mask, dense, minv, step, rps


def _encode_dare(sub, out_total, budget, bits, opt, seed):
    """The same for DARE at the largest keep probability the budget allows (over the
    scale-block options of the whole matrix)."""
    rows, inp = sub.shape
    best = None
    for rps in _rows_per_scale_options(out_total, budget / out_total):
        p = dare_keep_prob(out_total, inp, budget, bits, rps)
        if p > 0 and (best is None or p > best[0]):
            best = (min(p, 1.0), min(rps, rows))
    if best is None:
        return None
    p, rps = best
    mask = bernoulli_mask(seed, rows, inp, p)
    if not bool(mask.any()):
        return None
    row_of = kept_rows(mask)
    codes, step, minv = _quantize_ragged(sub[mask] / p, row_of, rows, bits, rps, opt.clip)
    dense = torch.zeros_like(sub)
    dense[mask] = codes.float()
    return mask.float(), dense, minv, step, rps


ENCODE = {"deltadq": _encode_deltadq, "dare": _encode_dare}


def probe_matrix(method: str, sub: torch.Tensor, x: torch.Tensor | None, out_total: int,
                 share: float, opt: MethodOptions, seed: int) -> Curve:
    """The error curve of one matrix from `sub`, a sample of its delta's rows, and x, the
    layer's calibration inputs (None: weight-space error, as for an untied embedding)."""
    inp = sub.shape[1]
    project = (lambda m: x @ m.T) if x is not None else (lambda m: m.T)
    a = project(sub)
    ref = float(a.square().sum())
    points = []
    for mult in PROBE_MULTIPLIERS:
        budget = share * mult
        scored = []   # (gain, plain error^2, refitted error^2) per bit width
        for bits in ([opt.bits] if opt.bits else DEFAULT_BITS):
            enc = ENCODE[method](sub, out_total, budget, bits, opt, seed)
            if enc is None:
                continue
            mask, dense, minv, step, rps = enc
            p, q = project(mask), project(dense)
            blk = torch.arange(p.shape[-1]) // rps
            approx = p * minv.float()[blk] + q * step.float()[blk]
            plain = float((a - approx).square().sum())
            gain = float((a * approx).sum()) / ref if ref > 0 else 1.0
            refit, dot = _refit_error2(a, p, q, minv, step, rps)
            # as the real pass (refine.py): refitted values only where they keep the delta
            eligible = ref > 0 and dot / ref >= opt.min_gain
            scored.append((gain, plain, min(plain, refit) if eligible else plain))
        if scored and ref > 0:
            # as the real pass: widths ranked by plain error (where none beats zero, those
            # that keep the delta first: opt.width_gain), the leading ones refined
            floor = width_floor((plain / ref for _, plain, _ in scored), opt.width_gain)
            scored = sorted((floor is not None and gain < floor, plain, r)
                            for gain, plain, r in scored)
            lead = scored[:REFINE_WIDTHS] if out_total * inp <= REFINE_ALL_BITS_ELEMENTS \
                else scored[:1]
            # the error-only selection (min gain 0) drops what stays >= 1 (the earlier
            # --unsafe delta rule: no worse than nothing); with the gain bound errors
            # above 1 are stored, and the curve says how fast bytes lower them
            cap = 1.0 if opt.min_gain == 0 else float("inf")
            lead = [t for t in lead if t[0] == lead[0][0]]   # (refine.py keeps to the class)
            points.append((budget, min(min(r for *_, r in lead) / ref, cap)))
        elif scored:
            points.append((budget, 0.0))
    # more bytes never hurt the real method (it can spend fewer): keep the curve monotone
    for i in range(1, len(points)):
        points[i] = (points[i][0], min(points[i][1], points[i - 1][1]))
    return Curve(numel=out_total * inp, share=share, points=points)


def sample_rows(out: int, seed: int, n: int = PROBE_ROWS) -> list[int]:
    if out <= n:
        return list(range(out))
    return sorted(random.Random(seed).sample(range(out), n))


# ---------------------------------------------------------------- allocation


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of a decreasing curve (bytes increasing)."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            # drop the middle point if it lies on or above the chord from x0 to p
            if (y1 - y0) * (p[0] - x0) >= (p[1] - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(curves: dict[str, Curve], total: float) -> dict[str, float]:
    """Bytes per matrix summing to `total` that minimise the sum of the curves' errors^2
    (on their lower convex hulls). Matrices without points keep their element share.
    Every probed matrix starts at its smallest probed budget; segments of the hulls are then
    bought in order of error reduction per byte, the last one fractionally."""
    alloc, fixed = {}, 0.0
    for name, c in curves.items():
        if len(c.points) < 1:
            alloc[name] = c.share
            fixed += c.share
    probed = {n: c for n, c in curves.items() if n not in alloc}
    start = sum(c.points[0][0] for c in probed.values())
    room = total - fixed - start
    if room < 0 or not probed:
        # the smallest budgets do not fit (a budget far below the probed one): fall back
        # to proportional shares
        s = sum(c.share for c in curves.values())
        return {n: total * c.share / s for n, c in curves.items()}
    segments = []
    for name, c in probed.items():
        alloc[name] = c.points[0][0]
        hull = _hull(c.points)
        for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
            segments.append(((y0 - y1) / (x1 - x0), x1 - x0, name))
    segments.sort(key=lambda s: -s[0])
    for gain, width, name in segments:
        if room <= 0:
            break
        take = min(width, room)
        alloc[name] += take
        room -= take
    if room > 0:
        # every curve bought to its top: spread what is left by element share
        s = sum(c.share for c in probed.values())
        for name, c in probed.items():
            alloc[name] += room * c.share / s
    return alloc


def objective(curves: dict[str, Curve], alloc: dict[str, float]) -> float:
    """Sum over matrices of the estimated relative error^2 at their allocated bytes."""
    return sum(c.at(alloc[n]) for n, c in curves.items())


# ---------------------------------------------------------------- the probe pass


def probe_pass(base, ft, plans, shares: dict[str, float], opt, topts_for, calibrator,
               calibration_x, progress_bar) -> tuple[dict[str, Curve], dict]:
    """Curves of every compressible matrix in `plans` (compress order). calibration_x(p)
    gives the probe inputs of plan p (None: weight space); topts_for(p) its MethodOptions."""
    from deltadq_vllm.format.positions import tensor_seed

    t0, c0 = time.time(), time.process_time()
    curves = {}
    for p in progress_bar(plans):
        out = p.base_rows[0]
        seed = tensor_seed(opt.seed, p.name)
        rows = sample_rows(out, seed)
        sub = ft.get_rows(p.name, rows).float().sub_(base.get_rows(p.name, rows))
        x = calibration_x(p)
        curves[p.name] = probe_matrix(opt.method, sub, x, out, shares[p.name], topts_for(p),
                                      seed)
    info = {"seconds": round(time.time() - t0, 2),
            "cpu_seconds": round(time.process_time() - c0, 2),
            "rows": PROBE_ROWS, "tokens": getattr(calibrator, "n_tokens", 0),
            "multipliers": list(PROBE_MULTIPLIERS)}
    return curves, info


def uses_sensitivity(mode: str, method: str, budget) -> bool:
    return mode == "sensitivity" and method in SENSITIVITY_METHODS and budget is not None


def sensitivity_plan(opt, base, ft, matrices, budget, tied, calibrator, calib_model, text,
                      opts, probes) -> dict:
    """Planned bytes per matrix from the probe pass (probe_pass above); the curves are
    measured once per compress() and reused by its budget rewrites (`probes`)."""
    total = sum(math.prod(p.base_rows) for p in matrices)
    shares = {p.name: budget * math.prod(p.base_rows) / total for p in matrices}
    if probes is not None and "curves" in probes and not \
            PROBE_VALID[0] <= budget / probes["budget"] <= PROBE_VALID[1]:
        probes.clear()   # a rewrite far from the probed budget (small models: the manifest
                         # reserve can be most of it): the curves do not reach it, re-probe
    if probes is None or "curves" not in probes:
        if isinstance(calibrator, RecordingCalibrator):
            probe_cal = calibrator   # a sweep's recorded inputs: their first rows
        else:
            probe_cal = make_calibrator(calib_model, text, n_seqs=min(PROBE_SEQS, opt.calib_seqs),
                                        seq_len=opt.calib_seq_len, seed=opt.seed)
        rows = PROBE_SEQS * opt.calib_seq_len

        def calibration_x(p):
            if probe_cal is None or (p.cls == "embedding" and not tied):
                return None     # weight space: an untied embedding's output is its row
            if p.cls in ("lm_head", "embedding"):
                return probe_cal.final_inputs()[:rows]
            x = probe_cal.inputs_for_layer(layer_index(p.name)).get(p.name)
            return None if x is None else x[:rows]

        def topts_for(p):
            return replace(opts, tp_align=opt.tp_align if p.cls == "linear" else 1)

        def bar(items):
            return tqdm(items, desc="probe (budget by sensitivity)", unit="tensor",
                        disable=not opt.progress, file=sys.stderr)

        curves, info = probe_pass(base, ft, matrices, shares, opt, topts_for, probe_cal,
                                  calibration_x, bar)
        del probe_cal
        release_freed_memory()
        if probes is not None:
            probes.update(curves=curves, info=info, budget=budget)
    else:
        curves, info = probes["curves"], probes["info"]
    plan = allocate(curves, budget)
    return {"mode": "sensitivity", "probe": info, "plan": plan,
            "estimated_objective": {"sensitivity": round(objective(curves, plan), 4),
                                    "share": round(objective(curves, shares), 4)}}
