"""What a compressed matrix's error is measured on (`Calibration`): the layer's held-out
calibration inputs, the token rows an embedding is read at, or weight space; and for a
tied embedding, the worse of its two roles. Split from methods.py (one concept per module);
methods.py re-exports `Calibration`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

HOLD_EVERY = 4  # Calibration.split: one calibration row in 4 is held out for the error
LARGE_MATRIX = 1 << 22   # elements; larger matrices are scored on fewer rows (split)
LARGE_HOLD_ROWS = 64
LARGE_STAT_ROWS = 128
ROW_BLOCK = 8192  # rows per fp32 block when norms are taken over a whole (bf16) matrix


# ---------------------------------------------------------------- calibrated error


@dataclass
class Calibration:
    """What the error of an approximation is measured on, for one matrix.

    x:     [N, in] real inputs of the layer (linear layers, LM head) the error is measured
           on (with `split`: the held-out rows), or
    rows:  token ids whose rows matter (embeddings: the output *is* the row), or
    neither: plain weight-space (Frobenius) error.
    x_fit: [M, in] inputs the calibrated values are solved on (None: no calibrated solve);
           disjoint from x, so the error that decides a matrix's fate is held out.
    input_rows: the matrix is ALSO read row by row as an input embedding (a tied embedding
           judged on the LM head's inputs x): its error is the worse of its two roles, the
           LM head's output error on x and the weight-space error of every row. Judged on
           x alone, a calibrated solve can put large values in directions the final hidden
           states never span: harmless for the logits, but the embedding rows themselves
           were wrecked (llama-gqa--math at 256x: stored rows 4.9x the true delta's norm,
           KL to the fine-tune 42.5 nats vs the base's 6.5).
    """

    x: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    x_fit: torch.Tensor | None = None
    factors: object | None = None   # SweepFactors of x_fit, or a cache {input key: factors}
    source_key: tuple | None = None  # identifies the captured input x_fit was split from

    stat_rows: int | None = None    # fit rows the per-block scale fits use (None: all)
    input_rows: bool = False

    @classmethod
    def split(cls, x: torch.Tensor, hold_every: int = HOLD_EVERY, factors_cache=None,
              numel: int = 0, input_rows: bool = False, hold_block: int = 1):
        """Every `hold_every`-th block of `hold_block` consecutive rows held out for the
        error, the rest to solve on. The calibrator's rows come in sequence order and it
        passes its rows per sequence (`LayerwiseCalibrator.hold_block`), so whole passages
        are held out: tokens of the passages the values were solved on share their context,
        and judged on them, calibrated values that fit the calibration text's passages and
        nothing else were taken over plain ones (tests/test_calibrated.py: held-out tokens
        are far more optimistic than new passages; benchmarks/README.md for task scores,
        which moved within one artifact's spread). For a matrix of more than LARGE_MATRIX
        elements (7B shapes) the errors use LARGE_HOLD_ROWS held-out rows and the scale fits
        LARGE_STAT_ROWS fit rows, spread evenly over them: each candidate costs rows x
        elements, and the calibrated solve keeps every fit row."""
        if x.shape[0] < 4 * hold_every:
            return cls(x=x, input_rows=input_rows)
        idx = torch.arange(x.shape[0])
        hold = (idx // max(1, hold_block)) % hold_every == 0
        xh = x[hold]
        big = numel > LARGE_MATRIX
        return cls(x=_spread(xh, LARGE_HOLD_ROWS) if big else xh, x_fit=x[~hold],
                   factors=factors_cache, source_key=(x.data_ptr(), tuple(x.shape)),
                   stat_rows=LARGE_STAT_ROWS if big else None, input_rows=input_rows)

    @property
    def x_stats(self):
        """Fit rows for the per-block scale fits (shrinkage, grid refit)."""
        if self.x_fit is None or self.stat_rows is None:
            return self.x_fit
        return _spread(self.x_fit, self.stat_rows)

    def sweep_factors(self):
        from .calibrated import SweepFactors
        if not isinstance(self.factors, SweepFactors):
            cache = self.factors if isinstance(self.factors, dict) else None
            key = self.source_key or (self.x_fit.data_ptr(), tuple(self.x_fit.shape))
            f = cache.get(key) if cache is not None else None
            if f is None:
                f = SweepFactors(self.x_fit)
                if cache is not None:
                    cache.clear()   # one input at a time (q/k/v, then o, gate/up, down)
                    cache[key] = f
            self.factors = f
        return self.factors

    def _project(self, m: torch.Tensor) -> torch.Tensor:
        if self.x is not None:
            return self.x @ m.T
        if self.rows is not None:
            return m[self.rows]
        return m

    def relative_error(self, delta: torch.Tensor, approx: torch.Tensor) -> float:
        return self.relative_error_of_difference(delta, delta - approx)

    def relative_error_of_difference(self, delta: torch.Tensor, diff: torch.Tensor) -> float:
        """relative_error given diff = delta - approx (lets a caller build it in place)."""
        return self.error_and_gain(delta, diff)[0]

    def error_and_gain(self, delta: torch.Tensor, diff: torch.Tensor) -> tuple[float, float]:
        """(relative_error_of_difference, gain) for diff = delta - approx: the gain is the
        share of the delta's output that the approximation carries along it,
        <P d, P approx> / |P d|^2 on what the error is measured on (1: none lost, as
        unbiased values carry in expectation; a clipped or shrunk grid carries less)."""
        # the reference projection is the same for every candidate of a matrix: once
        key = (delta.data_ptr(), tuple(delta.shape))
        if getattr(self, "_ref_key", None) != key:
            proj = self._project(delta)
            self._ref_key, self._ref_proj, self._ref = key, proj, proj.norm()
        ref = self._ref
        pd = self._project(diff)
        err = pd.norm()
        rel = float(err / ref) if ref > 0 else float(err)
        # (a dot product of flat views: no temporary of the matrix's size in weight space)
        along = torch.dot(self._ref_proj.reshape(-1).to(pd.dtype), pd.reshape(-1))
        gain = 1.0 - float(along / ref ** 2) if ref > 0 else 1.0
        if self.input_rows and self.x is not None:
            rel = max(rel, _relative_norm(diff, delta))
        return rel, gain

    def role_errors(self, delta: torch.Tensor, diff: torch.Tensor, w_ft: torch.Tensor) -> dict:
        """The error relative to the fine-tuned matrix's own output, per role: "output"
        (|X diff| / |X W_ft| on the held-out rows) and, for input_rows, "rows"
        (|diff| / |W_ft| over every row: the embedding lookup's output)."""
        num, den = self.output_norm2(diff), self.output_norm2(w_ft)
        out = {"output": (num / den) ** 0.5 if den > 0 else num ** 0.5}
        if self.input_rows and self.x is not None:
            out["rows"] = _relative_norm(diff, w_ft)
        return out

    def output_norm2(self, m: torch.Tensor) -> float:
        """|_project(m)|^2, in fp32 blocks of m's rows (never an fp32 copy of a bf16 7B LM
        head, 0.5 GB)."""
        return sum(float(self._project_rows(m, r0).square().sum())
                   for r0 in range(0, m.shape[0], ROW_BLOCK))

    def _project_rows(self, m: torch.Tensor, r0: int) -> torch.Tensor:
        """_project of rows r0..r0+ROW_BLOCK of m, in fp32 (token-row selection: the selected
        rows that fall in the block)."""
        block = m[r0:r0 + ROW_BLOCK].float()
        if self.x is not None:
            return self.x @ block.T
        if self.rows is not None:
            sel = self.rows[(self.rows >= r0) & (self.rows < r0 + block.shape[0])] - r0
            return block[sel]
        return block


def _relative_norm(a: torch.Tensor, ref: torch.Tensor) -> float:
    """|a| / |ref| (|a| where ref is zero), in fp32 blocks of rows (weight space)."""
    na, nr = _WEIGHT_SPACE.output_norm2(a), _WEIGHT_SPACE.output_norm2(ref)
    return (na / nr) ** 0.5 if nr > 0 else na ** 0.5


_WEIGHT_SPACE = Calibration()


def _spread(x: torch.Tensor, n: int) -> torch.Tensor:
    """n of x's rows, evenly spaced (all of them if it has no more): a sample of every
    passage, not the first passage's first tokens."""
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n).round().long()]
