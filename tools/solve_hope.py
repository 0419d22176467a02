"""Whether a matrix's calibrated solve is worth finishing (tools/refine.py).

The calibrated values are stored only if they carry --min-gain of the delta's output on the
held-out calibration rows; at high ratios they never do, and solving them was most of the
compress time. A solve is therefore judged as early as possible and given up once it cannot
become eligible. After a full solve the verdict is exact (what is stored is what finishing
the solve would have stored); the sample's verdict before it (prejudge) can differ, and then
the matrix keeps its plain / shrunk / refit values: never was seen to happen (below).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # (refine imports this module)
    from .refine_chunk import _Chunk

# A calibrated solution must carry MIN_GAIN (opt.min_gain) of the delta's output to be
# eligible; its grid variants (refit, shrunk) raise the gain of the solution they start from
# by at most 0.22 (measured: SmolLM2 arith-light at 16x, 508 matrices). So a matrix whose
# first calibrated solution carries less than min_gain - CALIBRATED_GAIN_MARGIN on the
# held-out rows is not solved further: at 64x-1024x no calibrated candidate was ever
# eligible (spell-heavy 64x/256x, mix-heavy and arith-light 1024x: 0 of 1,762 refinements;
# their solutions carried 0.1-0.5), and the solves were most of the compress time.
CALIBRATED_GAIN_MARGIN = 0.3
# An other leading width beside the chosen configuration (refine_together.py) is refined
# for its calibrated values only, and they are stored only where they beat everything the
# chosen configuration stores: its floor is min_gain - OTHER_WIDTH_GAIN_MARGIN. Measured
# (SmolLM2 arith-light at 16x, every configuration's first solution logged): the 19 other
# configurations whose calibrated values won carried 0.835-0.939 (all above the chosen
# one's), and 223 of the 284 that lost carried less than 0.8; at 64x-1024x none ever won.
# With it, 16x artifacts: arith-light and mix-heavy bit for bit the same, spell-heavy one
# matrix of 211 (0.3% more output error on it); compress time -1.5% to -3.5%.
OTHER_WIDTH_GAIN_MARGIN = 0.1
# Before a matrix's first solve, PREJUDGE_ROWS evenly spaced rows of its first chunk are
# solved alone (rows are independent: one shared H) and the whole solve is skipped when they
# carry less than the floor minus PREJUDGE_MARGIN; otherwise the chunks are solved and
# judged as before (once the first is judged, sampling the later ones would only solve
# their rows twice), so an artifact changes only where the sample's verdict is that far
# below the floor while the whole chunk's is not. Measured on SmolLM2 arith-light (every refinement of a matrix of
# >= 128 rows, sample gain vs the full solve's): 1024x: 340 of 372 skipped, none of them
# eligible after the full solve (those solves were 17% of the compress time); 16x: 15 of
# 515 skipped, none eligible; |sample - full| mean 0.015, at most 0.154. Artifacts bit for
# bit the same as without it at both ratios. Only the exact solve (high ratios: few kept
# per row) is sampled: its cost is per row. The sweep's is mostly per column (a few vector
# ops each, whatever the row count: 27 ms for 64 rows of a 576-wide input against 37 ms
# for all 576, one thread), so its sample cost nearly a whole solve, and where the sweep
# runs (16x-64x) a solve is rarely hopeless: at 16x the samples were 38 s of a 349 s
# compress (profile, one thread) and spared 15 of 515 solves.
PREJUDGE_ROWS = 64
PREJUDGE_MARGIN = 0.1


class Hope:
    """Whether a matrix's calibrated solve is worth finishing: each block of rows' first
    solution is judged by its held-out gain (CALIBRATED_GAIN_MARGIN); once one falls short
    the solve is given up for the rest of the matrix (and _refine drops the set)."""

    def __init__(self, min_gain: float, other_width: bool = False):
        self.floor = min_gain - (OTHER_WIDTH_GAIN_MARGIN if other_width
                                 else CALIBRATED_GAIN_MARGIN)
        self.alive = True
        self.sampled = False   # prejudge samples a matrix once: later chunks have judge()

    def judge(self, ch: "_Chunk", approx: torch.Tensor) -> bool:
        """approx [n, in]: the chunk's solution (zero off the mask). False from then on
        when it carries less than the floor of the delta's output on the held-out rows."""
        if self.alive and self.floor > 0:
            got = _carried(ch.a_held, ch.held(approx))
            self.alive = got is None or got >= self.floor
        return self.alive

    def prejudge(self, ch: "_Chunk", solve_rows) -> bool:
        """Before the matrix's first exact solve: solve_rows(idx) -> [len(idx), in] the solution of
        those rows only (zero off the mask). False (from then on) when a sample of the rows
        carries less than floor - PREJUDGE_MARGIN of their delta's output on the held-out
        rows. Chunks judged in weight space (an embedding's rows) and short chunks are
        left to judge()."""
        if self.sampled or not self.alive or self.floor <= 0 or ch.calib.x is None \
                or ch.n < 2 * PREJUDGE_ROWS:
            return self.alive
        self.sampled = True
        idx = torch.arange(PREJUDGE_ROWS) * ch.n // PREJUDGE_ROWS
        got = _carried(ch.a_held[:, idx], ch.held(solve_rows(idx)))
        self.alive = got is None or got >= self.floor - PREJUDGE_MARGIN
        return self.alive


def _carried(a: torch.Tensor, approx_out: torch.Tensor) -> float | None:
    """<a, approx_out> / |a|^2: the share of the delta's output (a, on the held-out rows)
    that a solution's output carries along it; None where the delta has no output there."""
    ref = float(a.square().sum())
    return float((a * approx_out).sum()) / ref if ref > 0 else None
