"""DeltaDQ fitted to a byte budget: group-wise dropout at regenerated positions (group
size, keep count and bits searched by the calibrated output error), separate quantization,
then the refinement of the winner's values (tools/refine.py). Split from methods.py (one
concept per module); methods.py re-exports these names."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from deltadq_vllm.errors import DeltaDQError
from deltadq_vllm.format.bitpack import pack_bits, packed_row_bytes
from deltadq_vllm.format.layouts import (codes_bytes, col_bits, encode_hash_groupwise,
                                         encode_sparse_rows, wants_flat)
from deltadq_vllm.format.positions import (kept_columns, kept_columns_by_group,
                                           kept_columns_of_rows)
from deltadq_vllm.format.quant import dequantize, quantize

from . import refine_together as RT   # (module attributes: tests patch them)
from .measure import Calibration
from .method_base import (DEFAULT_BITS, MAX_GROUP_CANDIDATES, REFINE_ALL_BITS_ELEMENTS,
                          REFINE_WIDTHS, SCALE_BYTES, Choice, MethodOptions,
                          _aligned, _divisors, _memo_key, _rows_per_scale_options,
                          _scale_blocks, _spread, _unfit, width_floor)


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


# Scoring hashes each group size's positions once per matrix (per row block or sample), at
# the largest keep of its candidates; a smaller keep is a slice (positions.py,
# kept_columns_by_group): one matrix's candidates are ~4 widths x up to 8 group sizes x 1-2
# scale blocks, with ~8 distinct group sizes. Cached int64 positions are dropped oldest
# first above this many bytes (at 7B shapes a sampled MLP matrix's are ~30 MB per size).
POSITION_CACHE_BYTES = 128 << 20


class _Positions:
    """Kept columns of one matrix's scoring candidates (bit for bit kept_columns')."""

    def __init__(self, seed: int, inp: int, keep_max: dict, scored_rows: int):
        self.seed, self.inp, self.keep_max = seed, inp, keep_max
        self.scored_rows = scored_rows     # rows a candidate's score covers
        self.cache: dict[tuple, torch.Tensor] = {}
        self.bytes = 0

    def columns(self, g: int, k: int, rows: torch.Tensor, key) -> torch.Tensor:
        """int64 [len(rows), inp // g * k] for global `rows`; key names the rows."""
        kmax = max(k, self.keep_max.get(g, k))
        if self.scored_rows * (self.inp // g) * kmax * 8 > POSITION_CACHE_BYTES:
            # (one candidate's positions would not fit: every candidate would evict the
            # last one's, as on SmolLM2's embedding, scored on all 49152 rows)
            return kept_columns_of_rows(self.seed, rows, self.inp, g, k)
        hit = self.cache.get((g, key))
        if hit is None or hit.shape[2] < k:   # (a keep above keep_max: re-hashed, replaced)
            if hit is not None:
                self.bytes -= hit.numel() * hit.element_size()
                del self.cache[(g, key)]
            hit = kept_columns_by_group(self.seed, rows, self.inp, g, kmax)
            self.cache[(g, key)] = hit
            self.bytes += hit.numel() * hit.element_size()
            while self.bytes > POSITION_CACHE_BYTES and len(self.cache) > 1:
                old = self.cache.pop(next(iter(self.cache)))
                self.bytes -= old.numel() * old.element_size()
        return hit[:, :, :k].reshape(len(rows), -1)


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

    scores: dict[tuple, tuple[float, float]] = {}   # cfg -> (error, gain)
    windows = score_windows(out, inp)
    # (kept alive: Calibration caches the reference projection of the matrix it is given)
    sampled = torch.cat([delta[r0:r1] for r0, r1 in windows]) if windows else None
    sampled_rows = torch.cat([torch.arange(r0, r1) for r0, r1 in windows]) if windows else None
    cands_by_bits = {b: deltadq_configs(out, inp, budget, b, opt) for b in bits_opts}
    keep_max: dict[int, int] = {}
    for cands in cands_by_bits.values():
        for g, k, _ in cands:
            keep_max[g] = max(k, keep_max.get(g, 0))
    positions = _Positions(seed, inp, keep_max, len(sampled_rows) if windows else out)

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
            # all windows at once: positions of their global rows, and (windows being whole
            # scale blocks) one quantize call gives each block the grid it has in the matrix
            cols = positions.columns(g, k, sampled_rows, "sample")
            vals = torch.gather(sampled, 1, cols).mul_(g / k)
            codes, step, minv = quantize(vals, b, rps, opt.clip)
            diff = torch.zeros_like(sampled).scatter_(1, cols, dequantize(codes, step, minv, rps))
            torch.sub(sampled, diff, out=diff)
            scores[cfg] = calib.error_and_gain(sampled, diff)
            if opt.memo is not None:
                opt.memo.put(memo_key, scores[cfg])
        if cfg not in scores:
            scores[cfg] = full_score(cfg)
            if opt.memo is not None:
                opt.memo.put(memo_key, scores[cfg])
        return scores[cfg][0], cfg

    def full_score(cfg) -> tuple[float, float]:
        """(error, gain) of a configuration's plain values on every row."""
        g, k, b, rps = cfg
        diff = torch.empty_like(delta)  # delta - approximation
        for r0, r1 in _row_chunks(out, inp, rps):
            # (a sampled matrix's chosen configuration is measured on every row once: its
            # positions are not worth holding)
            cols = kept_columns(seed, r1 - r0, inp, g, k, row_offset=r0) if windows \
                else positions.columns(g, k, torch.arange(r0, r1), (r0, r1))
            part = delta[r0:r1]
            vals = torch.gather(part, 1, cols).mul_(g / k)
            codes, step, minv = quantize(vals, b, rps, opt.clip)
            # part - decoded, in place: the decoded values are subtracted at the kept
            # positions only (no dense temporary: a chunk is a whole scale block, which at
            # extreme ratios can be all 32000 rows of a 7B embedding)
            diff[r0:r1].copy_(part).scatter_add_(1, cols, dequantize(codes, step, minv, rps).neg_())
        return calib.error_and_gain(delta, diff)

    def encoded(cfgs) -> list[Choice]:
        """The configurations' encodings, refined (one call: their calibrated sweeps are
        stacked, refine_together.py); the first is the chosen one, the others are the other
        leading widths (refined for their calibrated values only: refine_together.py)."""
        keys = [_memo_key(opt, name, seed, "choice" if i == 0 else "other width", cfg,
                          tuple(delta.shape)) for i, cfg in enumerate(cfgs)]
        got = [opt.memo.get(key) if opt.memo is not None else None for key in keys]
        todo = [i for i, c in enumerate(got) if c is None]
        for i, c in zip(todo, _encoded([cfgs[i] for i in todo], [i > 0 for i in todo])):
            got[i] = c
            if opt.memo is not None:
                opt.memo.put(keys[i], c, c.enc.nbytes())
        return [replace(c) for c in got]   # copies: callers set .method / .plain_error

    def _encoded(cfgs, others) -> list[Choice]:
        plains = []
        for g, k, b, rps in cfgs:
            enc = deltadq_encode(delta, g, k, b, seed, rps, opt.decompose_bits, opt.clip)
            # (a score from sampled rows is an estimate: the stored choice is measured on all)
            cfg = (g, k, b, rps)
            err = full_score(cfg)[0] if windows is not None else scores[cfg][0]
            plains.append(Choice(enc, err, b - opt.decompose_bits, out * (inp // g) * k,
                                 plain_error=err))
        if opt.decompose_bits or not opt.refine or not plains:
            return plains
        return RT.refine_hash_groupwise_many(delta, calib, plains, opt, others)

    best_per_bits = []
    for b in bits_opts:
        cands = cands_by_bits[b]
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
    # where no width beats storing nothing, widths whose plain values keep the delta
    # (opt.width_gain) before those that lose it (see method_base.WIDTH_MIN_GAIN)
    floor = width_floor((t[0][0] for t in best_per_bits), opt.width_gain)

    def loses(cfg) -> bool:
        return floor is not None and scores[cfg][1] < floor

    def width_key(t):
        (err, cfg) = t[0]
        return (loses(cfg), err)

    best, b, cands = min(best_per_bits, key=width_key)
    keeps = floor is not None and not loses(best[1])
    for g, k, rps in cands:
        c = evaluate(g, k, b, rps)
        if c[0] < best[0] and not (keeps and loses(c[1])):
            best = c
    final = [best[1]]
    if opt.refine and out * inp <= REFINE_ALL_BITS_ELEMENTS and RT.other_widths_can_win(opt):
        # refined values can reorder the bit widths (plain errors far above 1 at extreme
        # ratios say little about what a calibrated, shrunk encoding reaches): the best
        # configurations of the leading widths are refined and the final errors decide
        # (the two widths with the smallest plain errors: each refinement costs a sweep),
        # among the widths that keep the delta if the chosen one does
        ranked = sorted(best_per_bits, key=width_key)
        final += [t[0][1] for t in ranked[:REFINE_WIDTHS] if t[0][1] != best[1]
                  and not (keeps and loses(t[0][1]))]
    positions.cache.clear()   # (scoring is done: not held through the refinement's peak)
    stored = min(encoded(final), key=lambda c: c.error)
    # (the error alone would have taken a width whose plain values lose the delta)
    stored.width_rule = loses(min(best_per_bits, key=lambda t: t[0][0])[0][1]) \
        and not loses(best[1])
    return stored
