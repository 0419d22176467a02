"""Slots and caches of deltas on one worker (the counterpart of vLLM's LoRAModelManager).

Two LRU levels, exactly as vLLM manages LoRA adapters:

* registered deltas: host copies (compressed; `max_cpu_loras`, set with
  `--max-cpu-deltas`), loaded from disk once;
* active deltas: the `max_loras` *slots* (`--max-deltas-per-batch`) every wrapped
  layer holds; a step's requests may use at most that many distinct fine-tunes
  (vLLM's scheduler enforces the cap), and activating a delta into a full set of
  slots evicts the least recently used one that the step does not need.

The token -> fine-tune mapping of every step arrives through `set_adapter_mapping`
(vLLM's LoRAMapping: adapter ids per token and per sampled row) and is turned once
into slot ids and grouped metadata in the shared DeltaContext.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn as nn

from ..kernels import DeltaSlots
from ..kernels.arena import ArenaFull, DeltaArena
from ..kernels.slots import row_bytes_for_ratio, slot_capacity_bytes, units_packed
from .layers import (DeltaContext, DeltaEmbedding, DeltaLinearMethod, DeltaLMHeadMethod,
                     DeltaRMSNorm, EmbeddingSlots, HeadExtras, VectorSlots)
from .loaded import LoadedDelta, empty_delta
from .targets import find_targets

log = logging.getLogger("deltadq")


def _open_base(base_dir):
    import os

    from ..checkpoint import Checkpoint
    from ..errors import DeltaDQError

    if not base_dir or not os.path.isdir(base_dir):
        return None
    try:
        return Checkpoint(base_dir, "served base")
    except DeltaDQError:
        return None


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class DeltaModelManager:
    def __init__(self, model: nn.Module, *, n_slots: int, capacity: int, device: torch.device,
                 settings: dict, base_dir: str | None = None):
        self.model = model
        self.n_slots = n_slots
        self.capacity = max(capacity, n_slots)
        self.device = torch.device(device)
        self.settings = settings
        self.cpu = self.device.type == "cpu"
        self.base = _open_base(base_dir) if self.cpu else None
        self.dtype = _param_dtype(model)
        self.targets = find_targets(model)
        self.ctx = DeltaContext(n_slots, self.device)
        self.registered: OrderedDict[int, LoadedDelta] = OrderedDict()
        self.active: OrderedDict[int, int] = OrderedDict()       # id -> slot (LRU order)
        self.slot_ids: list[int | None] = [None] * n_slots
        self.pinned: set[int] = set()
        self.protected: set[int] = set()   # ids the current step needs: never evicted for room
        # GPU: one arena holds the compressed bytes of every resident delta, all layers
        # (on a CPU too when cpu_strategy is None: the kernels' layout, for tests)
        kernel_slots = not self.cpu or settings.get("cpu_strategy", "dense") is None
        self.arena = DeltaArena(self._arena_bytes(), self.device) if kernel_slots else None
        self._wrap()
        strategies: dict[str, int] = {}
        for sl in self.linear_slots.values():
            strategies[str(sl.cpu_strategy)] = strategies.get(str(sl.cpu_strategy), 0) + 1
        log.info("deltadq: %d slots on %s, targets: %s; linear layers by CPU strategy: %s",
                 n_slots, self.device, self.targets.describe(), strategies)
        if self.arena is not None:
            log.info("deltadq: delta arena of %.1f MiB on %s for the compressed deltas of "
                     "every resident fine-tune (--delta-arena-mb)",
                     self.arena.capacity_bytes / 2 ** 20, self.device)

    # ------------------------------------------------------------------ wrapping

    def _slots(self, in_features: int, sizes: list[int], target=None) -> DeltaSlots:
        s = self.settings
        strategy = s.get("cpu_strategy", "dense") if self.cpu else None
        base_weight = None
        if strategy == "merged":
            base_weight = self._base_reader(target)
            if base_weight is None:
                strategy = "dense"
        return DeltaSlots(self.n_slots, in_features, sizes, device=self.device,
                          min_ratio=float(s.get("min_ratio", 8.0)), cpu_strategy=strategy,
                          cpu_dtype=self.dtype, base_weight=base_weight, arena=self.arena)

    def _arena_bytes(self) -> int:
        """--delta-arena-mb, else room for n_slots deltas of >= --delta-min-ratio x."""
        mb = self.settings.get("arena_mb")
        if mb:
            return int(float(mb) * 2 ** 20)
        ratio = float(self.settings.get("min_ratio", 8.0))
        layers = [(lt.in_features, lt.slice_sizes) for lt in self.targets.linears.values()]
        if self.targets.lm_head is not None:
            layers.append((self.targets.lm_head.dim, [self.targets.lm_head.local_width]))
        return self.n_slots * sum(slot_capacity_bytes(i, s, row_bytes_for_ratio(i, ratio))
                                  for i, s in layers)

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
        # norm/bias deltas: float32 on the host; bf16 on a GPU, where resident bytes per
        # fine-tune are the budget (their int2-int8 codes lose nothing in bf16)
        return torch.float32 if self.cpu else torch.bfloat16

    def _wrap(self) -> None:
        t = self.targets
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
            lt.module.quant_method = DeltaLinearMethod(lt.module.quant_method, slots, self.ctx,
                                                       bias, on_rank)
            self.linear_slots[name] = slots
        self.norm_slots: dict[str, VectorSlots] = {}
        for name, nt in t.norms.items():
            vs = VectorSlots(self.n_slots, nt.size, self.device, self._vector_dtype())
            _replace_submodule(self.model, name, DeltaRMSNorm(nt.module, vs, self.ctx))
            self.norm_slots[name] = vs
        # vocabulary of the base checkpoint; the server's may be larger (fine-tunes that
        # add tokens, engine_flags._extend_vocab)
        self.base_vocab = int(self.settings.get("base_vocab") or 0) or None
        self.vocab_size = int(self.settings.get("vocab_size") or 0) or None
        self.embedding_slots = None
        if t.embedding is not None:
            e = t.embedding
            self.embedding_slots = EmbeddingSlots(self.n_slots, self.base_vocab or e.vocab, e.dim,
                                                  self.device, self.dtype, expand=self.cpu)
            _replace_submodule(self.model, e.name,
                               DeltaEmbedding(e.module, self.embedding_slots, self.ctx))
        self.head_slots = None
        self.head_extras = None
        if t.lm_head is not None:
            h = t.lm_head
            base_rows = (h.rows[0], min(h.rows[1], self.base_vocab or h.rows[1]))
            real = max(0, base_rows[1] - base_rows[0])
            sizes = [real] + ([h.local_width - real] if h.local_width > real else [])
            self.head_slots = self._slots(h.dim, sizes)
            if self.vocab_size and self.base_vocab and self.vocab_size > self.base_vocab:
                self.head_extras = HeadExtras(self.n_slots, self.base_vocab, h.rows, self.device,
                                              self.dtype)
            h.module.quant_method = DeltaLMHeadMethod(h.module.quant_method, self.head_slots,
                                                      self.ctx, self.head_extras)
            if self.head_extras is not None and t.logits_processor is not None:
                extras, ctx = self.head_extras, self.ctx
                t.logits_processor.register_forward_hook(
                    lambda _mod, _args, logits: extras.remask(logits, ctx))

    # ------------------------------------------------------------------ slots

    def _load_slot(self, slot: int, d: LoadedDelta) -> None:
        for name, slots in self.linear_slots.items():
            encs = d.linears.get(name)
            if encs is None:
                if slots.is_loaded(slot):
                    slots.clear(slot)
            else:
                slots.load(slot, encs)
        for name, vs in self.bias_slots.items():
            b = d.biases.get(name)
            vs.load(slot, torch.cat([x if x is not None else torch.zeros(n) for x, n in
                                     zip(b, self.targets.linears[name].slice_sizes)])
                    if b is not None else None)
        for name, vs in self.norm_slots.items():
            vs.load(slot, d.norms.get(name))
        if self.head_slots is not None:
            if d.lm_head is None:
                self.head_slots.clear(slot)
            else:
                encs = [d.lm_head] + [None] * (self.head_slots.n_slices - 1)
                self.head_slots.load(slot, encs)
            if self.head_extras is not None:
                self.head_extras.load(slot, d.lm_head_extra)
        self._load_embedding(slot, d)

    def _load_embedding(self, slot: int, d: LoadedDelta) -> None:
        if self.embedding_slots is None:
            return
        view = None
        if d.embedding is not None and d.embedding is d.lm_head and self.head_slots is not None:
            view = self.head_slots.arena_view(slot, 0)   # tied: one copy on the device
        if view is not None:
            self.embedding_slots.load(slot, view, d.embedding_extra, shared=True)
        else:
            self.embedding_slots.load(slot, d.embedding, d.embedding_extra)

    def _compact(self) -> None:
        self.arena.compact()
        if self.embedding_slots is not None:  # tied embeddings view segments that moved
            for s in list(self.embedding_slots.shared):
                self._load_embedding(s, self.registered[self.slot_ids[s]])

    def _clear_slot(self, slot: int) -> None:
        for slots in list(self.linear_slots.values()) + ([self.head_slots] if self.head_slots else []):
            if slots.is_loaded(slot):
                slots.clear(slot)
        for vs in list(self.bias_slots.values()) + list(self.norm_slots.values()):
            vs.clear(slot)
        if self.embedding_slots is not None:
            self.embedding_slots.clear(slot)
        if self.head_slots is not None and self.head_extras is not None:
            self.head_extras.clear(slot)

    # ------------------------------------------------------------------ LoRA-manager API

    @property
    def lora_slots(self) -> int:
        return self.n_slots

    adapter_slots = lora_slots

    def __len__(self) -> int:
        return len(self.registered)

    def list_adapters(self) -> dict[int, LoadedDelta]:
        return dict(self.registered)

    def get_adapter(self, adapter_id: int) -> LoadedDelta | None:
        return self.registered.get(adapter_id)

    def add_adapter(self, adapter_id: int, delta: LoadedDelta) -> bool:
        if adapter_id in self.registered:
            self.registered.move_to_end(adapter_id)
            return False
        self.registered[adapter_id] = delta
        return True

    def remove_oldest_adapter(self) -> bool:
        for aid in self.registered:
            if aid not in self.pinned and aid not in self.active:
                self.remove_adapter(aid)
                return True
        for aid in self.registered:
            if aid not in self.pinned:
                self.remove_adapter(aid)
                return True
        return False

    def activate_adapter(self, adapter_id: int) -> bool:
        if adapter_id in self.active:
            self.active.move_to_end(adapter_id)
            self.registered.move_to_end(adapter_id)
            return False
        delta = self.registered[adapter_id]
        free = [s for s, a in enumerate(self.slot_ids) if a is None]
        if free:
            slot = free[0]
        else:
            victim = self._victim(adapter_id)
            if victim is None:
                raise RuntimeError("deltadq: every slot is pinned or used by this step; "
                                   "cannot activate another delta")
            slot = self.active[victim]
            self.deactivate_adapter(victim)
        if self.arena is not None:
            self._make_room(adapter_id, delta)
        try:
            self._load_slot(slot, delta)
        except ArenaFull:  # enough free bytes, but fragmented
            self._clear_slot(slot)
            self._compact()
            self._load_slot(slot, delta)
        self.slot_ids[slot] = adapter_id
        self.active[adapter_id] = slot
        self.registered.move_to_end(adapter_id)
        return True

    def _victim(self, adapter_id: int) -> int | None:
        """Least recently used active delta that is not pinned and not needed by this step."""
        return next((a for a in self.active if a not in self.pinned and a not in self.protected
                     and a != adapter_id), None)

    def arena_words(self, d: LoadedDelta) -> list[int]:
        """Arena allocations (words) loading delta d needs: its segment in every layer, and
        the units tables of group sizes the arena does not hold yet."""
        need, groups = [], set()
        for slots, encs in self._kernel_encs(d):
            need += slots.segment_words(encs)
            groups |= {e.params["group_size"] for e in encs
                       if e is not None and e.layout == "hash_groupwise"}
        return need + [len(units_packed(g)) for g in sorted(groups - self.arena.group_sizes())]

    def _kernel_encs(self, d: LoadedDelta):
        """(slots, per-slice encodings) of d in every layer (with an arena, every layer's
        slots use it)."""
        for name, slots in self.linear_slots.items():
            encs = d.linears.get(name)
            if encs is not None:
                yield slots, encs
        if self.head_slots is not None and d.lm_head is not None:
            yield self.head_slots, [d.lm_head] + [None] * (self.head_slots.n_slices - 1)

    def _make_room(self, adapter_id: int, d: LoadedDelta) -> None:
        """Evict least recently used deltas until d's bytes fit in the arena."""
        while not self.arena.fits(need := self.arena_words(d)):
            victim = self._victim(adapter_id)
            if victim is None:
                mb = sum(need) * 4 / 2 ** 20
                raise RuntimeError(
                    f"deltadq: fine-tune {d.name!r} needs {mb:.1f} MiB of delta memory; "
                    f"{self.arena.free_bytes / 2 ** 20:.1f} of "
                    f"{self.arena.capacity_bytes / 2 ** 20:.1f} MiB are free and the other "
                    "resident deltas are pinned or used by this step: raise --delta-arena-mb "
                    "or lower --max-deltas")
            self.deactivate_adapter(victim)

    def deactivate_adapter(self, adapter_id: int) -> bool:
        slot = self.active.pop(adapter_id, None)
        if slot is None:
            return False
        self._clear_slot(slot)
        self.slot_ids[slot] = None
        return True

    def remove_adapter(self, adapter_id: int) -> bool:
        self.deactivate_adapter(adapter_id)
        self.pinned.discard(adapter_id)
        return self.registered.pop(adapter_id, None) is not None

    def remove_all_adapters(self) -> None:
        for aid in list(self.registered):
            self.remove_adapter(aid)

    def pin_adapter(self, adapter_id: int) -> bool:
        if adapter_id not in self.registered:
            raise ValueError(f"delta {adapter_id} is not loaded")
        self.pinned.add(adapter_id)
        self.activate_adapter(adapter_id)
        return True

    def set_adapter_mapping(self, mapping) -> None:
        """vLLM's LoRAMapping (adapter id per token / per sampled row, 0 = none) -> slots."""
        slot_of = self.active

        def slots(ids):
            return [slot_of.get(i, -1) if i > 0 else -1 for i in ids]

        self.ctx.set(slots(mapping.index_mapping), slots(mapping.prompt_mapping))

    def create_dummy(self, adapter_id: int) -> LoadedDelta:
        return empty_delta(f"warmup_{adapter_id}")

    # ------------------------------------------------------------------ accounting

    def resident_bytes(self) -> dict:
        host = sum(d.nbytes() for d in self.registered.values())
        slots = sum(s.nbytes() for s in self.linear_slots.values())
        if self.head_slots is not None:
            slots += self.head_slots.nbytes()
        out = {"registered_host_bytes": host, "slot_buffer_bytes": slots}
        if self.arena is not None:
            out.update(arena_capacity_bytes=self.arena.capacity_bytes,
                       arena_used_bytes=self.arena.used_bytes,
                       arena_units_bytes=self.arena.units_bytes(),
                       device_bytes_per_delta={str(a): self.device_bytes(s)
                                               for a, s in self.active.items()})
        return out

    def device_bytes(self, slot: int) -> int:
        """Device bytes the delta in `slot` occupies: its arena segments, its norm/bias
        vectors and its compressed embedding (shared units tables and metadata excluded)."""
        n = sum(s.slot_bytes(slot) for s in self.linear_slots.values())
        if self.head_slots is not None:
            n += self.head_slots.slot_bytes(slot)
        for vs in list(self.bias_slots.values()) + list(self.norm_slots.values()):
            if slot in vs.loaded:
                n += vs.buf[slot].numel() * vs.buf.element_size()
        if self.embedding_slots is not None:
            n += self.embedding_slots.slot_bytes(slot)
        return n
