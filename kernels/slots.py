"""Per-layer slots: the compressed deltas of up to S fine-tunes for one linear layer.

One `DeltaSlots` belongs to one linear layer (a fused one included: q/k/v or
gate/up are *output slices* of the same layer). Slot s, slice i holds one
`hash_groupwise` EncodedTensor of shape [slice_size_i, in_features] (or nothing:
a fine-tune may leave a tensor unchanged). Every fine-tune brings its own group
size g, keep count k, bits and scale block, so these are per-(slot, slice)
*runtime* metadata, not compile-time constants.

Device memory (GPU path, and the Triton interpreter on a CPU):

| buffer       | dtype / shape                  | holds                                         |
|--------------|--------------------------------|-----------------------------------------------|
| arena.words  | int32 [capacity / 4]           | one segment per loaded (slot, slice): its     |
|              |                                | codes as one LSB-first bit stream (row r,     |
|              |                                | code e at bit (r * n_kept + e) * bits), then  |
|              |                                | nb bf16 `step` and nb bf16 `minv`; plus one   |
|              |                                | shared units table per group size g           |
| meta         | int32 [S, n_slices, META_FIELDS] | g, k, bits, seed, offsets... (see META_*)   |

The arena (arena.py) is shared by every layer of a served model (`arena=`), or private
(default: sized so that S deltas of at least `min_ratio` x compression fit). A loaded
(slot, slice) occupies its bytes on disk rounded up to 16: no row padding, no fixed
per-row capacity, positions regenerated in the kernel. No dense delta is ever built for
the GPU path.

On a CPU device the slots can instead keep a load-time expansion for the CPU path
(`cpu_strategy`, see cpu.py), which costs what cpu.py's table says.

Slots built with `lowrank=True` (the LM head's and the embedding's, where the compressor
may store rank r instead of codes: tools/choose.py) keep a `lowrank` delta as its bf16
factors, U [rows, r] then V [r, in] in one segment (META_VALID = META_LOWRANK, META_RANK = r,
META_SCALE_REL = words of U), applied by kernels/triton_lowrank.py; the hash kernels skip
those entries. Cost: (rows + in) x r x 2 bytes.

Other layouts (dare, magnitude, decomposed, dense; lowrank elsewhere) are
converted when loaded into kernel slots (`to_kernel_layout`): decoded once and stored as
hash_groupwise with g = k = 1 (every weight kept, natural column order), 16-bit codes and
one bf16 (step, minv) pair per row, so the same kernels, arena, eviction and CUDA graphs
serve them. Cost: 2 bytes per weight plus 4 bytes per row on the device (as a bf16 dense
delta), and an absolute error of at most half a code step, (max - min) / 131070 of the
row's delta range per weight.

Loads can go through a `DeviceStager` (staging.py): segment bytes and metadata rows are
then copied from pinned host memory on a side stream instead of one synchronous copy each.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from deltadq_vllm.format.bitpack import packed_row_bytes
from deltadq_vllm.format.layouts import EncodedTensor, to_row_packed
from deltadq_vllm.format.positions import MASK32, units

from .arena import ALIGN_WORDS, ArenaFull, DeltaArena, align_words
from .kernel_layout import (CONVERTED_BITS, StagedTensor,  # noqa: F401
                            check_kernel_tensor, lowrank_views, lowrank_words,
                            segment_image, stage, to_kernel_layout)
from .staging import DeviceStager

# meta fields (int32) of one (slot, slice)
META_VALID = 0       # META_HASH / META_LOWRANK when a delta is loaded for this (slot, slice), else 0
META_G = 1           # group size g
META_K = 2           # kept per group k
META_BITS = 3        # code bits
META_SEED = 4        # matrix seed, uint32 bit pattern stored as int32
META_RPS = 5         # rows per scale block
META_ROW_OFF = 6     # global row of local row 0 (tensor-parallel slices)
META_GROUP_OFF = 7   # global group of local group 0
META_NGT = 8         # groups per row of the unsliced matrix
META_SRO = 9         # scale_row_offset
META_NGROUPS = 10    # local groups per row = in_features // g
META_NUNITS = 11     # len(units(g))
META_NROWS = 12      # rows of this slice (= slice size)
META_OUT_OFF = 13    # first output column of this slice in y
META_CODE_OFF = 14   # start of the segment in the arena, in 16-byte units
META_SCALE_REL = 15  # words from the segment start to its bf16 scales (step[nb], minv[nb])
META_NB = 16         # scale blocks nb
META_UNITS_OFF = 17  # start of the shared units table of g in the arena, in 16-byte units
META_RANK = 18       # rank r of a low-rank entry (U [rows, r], V [r, in] from META_CODE_OFF)
META_FIELDS = 20

META_HASH = 1        # META_VALID of a hash_groupwise entry (the hash kernels run only these)
META_LOWRANK = 2     # META_VALID of a low-rank entry (triton_lowrank.py runs only these)

POW2_BITS = (1, 2, 4, 8, 16)  # codes never straddle a 32-bit word


def _i32(v: int) -> int:
    """uint32 bit pattern -> the int32 with the same bits."""
    v &= MASK32
    return v - (1 << 32) if v >= (1 << 31) else v


def units_packed(g: int) -> list[int]:
    """units(g) entries packed as u | inverse(u mod g) << 16 (the kernel's table)."""
    out = []
    for u in units(g):
        inv = pow(u, -1, g) if g > 1 else 0
        out.append(_i32(u | (inv << 16)))  # int32 bit pattern (inv may use bit 31)
    return out


def row_bytes_for_ratio(in_features: int, ratio: float, dense_bytes_per_weight: int = 2) -> int:
    """Packed-row capacity that holds any delta compressed at least `ratio` x vs bf16."""
    return math.ceil(in_features * dense_bytes_per_weight / ratio)


def slot_capacity_bytes(in_features: int, slice_sizes: Sequence[int], row_bytes: int) -> int:
    """Arena bytes one slot of a layer needs when every packed row takes <= row_bytes
    (per-row scales, a private units table per slice, 16-byte alignment)."""
    return sum(align_words(math.ceil(size * row_bytes / 4) + size) * 4
               + align_words(max(2, in_features)) * 4 for size in slice_sizes)


class DeltaSlots:
    """The slots of one linear layer.

    n_slots:      S, fine-tunes resident at once.
    in_features:  row length of every slice.
    slice_sizes:  output sizes of the fused slices, e.g. [q, k, v] or [gate, up];
                  slice i writes y[:, offset_i : offset_i + size_i].
    arena:        the DeltaArena holding the compressed bytes (shared by the layers of a
                  model); default: a private one sized for S deltas whose packed rows
                  take at most `row_bytes` (default: any delta of at least `min_ratio` x
                  compression vs bf16).
    cpu_strategy: on a CPU device, the load-time expansion the CPU path uses
                  ("dense", "merged", "dequant", "csr", or None for none; cpu.py).
    base_weight:  [out_total, in] base weight, needed by cpu_strategy="merged"; or a
                  callable returning it, called when a delta is loaded (so a server need not
                  keep a second copy of the base resident; pass cpu_dtype then).
    any_bits:     compile the kernels for codes straddling 32-bit words even if
                  no such delta is loaded yet (set it when CUDA graphs are
                  captured before every delta is known).
    lowrank:      keep low-rank deltas as their factors (kernel slots; every launch then
                  also runs the low-rank kernel): for an LM head or an embedding, the
                  matrices the compressor may store as rank r.
    """

    def __init__(self, n_slots: int, in_features: int, slice_sizes: Sequence[int], *,
                 row_bytes: int | None = None, min_ratio: float = 16.0,
                 device: torch.device | str = "cpu", cpu_strategy: str | None = "dense",
                 cpu_dtype: torch.dtype | None = None, base_weight: torch.Tensor | None = None,
                 any_bits: bool = False, arena: DeltaArena | None = None,
                 lowrank: bool = False):
        if n_slots < 1:
            raise ValueError("n_slots must be >= 1")
        self.n_slots = n_slots
        self.in_features = in_features
        self.slice_sizes = [int(s) for s in slice_sizes]
        self.slice_offsets = [sum(self.slice_sizes[:i]) for i in range(len(self.slice_sizes))]
        self.out_total = sum(self.slice_sizes)
        self.n_slices = len(self.slice_sizes)
        self.device = torch.device(device)
        # CPU path: deltas stay host objects and are expanded per cpu_strategy; no arena
        self.host_only = self.device.type == "cpu" and cpu_strategy is not None
        S, dev = n_slots, self.device
        self.private_arena = arena is None and not self.host_only
        if self.private_arena:
            cap = row_bytes if row_bytes is not None else row_bytes_for_ratio(in_features, min_ratio)
            arena = DeltaArena(S * slot_capacity_bytes(in_features, self.slice_sizes, cap), dev)
        elif arena is not None and arena.device != dev:
            raise ValueError(f"arena on {arena.device}, slots on {dev}")
        self.arena = None if self.host_only else arena
        self.meta = torch.zeros(S, self.n_slices, META_FIELDS, dtype=torch.int32, device=dev)
        self.host_meta = torch.zeros(S, self.n_slices, META_FIELDS, dtype=torch.int32)  # mirror
        self._segments: dict[tuple[int, int], int] = {}   # (slot, slice) -> start word
        # host mirrors
        self.params: list[list[dict | None]] = [[None] * self.n_slices for _ in range(S)]
        self.loaded_bytes = [0] * S
        self.any_bits = any_bits
        self.lowrank = bool(lowrank) and not self.host_only
        self.version = 0
        # CPU path
        self.cpu_strategy = cpu_strategy if self.device.type == "cpu" else None
        self.cpu_dtype = cpu_dtype
        self._base_weight = base_weight
        if self.cpu_strategy == "merged" and base_weight is None:
            raise ValueError("cpu_strategy='merged' needs base_weight")
        self.cpu_cache: dict[int, object] = {}
        self.cpu_scratch: dict = {}    # CPU "dequant" strategy: one dense scratch per dtype
        self._host_encs: dict[tuple[int, int], EncodedTensor] = {}
        self._base_gemms: dict[torch.dtype, object] = {}

    # ------------------------------------------------------------ CPU path helpers

    @property
    def base_weight(self) -> torch.Tensor | None:
        w = self._base_weight
        return w() if callable(w) else w

    def cpu_compute_dtype(self) -> torch.dtype:
        if self.cpu_dtype is not None:
            return self.cpu_dtype
        if self.base_weight is not None:
            return self.base_weight.dtype
        return torch.bfloat16

    def base_gemm(self, dtype: torch.dtype | None = None):
        """Prepacked GEMM with the base weight (CPU path, strategy "merged")."""
        if self.base_weight is None:
            raise ValueError("these slots were built without base_weight")
        dtype = dtype or self.cpu_compute_dtype()
        g = self._base_gemms.get(dtype)
        if g is None:
            from .cpu import CpuGemm
            g = self._base_gemms[dtype] = CpuGemm(self.base_weight.to(dtype))
        return g

    # ------------------------------------------------------------ host-side summaries

    @property
    def max_keep(self) -> int:
        ks = [p["keep"] for row in self.params for p in row if p is not None and "keep" in p]
        return max(ks) if ks else 1

    @property
    def straddle(self) -> bool:
        """Whether some loaded delta has codes that can straddle 32-bit words."""
        if self.any_bits:
            return True
        return any(p["bits"] not in POW2_BITS for row in self.params for p in row
                   if p is not None and "bits" in p)

    def is_loaded(self, slot: int) -> bool:
        return any(p is not None for p in self.params[slot])

    def nbytes(self) -> int:
        """Device bytes these slots hold: the metadata, plus the whole arena when it is
        private, else the arena segments of the loaded deltas (CPU expansions excluded)."""
        meta = self.meta.numel() * 4
        if self.arena is None:
            return meta
        if self.private_arena:
            return meta + self.arena.capacity_bytes
        return meta + sum(self.slot_bytes(s) for s in range(self.n_slots))

    def slot_bytes(self, slot: int) -> int:
        """Arena bytes occupied by the delta in `slot` (shared units tables excluded)."""
        if self.arena is None:
            return 0
        return sum(self.arena._live[start][0] * 4 for (s, _), start in self._segments.items()
                   if s == slot)

    def segment_words(self, encs: Sequence[EncodedTensor | None]) -> list[int]:
        """Arena words the kernel-path tensors of one fine-tune would take (for fit checks);
        other layouts count as what `to_kernel_layout` makes of them."""
        out = []
        if self.host_only:
            return out
        for i, enc in enumerate(encs):
            if enc is None:
                continue
            if enc.layout == "lowrank" and self.lowrank:
                out.append(lowrank_words(self.slice_sizes[i], self.in_features,
                                         enc.params["rank"])[1])
                continue
            if enc.layout == "hash_groupwise":
                p, nb = enc.params, enc.tensors["step"].numel()
            else:   # converted at load: g = k = 1, 16-bit codes, a scale pair per row
                p, nb = {"group_size": 1, "keep": 1, "bits": CONVERTED_BITS}, self.slice_sizes[i]
            n_kept = self.in_features // p["group_size"] * p["keep"]
            code_words = math.ceil(self.slice_sizes[i] * n_kept * p["bits"] / 32)
            out.append(code_words + nb)
        return out

    # ------------------------------------------------------------ load / clear

    def load(self, slot: int, encs: Sequence[EncodedTensor | None],
             stager: DeviceStager | None = None) -> None:
        """Copy one fine-tune's compressed deltas (one per slice, None = no delta) into `slot`.

        Kernel slots convert other layouts (to_kernel_layout) and write through `stager`
        when given (pinned copies on a side stream; the caller waits before the step).
        Raises ArenaFull (slot left empty) when the arena has no room for them."""
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")
        if len(encs) != self.n_slices:
            raise ValueError(f"expected {self.n_slices} encoded tensors (one per slice), got {len(encs)}")
        if not self.host_only:
            encs = [None if e is None else to_kernel_layout(e, lowrank=self.lowrank)
                    for e in encs]
        for i, enc in enumerate(encs):
            if enc is not None:
                check_kernel_tensor(enc, i, self.slice_sizes[i], self.in_features)
        self.clear(slot, stager)
        total = 0
        try:
            for i, enc in enumerate(encs):
                if enc is None:
                    continue
                if self.host_only:   # CPU path: kept on the host, expanded below
                    if enc.layout == "hash_groupwise":  # CPU expansions read byte-aligned rows
                        enc = to_row_packed(enc)
                    self._host_encs[(slot, i)] = enc
                    self.params[slot][i] = {**enc.params, "layout": enc.layout}
                elif enc.layout == "lowrank":
                    self._load_lowrank_segment(slot, i, enc, stager)
                else:
                    self._load_segment(slot, i, enc, stager)
                total += enc.nbytes()
        except ArenaFull as e:
            self.clear(slot, stager)
            raise ArenaFull(f"{e}; this layer's delta for slot {slot} does not fit") from None
        self.loaded_bytes[slot] = total
        self.version += 1
        if self.cpu_strategy is not None:  # expand at load time, not on the first step
            from .cpu import build_cpu_entry
            self.cpu_cache[slot] = build_cpu_entry(
                self, slot, [self.encoded(slot, i) for i in range(self.n_slices)])

    def _load_segment(self, slot: int, i: int, enc: EncodedTensor,
                      stager: DeviceStager | None) -> None:
        """One (slot, slice) into the arena: code stream, then bf16 step and minv."""
        p = enc.params
        size, off = self.slice_sizes[i], self.slice_offsets[i]
        g, k, bits = p["group_size"], p["keep"], p["bits"]
        n_groups = self.in_features // g
        image = segment_image(enc)        # int32 [code_words + nb]: codes, step, minv
        nb = enc.tensors["step"].numel()
        code_words = image.numel() - nb
        arena = self.arena
        stager = stager or DeviceStager(self.device, side_stream=False)
        start = arena.alloc(code_words + nb, self, (slot, i))
        self._segments[(slot, i)] = start
        stager.copy(arena.words[start:start + image.numel()], image)
        table = units_packed(g)
        units_start = arena.units_table(g, table, stager)
        m = [0] * META_FIELDS
        m[META_VALID] = META_HASH
        m[META_G], m[META_K], m[META_BITS] = g, k, bits
        m[META_SEED] = _i32(p["seed"])
        m[META_RPS] = p["rows_per_scale"]
        m[META_ROW_OFF] = p.get("row_offset", 0)
        m[META_GROUP_OFF] = p.get("group_offset", 0)
        m[META_NGT] = p.get("n_groups_total", n_groups + m[META_GROUP_OFF])
        m[META_SRO] = p.get("scale_row_offset", 0)
        m[META_NGROUPS] = n_groups
        m[META_NUNITS] = len(table)
        m[META_NROWS] = size
        m[META_OUT_OFF] = off
        m[META_CODE_OFF] = start // ALIGN_WORDS
        m[META_SCALE_REL] = code_words
        m[META_NB] = nb
        m[META_UNITS_OFF] = units_start // ALIGN_WORDS
        self.host_meta[slot, i] = torch.tensor(m, dtype=torch.int32)
        stager.copy(self.meta[slot, i], self.host_meta[slot, i].clone())
        self.params[slot][i] = {k_: v for k_, v in p.items() if k_ != "flat"}

    def _load_lowrank_segment(self, slot: int, i: int, enc: EncodedTensor,
                              stager: DeviceStager | None) -> None:
        """One (slot, slice) low-rank delta into the arena: U bf16 [rows, r], then V bf16
        [r, in] (segment_image); no units table."""
        size, r = self.slice_sizes[i], enc.params["rank"]
        image = segment_image(enc)
        u_words, words = lowrank_words(size, self.in_features, r)
        stager = stager or DeviceStager(self.device, side_stream=False)
        start = self.arena.alloc(words, self, (slot, i))
        self._segments[(slot, i)] = start
        stager.copy(self.arena.words[start:start + image.numel()], image)
        m = [0] * META_FIELDS
        m[META_VALID] = META_LOWRANK
        m[META_RANK] = r
        m[META_NROWS] = size
        m[META_OUT_OFF] = self.slice_offsets[i]
        m[META_CODE_OFF] = start // ALIGN_WORDS
        m[META_SCALE_REL] = u_words
        self.host_meta[slot, i] = torch.tensor(m, dtype=torch.int32)
        stager.copy(self.meta[slot, i], self.host_meta[slot, i].clone())
        self.params[slot][i] = {"layout": "lowrank", "rank": r}

    def clear(self, slot: int, stager: DeviceStager | None = None) -> None:
        """Empty a slot: its tokens get no delta (the kernel skips invalid entries)."""
        self.host_meta[slot].zero_()
        if stager is not None:
            stager.fill(self.meta[slot], 0)
        else:
            self.meta[slot].zero_()
        for i in range(self.n_slices):
            self._host_encs.pop((slot, i), None)
            start = self._segments.pop((slot, i), None)
            if start is not None:
                self.arena.free(start)
                if "group_size" in self.params[slot][i]:   # low-rank entries have no table
                    self.arena.release_units(self.params[slot][i]["group_size"])
        self.params[slot] = [None] * self.n_slices
        self.loaded_bytes[slot] = 0
        self.cpu_cache.pop(slot, None)
        self.version += 1

    # arena callbacks (DeltaArena.compact moves segments and units tables)
    def _relocate(self, key, old: int, new: int) -> None:
        slot, i = key
        self._segments[key] = new
        self.host_meta[slot, i, META_CODE_OFF] = new // ALIGN_WORDS
        self.meta[slot, i, META_CODE_OFF] = new // ALIGN_WORDS

    def _units_moved(self, g: int, new: int) -> None:
        for (slot, i) in self._segments:
            if self.params[slot][i].get("group_size") == g:
                self.host_meta[slot, i, META_UNITS_OFF] = new // ALIGN_WORDS
                self.meta[slot, i, META_UNITS_OFF] = new // ALIGN_WORDS

    def arena_view(self, slot: int, i: int) -> EncodedTensor | None:
        """(slot, slice i) as a flat-packed EncodedTensor whose tensors are *views* of the
        arena (no copy; valid until the arena is compacted or the slot cleared): lets a
        tied embedding read the LM head's bytes instead of holding a second copy."""
        start = self._segments.get((slot, i))
        if start is None:
            return None
        p = self.params[slot][i]
        size = self.slice_sizes[i]
        if p.get("layout") == "lowrank":
            u, v = lowrank_views(self.arena.halves[2 * start:], size, self.in_features,
                                 p["rank"])
            return EncodedTensor("lowrank", (size, self.in_features), {"rank": p["rank"]},
                                 {"u": u, "v": v})
        n_kept = self.in_features // p["group_size"] * p["keep"]
        m = self.host_meta[slot, i].tolist()
        code_words, nb = m[META_SCALE_REL], m[META_NB]
        nbytes = packed_row_bytes(size * n_kept, p["bits"])
        codes = self.arena.words[start:start + code_words].view(torch.uint8)[:nbytes].view(1, -1)
        h0 = 2 * (start + code_words)
        return EncodedTensor("hash_groupwise", (size, self.in_features), {**p, "flat": True},
                             {"codes": codes, "step": self.arena.halves[h0:h0 + nb],
                              "minv": self.arena.halves[h0 + nb:h0 + 2 * nb]})

    def encoded(self, slot: int, i: int) -> EncodedTensor | None:
        """The EncodedTensor held by (slot, slice i), read back from the arena (CPU copy,
        byte-aligned rows)."""
        p = self.params[slot][i]
        if p is None:
            return None
        if (slot, i) in self._host_encs:
            return self._host_encs[(slot, i)]
        view = self.arena_view(slot, i)
        if view.layout == "lowrank":
            return EncodedTensor("lowrank", view.shape, dict(view.params),
                                 {k: t.cpu().clone() for k, t in view.tensors.items()})
        return to_row_packed(EncodedTensor(view.layout, view.shape, view.params,
                                           {k: t.cpu().clone() for k, t in view.tensors.items()}))

    def cpu_entry(self, slot: int):
        """The CPU path's expansion of `slot` (built now if the slots were made without one)."""
        entry = self.cpu_cache.get(slot)
        if entry is None and self.is_loaded(slot):
            from .cpu import build_cpu_entry
            entry = build_cpu_entry(self, slot, [self.encoded(slot, i) for i in range(self.n_slices)])
            self.cpu_cache[slot] = entry
        return entry
