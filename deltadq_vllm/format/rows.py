"""Single rows of an encoded delta, decoding only those rows' bytes.

An embedding's lookups need the rows of the tokens in a batch (the CPU serving path) or
in a check text (`tools/model_check.py`): decoding a 32000 x 4096 delta whole for a few
hundred rows costs 0.5 GB of float32. hash_groupwise rows read their own codes (row-packed
or flat streams) and regenerate their kept columns from the seed; low-rank rows are U's
rows times V; other layouts are decoded whole (their single rows are expensive).
"""

from __future__ import annotations

import torch

from .bitpack import unpack_bits
from .layouts import EncodedTensor, decode
from .positions import kept_columns_of_rows


def _row_codes(enc: EncodedTensor, rows: torch.Tensor, n_kept: int) -> torch.Tensor:
    """int64 [len(rows), n_kept] codes of some rows (host), reading only their bytes from
    the row-packed or flat code stream."""
    bits = enc.params["bits"]
    codes = enc.tensors["codes"]
    if not enc.params.get("flat"):
        return unpack_bits(codes.index_select(0, rows.to(codes.device)).cpu(), bits, n_kept)
    stream = codes.reshape(-1)
    row_bits = n_kept * bits
    first_bit = rows.to(torch.int64) * row_bits                    # flat: rows are not byte-aligned
    span = (row_bits + 7) // 8 + 1
    idx = (first_bit // 8).unsqueeze(1) + torch.arange(span)
    chunk = stream.index_select(0, idx.clamp_max(stream.numel() - 1).reshape(-1).to(stream.device))
    chunk = chunk.cpu().view(len(rows), span).to(torch.int64)
    bitv = (chunk.unsqueeze(2) >> torch.arange(8)) & 1            # [R, span, 8] LSB first
    bitv = bitv.reshape(len(rows), span * 8)
    pos = (first_bit % 8).unsqueeze(1) + torch.arange(row_bits)
    sel = bitv.gather(1, pos).view(len(rows), n_kept, bits)
    return (sel << torch.arange(bits)).sum(2)


def decode_rows(enc: EncodedTensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of the dense float32 delta, decoding only those rows (hash_groupwise,
    low-rank; other layouts whole), host side (the CPU path's lookups, the check's
    embedding streams); = decode(enc)[rows]."""
    if enc.layout == "lowrank":   # U's rows times V
        u = enc.tensors["u"].index_select(0, rows.to(enc.tensors["u"].device, torch.int64))
        return (u.float() @ enc.tensors["v"].float()).to(rows.device)
    if enc.layout != "hash_groupwise":
        return decode(enc)[rows.cpu()].to(rows.device)
    p = enc.params
    out, inp = enc.shape
    g, k = p["group_size"], p["keep"]
    rows_cpu = rows.to("cpu", torch.int64)
    uniq, inv = torch.unique(rows_cpu, return_inverse=True)
    n_kept = inp // g * k
    codes = _row_codes(enc, uniq, n_kept)
    blk = ((p.get("scale_row_offset", 0) + uniq) // p["rows_per_scale"]).to(enc.tensors["step"].device)
    step = enc.tensors["step"].index_select(0, blk).float().cpu()
    minv = enc.tensors["minv"].index_select(0, blk).float().cpu()
    vals = minv.unsqueeze(1) + step.unsqueeze(1) * codes.float()
    cols = kept_columns_of_rows(p["seed"], uniq + p.get("row_offset", 0), inp, g, k,
                                p.get("n_groups_total"), p.get("group_offset", 0))
    dense = torch.zeros(len(uniq), inp)
    dense.scatter_(1, cols, vals)
    return dense[inv].to(rows.device)
