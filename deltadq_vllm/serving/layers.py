"""Delta layers: the fine-tune's difference added to the base layer's own output.

Linear layers and the LM head keep their vLLM module; only their `quant_method` is
wrapped (`DeltaLinearMethod`): `apply(layer, x, bias)` runs the base method
(unquantized, AWQ, FP8, ... and on the CPU vLLM's repacked oneDNN GEMM) and then
adds `x @ D_slot(t)^T` per token. Because the module's own forward still runs,
tensor-parallel input splitting, all-reduce / all-gather and bias handling stay
exactly vLLM's: the delta of a row-parallel layer is a column slice added before
the all-reduce, and a bias delta is added only where the base adds its bias.

Embeddings and norms are replaced by small wrapper modules (`DeltaEmbedding` in
embedding.py, `DeltaRMSNorm`) that call the base module and correct the rows of delta
tokens.

Graph safety: the forward reads the step's routing from persistent buffers (the
DeltaContext's StepSlots, refilled in place before each step) and hands every tensor to
the backend's custom ops; it never reads a tensor on the host, never branches on the step
(a step without fine-tunes runs the same code with every row on slot -1) and makes no
host->device copies. So torch.compile traces it as one graph and CUDA graphs replay it
with the current step's routing. Only static facts (does this layer have a bias, does
the backend replace the base GEMM) select code paths.
"""

from __future__ import annotations

import logging

import torch

from ..kernels import DeltaSlots
from .context import DeltaContext, DeltaRoutingError  # noqa: F401  (re-exported)
from .embedding import (DeltaEmbedding, ExtraRows, HostEmbeddingDeltas, _Wrapper,  # noqa: F401
                        decode_rows)

log = logging.getLogger("deltadq")


class VectorSlots:
    """Per-slot dense vectors (norm-weight or bias deltas) in one device buffer; row S is
    all zeros (slot -1)."""

    def __init__(self, n_slots: int, size: int, device, dtype: torch.dtype = torch.float32):
        self.buf = torch.zeros(n_slots + 1, size, dtype=dtype, device=device)
        self.loaded: set[int] = set()

    def load(self, slot: int, v: torch.Tensor | None, stager) -> None:
        if v is None:
            self.clear(slot, stager)
            return
        stager.copy(self.buf[slot], v.reshape(-1).to(self.buf.dtype))
        self.loaded.add(slot)

    def clear(self, slot: int, stager) -> None:
        if slot in self.loaded:
            stager.fill(self.buf[slot], 0)
        self.loaded.discard(slot)

    def rows(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """[T, size] float32: the vector of each row's slot (zeros for -1)."""
        idx = torch.where(slot_ids < 0, torch.full_like(slot_ids, self.buf.shape[0] - 1), slot_ids)
        return self.buf.index_select(0, idx.to(torch.int64)).float()

    def slot_bytes(self, slot: int) -> int:
        return self.buf.shape[1] * self.buf.element_size() if slot in self.loaded else 0


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, t.shape[-1])


class DeltaLinearMethod:
    """Wraps a linear layer's quant_method: base output + per-token delta (+ bias delta)."""

    def __init__(self, inner, slots: DeltaSlots, ctx: DeltaContext, backend,
                 bias: VectorSlots | None, bias_on_this_rank: bool, layer=None):
        self.inner = inner
        self.slots = slots
        self.ctx = ctx
        self.backend = backend
        self.bias_slots = bias
        self.bias_on_this_rank = bias_on_this_rank
        self.bound_slots = backend.bind(slots)
        # the CPU "merged" strategy computes the whole layer (one GEMM per active delta
        # *instead of* the base GEMM for its tokens; vLLM's own GEMM for the rest)
        self.bound = None
        if layer is not None:
            inner_apply = inner.apply
            self.bound = backend.bind_linear(slots, lambda xs: inner_apply(layer, xs, None))

    def __getattr__(self, name):  # everything else is the base method's
        return getattr(self.inner, name)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        routing = self.ctx.tokens.routing
        if self.bound is not None:
            x2 = _rows_2d(x)
            y2 = self.backend.linear(x2, routing, self.bound).to(x.dtype)
            if bias is not None:
                y2 = y2 + bias.to(y2.dtype)
            self._add_bias_delta(layer, y2, bias, routing)
            return y2.view(*x.shape[:-1], y2.shape[-1])
        out = self.inner.apply(layer, x, bias)
        x2, y2 = _rows_2d(x), _rows_2d(out)
        self.backend.apply(y2, x2, routing, self.bound_slots)
        self._add_bias_delta(layer, y2, bias, routing)
        return out

    def _add_bias_delta(self, layer, y2, bias, routing) -> None:
        b = self.bias_slots
        if b is not None and self.bias_on_this_rank \
                and (bias is not None or getattr(layer, "skip_bias_add", False)):
            y2 += b.rows(routing.slot_ids[:y2.shape[0]]).to(y2.dtype)


class HeadExtras:
    """Logits of tokens a fine-tune adds (vocabulary rows the base lacks).

    The server's vocabulary is the largest fine-tune's; the base's missing rows are zero.
    For those columns every row gets -inf, except the fine-tune's own added tokens,
    which get h @ extra_rows^T. This rank holds vocab columns [cols[0], cols[1]).
    Tensor ops only: one GEMM against every slot's extra rows, then each row keeps its
    own slot's block."""

    def __init__(self, n_slots: int, base_vocab: int, cols: tuple[int, int], dim: int, device,
                 dtype):
        self.base_vocab, self.cols, self.n_slots = base_vocab, cols, n_slots
        c0, c1 = cols
        self.lo = max(base_vocab, c0)
        self.width = max(0, c1 - self.lo)       # extended columns on this rank
        self.buf = torch.zeros(n_slots, max(1, self.width), dim, dtype=dtype, device=device)
        self.count = torch.zeros(n_slots + 1, dtype=torch.int32, device=device)
        self.host_count = [0] * n_slots
        # every rank's extra rows of each slot (the gathered logits' columns, for remask)
        self.total = torch.zeros(n_slots + 1, dtype=torch.int32, device=device)
        self._call_slots: torch.Tensor | None = None   # row slots of the current logits call

    def load(self, slot: int, extra: torch.Tensor | None, stager) -> None:
        n = 0
        block = torch.zeros(self.buf.shape[1:], dtype=self.buf.dtype)
        if extra is not None and self.width:
            a = self.lo - self.base_vocab              # first extra row this rank holds
            rows = extra[a:a + self.width]
            n = rows.shape[0]
            block[:n] = rows.to(self.buf.dtype)
        stager.copy(self.buf[slot], block)
        stager.copy(self.count[slot:slot + 1], torch.tensor([n], dtype=torch.int32))
        total = 0 if extra is None else extra.shape[0]
        stager.copy(self.total[slot:slot + 1], torch.tensor([total], dtype=torch.int32))
        self.host_count[slot] = n

    def clear(self, slot: int, stager) -> None:
        self.load(slot, None, stager)

    def has(self, slot: int) -> bool:
        return self.host_count[slot] > 0

    def _row_slots(self, slot_ids: torch.Tensor | None, R: int, device) -> torch.Tensor:
        """int64 [R]: each row's slot, n_slots for slot -1 (the zero entries)."""
        if slot_ids is None:
            return torch.full((R,), self.n_slots, dtype=torch.int64, device=device)
        s = slot_ids[:R].to(torch.int64)
        return torch.where(s < 0, torch.full_like(s, self.n_slots), s)

    def apply(self, out: torch.Tensor, h: torch.Tensor, slot_ids: torch.Tensor | None) -> None:
        R = out.shape[0]
        s = self._row_slots(slot_ids, R, out.device)
        self._call_slots = s     # for remask, after the logits processor (every rank)
        if self.width == 0:
            return
        c0 = self.cols[0]
        ext = out[:, self.lo - c0:self.lo - c0 + self.width]
        if slot_ids is None:
            ext.fill_(float("-inf"))
            return
        w = self.buf.reshape(-1, self.buf.shape[2])                       # [S * width, dim]
        every = (h.to(w.dtype) @ w.T).view(R, self.n_slots, -1)           # [R, S, width]
        own = every.gather(1, s.clamp_max(self.n_slots - 1).view(R, 1, 1)
                           .expand(R, 1, every.shape[2])).squeeze(1)
        j = torch.arange(self.width, device=out.device)
        keep = j.unsqueeze(0) < self.count.index_select(0, s).unsqueeze(1)
        ext.copy_(torch.where(keep, own[:, :self.width].to(ext.dtype),
                              torch.full((), float("-inf"), dtype=ext.dtype, device=ext.device)))

    def remask(self, logits: torch.Tensor | None) -> None:
        """After the logits processor (gathered vocabulary): the added columns back to -inf
        for every row whose fine-tune lacks them. Final soft-capping (Gemma-2:
        tanh(x / c) * c) turns the -inf set in apply() into -c, a small but real
        probability of tokens the base and the other fine-tunes do not have. Tensor ops
        on the rows' slots recorded by apply() in the same logits call."""
        s, self._call_slots = self._call_slots, None
        if logits is None or logits.dim() != 2 or logits.shape[1] <= self.base_vocab:
            return   # a rank without the gathered logits
        if s is None or logits.shape[0] != s.shape[0]:
            raise DeltaRoutingError(
                f"deltadq: soft-capped logits of {logits.shape[0]} rows, but the LM head "
                f"served {'no call' if s is None else f'{s.shape[0]} rows'}: cannot tell "
                "which requests may see the added tokens; refusing to return them")
        ext = logits[:, self.base_vocab:]
        j = torch.arange(ext.shape[1], device=ext.device)
        lacks = j.unsqueeze(0) >= self.total.index_select(0, s.to(ext.device)).unsqueeze(1)
        ext.masked_fill_(lacks, float("-inf"))


class DeltaLMHeadMethod:
    """Wraps the LM head's quant_method: logits + h @ D_slot^T for each row's slot (+ the
    logits of tokens a fine-tune adds). Runs outside the captured forward, once per logits
    call; which rows it got comes from the DeltaContext (sampled rows, or a slice of the
    step's token rows for prompt logprobs)."""

    def __init__(self, inner, slots: DeltaSlots, ctx: DeltaContext, backend,
                 extras: HeadExtras | None = None):
        self.inner = inner
        self.slots = slots
        self.ctx = ctx
        self.backend = backend
        self.bound_slots = backend.bind(slots)
        self.extras = extras

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _needed(self) -> bool:
        return any(self.slots.is_loaded(s) or (self.extras is not None and self.extras.has(s))
                   for s in self.ctx.step_slots)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = self.inner.apply(layer, x, bias)
        x2, y2 = _rows_2d(x), _rows_2d(out)
        routing = self.ctx.head_routing(x2.shape[0], self._needed)
        if routing is not None:
            self.backend.apply(y2[:, :self.slots.out_total], x2, routing, self.bound_slots)
        if self.extras is not None:
            self.extras.apply(y2, x2, None if routing is None else routing.slot_ids)
        return out


class DeltaRMSNorm(_Wrapper):
    """RMSNorm (x_hat * w) or GemmaRMSNorm (x_hat * (1 + w)) whose weight is w + dw_slot(t):
    base output + x_hat * dw for every row (slot -1 reads a zero vector), so no branch on
    the step.

    A norm's input is [tokens, width], or [tokens, heads, head_dim] for a per-head norm
    (Qwen3's q/k norm: every head of a token gets that token's delta); vLLM's Transformers
    backend adds a leading batch of one ([1, tokens, ...]), which `batch_leading` (a static
    fact of the model, not of the step) drops."""

    def __init__(self, base, slots: VectorSlots, ctx: DeltaContext, batch_leading: bool = False):
        super().__init__()
        self.base = base
        self.delta_slots = slots
        self.ctx = ctx
        self.batch_leading = batch_leading
        self.eps = getattr(base, "variance_epsilon", getattr(base, "eps", 1e-6))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # the fused add+norm may overwrite x in place, and returns the sum as the residual
        res = self.base(x, residual) if residual is not None else self.base(x)
        out = res[0] if isinstance(res, tuple) else res
        x_in = res[1] if residual is not None else x
        xf = self._token_rows(x_in).float()
        x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        o3 = self._token_rows(out)
        slot_ids = self.ctx.tokens.routing.slot_ids[:o3.shape[0]]
        o3 += (x_hat * self.delta_slots.rows(slot_ids).unsqueeze(1)).to(o3.dtype)
        return res

    def _token_rows(self, t: torch.Tensor) -> torch.Tensor:
        """[tokens, rows per token, width] view: [T, 1, W] for [T, W], [T, H, D] per head."""
        if self.batch_leading and t.dim() > 2:
            t = t[0]
        return t.view(t.shape[0], -1, t.shape[-1])
