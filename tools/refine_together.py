"""Refining several candidate configurations of one matrix together (deltadq_search.py
refines the best configuration of the leading bit widths, REFINE_WIDTHS, and keeps the one
with the smallest refined error).

Each configuration is refined exactly as alone (refine.refine_hash_groupwise); what they
share is computed once: for a matrix that is one block of rows (refine._chunks: all of
SmolLM2-135M's linears), the projections of the delta onto the calibration rows
(refine_chunk._Chunk), and where the calibrated values of two or more come from the sweep (16x-64x:
many kept per row), their sweeps are one sweep over the configurations' stacked rows
(calibrated.sweep_many): the unquantized sweeps together, each judged by its own Hope and
given its grid as alone, then the quantized sweeps of the survivors together. Rows are
independent given the shared inverse-Hessian factors, so every value is the one the
configuration's own sweep gives (up to float rounding where a row count is not a multiple
of 64; tested), and the SmolLM2 arith-light 16x artifact is bit for bit the same. Measured
there (2 threads, AVX2 VM, cProfile): the sweeps 47.5 s -> 23.7 s, the compress 156 -> 122 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltadq_vllm.format.positions import kept_columns

from .calibrated import exact_cheaper, sweep_many
from .refine import (EXACT, GAVE_UP, TWO_PASS_ELEMENTS, _calibrated_grid, _chunks, _kept_codes,
                     refine_hash_groupwise)
from .refine_chunk import _Chunk
from .solve_hope import Hope


# The other leading widths are refined because plain errors say little about what their
# calibrated values reach; their plain, shrunk and refit values are not candidates (their
# plain error is never below the chosen configuration's, and those variants are small
# corrections of it). Measured before this rule (default compress, every refinement
# instrumented): an other width's plain-derived values were stored for 2 of 422 SmolLM2
# matrices at 16x (arith-light, spell-heavy: refit, each the only one), none at 1024x (887
# other widths on arith-light, spell-heavy, mix-heavy) and none on the large-delta test
# fixtures at 256x (their calibrated values were: 16 matrices). So a width whose solve is
# given up costs no projections, and one whose solve runs projects only its solved codes.
OTHER_WIDTHS_CALIBRATED_ONLY = True


def _calibrated_only(opt) -> bool:
    """Whether the other leading widths are refined for their calibrated values only
    (--plain-gain rescales plain values: then they are candidates in full)."""
    return OTHER_WIDTHS_CALIBRATED_ONLY and opt.plain_gain <= 0


def other_widths_can_win(opt) -> bool:
    """Whether refining the other leading widths can store anything but the chosen
    configuration: refined for their calibrated values only, they cannot without the solve
    (--values plain, the default: their plain values are never below the chosen one's
    plain error, which its own refinement only lowers), so they are not refined then."""
    return opt.calibrated or not _calibrated_only(opt)


@dataclass
class Shared:
    """What one configuration's refinement takes from the matrix's shared work."""
    chunk: _Chunk
    cols: torch.Tensor                 # kept columns [out, kept]
    mask: torch.Tensor                 # bool [out, in]
    calibrated: object = None          # (codes, step, minv, dense codes), GAVE_UP, or None:
                                       # solved by refine_hash_groupwise itself


def refine_hash_groupwise_many(delta, calib, plains, opt, others=None) -> list:
    """refine_hash_groupwise of each plain encoding (configuration) of one matrix. others[i]:
    plains[i] is another leading width beside the chosen configuration, refined for its
    calibrated values only (OTHER_WIDTHS_CALIBRATED_ONLY)."""
    others = others or [False] * len(plains)
    only = [o and _calibrated_only(opt) for o in others]
    shared = _prepare(delta, calib, plains, opt, only)
    return [refine_hash_groupwise(delta, calib, p, opt, s, calibrated_only=c)
            for p, s, c in zip(plains, shared, only)]


def _prepare(delta, calib, plains, opt, only) -> list:
    """[Shared or None] per plain: None unless the matrix is one chunk for every plain.
    only[i]: plains[i] is refined for its calibrated values only (its Hope's floor:
    solve_hope.OTHER_WIDTH_GAIN_MARGIN)."""
    out, inp = delta.shape
    if len(plains) < 2 or any(len(_chunks(out, inp, p.enc.params["rows_per_scale"])) > 1
                              for p in plains):
        return [None] * len(plains)
    ch = _Chunk(calib, delta, 0)
    shared = []
    for pl in plains:
        p = pl.enc.params
        cols = kept_columns(p["seed"], out, inp, p["group_size"], p["keep"])
        shared.append(Shared(ch, cols, torch.zeros(out, inp, dtype=torch.bool)
                             .scatter_(1, cols, True)))
    if calib.x_fit is not None and opt.calibrated and out * inp <= TWO_PASS_ELEMENTS:
        swept = [(s, pl.enc.params, o) for s, pl, o in zip(shared, plains, only) if not (
            EXACT and exact_cheaper(inp // pl.enc.params["group_size"] * pl.enc.params["keep"],
                                    inp))]
        if len(swept) >= 2:
            _sweep_together(delta, calib, swept, opt)
    return shared


def _sweep_together(delta, calib, jobs, opt) -> None:
    """Fill .calibrated of each (Shared, params, calibrated only) in jobs:
    refine_hash_groupwise's two-pass sweep (first solution, Hope's judgement, grid from the
    range search, quantized sweep, codes), the sweeps of all jobs stacked."""
    out, inp = delta.shape
    factors = calib.sweep_factors()
    first = sweep_many(delta, [(s.mask,) for s, _, _ in jobs], factors)
    live, grids = [], []
    for (s, p, only), v in zip(jobs, first):
        if not Hope(opt.min_gain, other_width=only).judge(s.chunk, v):
            s.calibrated = GAVE_UP
            continue
        live.append((s, p))
        grids.append((*_calibrated_grid(torch.gather(v, 1, s.cols), p["bits"],
                                        p["rows_per_scale"]), (1 << p["bits"]) - 1))
    if not live:
        return
    second = sweep_many(delta, [(s.mask, mrow, srow, levels) for (s, _), (_, _, srow, mrow, levels)
                                in zip(live, grids)], factors)
    for (s, _), (st2, mn2, srow, mrow, levels), q in zip(live, grids, second):
        c2, dense = _kept_codes(torch.gather(q, 1, s.cols), mrow, srow, levels, s.cols, inp)
        s.calibrated = (c2, st2, mn2, dense)
