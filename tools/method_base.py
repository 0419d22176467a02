"""What every compression method shares: the options (`MethodOptions`), the result of
compressing one matrix (`Choice`), the per-compress result memo, the byte-budget error
(`UnfitError`) and small helpers (scale blocks, divisors, group-size alignment). Split from
methods.py (one concept per module); methods.py re-exports these names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from deltadq_vllm.errors import DeltaDQError
from deltadq_vllm.format.layouts import EncodedTensor

METHODS = ("deltadq", "dare", "bitdelta", "magnitude", "lowrank", "dense")
SCALE_BYTES = 4  # bf16 step + bf16 minv per scale block
DEFAULT_BITS = (1, 2, 3, 4)
MAX_GROUP_CANDIDATES = 8
# matrices up to this size refine the best configuration of the REFINE_WIDTHS best bit
# widths, not just the overall best by plain error (all of SmolLM2-135M's linears)
REFINE_ALL_BITS_ELEMENTS = 1 << 21
REFINE_WIDTHS = 2
EXACT_SVD_ELEMENTS = 1 << 26  # larger matrices: randomized SVD (compress_lowrank)


@dataclass
class Choice:
    enc: EncodedTensor
    error: float
    value_bits: int  # bits per stored value (for the nominal ratio)
    n_values: int    # stored values (kept elements, or low-rank numbers)
    plain_error: float | None = None  # the same positions with plainly rescaled values
    values: str = "plain"             # "plain", "shrunk", "calibrated", "calibrated+shrunk"
    method: str | None = None         # set when a per-matrix choice overrides the artifact's
    width_rule: bool = False          # the width rule (WIDTH_MIN_GAIN) moved this choice off
                                      # the width the error alone would pick


# refined values (shrunk, refit, calibrated) must carry at least this fraction of the true
# delta's output along it (refine.py; docs/compression.md "Choice by held-out error")
MIN_GAIN = 0.9
# The bit width of plain values (deltadq, dare) is chosen by held-out error. Where no width
# beats storing nothing (every plain error >= 1: extreme ratios), the error is mostly noise
# that averages out over the network, and what does not average out is the share of the
# delta a width's grid loses: there the widths whose plain values carry at least this share
# of the delta's output (measure.py's gain) come first, the error deciding among them (all
# widths where none does). At 1024x on arith-light, a narrow width's range search clipped
# its few levels toward zero: 1-bit plain values carried 0.36-0.46 of each linear's delta,
# at a lower error than 2-bit ones at the same bytes (half the density; 0.44-0.98, most
# >= 0.7); 1 bit kept 53% of the task, 2 bits 93% (benchmarks/README.md "Bits against
# density"). Where a width beats zero the error alone decides, as before (the 16x choice
# between a dense 1-bit grid at error 0.66 and 2 bits at 1.05 is unchanged).
WIDTH_MIN_GAIN = 0.6


def width_floor(plain_errors, floor: float | None) -> float | None:
    """The gain floor a width choice among candidates with these relative plain errors
    applies: `floor` (MethodOptions.width_gain) where none beats storing nothing (every
    error >= 1), else None (the error alone decides). Shared by deltadq's and dare's
    searches and the sensitivity probe's model of them."""
    errors = list(plain_errors)
    return floor if floor is not None and errors and min(errors) >= 1 else None


@dataclass
class MethodOptions:
    bits: int | None = None            # fixed b, else searched over DEFAULT_BITS
    group_size: int | None = None      # fixed g (deltadq), else "auto"
    decompose_bits: int = 0            # m (deltadq, Separate Quantization)
    keep: float | None = None          # explicit keep fraction instead of a byte budget
    seed: int = 0
    tp_align: int = 1                  # prefer group sizes dividing in / tp_align (TP shards)
    quant_range: str = "minmax"        # "search": per-block range search (quant.py), or
                                       # "minmax" (compress_options.resolve_quant_range picks)
    calibrated: bool = True            # solve kept values on calibration inputs (when given)
    refine: bool = True                # tools/refine.py (calibrated values, shrinkage); off:
                                       # the plain method, as the papers describe it
    min_gain: float = MIN_GAIN         # refine.py: a refined candidate (shrunk, refit,
                                       # calibrated) is taken only if its projection on the
                                       # true delta's output is >= this; 0: by error alone
    width_gain: float | None = WIDTH_MIN_GAIN  # see WIDTH_MIN_GAIN; None: widths by error
                                       # alone (--budget sensitivity: its objective is it)
    plain_gain: float = 0.0            # refine.py: plain values on a clipped grid carrying
                                       # less than this are stored with raised scales (0: off)
    # per-matrix results shared by the passes of one compress() (its ratio rewrites move
    # the budget a little; most matrices keep their configuration, whose refinement, the
    # costly part, is then not redone). Not part of the options' identity.
    memo: "ResultMemo | None" = field(default=None, compare=False, repr=False)

    @property
    def clip(self) -> bool:
        return self.quant_range == "search"

    def identity(self) -> tuple:
        """The options that decide a configuration's score and encoding (ResultMemo's key):
        all but the memo and width_gain, which only chooses among configurations (so the
        error-alone fit after a refused width rule reuses the rule's fit's results)."""
        return tuple(getattr(self, f.name) for f in fields(self)
                     if f.name not in ("memo", "width_gain"))


class ResultMemo:
    """(matrix, seed, options, configuration) -> result, for the rewrites of one compress()
    and its two fits where the check refuses the width rule (tools/compress.py).
    Valid because every pass sees the same deltas and calibration inputs; encodings are
    kept up to MAX_BYTES in all (a 7B model at 16x would otherwise hold ~1 GB more)."""

    MAX_BYTES = 256 << 20

    def __init__(self):
        self.items: dict = {}
        self.bytes = 0
        self.hits = 0

    def get(self, key):
        got = self.items.get(key)
        if got is not None:
            self.hits += 1
        return got

    def put(self, key, value, nbytes: int = 0):
        if self.bytes + nbytes <= self.MAX_BYTES:
            self.items[key] = value
            self.bytes += nbytes


def _memo_key(opt: MethodOptions, name: str, seed: int, *what) -> tuple:
    return (name, seed, opt.identity(), *what)


def _scale_blocks(out: int, rows_per_scale: int) -> int:
    return (out + rows_per_scale - 1) // rows_per_scale


def _rows_per_scale_options(out: int, row_budget: float) -> list[int]:
    """Per-row scales, unless they would eat a large share of the row's budget."""
    share = SCALE_BYTES / max(row_budget, 1e-9)
    opts = [1]
    if share > 0.1:
        opts.append(min(16, out))
    if share > 0.3:
        opts.append(out)
    return sorted(set(opts))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _aligned(cands: list[int], inp: int, tp_align: int) -> list[int]:
    """Group sizes that split evenly across tp_align tensor-parallel column shards (so a
    row-parallel layer's delta is sliced without re-compression), if any; else all."""
    if tp_align <= 1 or inp % tp_align:
        return cands
    ok = [g for g in cands if (inp // tp_align) % g == 0]
    return ok or cands


def _spread(cands: list[int], limit: int) -> list[int]:
    """At most `limit` candidates, log-spaced, always keeping the first and last."""
    if len(cands) <= limit:
        return cands
    idx = {round(i * (len(cands) - 1) / (limit - 1)) for i in range(limit)}
    return [cands[i] for i in sorted(idx)]


class UnfitError(DeltaDQError):
    """The method's smallest encoding of a matrix exceeds the bytes the ratio leaves it."""


def _unfit(name, method, need, budget):
    return UnfitError(
        f"--ratio cannot be met for {name} with method {method}: its smallest encoding takes "
        f"{need} bytes but the ratio leaves {int(budget)} bytes for it",
        "choose a smaller --ratio (or another --method)")
