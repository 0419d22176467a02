"""Per-layer slot buffers holding the compressed deltas of up to S fine-tunes.

One `DeltaSlots` belongs to one linear layer (a fused one included: q/k/v or
gate/up are *output slices* of the same layer). Slot s, slice i holds one
`hash_groupwise` EncodedTensor of shape [slice_size_i, in_features] (or nothing:
a fine-tune may leave a tensor unchanged). Every fine-tune brings its own group
size g, keep count k, bits and scale block, so these are per-(slot, slice)
*runtime* metadata, not compile-time constants.

Buffers (all fixed at construction, so pointers never change: CUDA-graph safe):

| buffer  | dtype / shape                               | holds                                   |
|---------|---------------------------------------------|-----------------------------------------|
| codes   | uint8 [S, out_total, row_bytes]             | packed codes, row r of slice i at row   |
|         |                                             | offset_i + r (LSB-first, as bitpack.py) |
| step    | bf16  [S, out_total]                        | scale block b of slice i at offset_i + b|
| minv    | bf16  [S, out_total]                        | (same)                                  |
| units   | int32 [S, n_slices, units_cap]              | u + (u^-1 mod g) << 16, units(g)  |
| meta    | int32 [S, n_slices, META_FIELDS]            | g, k, bits, seed, ... (see META_*)      |

`row_bytes` is the capacity of a packed row (rounded up to 16 bytes so the kernel
can read 32-bit words); a delta whose rows are longer is refused at load time.
Memory per slot is out_total * row_bytes + 4 * out_total + 4 * n_slices *
units_cap, i.e. the compressed bytes plus < 1 % for 16x deltas of 4096-wide
rows (the units table is the largest extra: 4 bytes per input feature per slice).
No dense delta is ever built for the GPU path.

On a CPU device the slots can also keep a load-time expansion for the CPU path
(`cpu_strategy`, see cpu.py), which costs what cpu.py's table says.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from deltadq_vllm.bitpack import packed_row_bytes
from deltadq_vllm.layouts import EncodedTensor, to_row_packed
from deltadq_vllm.positions import MASK32, units

# meta fields (int32) of one (slot, slice)
META_VALID = 0       # 1 when a delta is loaded for this (slot, slice)
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
META_OUT_OFF = 13    # first output column of this slice in y (and row in codes/step/minv)
META_FIELDS = 16

MAX_GROUP_SIZE = 46340  # g*g must fit in int32 (kernel index arithmetic) and g < 2**16 (units table)
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


class DeltaSlots:
    """Stacked slot buffers of one linear layer.

    n_slots:      S, fine-tunes resident at once.
    in_features:  row length of every slice.
    slice_sizes:  output sizes of the fused slices, e.g. [q, k, v] or [gate, up];
                  slice i writes y[:, offset_i : offset_i + size_i].
    row_bytes:    packed-row capacity in bytes (default: enough for any delta of
                  at least `min_ratio` x compression vs bf16).
    cpu_strategy: on a CPU device, the load-time expansion the CPU path uses
                  ("dense", "merged", "dequant", "csr", or None for none; cpu.py).
    base_weight:  [out_total, in] base weight, needed by cpu_strategy="merged"; or a
                  callable returning it, called when a delta is loaded (so a server need not
                  keep a second copy of the base resident; pass cpu_dtype then).
    any_bits:     compile the kernels for codes straddling 32-bit words even if
                  no such delta is loaded yet (set it when CUDA graphs are
                  captured before every delta is known).
    """

    def __init__(self, n_slots: int, in_features: int, slice_sizes: Sequence[int], *,
                 row_bytes: int | None = None, min_ratio: float = 16.0,
                 device: torch.device | str = "cpu", cpu_strategy: str | None = "dense",
                 cpu_dtype: torch.dtype | None = None, base_weight: torch.Tensor | None = None,
                 any_bits: bool = False):
        if n_slots < 1:
            raise ValueError("n_slots must be >= 1")
        self.n_slots = n_slots
        self.in_features = in_features
        self.slice_sizes = [int(s) for s in slice_sizes]
        self.slice_offsets = [sum(self.slice_sizes[:i]) for i in range(len(self.slice_sizes))]
        self.out_total = sum(self.slice_sizes)
        self.n_slices = len(self.slice_sizes)
        self.device = torch.device(device)
        cap = row_bytes if row_bytes is not None else row_bytes_for_ratio(in_features, min_ratio)
        self.row_bytes = max(16, (cap + 15) // 16 * 16)
        self.units_cap = max(2, in_features)
        # CPU path: deltas stay host objects and are expanded per cpu_strategy; the kernel
        # buffers (and their capacity limit) are not used, so they are left empty
        self.host_only = self.device.type == "cpu" and cpu_strategy is not None
        S, O = n_slots, (0 if self.host_only else self.out_total)
        dev = self.device
        self.codes = torch.zeros(S, O, self.row_bytes, dtype=torch.uint8, device=dev)
        self.step = torch.zeros(S, O, dtype=torch.bfloat16, device=dev)
        self.minv = torch.zeros(S, O, dtype=torch.bfloat16, device=dev)
        self.units = torch.zeros(S, self.n_slices, 0 if self.host_only else self.units_cap,
                                 dtype=torch.int32, device=dev)
        self.meta = torch.zeros(S, self.n_slices, META_FIELDS, dtype=torch.int32, device=dev)
        # host mirrors
        self.params: list[list[dict | None]] = [[None] * self.n_slices for _ in range(S)]
        self.loaded_bytes = [0] * S
        self.any_bits = any_bits
        self.version = 0
        # CPU path
        self.cpu_strategy = cpu_strategy if self.device.type == "cpu" else None
        self.cpu_dtype = cpu_dtype
        self._base_weight = base_weight
        if self.cpu_strategy == "merged" and base_weight is None:
            raise ValueError("cpu_strategy='merged' needs base_weight")
        self.cpu_cache: dict[int, object] = {}
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
        """Device bytes of the slot buffers (all slots), CPU-path expansions excluded."""
        return sum(t.numel() * t.element_size()
                   for t in (self.codes, self.step, self.minv, self.units, self.meta))

    # ------------------------------------------------------------ load / clear

    def load(self, slot: int, encs: Sequence[EncodedTensor | None]) -> None:
        """Copy one fine-tune's compressed deltas (one per slice, None = no delta) into `slot`."""
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")
        if len(encs) != self.n_slices:
            raise ValueError(f"expected {self.n_slices} encoded tensors (one per slice), got {len(encs)}")
        # kernels and CPU expansions read byte-aligned rows (flat packing is a disk format)
        encs = [to_row_packed(e) if e is not None and e.layout == "hash_groupwise" else e
                for e in encs]
        for i, enc in enumerate(encs):
            if enc is not None:
                self._check(i, enc)
        self.clear(slot)
        total = 0
        for i, enc in enumerate(encs):
            if enc is None:
                continue
            if self.host_only or enc.layout != "hash_groupwise":  # CPU path: kept on the host
                self._host_encs[(slot, i)] = enc
                self.params[slot][i] = {**enc.params, "layout": enc.layout}
                total += enc.nbytes()
                continue
            p = enc.params
            size, off = self.slice_sizes[i], self.slice_offsets[i]
            g, k, bits = p["group_size"], p["keep"], p["bits"]
            n_groups = self.in_features // g
            rb = packed_row_bytes(n_groups * k, bits)
            dev = self.device
            self.codes[slot, off:off + size, :rb] = enc.tensors["codes"].to(dev)
            nb = enc.tensors["step"].numel()
            self.step[slot, off:off + nb] = enc.tensors["step"].to(dev, torch.bfloat16).reshape(-1)
            self.minv[slot, off:off + nb] = enc.tensors["minv"].to(dev, torch.bfloat16).reshape(-1)
            table = units_packed(g)
            self.units[slot, i, :len(table)] = torch.tensor(table, dtype=torch.int32, device=dev)
            m = [0] * META_FIELDS
            m[META_VALID] = 1
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
            self.meta[slot, i] = torch.tensor(m, dtype=torch.int32, device=dev)
            self.params[slot][i] = dict(p)
            total += enc.nbytes()
        self.loaded_bytes[slot] = total
        self.version += 1
        if self.cpu_strategy is not None:  # expand at load time, not on the first step
            from .cpu import build_cpu_entry
            self.cpu_cache[slot] = build_cpu_entry(self, slot, encs)

    def clear(self, slot: int) -> None:
        """Empty a slot: its tokens get no delta (the kernel skips invalid entries)."""
        self.meta[slot].zero_()
        self.params[slot] = [None] * self.n_slices
        for i in range(self.n_slices):
            self._host_encs.pop((slot, i), None)
        self.loaded_bytes[slot] = 0
        self.cpu_cache.pop(slot, None)
        self.version += 1

    def encoded(self, slot: int, i: int) -> EncodedTensor | None:
        """The EncodedTensor held by (slot, slice i), read back from the buffers (CPU copy)."""
        p = self.params[slot][i]
        if p is None:
            return None
        if (slot, i) in self._host_encs:
            return self._host_encs[(slot, i)]
        size, off = self.slice_sizes[i], self.slice_offsets[i]
        rb = packed_row_bytes(self.in_features // p["group_size"] * p["keep"], p["bits"])
        nb = (p.get("scale_row_offset", 0) + size - 1) // p["rows_per_scale"] + 1
        tensors = {"codes": self.codes[slot, off:off + size, :rb].cpu().contiguous(),
                   "step": self.step[slot, off:off + nb].cpu().clone(),
                   "minv": self.minv[slot, off:off + nb].cpu().clone()}
        return EncodedTensor("hash_groupwise", (size, self.in_features), dict(p), tensors)

    def cpu_entry(self, slot: int):
        """The CPU path's expansion of `slot` (built now if the slots were made without one)."""
        entry = self.cpu_cache.get(slot)
        if entry is None and self.is_loaded(slot):
            from .cpu import build_cpu_entry
            entry = build_cpu_entry(self, slot, [self.encoded(slot, i) for i in range(self.n_slices)])
            self.cpu_cache[slot] = entry
        return entry

    def _check(self, i: int, enc: EncodedTensor) -> None:
        size = self.slice_sizes[i]
        if enc.layout != "hash_groupwise":
            # other layouts (the baselines) are served by the CPU path's expansions only
            if self.cpu_strategy is None:
                raise NotImplementedError(
                    f"slice {i}: layout {enc.layout!r} is served by the CPU path only; the "
                    "GPU kernels read hash_groupwise (methods deltadq and bitdelta)")
            if tuple(enc.shape) != (size, self.in_features):
                raise ValueError(f"slice {i}: delta shape {tuple(enc.shape)} != "
                                 f"{(size, self.in_features)}")
            return
        if tuple(enc.shape) != (size, self.in_features):
            raise ValueError(f"slice {i}: delta shape {tuple(enc.shape)} != {(size, self.in_features)}")
        p = enc.params
        g, k, bits = p["group_size"], p["keep"], p["bits"]
        if self.in_features % g:
            raise ValueError(f"slice {i}: group size {g} does not divide {self.in_features}")
        if g > MAX_GROUP_SIZE:
            raise ValueError(f"slice {i}: group size {g} > {MAX_GROUP_SIZE} is not supported by the kernels")
        if not 1 <= k <= g:
            raise ValueError(f"slice {i}: keep {k} not in [1, {g}]")
        if not 1 <= bits <= 16:
            raise ValueError(f"slice {i}: bits {bits} not in [1, 16]")
        rb = packed_row_bytes(self.in_features // g * k, bits)
        if rb > self.row_bytes and not self.host_only:
            raise ValueError(
                f"slice {i}: packed rows take {rb} bytes but the slots hold {self.row_bytes} "
                f"(build DeltaSlots with a larger row_bytes / smaller min_ratio)")
        codes = enc.tensors["codes"]
        if tuple(codes.shape) != (size, rb) or codes.dtype != torch.uint8:
            raise ValueError(f"slice {i}: codes {tuple(codes.shape)} {codes.dtype} != ({size}, {rb}) uint8")
        nb = enc.tensors["step"].numel()
        rps, sro = p["rows_per_scale"], p.get("scale_row_offset", 0)
        need = (sro + size - 1) // rps + 1
        if nb < need or nb > size or enc.tensors["minv"].numel() != nb:
            raise ValueError(f"slice {i}: {nb} scale blocks, need {need} (<= {size})")
