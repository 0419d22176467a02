"""Per-tensor layouts of the delta format (docs/format.md, section "Layouts").

A layout turns a few stored tensors plus JSON params back into the dense float32
delta of one 2-D matrix (or the 1-D delta of a norm/bias). `decode` here is the
reference every reader (merge, the CPU serving path, the Triton kernel's tests)
must agree with. Encoders take already-chosen positions and codes; *which*
positions and values to keep is the compression method's job (deltadq_vllm.tools).

| layout          | stored tensors                          | positions            |
|-----------------|-----------------------------------------|----------------------|
| dense           | values                                  | all                  |
| hash_groupwise  | codes, step, minv                       | regenerated (seed)   |
| bernoulli       | codes, step, minv                       | regenerated (seed)   |
| sparse_rows     | cols, codes, [part_counts], step, minv  | stored, bit-packed   |
| lowrank         | u, v                                    | n/a                  |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .bitpack import pack_bits, packed_row_bytes, unpack_bits
from .positions import bernoulli_mask, kept_columns, kept_rows
from .quant import dequantize

LAYOUTS = ("dense", "hash_groupwise", "bernoulli", "sparse_rows", "lowrank")


@dataclass
class EncodedTensor:
    """One compressed delta: the layout name, its JSON params, and its stored tensors."""

    layout: str
    shape: tuple[int, ...]
    params: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# ---------------------------------------------------------------- encoders


def encode_dense(delta: torch.Tensor, dtype: torch.dtype = torch.float32) -> EncodedTensor:
    return EncodedTensor("dense", tuple(delta.shape), {"dtype": str(dtype).replace("torch.", "")},
                         {"values": delta.to(dtype).contiguous()})


def codes_bytes(out: int, n_kept: int, bits: int, flat: bool) -> int:
    """Bytes of the packed codes of an [out, n_kept] code matrix."""
    if flat:
        return packed_row_bytes(out * n_kept, bits)
    return out * packed_row_bytes(n_kept, bits)


def wants_flat(n_kept: int, bits: int) -> bool:
    """Flat packing when byte-padding every row would waste more than 1% (few codes per
    row: extreme ratios, where a row holds only a handful of bits)."""
    row = n_kept * bits
    return row % 8 != 0 and (8 - row % 8) > 0.01 * row


def encode_hash_groupwise(shape, codes, step, minv, *, group_size, keep, bits, seed,
                          rows_per_scale, flat: bool = False,
                          packed: bool = False) -> EncodedTensor:
    """codes: int [out, n_groups*keep] in the order of positions.kept_columns.

    flat: one bit stream for the whole matrix instead of byte-aligned rows.
    packed: `codes` are already packed, as pack_bits would (a compressor that encodes
    a large matrix a block of rows at a time)."""
    out, inp = shape
    params = {"group_size": group_size, "keep": keep, "bits": bits, "seed": seed,
              "rows_per_scale": rows_per_scale, "row_offset": 0, "group_offset": 0,
              "n_groups_total": inp // group_size, "n_rows_total": out}
    if flat:
        params["flat"] = True
    if not packed:
        codes = pack_bits(codes.reshape(1, -1) if flat else codes, bits)
    return EncodedTensor("hash_groupwise", (out, inp), params,
                         {"codes": codes, "step": step, "minv": minv})


def hash_groupwise_codes(enc: EncodedTensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The integer codes [r1 - r0, n_kept] of rows (r0, r1) (default: all) of a
    hash_groupwise tensor (row or flat packing)."""
    p = enc.params
    out, inp = enc.shape
    r0, r1 = rows or (0, out)
    n_kept = inp // p["group_size"] * p["keep"]
    if p.get("flat"):   # one bit stream: row r's codes start at code r * n_kept
        return unpack_bits(enc.tensors["codes"].reshape(1, -1), p["bits"], (r1 - r0) * n_kept,
                           start=r0 * n_kept).reshape(r1 - r0, n_kept)
    return unpack_bits(enc.tensors["codes"][r0:r1], p["bits"], n_kept)


def flat_code_stream(enc: EncodedTensor) -> torch.Tensor:
    """The codes of a hash_groupwise tensor as one flat bit stream, uint8 1-D (what the
    kernels' arena holds): code e of row r at bit (r * n_kept + e) * bits."""
    p = enc.params
    codes = enc.tensors["codes"]
    if p.get("flat"):
        return codes.reshape(-1)
    out, inp = enc.shape
    n_kept = inp // p["group_size"] * p["keep"]
    if n_kept * p["bits"] % 8 == 0:  # byte-aligned rows carry no padding: already flat
        return codes.reshape(-1)
    return pack_bits(hash_groupwise_codes(enc).reshape(1, -1), p["bits"]).reshape(-1)


def to_row_packed(enc: EncodedTensor) -> EncodedTensor:
    """The same tensor with byte-aligned rows (what slicing and the kernels read)."""
    if not enc.params.get("flat"):
        return enc
    p = {k: v for k, v in enc.params.items() if k != "flat"}
    codes = pack_bits(hash_groupwise_codes(enc), p["bits"])
    return EncodedTensor(enc.layout, enc.shape, p, {**enc.tensors, "codes": codes})


def encode_bernoulli(shape, codes_flat, step, minv, *, keep_prob, bits, seed,
                     rows_per_scale) -> EncodedTensor:
    """codes_flat: int [n_kept] in row-major order of bernoulli_mask's True entries."""
    params = {"keep_prob": keep_prob, "bits": bits, "seed": seed, "rows_per_scale": rows_per_scale}
    return EncodedTensor("bernoulli", tuple(shape), params,
                         {"codes": pack_bits(codes_flat.view(1, -1), bits), "step": step,
                          "minv": minv})


def col_bits(in_features: int) -> int:
    return max(1, math.ceil(math.log2(in_features)))


def encode_sparse_rows(shape, cols, codes, step, minv, *, bits, decompose_bits,
                       rows_per_scale) -> EncodedTensor:
    """Stored positions, fixed count per row. With decompose_bits = m > 0 (Separate
    Quantization's decomposition) the top m bits of each code name one of 2**m parts;
    a row's elements are stored part by part, so only the low (bits - m) bits and the
    per-row part counts are stored."""
    out, inp = shape
    per_row = cols.shape[1]
    m = decompose_bits
    if not 0 <= m <= bits:
        raise ValueError(f"decompose bits {m} must be in [0, bits={bits}]")
    low_bits = bits - m
    tensors = {}
    if m:
        part = codes >> low_bits
        # stable sort by (part, column): the part of an element is implied by its slot
        order = torch.argsort(part * inp + cols, dim=1)
        cols = torch.gather(cols, 1, order)
        codes = torch.gather(codes, 1, order)
        part = torch.gather(part, 1, order)
        counts = torch.nn.functional.one_hot(part, 1 << m).sum(1)
        tensors["part_counts"] = counts.to(_count_dtype(per_row))
    tensors["cols"] = pack_bits(cols, col_bits(inp))
    if low_bits:
        tensors["codes"] = pack_bits(codes & ((1 << low_bits) - 1), low_bits)
    tensors["step"], tensors["minv"] = step, minv
    params = {"per_row": per_row, "bits": bits, "decompose_bits": m,
              "rows_per_scale": rows_per_scale}
    return EncodedTensor("sparse_rows", (out, inp), params, tensors)


def _count_dtype(max_count: int) -> torch.dtype:
    if max_count < 256:
        return torch.uint8
    if max_count < 32768:
        return torch.int16
    return torch.int32


def encode_lowrank(u: torch.Tensor, v: torch.Tensor, dtype=torch.bfloat16) -> EncodedTensor:
    return EncodedTensor("lowrank", (u.shape[0], v.shape[1]), {"rank": u.shape[1]},
                         {"u": u.to(dtype).contiguous(), "v": v.to(dtype).contiguous()})


# ---------------------------------------------------------------- decoders


def decode(enc: EncodedTensor) -> torch.Tensor:
    """Dense float32 delta of the stored rows (the reference reconstruction); float64 for
    dense float64 deltas."""
    fn = _DECODERS.get(enc.layout)
    if fn is None:
        raise ValueError(f"unknown layout {enc.layout!r}; known: {', '.join(LAYOUTS)}")
    return fn(enc)


def _decode_dense(enc):
    v = enc.tensors["values"]
    # float64 deltas (the exact `dense` method) stay float64 so merge is bit-exact
    return (v if v.dtype == torch.float64 else v.float()).reshape(enc.shape)


def hash_groupwise_columns(enc: EncodedTensor,
                           rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Kept columns of rows (r0, r1) (default: all), int64 [r1 - r0, n_groups*keep]."""
    p = enc.params
    out, inp = enc.shape
    r0, r1 = rows or (0, out)
    return kept_columns(p["seed"], r1 - r0, inp, p["group_size"], p["keep"],
                        row_offset=p["row_offset"] + r0, group_offset=p["group_offset"],
                        n_groups_total=p["n_groups_total"])


def hash_groupwise_values(enc: EncodedTensor,
                          rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Dequantized kept values of rows (r0, r1) (default: all) in kept_columns order."""
    p = enc.params
    r0 = rows[0] if rows else 0
    return dequantize(hash_groupwise_codes(enc, rows), enc.tensors["step"],
                      enc.tensors["minv"], p["rows_per_scale"],
                      p.get("scale_row_offset", 0) + r0)


# kept entries decoded at a time: their columns, codes and values are int64 / float32
# arrays of the kept count (a 32000 x 4096 LM head at 16x: ~1.5 GB of them at once, the
# peak of `compress --check` on a 7B pair), so rows go in blocks of about this many
DECODE_BLOCK_KEPT = 1 << 21


def _decode_hash_groupwise(enc, block_kept: int | None = None):
    out, inp = enc.shape
    p = enc.params
    n_kept = inp // p["group_size"] * p["keep"]
    rows = max(1, (block_kept or DECODE_BLOCK_KEPT) // max(1, n_kept))
    dense = torch.zeros(out, inp)
    for r0 in range(0, out, rows):
        block = (r0, min(out, r0 + rows))
        dense[block[0]:block[1]].scatter_(1, hash_groupwise_columns(enc, block),
                                          hash_groupwise_values(enc, block))
    return dense


def decode_bernoulli(enc, mask: torch.Tensor | None = None):
    """A bernoulli tensor decoded; `mask`: its bernoulli_mask when the caller has it (the
    compressor scoring a candidate it just encoded), else regenerated from the seed."""
    p = enc.params
    out, inp = enc.shape
    if mask is None:
        mask = bernoulli_mask(p["seed"], out, inp, p["keep_prob"])
    n = int(torch.count_nonzero(mask))
    codes = unpack_bits(enc.tensors["codes"], p["bits"], n)[0]
    blk = kept_rows(mask).floor_divide_(p["rows_per_scale"])
    vals = enc.tensors["minv"].float()[blk] + enc.tensors["step"].float()[blk] * codes.float()
    del codes, blk
    # (dense[mask] = vals, the same values in the same order, without index_put's index
    # tensors: ~0.6 GB for SmolLM2's tied embedding at 16x)
    return torch.zeros(out, inp).masked_scatter_(mask, vals)


def sparse_rows_entries(enc: EncodedTensor):
    """(cols, codes) int64 [out, per_row] of a sparse_rows tensor, in stored order."""
    p = enc.params
    out, inp = enc.shape
    k, bits, m = p["per_row"], p["bits"], p["decompose_bits"]
    cols = unpack_bits(enc.tensors["cols"], col_bits(inp), k)
    low_bits = bits - m
    low = (unpack_bits(enc.tensors["codes"], low_bits, k) if low_bits
           else torch.zeros(out, k, dtype=torch.int64))
    if m:
        ends = enc.tensors["part_counts"].to(torch.int64).cumsum(1)  # [out, 2**m]
        slot = torch.arange(k).expand(out, k).contiguous()
        part = torch.searchsorted(ends, slot, right=True)
        low = (part << low_bits) | low
    return cols, low


def _decode_sparse_rows(enc):
    p = enc.params
    out, inp = enc.shape
    cols, codes = sparse_rows_entries(enc)
    vals = dequantize(codes, enc.tensors["step"], enc.tensors["minv"], p["rows_per_scale"])
    dense = torch.zeros(out, inp)
    dense.scatter_(1, cols, vals)
    return dense


def _decode_lowrank(enc):
    return enc.tensors["u"].float() @ enc.tensors["v"].float()


_DECODERS = {
    "dense": _decode_dense,
    "hash_groupwise": _decode_hash_groupwise,
    "bernoulli": decode_bernoulli,
    "sparse_rows": _decode_sparse_rows,
    "lowrank": _decode_lowrank,
}


# ---------------------------------------------------------------- scaling


# the stored tensors a layout's decoded delta is linear in (value = minv + code * step)
_SCALED_ROLES = {"dense": ("values",), "hash_groupwise": ("step", "minv"),
                 "bernoulli": ("step", "minv"), "sparse_rows": ("step", "minv"),
                 "lowrank": ("u",)}


def scale_encoded(enc: EncodedTensor, factor: float) -> EncodedTensor:
    """The same layout decoding to `factor` x the delta: only the float tensors the values
    are linear in change (stored dtype kept: a bf16 step is rounded once more), positions,
    codes and params stay, so the bytes and the servers' readers are unchanged."""
    roles = _SCALED_ROLES.get(enc.layout)
    if roles is None:
        raise ValueError(f"unknown layout {enc.layout!r}; known: {', '.join(LAYOUTS)}")
    tensors = dict(enc.tensors)
    for r in roles:
        t = tensors[r]
        tensors[r] = (t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
                      * factor).to(t.dtype)
    return EncodedTensor(enc.layout, enc.shape, dict(enc.params), tensors)


# ---------------------------------------------------------------- tensor-parallel slices


def slice_hash_groupwise(enc: EncodedTensor, rows: tuple[int, int] | None = None,
                         cols: tuple[int, int] | None = None) -> EncodedTensor:
    """A row range and/or a group-aligned column range, without re-compressing.

    Positions stay those of the full matrix because hashing uses global indices.
    """
    enc = to_row_packed(enc)
    p = dict(enc.params)
    out, inp = enc.shape
    r0, r1 = rows if rows else (0, out)
    c0, c1 = cols if cols else (0, inp)
    g, k, bits = p["group_size"], p["keep"], p["bits"]
    if c0 % g or c1 % g:
        raise ValueError(f"column slice [{c0}, {c1}) is not aligned to the group size {g}")
    n_kept = inp // g * k
    codes = unpack_bits(enc.tensors["codes"][r0:r1], bits, n_kept)[:, c0 // g * k: c1 // g * k]
    rps, so = p["rows_per_scale"], p.get("scale_row_offset", 0)
    b0, b1 = (so + r0) // rps, (so + r1 - 1) // rps + 1
    p["row_offset"] += r0
    p["group_offset"] += c0 // g
    p["scale_row_offset"] = so + r0 - b0 * rps
    tensors = {"codes": pack_bits(codes, bits), "step": enc.tensors["step"][b0:b1],
               "minv": enc.tensors["minv"][b0:b1]}
    return EncodedTensor("hash_groupwise", (r1 - r0, c1 - c0), p, tensors)
