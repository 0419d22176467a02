"""Kept positions regenerated from a seed: they cost zero bytes on disk.

Group-wise dropout keeps exactly `k` of the `g` inputs in every group of a row.
Which ones is a pure function of (matrix seed, global row, global group), so the
artifact stores no positions and a GPU kernel can recompute them in its inner
loop with a handful of integer ops:

    h1     = mix32(mix32(row * n_groups_total + group) ^ seed)
    h2     = mix32(h1 ^ 0x9E3779B9)
    offset = h1 % g
    stride = units(g)[h2 % len(units(g))]          # units(g): 1 <= u < g, gcd(u, g) = 1
    pos_j  = (offset + j * stride) % g,  j = 0..k-1

`stride` is coprime with `g`, so the k positions are distinct; `offset` is uniform,
so every input is kept with probability exactly k/g (rescaling by g/k is unbiased).
Global row/group indices make the positions identical for any tensor-parallel slice.

All arithmetic is on uint32 values held in int64 tensors; products are split into
16-bit halves so nothing overflows int64 (the Triton kernel uses native uint32).
"""

from __future__ import annotations

import math
import zlib
from functools import lru_cache

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
_M1 = 0x7FEB352D
_M2 = 0x846CA68B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for uint32 values x held in int64, without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32): good avalanche, 2 multiplies."""
    if x.device.type == "cpu":  # numpy's uint32 arithmetic wraps by definition: ~10x faster
        a = (x & MASK32).numpy().astype(np.uint32)
        a ^= a >> np.uint32(16)
        a *= np.uint32(_M1)
        a ^= a >> np.uint32(15)
        a *= np.uint32(_M2)
        a ^= a >> np.uint32(16)
        return torch.from_numpy(a.astype(np.int64))
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    x = x ^ (x >> 16)
    return x


def mix32_int(x: int) -> int:
    return int(mix32(torch.tensor([x & MASK32], dtype=torch.int64))[0])


def tensor_seed(global_seed: int, name: str) -> int:
    """Per-matrix seed: depends on the user's seed and the tensor's checkpoint name."""
    return mix32_int((global_seed & MASK32) ^ zlib.crc32(name.encode()))


@lru_cache(maxsize=None)
def units(g: int) -> tuple[int, ...]:
    """Strides usable for a group of g: integers in [1, g) coprime with g (just (1,) for g <= 2)."""
    if g <= 2:
        return (1,)
    return tuple(u for u in range(1, g) if math.gcd(u, g) == 1)


def units_tensor(g: int) -> torch.Tensor:
    return torch.tensor(units(g), dtype=torch.int64)


def group_hashes(seed: int, rows: torch.Tensor, groups: torch.Tensor, n_groups_total: int):
    """h1, h2 for every (row, group) pair (broadcast)."""
    idx = (rows.to(torch.int64) * n_groups_total + groups.to(torch.int64)) & MASK32
    h1 = mix32(mix32(idx) ^ (seed & MASK32))
    h2 = mix32(h1 ^ GOLDEN)
    return h1, h2


def _positions(seed: int, rows: torch.Tensor, groups: torch.Tensor, n_groups_total: int,
               group_size: int, keep: int) -> torch.Tensor:
    """Within-group offsets [len(rows), len(groups), keep] for global row/group indices."""
    if not 1 <= keep <= group_size:
        raise ValueError(f"keep count {keep} must be in [1, group size {group_size}]")
    h1, h2 = group_hashes(seed, rows.view(-1, 1), groups.view(1, -1), n_groups_total)
    # offset + j * stride < g + g * g: int32 (half the work of this, the compressor's
    # hottest loop) whenever that fits
    it = torch.int32 if group_size <= 46340 else torch.int64
    offset = (h1 % group_size).to(it)
    table = units_tensor(group_size).to(it)
    stride = table[h2 % len(table)]
    j = torch.arange(keep, dtype=it)
    return ((offset.unsqueeze(-1) + j * stride.unsqueeze(-1)) % group_size).to(torch.int64)


def group_positions(
    seed: int,
    n_rows: int,
    n_groups: int,
    group_size: int,
    keep: int,
    n_groups_total: int | None = None,
    row_offset: int = 0,
    group_offset: int = 0,
) -> torch.Tensor:
    """Within-group offsets of the kept elements, int64 [n_rows, n_groups, keep].

    Rows `row_offset..` and groups `group_offset..` of a matrix with `n_groups_total`
    groups per row (defaults to n_groups + group_offset, i.e. the unsliced matrix).
    """
    total = n_groups_total if n_groups_total is not None else n_groups + group_offset
    rows = torch.arange(row_offset, row_offset + n_rows, dtype=torch.int64)
    groups = torch.arange(group_offset, group_offset + n_groups, dtype=torch.int64)
    return _positions(seed, rows, groups, total, group_size, keep)


def kept_columns(
    seed: int, n_rows: int, in_features: int, group_size: int, keep: int, **slice_kw
) -> torch.Tensor:
    """Absolute column index of every kept element, int64 [n_rows, n_groups * keep].

    Order: group by group, and inside a group in j order (the order values are stored in).
    """
    if in_features % group_size:
        raise ValueError(f"group size {group_size} must divide the row length {in_features}")
    n_groups = in_features // group_size
    pos = group_positions(seed, n_rows, n_groups, group_size, keep, **slice_kw)
    base = (torch.arange(n_groups, dtype=torch.int64) * group_size).view(1, -1, 1)
    return (pos + base).reshape(n_rows, n_groups * keep)


def kept_columns_of_rows(seed: int, rows: torch.Tensor, in_features: int, group_size: int,
                         keep: int, n_groups_total: int | None = None,
                         group_offset: int = 0) -> torch.Tensor:
    """kept_columns for arbitrary global rows (e.g. the embedding rows of a batch's tokens)."""
    cols = kept_columns_by_group(seed, rows, in_features, group_size, keep, n_groups_total,
                                 group_offset)
    return cols.reshape(len(rows), -1)


def kept_columns_by_group(seed: int, rows: torch.Tensor, in_features: int, group_size: int,
                          keep: int, n_groups_total: int | None = None,
                          group_offset: int = 0) -> torch.Tensor:
    """kept_columns_of_rows as int64 [len(rows), n_groups, keep]. A group's first j
    positions do not depend on keep (pos_j = (offset + j * stride) mod g), so
    `[:, :, :k]` of this are the positions of any keep k below it (the compressor's
    candidates of one group size share one hashing)."""
    n_groups = in_features // group_size
    total = n_groups_total if n_groups_total is not None else n_groups + group_offset
    groups = torch.arange(group_offset, group_offset + n_groups, dtype=torch.int64)
    pos = _positions(seed, rows.to(torch.int64), groups, total, group_size, keep)
    return pos.add_((torch.arange(n_groups, dtype=torch.int64) * group_size).view(1, -1, 1))


def bernoulli_hash(seed: int, n_rows: int, in_features: int, row_offset: int = 0,
                   n_cols_total: int | None = None, col_offset: int = 0) -> torch.Tensor:
    """The uint32 hash of every element (held in int64 [n_rows, in_features]) that DARE's
    mask compares with its keep probability: one per matrix serves every probability (the
    compressor's candidates of several widths and scale blocks)."""
    total = n_cols_total if n_cols_total is not None else in_features + col_offset
    rows = torch.arange(row_offset, row_offset + n_rows, dtype=torch.int64).view(-1, 1)
    cols = torch.arange(col_offset, col_offset + in_features, dtype=torch.int64).view(1, -1)
    return mix32(mix32((rows * total + cols) & MASK32) ^ (seed & MASK32))


def bernoulli_threshold(keep_prob: float) -> int:
    """An element is kept when its bernoulli_hash is below this."""
    return int(round(keep_prob * 2**32))


HASH_CHUNK = 1 << 20   # elements BernoulliMasks and bernoulli_mask hash at a time


def _hashed_row_chunks(seed: int, n_rows: int, in_features: int, row_offset: int = 0,
                       n_cols_total: int | None = None, col_offset: int = 0):
    """(r0, r1, bernoulli_hash of rows r0:r1) over a matrix, about HASH_CHUNK elements at a
    time: the whole matrix's int64 hash temporaries were ~4x an int32 copy of it at once
    (0.4-0.7 GB for SmolLM2's 49152 x 576 tied embedding)."""
    total = n_cols_total if n_cols_total is not None else in_features + col_offset
    step = max(1, HASH_CHUNK // max(1, in_features))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        yield r0, r1, bernoulli_hash(seed, r1 - r0, in_features, row_offset + r0, total,
                                     col_offset)


class BernoulliMasks:
    """bernoulli_mask of one matrix at several keep probabilities (the compressor's
    candidates of several widths and scale blocks), bit for bit, hashing its elements once.
    The hash is held as int32 (hash - 2**31: the same order, half of bernoulli_hash's int64;
    113 MB for SmolLM2's 49152 x 576 tied embedding)."""

    def __init__(self, seed: int, n_rows: int, in_features: int):
        self.hashed = torch.empty((n_rows, in_features), dtype=torch.int32)
        for r0, r1, h in _hashed_row_chunks(seed, n_rows, in_features):
            self.hashed[r0:r1] = h.sub_(1 << 31)

    def mask(self, keep_prob: float) -> torch.Tensor:
        threshold = bernoulli_threshold(keep_prob) - (1 << 31)
        if threshold >= 1 << 31:   # (keep_prob 1: every hash is below 2**32)
            return torch.ones(self.hashed.shape, dtype=torch.bool)
        return self.hashed < threshold


def kept_rows(mask: torch.Tensor) -> torch.Tensor:
    """The row of each True entry of a bool [rows, cols] mask, in row-major order: what
    mask.nonzero()[:, 0] is, without its int64 [kept, 2] temporary (0.2 GB for DARE's
    candidates on SmolLM2's tied embedding at 16x)."""
    return torch.repeat_interleave(torch.arange(mask.shape[0]), row_counts(mask))


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: True entries per row of a bool [rows, cols] mask, counted HASH_CHUNK
    elements at a time (mask.sum(1) on a whole mask makes a widened copy of it first:
    0.5 GB for a 7B embedding's)."""
    step = max(1, HASH_CHUNK // max(1, mask.shape[1]))
    if mask.shape[0] <= step:
        return mask.sum(1)
    return torch.cat([mask[r0:r0 + step].sum(1) for r0 in range(0, mask.shape[0], step)])


def bernoulli_mask(seed: int, n_rows: int, in_features: int, keep_prob: float,
                   row_offset: int = 0, n_cols_total: int | None = None, col_offset: int = 0):
    """DARE's per-element keep mask, regenerated from the seed (bool [n_rows, in_features]),
    hashed a chunk of rows at a time (at every decode of the matrix)."""
    threshold = bernoulli_threshold(keep_prob)
    mask = torch.empty((n_rows, in_features), dtype=torch.bool)
    for r0, r1, h in _hashed_row_chunks(seed, n_rows, in_features, row_offset, n_cols_total,
                                        col_offset):
        torch.lt(h, threshold, out=mask[r0:r1])
    return mask
