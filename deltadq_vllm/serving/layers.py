"""Delta layers: the fine-tune's difference added to the base layer's own output.

Linear layers and the LM head keep their vLLM module; only their `quant_method` is
wrapped (`DeltaLinearMethod`): `apply(layer, x, bias)` runs the base method
(unquantized, AWQ, FP8, ... and on the CPU vLLM's repacked oneDNN GEMM) and then
adds `x @ D_slot(t)^T` per token. Because the module's own forward still runs,
tensor-parallel input splitting, all-reduce / all-gather and bias handling stay
exactly vLLM's: the delta of a row-parallel layer is a column slice added before
the all-reduce, and a bias delta is added only where the base adds its bias.

Embeddings and norms are replaced by small wrapper modules (`DeltaEmbedding`,
`DeltaRMSNorm`) that call the base module and correct the rows of delta tokens.

Per-step routing (which slot each token uses) lives in one `DeltaContext`, set
once per step by the model manager and read by every layer.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..kernels import DeltaSlots, apply_deltas, linear_with_deltas
from ..kernels.metadata import DeltaBatchMeta
from ..bitpack import unpack_bits
from ..layouts import EncodedTensor, decode
from ..positions import kept_columns_of_rows

log = logging.getLogger("deltadq")


class DeltaContext:
    """Which slot every token (and every sampled row) of the current step uses."""

    def __init__(self, n_slots: int, device: torch.device):
        self.n_slots = n_slots
        self.device = device
        self.token_meta: DeltaBatchMeta | None = None
        self.sample_meta: DeltaBatchMeta | None = None
        self.token_slots: torch.Tensor | None = None   # int64 [T], -1 = base
        self.sample_slots: torch.Tensor | None = None
        self.step_slots: set[int] = set()              # distinct slots of the step (host)
        self._warned: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self.step_slots)

    def set(self, token_slots: list[int], sample_slots: list[int]) -> None:
        from ..kernels import build_meta

        dev = self.device
        self.step_slots = {s for s in token_slots if s >= 0} | {s for s in sample_slots if s >= 0}
        if not self.step_slots:
            self.token_meta = self.sample_meta = None
            self.token_slots = self.sample_slots = None
            return
        t = torch.tensor(token_slots, dtype=torch.int64)
        s = torch.tensor(sample_slots, dtype=torch.int64)
        self.token_meta = build_meta(t, self.n_slots, device=dev, host_info=True)
        self.sample_meta = build_meta(s, self.n_slots, device=dev, host_info=True)
        self.token_slots = t.to(dev)
        self.sample_slots = s.to(dev)

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)

    def rows_meta(self, n_rows: int, what: str):
        """(meta, slot ids) for an LM-head call of n_rows rows: the sampled rows of each
        request normally; prompt-logprob calls pass other row counts, which are served
        right when the step has one fine-tune (or none)."""
        if self.sample_meta is not None and n_rows == self.sample_meta.num_tokens:
            return self.sample_meta, self.sample_slots
        if self.token_meta is not None and n_rows == self.token_meta.num_tokens:
            return self.token_meta, self.token_slots
        if len(self.step_slots) == 1:
            from ..kernels import build_meta
            slot = next(iter(self.step_slots))
            ids = torch.full((n_rows,), slot, dtype=torch.int64)
            return build_meta(ids, self.n_slots, device=self.device, host_info=True), ids.to(self.device)
        self.warn_once(what, f"deltadq: {what} got {n_rows} rows in a step mixing several "
                             "fine-tunes; the delta is not applied to them (prompt logprobs "
                             "of mixed batches are base-model logprobs)")
        return None, None


class VectorSlots:
    """Per-slot dense vectors (norm-weight or bias deltas); row S is all zeros."""

    def __init__(self, n_slots: int, size: int, device, dtype: torch.dtype = torch.float32):
        self.buf = torch.zeros(n_slots + 1, size, dtype=dtype, device=device)
        self.loaded: set[int] = set()

    def load(self, slot: int, v: torch.Tensor | None) -> None:
        self.buf[slot].zero_()
        self.loaded.discard(slot)
        if v is not None:
            self.buf[slot].copy_(v.to(self.buf.device, self.buf.dtype))
            self.loaded.add(slot)

    def clear(self, slot: int) -> None:
        self.load(slot, None)

    def rows(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """[T, size] float32: the vector of each token's slot (zeros for -1)."""
        idx = torch.where(slot_ids < 0, torch.full_like(slot_ids, self.buf.shape[0] - 1), slot_ids)
        return self.buf.index_select(0, idx).float()

    def any_in(self, slots: set[int]) -> bool:
        return bool(self.loaded & slots)


def any_loaded(slots: DeltaSlots, step_slots: set[int]) -> bool:
    return any(slots.is_loaded(s) for s in step_slots)


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class DeltaLinearMethod:
    """Wraps a linear layer's quant_method: base output + per-token delta (+ bias delta)."""

    def __init__(self, inner, slots: DeltaSlots, ctx: DeltaContext, bias: VectorSlots | None,
                 bias_on_this_rank: bool):
        self.inner = inner
        self.slots = slots
        self.ctx = ctx
        self.bias_slots = bias
        self.bias_on_this_rank = bias_on_this_rank

    def __getattr__(self, name):  # everything else is the base method's
        return getattr(self.inner, name)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self.ctx
        meta = ctx.token_meta
        if (meta is not None and self.slots.cpu_strategy == "merged"
                and any_loaded(self.slots, ctx.step_slots)):
            return self._apply_merged(layer, x, bias, meta)
        out = self.inner.apply(layer, x, bias)
        if meta is None:
            return out
        x2, y2 = _rows_2d(x), _rows_2d(out)
        n = meta.num_tokens
        if x2.shape[0] < n:
            ctx.warn_once("rows", f"deltadq: layer got {x2.shape[0]} rows for {n} mapped tokens")
            return out
        if any_loaded(self.slots, ctx.step_slots):
            apply_deltas(y2[:n], x2[:n], meta, self.slots)
        self._add_bias_delta(layer, y2[:n], bias)
        return out

    def _apply_merged(self, layer, x, bias, meta):
        """CPU "merged" strategy: each delta's tokens go through W_base + D_s *instead of*
        the base GEMM (kernels/cpu.py; the fastest CPU choice), the rest through vLLM's
        own GEMM."""
        x2 = _rows_2d(x)
        n = meta.num_tokens
        base_fn = lambda xs: self.inner.apply(layer, xs, None)  # noqa: E731
        y = linear_with_deltas(x2[:n], meta, self.slots, base_fn=base_fn)
        if x2.shape[0] > n:  # padded rows: base only
            y = torch.cat([y, base_fn(x2[n:])], 0)
        if bias is not None:
            y = y + bias.to(y.dtype)
        self._add_bias_delta(layer, y[:n], bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _add_bias_delta(self, layer, y2, bias) -> None:
        ctx = self.ctx
        b = self.bias_slots
        if b is not None and self.bias_on_this_rank and b.any_in(ctx.step_slots) \
                and (bias is not None or getattr(layer, "skip_bias_add", False)):
            y2 += b.rows(ctx.token_slots).to(y2.dtype)


class HeadExtras:
    """Logits of tokens a fine-tune adds (vocabulary rows the base lacks).

    The server's vocabulary is the largest fine-tune's; the base's missing rows are zero.
    For those columns every row gets -inf, except the fine-tune's own added tokens,
    which get h @ extra_rows^T. This rank holds vocab columns [cols[0], cols[1])."""

    def __init__(self, n_slots: int, base_vocab: int, cols: tuple[int, int], device, dtype):
        self.base_vocab = base_vocab
        self.cols = cols
        self.device, self.dtype = device, dtype
        self.extra: list[torch.Tensor | None] = [None] * n_slots

    def load(self, slot: int, extra: torch.Tensor | None) -> None:
        self.extra[slot] = extra.to(self.device, self.dtype) if extra is not None else None

    def clear(self, slot: int) -> None:
        self.extra[slot] = None

    def apply(self, out: torch.Tensor, h: torch.Tensor, groups) -> None:
        c0, c1 = self.cols
        lo = max(self.base_vocab, c0)
        if lo >= c1:
            return
        ext = out[:, lo - c0:c1 - c0]
        ext.fill_(float("-inf"))
        for slot, idx in groups or ():
            rows = self.extra[slot]
            if rows is None:
                continue
            g1 = min(self.base_vocab + rows.shape[0], c1)  # global columns [lo, g1) are real
            if g1 <= lo:
                continue
            idx = idx.to(out.device)
            w = rows[lo - self.base_vocab:g1 - self.base_vocab]
            ext[idx, :g1 - lo] = (h.index_select(0, idx).to(w.dtype) @ w.T).to(ext.dtype)

    def remask(self, logits: torch.Tensor | None, ctx: "DeltaContext") -> None:
        """After the logits processor: the added columns back to -inf for every row whose
        fine-tune lacks them. Soft-capping (Gemma-2: tanh(x / c) * c) turns the -inf set
        in apply() into -c, which would give the base and other fine-tunes' requests a
        small but real probability of tokens they do not have."""
        if logits is None or logits.dim() != 2 or logits.shape[1] <= self.base_vocab:
            return
        n_extra = logits.shape[1] - self.base_vocab
        allowed = torch.zeros(logits.shape[0], n_extra, dtype=torch.bool)
        meta = ctx.rows_meta(logits.shape[0], "the logits mask")[0] if ctx.active else None
        for slot, idx in (meta.groups if meta is not None else ()):
            rows = self.extra[slot]
            if rows is not None:
                allowed[idx.cpu(), :min(rows.shape[0], n_extra)] = True
        logits[:, self.base_vocab:].masked_fill_(~allowed.to(logits.device), float("-inf"))


class DeltaLMHeadMethod:
    """Wraps the LM head's quant_method: logits of sampled rows + h @ D_slot^T (+ the
    logits of tokens a fine-tune adds)."""

    def __init__(self, inner, slots: DeltaSlots, ctx: DeltaContext,
                 extras: HeadExtras | None = None):
        self.inner = inner
        self.slots = slots
        self.ctx = ctx
        self.extras = extras

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = self.inner.apply(layer, x, bias)
        ctx = self.ctx
        if not ctx.active and self.extras is None:
            return out
        x2, y2 = _rows_2d(x), _rows_2d(out)
        meta = None
        if ctx.active:
            meta, _ = ctx.rows_meta(x2.shape[0], "the LM head")
        if meta is not None and any_loaded(self.slots, ctx.step_slots):
            apply_deltas(y2[:, :self.slots.out_total], x2, meta, self.slots)
        if self.extras is not None:
            self.extras.apply(y2, x2, meta.groups if meta is not None else None)
        return out


def _row_codes(enc: EncodedTensor, rows: torch.Tensor, n_kept: int) -> torch.Tensor:
    """int64 [len(rows), n_kept] codes of some rows (host), reading only their bytes from
    the (possibly device-resident) row-packed or flat code stream."""
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
    """Rows `rows` of the dense float32 delta, decoding only those rows (hash_groupwise),
    for embedding lookups; = decode(enc)[rows]."""
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


class EmbeddingSlots:
    """Per-slot embedding deltas: compressed (rows decoded on lookup) or dense, plus the
    rows an extended vocabulary adds."""

    def __init__(self, n_slots: int, vocab: int, dim: int, device, dtype, expand: bool):
        self.vocab, self.dim, self.device, self.dtype = vocab, dim, device, dtype
        # CPU: expand layouts whose single rows are expensive to decode (the baselines) to a
        # dense [vocab, dim] table at load; hash_groupwise deltas stay compressed on every
        # device (a step looks up only its tokens' rows, and a dense table per active slot
        # would cost vocab x dim x 2 bytes: 57 MB for SmolLM2)
        self.expand = expand
        self.deltas: list[object | None] = [None] * n_slots
        self.extra: list[torch.Tensor | None] = [None] * n_slots
        self.shared: set[int] = set()   # slots whose delta is a view of the LM head's arena bytes

    def load(self, slot: int, enc: EncodedTensor | None, extra: torch.Tensor | None,
             shared: bool = False) -> None:
        """shared: enc's tensors already live on the device (a view of another buffer: a tied
        LM head's arena segment); they are used as they are and not counted here."""
        self.shared.discard(slot)
        if shared and enc is not None:
            self.deltas[slot] = enc
            self.shared.add(slot)
        elif enc is None:
            self.deltas[slot] = None
        elif self.expand and enc.layout != "hash_groupwise":
            self.deltas[slot] = decode(enc).to(self.device, self.dtype)
        else:  # as on disk (flat or row-packed): decode_rows reads either
            self.deltas[slot] = EncodedTensor(enc.layout, enc.shape, enc.params,
                                              {k: v.to(self.device) for k, v in enc.tensors.items()})
        self.extra[slot] = extra.to(self.device, self.dtype) if extra is not None else None

    def clear(self, slot: int) -> None:
        self.deltas[slot] = None
        self.extra[slot] = None
        self.shared.discard(slot)

    def loaded(self, slot: int) -> bool:
        return self.deltas[slot] is not None or self.extra[slot] is not None

    def slot_bytes(self, slot: int) -> int:
        d, ex = self.deltas[slot], self.extra[slot]
        n = 0 if d is None or slot in self.shared else (d.numel() * d.element_size() if isinstance(d, torch.Tensor)
                                 else d.nbytes())
        return n + (0 if ex is None else ex.numel() * ex.element_size())

    def add_to(self, out: torch.Tensor, ids: torch.Tensor, groups) -> None:
        """out[t] += delta_slot(t)[ids[t]] for the tokens of each (slot, token indices)."""
        for slot, idx in groups:
            if not self.loaded(slot):
                continue
            idx = idx.to(out.device)
            tok = ids.index_select(0, idx)
            base_rows = tok < self.vocab
            d = self.deltas[slot]
            add = torch.zeros(len(idx), self.dim, dtype=torch.float32, device=out.device)
            if d is not None and bool(base_rows.any()):
                sel = base_rows.nonzero().squeeze(1)
                rows = d.index_select(0, tok[sel]) if isinstance(d, torch.Tensor) \
                    else decode_rows(d, tok[sel])
                add.index_copy_(0, sel, rows.float())
            ex = self.extra[slot]
            if ex is not None and not bool(base_rows.all()):
                sel = (~base_rows).nonzero().squeeze(1)
                add.index_copy_(0, sel, ex.index_select(0, tok[sel] - self.vocab).float())
            out.index_add_(0, idx, add.to(out.dtype))


class _Wrapper(nn.Module):
    """A module standing in for `self.base`: unknown attributes are the base's."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base, name)


class DeltaEmbedding(_Wrapper):
    """Input embedding + the fine-tune's embedding delta for its tokens."""

    def __init__(self, base: nn.Module, slots: EmbeddingSlots, ctx: DeltaContext):
        super().__init__()
        self.base = base
        self.delta_slots = slots
        self.ctx = ctx


    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        vocab = self.delta_slots.vocab
        extended = bool((input_ids >= vocab).any()) if ctx.active else False
        out = self.base(input_ids.clamp(max=vocab - 1) if extended else input_ids)
        meta = ctx.token_meta
        if meta is None:
            return out
        o2 = _rows_2d(out)
        ids = input_ids.reshape(-1)
        if extended:  # rows the base lacks: only the extra rows of the token's fine-tune
            o2[:ids.shape[0]][ids >= vocab] = 0
        self.delta_slots.add_to(o2, ids, meta.groups)
        return out


class DeltaRMSNorm(_Wrapper):
    """RMSNorm whose weight is w + dw_slot(t): base output + x_hat * dw for delta tokens."""

    def __init__(self, base: nn.Module, slots: VectorSlots, ctx: DeltaContext):
        super().__init__()
        self.base = base
        self.delta_slots = slots
        self.ctx = ctx
        self.eps = getattr(base, "variance_epsilon", getattr(base, "eps", 1e-6))


    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        ctx = self.ctx
        active = ctx.token_meta is not None and self.delta_slots.any_in(ctx.step_slots)
        # the fused add+norm may overwrite x in place, and returns the sum as the residual
        res = self.base(x, residual) if residual is not None else self.base(x)
        if not active:
            return res
        out = res[0] if isinstance(res, tuple) else res
        x_in = res[1] if residual is not None else x
        n = ctx.token_meta.num_tokens
        xf = _token_rows(x_in, n)[:n].float()
        x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        o3 = _token_rows(out, n)
        o3[:n] += (x_hat * self.delta_slots.rows(ctx.token_slots)[:, None]).to(o3.dtype)
        return res


def _token_rows(t: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[tokens, rows per token, width] view of a norm's input or output: per-head norms
    (Qwen3's q/k norm) get [tokens, heads, head_dim], the others [tokens, width] or, with
    a leading batch of one (vLLM's Transformers backend), [1, tokens, width]."""
    if t.dim() > 2 and t.shape[0] >= n_tokens:
        return t.reshape(t.shape[0], -1, t.shape[-1])
    return t.reshape(-1, 1, t.shape[-1])
