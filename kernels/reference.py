"""The plain reference of the delta op: dense decode (layouts.decode), per-token loop.

    y[t, off_i : off_i + size_i] += x[t] @ decode(delta[slot(t)][i])^T     for slot(t) >= 0

Arithmetic is float32 (x upcast, the dense float32 delta of layouts.decode), then one
rounding to y's dtype. Slow on purpose: it is what the kernels are tested against.
"""

from __future__ import annotations

from typing import Sequence

import torch

from deltadq_vllm.format.layouts import EncodedTensor, decode


def dense_deltas(encs: Sequence[Sequence[EncodedTensor | None] | None], slice_sizes: Sequence[int],
                 in_features: int) -> list[torch.Tensor | None]:
    """Per slot, the dense float32 [out_total, in] delta of all its slices (None: empty slot)."""
    out_total = sum(slice_sizes)
    dense = []
    for slot_encs in encs:
        if slot_encs is None or all(e is None for e in slot_encs):
            dense.append(None)
            continue
        d = torch.zeros(out_total, in_features)
        off = 0
        for size, e in zip(slice_sizes, slot_encs):
            if e is not None:
                d[off:off + size] = decode(e)
            off += size
        dense.append(d)
    return dense


def reference_apply_deltas(y: torch.Tensor, x: torch.Tensor, slot_ids: torch.Tensor,
                           encs: Sequence[Sequence[EncodedTensor | None] | None],
                           slice_sizes: Sequence[int]) -> torch.Tensor:
    """In place on y [T, out_total] (any float dtype); encs[s] = per-slice tensors of slot s."""
    dense = dense_deltas(encs, slice_sizes, x.shape[1])
    ids = slot_ids.tolist()
    for t, s in enumerate(ids):
        if s < 0 or s >= len(dense) or dense[s] is None:
            continue
        contrib = x[t].float().cpu() @ dense[s].T
        y[t] = (y[t].float() + contrib.to(y.device)).to(y.dtype)
    return y
