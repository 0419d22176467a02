"""DeltaArena: one device buffer that holds the compressed deltas of every resident fine-tune.

The kernels read each (slot, slice) of a layer from a *segment* of this buffer (its
packed codes as one bit stream, then its bf16 scales) at an offset recorded in the
slot metadata, so a fine-tune occupies the bytes it has on disk (plus <= 15 bytes of
alignment per tensor), whatever its ratio: a 1024x delta takes 1/64 of the memory of a
16x one, instead of a fixed per-row capacity sized for the least compressed delta.

The buffer is allocated once (its address never changes: CUDA-graph safe); segments are
allocated first-fit with coalescing frees. Offsets are kept in 16-byte units in int32
metadata, so one arena addresses up to 32 GiB. `compact()` slides every live segment
down (the owners rewrite their metadata), for when the free bytes suffice but are
fragmented. Units tables (the strides coprime with a group size g, positions.units) are
shared by every tensor with the same g, reference-counted.

One arena may be shared by the DeltaSlots of all layers of a model (the serving manager
does that, sized by `--delta-arena-mb`), or private to one DeltaSlots (the default).
"""

from __future__ import annotations

import bisect
import math

import torch

ALIGN_WORDS = 4                    # segments start on 16-byte boundaries
MAX_UNITS = (1 << 31) - 1          # offsets in 16-byte units must fit int32


class ArenaFull(RuntimeError):
    """The arena has no room for a segment (free bytes are too few or too fragmented)."""


def align_words(n: int) -> int:
    return (int(n) + ALIGN_WORDS - 1) // ALIGN_WORDS * ALIGN_WORDS


class DeltaArena:
    """capacity_bytes of device memory, viewed as int32 `words` and bf16 `halves`."""

    def __init__(self, capacity_bytes: int, device: torch.device | str = "cpu"):
        n_words = align_words(math.ceil(max(int(capacity_bytes), 16) / 4))
        if n_words // ALIGN_WORDS > MAX_UNITS:
            raise ValueError(f"arena of {capacity_bytes} bytes exceeds the 32 GiB an arena can "
                             "address; use several models' worth of smaller arenas")
        self.device = torch.device(device)
        self.words = torch.zeros(n_words, dtype=torch.int32, device=self.device)
        self.halves = self.words.view(torch.bfloat16)
        self._free: list[tuple[int, int]] = [(0, n_words)]      # sorted (start, length) in words
        self._live: dict[int, tuple[int, object, object]] = {}  # start -> (length, owner, key)
        self._units: dict[int, list[int]] = {}                  # g -> [start, refcount]

    # ------------------------------------------------------------------ sizes

    @property
    def capacity_bytes(self) -> int:
        return self.words.numel() * 4

    @property
    def used_bytes(self) -> int:
        return sum(n for n, _, _ in self._live.values()) * 4

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free) * 4

    @property
    def largest_free_bytes(self) -> int:
        return max((n for _, n in self._free), default=0) * 4

    def units_bytes(self) -> int:
        """Bytes of the shared units tables (not attributable to one fine-tune)."""
        return sum(self._live[s][0] for s, _ in self._units.values()) * 4

    # ------------------------------------------------------------------ alloc / free

    def alloc(self, n_words: int, owner=None, key=None) -> int:
        """First-fit allocation of n_words (rounded up to 16 bytes); returns the start word."""
        need = align_words(max(1, n_words))
        for i, (start, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, length - need)
                self._live[start] = (need, owner, key)
                return start
        raise ArenaFull(f"no {need * 4} contiguous bytes free in the delta arena "
                        f"({self.free_bytes} of {self.capacity_bytes} bytes free, largest "
                        f"run {self.largest_free_bytes})")

    def free(self, start: int) -> None:
        length, _, _ = self._live.pop(start)
        i = bisect.bisect_left(self._free, (start, 0))
        self._free.insert(i, (start, length))
        # coalesce with the neighbours
        if i + 1 < len(self._free) and start + length == self._free[i + 1][0]:
            self._free[i] = (start, length + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            s0, l0 = self._free[i - 1]
            self._free[i - 1] = (s0, l0 + self._free[i][1])
            del self._free[i]

    def compact(self) -> int:
        """Slide live segments down to remove holes; owners get `_relocate(key, old, new)`.
        Returns the number of segments moved. Call it between steps only."""
        moved, pos = 0, 0
        for start in sorted(self._live):
            length, owner, key = self._live[start]
            if start != pos:
                # regions may overlap (pos < start): copy through a temporary
                self.words[pos:pos + length] = self.words[start:start + length].clone()
                del self._live[start]
                self._live[pos] = (length, owner, key)
                if owner is not None:
                    owner._relocate(key, start, pos)
                moved += 1
            pos += length
        self._free = [(pos, self.words.numel() - pos)] if pos < self.words.numel() else []
        return moved

    def fits(self, segment_words: list[int]) -> bool:
        """Whether segments of these sizes fit in the free bytes (after compaction)."""
        return sum(align_words(max(1, n)) for n in segment_words) <= self.free_bytes // 4

    # ------------------------------------------------------------------ shared units tables

    def units_table(self, g: int, table: list[int], stager=None) -> int:
        """Start word of the shared units table of group size g (allocated on first use;
        written through `stager` when given, see staging.py)."""
        ent = self._units.get(g)
        if ent is None:
            start = self.alloc(len(table), self, ("units", g))
            src = torch.tensor(table, dtype=torch.int32)
            if stager is not None:
                stager.copy(self.words[start:start + len(table)], src)
            else:
                self.words[start:start + len(table)] = src.to(self.device)
            ent = self._units[g] = [start, 0]
        ent[1] += 1
        return ent[0]

    def release_units(self, g: int) -> None:
        ent = self._units[g]
        ent[1] -= 1
        if ent[1] == 0:
            self.free(ent[0])
            del self._units[g]

    def group_sizes(self) -> set[int]:
        """Group sizes whose units table is resident."""
        return set(self._units)

    def _relocate(self, key, old: int, new: int) -> None:  # units tables move in compact()
        self._units[key[1]][0] = new
        for owner in {o for _, o, _ in self._live.values() if o is not None and o is not self}:
            owner._units_moved(key[1], new)
