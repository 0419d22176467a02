"""Delta compression methods: DeltaDQ and the baselines, each fitted to a byte budget.

Every method gets, per matrix, the fp32 delta, the matrix's calibration inputs and a
budget in *stored bytes* (values + positions + scales), and returns an EncodedTensor
that fits it. Where a method has free parameters (bits, group size), it picks them
by the same calibrated output error, so baselines get the same tuning DeltaDQ gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch

from deltadq_vllm.format.bitpack import pack_bits, packed_row_bytes
from deltadq_vllm.errors import DeltaDQError
from deltadq_vllm.format.layouts import (EncodedTensor, codes_bytes, col_bits, decode, encode_bernoulli,
                                  encode_dense, encode_hash_groupwise, encode_lowrank,
                                  encode_sparse_rows, wants_flat)
from deltadq_vllm.format.positions import bernoulli_mask, kept_columns
from deltadq_vllm.format.quant import dequantize, quantize, quantize_sign, search_ranges

from .measure import Calibration

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


# refined values (shrunk, refit, calibrated) must carry at least this fraction of the true
# delta's output along it (refine.py; docs/compression.md "Choice by held-out error")
MIN_GAIN = 0.9


@dataclass
class MethodOptions:
    bits: int | None = None            # fixed b, else searched over DEFAULT_BITS
    group_size: int | None = None      # fixed g (deltadq), else "auto"
    decompose_bits: int = 0            # m (deltadq, Separate Quantization)
    keep: float | None = None          # explicit keep fraction instead of a byte budget
    seed: int = 0
    tp_align: int = 1                  # prefer group sizes dividing in / tp_align (TP shards)
    quant_range: str = "minmax"        # "search": per-block range search (quant.py), or
                                       # "minmax" (compress.resolve_quant_range picks)
    calibrated: bool = True            # solve kept values on calibration inputs (when given)
    refine: bool = True                # tools/refine.py (calibrated values, shrinkage); off:
                                       # the plain method, as the papers describe it
    min_gain: float = MIN_GAIN         # refine.py: a refined candidate (shrunk, refit,
                                       # calibrated) is taken only if its projection on the
                                       # true delta's output is >= this; 0: by error alone
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
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "memo")


class ResultMemo:
    """(matrix, seed, options, configuration) -> result, for the rewrites of one compress().
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


# ---------------------------------------------------------------- DeltaDQ


# Scoring candidates and encoding the winner work on blocks of about this many delta
# elements: positions (int64), kept values and codes (int64) each take up to 8 bytes
# per kept element, so whole-matrix temporaries are several times the fp32 delta
# (> 1 GB at a 16M-element embedding). Every step is row-local (positions hash the
# global row, scales cover whole blocks of rows_per_scale rows, packed rows are
# byte-aligned), so the results are bit-identical to whole-matrix computation.
CHUNK_ELEMENTS = 1 << 19


# Configurations of a matrix this large are scored on a sample of its rows: SCORE_WINDOWS
# windows of SCORE_WINDOW rows spread evenly over the matrix (whole scale blocks of 1 or 16
# rows; positions are those of the full matrix, regenerated at each window's row offset).
# Each candidate costs rows x elements: on a 7B MLP matrix (11008 x 4096) scoring is about
# half of the compress time. The sum of squared output errors over sampled rows, over the
# delta's own, estimates the ratio over all rows; the chosen configuration is then encoded,
# refined and measured on every row. (Above 2^25 elements: 7B MLP matrices and LM heads;
# SmolLM2's 28M-element embedding and 7B attention matrices are scored on every row.)
SCORE_SAMPLE_ABOVE = 1 << 25
SCORE_WINDOW, SCORE_WINDOWS = 64, 48


def score_windows(out: int, inp: int) -> list[tuple[int, int]] | None:
    """Row windows a large matrix's configurations are scored on (None: every row)."""
    if out * inp <= SCORE_SAMPLE_ABOVE or out < 2 * SCORE_WINDOW * SCORE_WINDOWS:
        return None
    n = out // SCORE_WINDOW
    picks = sorted({round(i * (n - 1) / (SCORE_WINDOWS - 1)) for i in range(SCORE_WINDOWS)})
    return [(w * SCORE_WINDOW, (w + 1) * SCORE_WINDOW) for w in picks]


def _row_chunks(out: int, inp: int, rows_per_scale: int) -> list[tuple[int, int]]:
    """[r0, r1) row ranges of about CHUNK_ELEMENTS elements: a multiple of
    rows_per_scale (whole scale blocks) and of 8 rows (a flat bit stream of b-bit codes
    then splits on byte boundaries)."""
    unit = math.lcm(rows_per_scale, 8)
    rows = max(unit, CHUNK_ELEMENTS // max(inp, 1) // unit * unit)
    return [(r0, min(out, r0 + rows)) for r0 in range(0, out, rows)]


def deltadq_encode(delta, group_size, keep, bits, seed, rows_per_scale, decompose_bits=0,
                   clip=False):
    """Group-wise dropout (exactly `keep` of every `group_size`, rescaled by g/k) then
    b-bit quantization; m > 0 stores positions so codes can be decomposed. Codes are
    packed flat when byte-aligned rows would waste bits (few codes per row)."""
    out, inp = delta.shape
    if decompose_bits:
        cols = kept_columns(seed, out, inp, group_size, keep)
        vals = torch.gather(delta, 1, cols) * (group_size / keep)
        codes, step, minv = quantize(vals, bits, rows_per_scale, clip)
        return encode_sparse_rows((out, inp), cols, codes, step, minv, bits=bits,
                                  decompose_bits=decompose_bits, rows_per_scale=rows_per_scale)
    flat = wants_flat(inp // group_size * keep, bits)
    packed, steps, minvs = [], [], []
    for r0, r1 in _row_chunks(out, inp, rows_per_scale):
        cols = kept_columns(seed, r1 - r0, inp, group_size, keep, row_offset=r0)
        vals = torch.gather(delta[r0:r1], 1, cols).mul_(group_size / keep)
        codes, step, minv = quantize(vals, bits, rows_per_scale, clip)
        packed.append(pack_bits(codes.reshape(1, -1) if flat else codes, bits))
        steps.append(step)
        minvs.append(minv)
    codes = torch.cat(packed, 1 if flat else 0)
    return encode_hash_groupwise((out, inp), codes, torch.cat(steps), torch.cat(minvs),
                                 group_size=group_size, keep=keep, bits=bits, seed=seed,
                                 rows_per_scale=rows_per_scale, flat=flat, packed=True)


def deltadq_bytes(out, inp, group_size, keep, bits, rows_per_scale, decompose_bits=0) -> int:
    n_kept = inp // group_size * keep
    scales = SCALE_BYTES * _scale_blocks(out, rows_per_scale)
    if decompose_bits:
        counts = (1 << decompose_bits) * (1 if n_kept < 256 else 2 if n_kept < 32768 else 4)
        per_row = (packed_row_bytes(n_kept, col_bits(inp))
                   + packed_row_bytes(n_kept, bits - decompose_bits) + counts)
        return out * per_row + scales
    return codes_bytes(out, n_kept, bits, wants_flat(n_kept, bits)) + scales


def _max_kept_per_row(out, inp, budget, bits, rps, decompose_bits) -> int:
    """Largest kept count per row whose encoding fits the budget (0 if none)."""
    lo, hi = 0, inp
    while lo < hi:  # bytes grow monotonically with the count
        mid = (lo + hi + 1) // 2
        cost = _codes_cost(out, mid, inp, bits, decompose_bits) + SCALE_BYTES * _scale_blocks(out, rps)
        lo, hi = (mid, hi) if cost <= budget else (lo, mid - 1)
    return lo


def _codes_cost(out, n_kept, inp, bits, m):
    """Bytes of values (and stored positions when m > 0) of `n_kept` per row."""
    if m:
        counts = (1 << m) * (1 if n_kept < 256 else 2 if n_kept < 32768 else 4)
        return out * (packed_row_bytes(n_kept, col_bits(inp)) + packed_row_bytes(n_kept, bits - m)
                      + counts)
    return codes_bytes(out, n_kept, bits, wants_flat(n_kept, bits))


def deltadq_configs(out, inp, budget, b, opt: MethodOptions) -> list[tuple[int, int, int]]:
    """(g, k, rows_per_scale) candidates for b bits that fit the budget."""
    found = []
    rps_opts = [1] if budget is None else _rows_per_scale_options(out, budget / out)
    for rps in rps_opts:
        if opt.keep is not None:
            keep_max = opt.keep
        else:
            keep_max = _max_kept_per_row(out, inp, budget, b, rps, opt.decompose_bits) / inp
        groups = [opt.group_size] if opt.group_size else _spread(
            _aligned([g for g in _divisors(inp) if g * keep_max >= 1], inp, opt.tp_align),
            MAX_GROUP_CANDIDATES)
        for g in groups:
            k = min(g, math.floor(g * keep_max + 1e-9))
            if k >= 1:
                found.append((g, k, rps))
    return found


def most_kept(cands):
    """The candidate keeping the largest share (ties: the smallest group)."""
    return max(cands, key=lambda c: (c[1] / c[0], -c[0]))


def dare_keep_prob(out, inp, budget, bits, rps) -> float:
    """DARE's keep probability for a byte budget (with a margin: the kept count is random)."""
    n = out * inp
    room = budget - SCALE_BYTES * _scale_blocks(out, rps)
    if room <= 0:
        return 0.0
    p = room * 8 / bits / n
    return p * (1 - 4 / math.sqrt(max(p * n, 1)))  # <= 0 when fewer than ~16 would be kept


def check_group_size(opt: MethodOptions, name: str, inp: int) -> None:
    """A fixed --group-size must divide the matrix's row length (checked before any pass
    that encodes it: the budget probe as well as the compressor)."""
    if opt.group_size and inp % opt.group_size:
        raise DeltaDQError(
            f"--group-size {opt.group_size} does not divide the row length {inp} of {name}",
            f"choose a divisor of every row length (e.g. one of {_divisors(inp)[:12]}) or 'auto'")


def compress_deltadq(name, delta, calib: Calibration, budget, opt: MethodOptions, seed) -> Choice:
    out, inp = delta.shape
    bits_opts = [opt.bits] if opt.bits else list(DEFAULT_BITS)
    if opt.decompose_bits and any(opt.decompose_bits > b for b in bits_opts):
        raise DeltaDQError(f"--decompose-bits {opt.decompose_bits} exceeds --bits {bits_opts}",
                           "choose decompose bits <= bits")
    check_group_size(opt, name, inp)

    scores: dict[tuple, float] = {}
    windows = score_windows(out, inp)
    # (kept alive: Calibration caches the reference norm of the matrix it is given)
    sampled = torch.cat([delta[r0:r1] for r0, r1 in windows]) if windows else None

    def evaluate(g, k, b, rps) -> tuple[float, tuple]:
        """Calibrated error of one configuration, without packing any bits: the decoded
        values are exactly the dequantized codes at the regenerated positions (the
        decomposition of Separate Quantization is lossless, so it does not change them).
        Computed a block of rows at a time (see _row_chunks); positions are regenerated
        per candidate rather than cached (a cache of every candidate's int64 positions
        held > 1 GB for a 16M-element matrix)."""
        cfg = (g, k, b, rps)
        memo_key = _memo_key(opt, name, seed, "score", cfg, tuple(delta.shape))
        if cfg not in scores and opt.memo is not None:
            hit = opt.memo.get(memo_key)   # (one lookup: ResultMemo.get counts the hits)
            if hit is not None:
                scores[cfg] = hit
        if cfg not in scores and windows is not None and SCORE_WINDOW % rps == 0:
            diff = torch.empty_like(sampled)
            at = 0
            for r0, r1 in windows:
                cols = kept_columns(seed, r1 - r0, inp, g, k, row_offset=r0)
                part = delta[r0:r1]
                vals = torch.gather(part, 1, cols).mul_(g / k)
                codes, step, minv = quantize(vals, b, rps, opt.clip)
                approx = torch.zeros_like(part).scatter_(1, cols,
                                                         dequantize(codes, step, minv, rps))
                torch.sub(part, approx, out=diff[at:at + r1 - r0])
                at += r1 - r0
            scores[cfg] = calib.relative_error_of_difference(sampled, diff)
            if opt.memo is not None:
                opt.memo.put(memo_key, scores[cfg])
        if cfg not in scores:
            scores[cfg] = full_score(cfg)
            if opt.memo is not None:
                opt.memo.put(memo_key, scores[cfg])
        return scores[cfg], cfg

    def full_score(cfg) -> float:
        g, k, b, rps = cfg
        diff = torch.empty_like(delta)  # delta - approximation
        for r0, r1 in _row_chunks(out, inp, rps):
            cols = kept_columns(seed, r1 - r0, inp, g, k, row_offset=r0)
            part = delta[r0:r1]
            vals = torch.gather(part, 1, cols).mul_(g / k)
            codes, step, minv = quantize(vals, b, rps, opt.clip)
            approx = torch.zeros_like(part).scatter_(1, cols, dequantize(codes, step, minv, rps))
            torch.sub(part, approx, out=diff[r0:r1])
        return calib.relative_error_of_difference(delta, diff)

    def encoded(cfg) -> Choice:
        key = _memo_key(opt, name, seed, "choice", cfg, tuple(delta.shape))
        got = opt.memo.get(key) if opt.memo is not None else None
        if got is None:
            got = _encoded(cfg)
            if opt.memo is not None:
                opt.memo.put(key, got, got.enc.nbytes())
        return replace(got)   # a copy: callers set .method / .plain_error on theirs

    def _encoded(cfg) -> Choice:
        g, k, b, rps = cfg
        enc = deltadq_encode(delta, g, k, b, seed, rps, opt.decompose_bits, opt.clip)
        # (a score from sampled rows is an estimate: the stored choice is measured on all)
        err = full_score(cfg) if windows is not None else scores[cfg]
        plain = Choice(enc, err, b - opt.decompose_bits, out * (inp // g) * k, plain_error=err)
        if opt.decompose_bits or not opt.refine:
            return plain
        from .refine import refine_hash_groupwise
        return refine_hash_groupwise(delta, calib, plain, opt)

    best_per_bits = []
    for b in bits_opts:
        cands = deltadq_configs(out, inp, budget, b, opt)
        if not cands:
            continue
        # coordinate search: compare bits at the candidate that keeps the most (small
        # groups round k = g * keep down, which would bias the choice), then the group
        # size at those bits
        g0 = most_kept(cands)
        best_per_bits.append((evaluate(*g0[:2], b, g0[2]), b, cands))
    if not best_per_bits:
        smallest = deltadq_bytes(out, inp, inp, 1, min(bits_opts), out, opt.decompose_bits)
        raise _unfit(name, "deltadq", smallest, budget)
    best, b, cands = min(best_per_bits, key=lambda t: t[0][0])
    for g, k, rps in cands:
        c = evaluate(g, k, b, rps)
        if c[0] < best[0]:
            best = c
    final = [best[1]]
    if opt.refine and out * inp <= REFINE_ALL_BITS_ELEMENTS:
        # refined values can reorder the bit widths (plain errors far above 1 at extreme
        # ratios say little about what a calibrated, shrunk encoding reaches): the best
        # configurations of the leading widths are refined and the final errors decide
        # (the two widths with the smallest plain errors: each refinement costs a sweep)
        ranked = sorted(best_per_bits, key=lambda t: t[0][0])
        final += [t[0][1] for t in ranked[:REFINE_WIDTHS] if t[0][1] != best[1]]
    return min((encoded(cfg) for cfg in final), key=lambda c: c.error)


# ---------------------------------------------------------------- baselines


def compress_dare(name, delta, calib, budget, opt, seed) -> Choice:
    """DARE: independent Bernoulli drop with rescale 1/p, kept values quantized (DARE-Qt)."""
    out, inp = delta.shape
    best = None
    for b in ([opt.bits] if opt.bits else list(DEFAULT_BITS)):
        for rps in ([1] if budget is None else _rows_per_scale_options(out, budget / out)):
            if opt.keep is not None:
                p = opt.keep
            else:
                p = dare_keep_prob(out, inp, budget, b, rps)
            if p <= 0:
                continue
            p = min(p, 1.0)
            mask = bernoulli_mask(seed, out, inp, p)
            cost = packed_row_bytes(int(mask.sum()), b) + SCALE_BYTES * _scale_blocks(out, rps)
            if budget is not None and cost > budget:
                continue
            vals = delta[mask] / p
            rows = mask.nonzero()[:, 0]
            codes, step, minv = _quantize_ragged(vals, rows, out, b, rps, opt.clip)
            enc = encode_bernoulli((out, inp), codes, step, minv, keep_prob=p, bits=b, seed=seed,
                                   rows_per_scale=rps)
            err = calib.relative_error(delta, decode(enc))
            c = Choice(enc, err, b, int(mask.sum()), plain_error=err)
            if best is None or c.error < best.error:
                best = c
    if best is None:
        raise _unfit(name, "dare", packed_row_bytes(1, 2) + SCALE_BYTES, budget)
    if not opt.refine:
        return best
    from .refine import refine_bernoulli
    return refine_bernoulli(delta, calib, best, opt)


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


def compress_lowrank(name, delta, calib, budget, opt, seed) -> Choice:
    """Truncated SVD, bf16 factors, rank chosen to fit the budget."""
    out, inp = delta.shape
    if opt.keep is not None:
        r = max(1, round(opt.keep * min(out, inp)))
    else:
        r = int(budget // ((out + inp) * 2))
    r = min(r, min(out, inp))
    if r < 1:
        raise _unfit(name, "lowrank", (out + inp) * 2, budget)
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
