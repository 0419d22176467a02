"""base + decoded delta -> the fine-tune's tensor, exactly as `deltadq merge` and the server do."""

from __future__ import annotations

import torch

from .artifact import DeltaArtifact
from ..checkpoint import SAFETENSORS_DTYPES
from .layouts import decode


def reconstruct(artifact: DeltaArtifact, name: str, base: torch.Tensor | None) -> torch.Tensor:
    """The fine-tune's tensor `name`, in the fine-tune's dtype.

    Arithmetic is float32 (float64 for exact dense deltas): W = base + delta, then new vocabulary rows (stored
    as the fine-tune's own values) are appended, then one cast to the fine-tune dtype.
    """
    e = artifact.entries[name]
    delta = decode(artifact.encoded(name))
    if e.absolute:
        full = delta
    else:
        if base is None or tuple(base.shape) != e.base_shape:
            raise ValueError(f"{name}: base tensor shape {None if base is None else tuple(base.shape)}"
                             f" != {e.base_shape}")
        full = base.to(delta.dtype) + delta.reshape(base.shape)
    extra = artifact.extra_rows(name)
    if extra is not None:
        full = torch.cat([full, extra.to(full.dtype)], 0)
    return full.reshape(e.shape).to(SAFETENSORS_DTYPES[e.dtype])
