"""The delta layers of one served model and their per-slot stores (a part of
DeltaModelManager: wrapping the model, loading / clearing one slot in every layer,
counting a slot's bytes).

Every store is written through the manager's DeviceStager (pinned copies on a side
stream, waited for on the device before the step's forward: kernels/staging.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .. import vllm_compat
from ..kernels import DeltaSlots
from .layers import (DeltaEmbedding, DeltaLinearMethod, DeltaLMHeadMethod, DeltaRMSNorm,
                     ExtraRows, HeadExtras, HostEmbeddingDeltas, VectorSlots)
from .loaded import LoadedDelta


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class LayerStores:
    """Mixin of DeltaModelManager (uses its model, targets, backend, ctx, stager, arena)."""

    def _slots(self, in_features: int, sizes: list[int], target=None,
               lowrank: bool = False) -> DeltaSlots:
        """lowrank: the LM head's and the embedding's slots, which keep a low-rank delta as
        its factors (the compressor stores those two as rank r where that beats its codes)."""
        base_weight = None
        if getattr(self.backend, "strategy", None) == "merged":
            base_weight = self._base_reader(target)
        return self.backend.make_slots(self.n_slots, in_features, sizes, device=self.device,
                                       arena=self.arena, base_weight=base_weight,
                                       dtype=self.dtype, lowrank=lowrank)

    def _base_reader(self, target):
        """A callable reading this rank's base weight of a linear target from the checkpoint
        (vLLM has repacked its own copy for oneDNN and dropped the plain weight), for the
        CPU path's "merged" strategy; None where that is not possible (quantized base,
        no local checkpoint): the target then uses "dense"."""
        if target is None or self.base is None:
            return None
        inner = getattr(target.module, "quant_method", None)
        if type(inner).__name__ != "UnquantizedLinearMethod":
            return None
        names = [s.hf_name for s in target.slices]
        if any(self.targets.rename(n) != n or n not in self.base.tensors for n in names):
            return None
        base, dtype = self.base, self.dtype

        def read():
            parts = []
            for sl in target.slices:
                w = base.get(sl.hf_name)[sl.rows[0]:sl.rows[1]]
                if target.cols is not None:
                    w = w[:, target.cols[0]:target.cols[1]]
                parts.append(w)
            return torch.cat(parts, 0).to(dtype)
        return read

    def _vector_dtype(self) -> torch.dtype:
        # norm/bias deltas: float32 on the host; bf16 in device memory, where resident bytes
        # per fine-tune are the budget (their int2-int8 codes lose nothing in bf16)
        return torch.bfloat16 if self.backend.kernel_layout and self.device.type != "cpu" \
            else torch.float32

    def _wrap(self) -> None:
        t, ctx, be = self.targets, self.ctx, self.backend
        self.linear_slots: dict[str, DeltaSlots] = {}
        self.bias_slots: dict[str, VectorSlots] = {}
        for name, lt in t.linears.items():
            slots = self._slots(lt.in_features, lt.slice_sizes, lt)
            bias = None
            if getattr(lt.module, "bias", None) is not None:
                bias = VectorSlots(self.n_slots, sum(lt.slice_sizes), self.device,
                                   self._vector_dtype())
                self.bias_slots[name] = bias
            row_parallel = lt.cols is not None
            on_rank = not row_parallel or getattr(lt.module, "tp_rank", 0) == 0
            lt.module.quant_method = DeltaLinearMethod(lt.module.quant_method, slots, ctx, be,
                                                       bias, on_rank, layer=lt.module)
            self.linear_slots[name] = slots
        self.norm_slots: dict[str, VectorSlots] = {}
        batch_leading = vllm_compat.adds_batch_dim(self.model)
        for name, nt in t.norms.items():
            vs = VectorSlots(self.n_slots, nt.size, self.device, self._vector_dtype())
            _replace_submodule(self.model, name, DeltaRMSNorm(nt.module, vs, ctx, batch_leading))
            self.norm_slots[name] = vs
        extended = bool(self.vocab_size and self.base_vocab and self.vocab_size > self.base_vocab)
        self.head_slots = None
        self.head_extras = None
        if t.lm_head is not None:
            h = t.lm_head
            base_rows = (h.rows[0], min(h.rows[1], self.base_vocab or h.rows[1]))
            real = max(0, base_rows[1] - base_rows[0])
            sizes = [real] + ([h.local_width - real] if h.local_width > real else [])
            self.head_slots = self._slots(h.dim, sizes, lowrank=True)
            if extended:
                self.head_extras = HeadExtras(self.n_slots, self.base_vocab, h.rows, h.dim,
                                              self.device, self.dtype)
            h.module.quant_method = DeltaLMHeadMethod(h.module.quant_method, self.head_slots,
                                                      ctx, be, self.head_extras)
            if self.head_extras is not None and t.logits_processor is not None \
                    and vllm_compat.logits_soft_cap(t.logits_processor) is not None:
                # added tokens masked again after the processor's soft-capping (Gemma-2)
                extras = self.head_extras
                t.logits_processor.register_forward_hook(
                    lambda _mod, _args, logits: extras.remask(logits))
        self.embedding_store = None
        self.embedding_extras = None
        self.embedding_reads_head = False
        if t.embedding is not None:
            e = t.embedding
            vocab = self.base_vocab or e.vocab
            h = t.lm_head
            if be.kernel_layout:
                # tied and this rank holds every row: read the LM head's segments (one copy)
                self.embedding_reads_head = (h is not None and h.name == e.name
                                             and h.rows[0] == 0 and h.rows[1] >= vocab)
                self.embedding_store = (self.head_slots if self.embedding_reads_head
                                        else self._slots(e.dim, [vocab], lowrank=True))
            else:
                self.embedding_store = HostEmbeddingDeltas(self.n_slots, vocab, e.dim, self.dtype)
            if extended:
                self.embedding_extras = ExtraRows(self.n_slots, vocab, self.vocab_size - vocab,
                                                  e.dim, self.device, self.dtype)
            _replace_submodule(self.model, e.name,
                               DeltaEmbedding(e.module, self.embedding_store, ctx, be, vocab,
                                              self.embedding_extras))

    def _wrap_compute_logits(self) -> None:
        """The LM head must know which rows each logits call holds (sampled rows, or a slice
        of the step's token rows for prompt logprobs): vLLM's runners call
        model.compute_logits(hidden_states[...]); wrap it to tell the DeltaContext."""
        fn = getattr(self.model, "compute_logits", None)
        if fn is None or getattr(fn, "_deltadq", False):
            return
        ctx = self.ctx

        @functools.wraps(fn)
        def compute_logits(hidden_states, *args, **kwargs):
            with ctx.logits_call(hidden_states):
                return fn(hidden_states, *args, **kwargs)

        compute_logits._deltadq = True
        self.model.compute_logits = compute_logits
        forward = self.model.forward

        @functools.wraps(forward)
        def forward_noting_hidden_states(*args, **kwargs):
            out = forward(*args, **kwargs)
            ctx.note_hidden_states(out)
            return out

        forward_noting_hidden_states._deltadq = True
        self.model.forward = forward_noting_hidden_states

    # ------------------------------------------------------------------ slots

    def _load_slot(self, slot: int, d: LoadedDelta) -> None:
        st = self.stager
        for name, slots in self.linear_slots.items():
            encs = d.linears.get(name)
            if encs is None:
                if slots.is_loaded(slot):
                    slots.clear(slot, st)
            else:
                slots.load(slot, encs, st)
        for name, vs in self.bias_slots.items():
            b = d.biases.get(name)
            vs.load(slot, torch.cat([x if x is not None else torch.zeros(n) for x, n in
                                     zip(b, self.targets.linears[name].slice_sizes)])
                    if b is not None else None, st)
        for name, vs in self.norm_slots.items():
            vs.load(slot, d.norms.get(name), st)
        if self.head_slots is not None:
            if d.lm_head is None:
                self.head_slots.clear(slot, st)
            else:
                self.head_slots.load(slot, [d.lm_head] + [None] * (self.head_slots.n_slices - 1),
                                     st)
            if self.head_extras is not None:
                self.head_extras.load(slot, d.lm_head_extra, st)
        self._load_embedding(slot, d)

    def _load_embedding(self, slot: int, d: LoadedDelta) -> None:
        store, st = self.embedding_store, self.stager
        if store is None:
            return
        if self.embedding_extras is not None:
            self.embedding_extras.load(slot, d.embedding_extra, st)
        if self.embedding_reads_head:
            if d.embedding is not None and d.embedding is not d.lm_head:
                raise RuntimeError(f"deltadq: fine-tune {d.name!r} changes the tied embedding "
                                   "and LM head differently; this server reads one for both")
            return
        if isinstance(store, DeltaSlots):
            if d.embedding is None:
                store.clear(slot, st)
            else:
                store.load(slot, [d.embedding], st)
        else:
            store.load(slot, d.embedding)

    def _compact(self) -> None:
        with self.stager.ordered():
            self.arena.compact()

    def _clear_slot(self, slot: int) -> None:
        st = self.stager
        for slots in list(self.linear_slots.values()) + ([self.head_slots] if self.head_slots else []):
            if slots.is_loaded(slot):
                slots.clear(slot, st)
        for vs in list(self.bias_slots.values()) + list(self.norm_slots.values()):
            vs.clear(slot, st)
        store = self.embedding_store
        if store is not None and store is not self.head_slots:
            if isinstance(store, DeltaSlots):
                if store.is_loaded(slot):
                    store.clear(slot, st)
            else:
                store.clear(slot)
        for ex in (self.embedding_extras, self.head_extras):
            if ex is not None:
                ex.clear(slot, st)

    def _kernel_encs(self, d: LoadedDelta):
        """(slots, per-slice encodings) of d in every layer (with an arena, every layer's
        slots use it)."""
        for name, slots in self.linear_slots.items():
            encs = d.linears.get(name)
            if encs is not None:
                yield slots, encs
        if self.head_slots is not None and d.lm_head is not None:
            yield self.head_slots, [d.lm_head] + [None] * (self.head_slots.n_slices - 1)
        store = self.embedding_store
        if isinstance(store, DeltaSlots) and not self.embedding_reads_head \
                and d.embedding is not None:
            yield store, [d.embedding]

    def device_bytes(self, slot: int) -> int:
        """Bytes the delta in `slot` occupies: its arena segments (or CPU expansions' source),
        its norm/bias vectors, its embedding delta and extra rows (shared units tables and
        metadata excluded)."""
        n = sum(s.slot_bytes(slot) for s in self.linear_slots.values())
        if self.head_slots is not None:
            n += self.head_slots.slot_bytes(slot)
        for vs in list(self.bias_slots.values()) + list(self.norm_slots.values()):
            n += vs.slot_bytes(slot)
        store = self.embedding_store
        if store is not None and store is not self.head_slots:
            n += store.slot_bytes(slot)
        for ex in (self.embedding_extras, self.head_extras):
            if ex is not None:
                n += ex.slot_bytes(slot) if hasattr(ex, "slot_bytes") else 0
        return n
