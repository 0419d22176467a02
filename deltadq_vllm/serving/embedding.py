"""Embedding deltas: the fine-tune's rows added to the base embedding of its tokens.

Where the deltas live is the backend's (kernels/backends.py):

* triton: a kernel-layout DeltaSlots in the shared arena ([vocab, dim], one slice), or the
  LM head's own slots when the embedding is tied and this rank holds every row; rows are
  decoded on the device by deltadq::embedding_rows (a low-rank delta: U[id] @ V,
  kernels/triton_lowrank.py).
* cpu: `HostEmbeddingDeltas`, per slot the encoded delta (hash_groupwise rows decoded on
  lookup) or, for layouts whose single rows are expensive to decode, a dense table made at
  load; looked up inside deltadq::embedding_cpu.

Rows an extended vocabulary adds (ids >= the base vocabulary) come from `ExtraRows`, a
[S + 1, n_extra, dim] device buffer read with tensor ops (no host check of the ids).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..format.layouts import EncodedTensor, decode
from ..format.rows import decode_rows


class HostEmbeddingDeltas:
    """CPU backend: per-slot embedding deltas on the host, looked up inside the CPU op.
    hash_groupwise and low-rank deltas stay compressed (a step decodes only its tokens'
    rows; a dense table per active slot would cost vocab x dim x 2 bytes: 57 MB for
    SmolLM2); other layouts are expanded to a dense table at load (their single rows are
    expensive)."""

    def __init__(self, n_slots: int, vocab: int, dim: int, dtype: torch.dtype):
        self.vocab, self.dim, self.dtype = vocab, dim, dtype
        self.deltas: list[object | None] = [None] * n_slots

    def load(self, slot: int, enc: EncodedTensor | None, stager=None) -> None:
        if enc is None:
            self.deltas[slot] = None
        elif enc.layout not in ("hash_groupwise", "lowrank"):
            self.deltas[slot] = decode(enc).to(self.dtype)
        else:
            self.deltas[slot] = enc

    def clear(self, slot: int, stager=None) -> None:
        self.deltas[slot] = None

    def is_loaded(self, slot: int) -> bool:
        return self.deltas[slot] is not None

    def slot_bytes(self, slot: int) -> int:
        d = self.deltas[slot]
        if d is None:
            return 0
        return d.numel() * d.element_size() if isinstance(d, torch.Tensor) else d.nbytes()

    def add_to(self, out: torch.Tensor, ids: torch.Tensor, plan) -> None:
        """out[t] += delta_slot(t)[ids[t]] (ids < vocab) for the tokens of each plan segment."""
        for slot, a, n in plan.segs:
            d = self.deltas[slot] if n else None
            if d is None:
                continue
            idx = plan.order[a:a + n]
            tok = ids.index_select(0, idx)
            sel = (tok < self.vocab).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            rows = (d.index_select(0, tok[sel]) if isinstance(d, torch.Tensor)
                    else decode_rows(d, tok[sel]))
            out.index_add_(0, idx[sel], rows.to(out.dtype))


class ExtraRows:
    """Rows a fine-tune's extended vocabulary adds (ids base_vocab .. base_vocab + n_extra),
    per slot, in one device buffer [S + 1, n_extra, dim] (row S: none)."""

    def __init__(self, n_slots: int, base_vocab: int, n_extra: int, dim: int, device, dtype):
        self.base_vocab, self.n_extra, self.n_slots = base_vocab, n_extra, n_slots
        self.buf = torch.zeros(n_slots + 1, max(1, n_extra), dim, dtype=dtype, device=device)
        self.count = [0] * n_slots

    def load(self, slot: int, rows: torch.Tensor | None, stager) -> None:
        n = 0 if rows is None else min(rows.shape[0], self.n_extra)
        block = torch.zeros(self.buf.shape[1:], dtype=self.buf.dtype)
        if n:
            block[:n] = rows[:n].to(self.buf.dtype)
        stager.copy(self.buf[slot], block)
        self.count[slot] = n

    def clear(self, slot: int, stager) -> None:
        if self.count[slot]:
            stager.fill(self.buf[slot], 0)
        self.count[slot] = 0

    def slot_bytes(self, slot: int) -> int:
        return self.count[slot] * self.buf.shape[2] * self.buf.element_size()

    def rows(self, ids: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """[T, dim]: the extra row of each token whose id is past the base vocabulary (zero
        for the others, for slot -1, and past the slot's own extra rows)."""
        j = ids.to(torch.int64) - self.base_vocab
        s = slot_ids.to(torch.int64)
        use = (j >= 0) & (s >= 0)
        s = torch.where(s < 0, torch.full_like(s, self.n_slots), s)
        r = self.buf[s, j.clamp(0, self.buf.shape[1] - 1)]
        return torch.where(use.unsqueeze(1), r, torch.zeros((), dtype=r.dtype, device=r.device))


class _Wrapper(nn.Module):
    """A module standing in for `self.base`: unknown attributes are the base's."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base, name)


class DeltaEmbedding(_Wrapper):
    """Input embedding + the fine-tune's embedding delta (and extra rows) for its tokens.
    No branch on the step: every token is looked up (slot -1 adds nothing)."""

    def __init__(self, base: nn.Module, store, ctx, backend, base_vocab: int,
                 extras: ExtraRows | None = None):
        super().__init__()
        self.base = base
        self.delta_store = store
        self.bound_store = backend.bind(store)
        self.ctx = ctx
        self.backend = backend
        self.base_vocab = base_vocab
        self.extras = extras

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids
        if self.extras is not None:   # the server's vocabulary is larger than the base's
            in_base = ids < self.base_vocab
            out = self.base(torch.where(in_base, ids, torch.zeros_like(ids)))
            out = torch.where(in_base.unsqueeze(-1), out, torch.zeros_like(out))
        else:
            out = self.base(ids)
        o2 = out.view(-1, out.shape[-1])
        flat = ids.reshape(-1)
        T = flat.shape[0]
        routing = self.ctx.tokens.routing
        self.backend.embedding(o2, flat, routing, self.bound_store)
        if self.extras is not None:
            o2 += self.extras.rows(flat, routing.slot_ids[:T]).to(o2.dtype)
        return out
