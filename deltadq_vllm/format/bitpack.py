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


# Unpacking expands every stored bit to a whole integer for a moment: done in blocks of
# rows holding at most this many bits, so a 7B LM head's codes (32000 rows) cost ~100 MB of
# temporaries instead of ~2 GB (int64 bit planes of the whole matrix, measured)
BLOCK_BITS = 1 << 23


def _row_blocks(rows: int, bits_per_row: int):
    step = max(1, BLOCK_BITS // max(1, bits_per_row))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


# A flat stream (one row: DARE's codes, flat hash_groupwise codes) is packed in pieces of
# this many codes, a multiple of 8 so each piece ends on a byte boundary: the same bytes as
# packing it whole, without int32 copies of all its codes (DARE's 65M codes of a 7B
# embedding at 16x: ~1 GB of temporaries, 3 GB on the 3-bit bit-plane path).
FLAT_PIECE = 1 << 20


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) of shape [R, C] into uint8 [R, ceil(C*bits/8)]."""
    if codes.dim() == 2 and codes.shape[0] == 1 and codes.shape[1] > FLAT_PIECE:
        return torch.cat([_pack(codes[:, i:i + FLAT_PIECE], bits, aligned=True)
                          for i in range(0, codes.shape[1], FLAT_PIECE)], 1)
    return _pack(codes, bits, aligned=True)


def _pack(codes: torch.Tensor, bits: int, aligned: bool) -> torch.Tensor:
    """pack_bits; aligned=False always takes the bit-plane path (the reference the tests
    compare the byte-aligned path with)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    if codes.dim() != 2:
        raise ValueError("pack_bits expects a 2-D tensor")
    rows, count = codes.shape
    nbytes = packed_row_bytes(count, bits)
    if rows == 0 or count == 0:
        return torch.zeros(rows, nbytes, dtype=torch.uint8)
    if int(codes.min()) < 0 or int(codes.max()) >= (1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    out = torch.empty(rows, nbytes, dtype=torch.uint8)
    if aligned and 8 % bits == 0:
        # 1, 2, 4, 8 bits: whole codes per byte, so each byte is a sum of shifted codes
        # (the bit-plane path below expands every bit to an int32: ~8x the work)
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.int32)
        for r0, r1 in _row_blocks(rows, nbytes * 8):
            block = codes[r0:r1].to(torch.int32)
            if nbytes * per != count:
                block = torch.nn.functional.pad(block, (0, nbytes * per - count))
            out[r0:r1] = (block.reshape(r1 - r0, nbytes, per) << shifts).sum(-1)
        return out
    shifts = torch.arange(bits, dtype=torch.int32)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.int32)
    pad = nbytes * 8 - count * bits
    for r0, r1 in _row_blocks(rows, nbytes * 8):
        block = codes[r0:r1].to(torch.int32)
        bitplane = ((block.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(r1 - r0, -1)
        if pad:
            bitplane = torch.nn.functional.pad(bitplane, (0, pad))
        out[r0:r1] = (bitplane.reshape(r1 - r0, nbytes, 8).to(torch.int32) * weights).sum(-1)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, count: int, start: int = 0) -> torch.Tensor:
    """Inverse of pack_bits: codes `[start, start+count)` of every row, as int64 [R, count]."""
    return _unpack(packed, bits, count, start, aligned=True)


def _unpack(packed: torch.Tensor, bits: int, count: int, start: int,
            aligned: bool) -> torch.Tensor:
    rows, nbytes = packed.shape
    if (start + count) * bits > nbytes * 8:
        raise ValueError(
            f"packed rows hold {nbytes * 8 // bits} codes of {bits} bits, asked for {start + count}"
        )
    if count == 0:
        return torch.zeros(rows, 0, dtype=torch.int64)
    first = start * bits // 8
    last = ((start + count) * bits + 7) // 8
    offset = start * bits - first * 8
    if aligned and 8 % bits == 0:   # whole codes per byte (see pack_bits)
        mask = (1 << bits) - 1
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        out = torch.empty(rows, count, dtype=torch.int64)
        for r0, r1 in _row_blocks(rows, (last - first) * 8):
            chunk = packed[r0:r1, first:last]
            codes = ((chunk.unsqueeze(-1) >> shifts) & mask).reshape(r1 - r0, -1)
            out[r0:r1] = codes[:, offset // bits: offset // bits + count]
        return out
    shifts = torch.arange(8, dtype=torch.uint8)
    weights = 1 << torch.arange(bits, dtype=torch.int64)
    out = torch.empty(rows, count, dtype=torch.int64)
    for r0, r1 in _row_blocks(rows, (last - first) * 8):
        chunk = packed[r0:r1, first:last]
        bitplane = ((chunk.unsqueeze(-1) >> shifts) & 1).reshape(r1 - r0, -1)
        bitplane = bitplane[:, offset: offset + count * bits].reshape(r1 - r0, count, bits)
        out[r0:r1] = (bitplane.to(torch.int64) * weights).sum(-1)
    return out
