"""Row-wise bit packing of small unsigned integer codes.

Each row of `codes [R, C]` becomes `ceil(C * bits / 8)` bytes, LSB-first: code `c`
of a row occupies bits `[c*bits, (c+1)*bits)` of that row's byte string. Rows are
byte-aligned so a tensor-parallel slice of rows is a slice of the packed tensor,
and a column range of codes starts at a known bit offset inside every row.
"""

from __future__ import annotations

import torch


def packed_row_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) of shape [R, C] into uint8 [R, ceil(C*bits/8)]."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    if codes.dim() != 2:
        raise ValueError("pack_bits expects a 2-D tensor")
    rows, count = codes.shape
    nbytes = packed_row_bytes(count, bits)
    codes = codes.to(torch.int32)
    if rows == 0 or count == 0:
        return torch.zeros(rows, nbytes, dtype=torch.uint8)
    if int(codes.min()) < 0 or int(codes.max()) >= (1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int32)
    bitplane = ((codes.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(rows, count * bits)
    pad = nbytes * 8 - count * bits
    if pad:
        bitplane = torch.nn.functional.pad(bitplane, (0, pad))
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.int32)
    return (bitplane.reshape(rows, nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int, start: int = 0) -> torch.Tensor:
    """Inverse of pack_bits: codes `[start, start+count)` of every row, as int64 [R, count]."""
    rows, nbytes = packed.shape
    if (start + count) * bits > nbytes * 8:
        raise ValueError(
            f"packed rows hold {nbytes * 8 // bits} codes of {bits} bits, asked for {start + count}"
        )
    if count == 0:
        return torch.zeros(rows, 0, dtype=torch.int64)
    first = start * bits // 8
    last = ((start + count) * bits + 7) // 8
    chunk = packed[:, first:last].to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64)
    bitplane = ((chunk.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)
    offset = start * bits - first * 8
    bitplane = bitplane[:, offset : offset + count * bits].reshape(rows, count, bits)
    weights = 1 << torch.arange(bits, dtype=torch.int64)
    return (bitplane * weights).sum(-1)
