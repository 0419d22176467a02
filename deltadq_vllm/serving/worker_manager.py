"""The worker-side adapter manager vLLM's model runner talks to, serving deltas.

vLLM's model runner creates its adapter manager through one module global
(vllm_compat.install_worker_manager_factory); `make_worker_manager` returns this
class when the engine was started with deltas (`additional_config["deltadq"]`) and
vLLM's own LoRA manager otherwise, so installing the plugin never changes plain
LoRA serving. The methods are the ones the runner calls on
LRUCacheWorkerLoRAManager; a LoRARequest carries a delta: `lora_int_id` is the
delta id (one per load), `lora_path` its resolved artifact directory stamped with the
manifest digest the API process checked (artifact_files.stamp).

Every read of an artifact, first load or re-read after eviction, goes through the same
checks (ArtifactFiles: resolved path, no symlinks, checksums, the stamped digest; then
the base check and the vocabulary check). Reads happen only when the engine core
admits a request or loads an adapter (`admit`, called through admission.py), never
inside a step: deltas that unfinished requests need are never evicted from host
memory, so a file that changed or vanished fails the requests that ask for it, not
the engine.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from .. import vllm_compat
from ..architectures import check_architecture
from ..format.artifact_files import parse_stamp
from ..errors import DeltaDQError
from .loaded import load_delta
from .model_manager import DeltaModelManager
from .residency import DeltaEvents, residency

log = logging.getLogger("deltadq")
CONFIG_KEY = "deltadq"
_current: "DeltaWorkerManager | None" = None   # this process's manager (admission RPCs)


def deltadq_settings(vllm_config) -> dict | None:
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict):
        return None
    s = extra.get(CONFIG_KEY)
    return s if isinstance(s, dict) else None


def make_worker_manager(vllm_config, device, embedding_modules, *args, **kwargs):
    """Factory installed in place of LRUCacheWorkerLoRAManager."""
    settings = deltadq_settings(vllm_config)
    if settings is None:
        return vllm_compat.original_worker_manager_cls()(vllm_config, device, embedding_modules,
                                                         *args, **kwargs)
    return DeltaWorkerManager(vllm_config, device, settings)


def routing_rows(vllm_config) -> int | None:
    """Rows of the per-step routing buffers: the most rows a forward or a sampler call of
    this engine can have (max_num_batched_tokens, max_num_seqs, the largest CUDA-graph
    capture size)."""
    sched = getattr(vllm_config, "scheduler_config", None)
    comp = getattr(vllm_config, "compilation_config", None)
    sizes = [getattr(sched, "max_num_batched_tokens", 0), getattr(sched, "max_num_seqs", 0),
             getattr(comp, "max_cudagraph_capture_size", 0),
             max(getattr(comp, "cudagraph_capture_sizes", None) or [0])]
    return max(int(x or 0) for x in sizes) or None


class DeltaWorkerManager:
    def __init__(self, vllm_config, device, settings: dict):
        self.vllm_config = vllm_config
        self.device = torch.device(device)
        self.settings = settings
        lora = vllm_config.lora_config
        self.max_loras = lora.max_loras
        self.max_cpu_loras = lora.max_cpu_loras or lora.max_loras
        model = vllm_config.model_config.model
        # refused here too: `vllm serve --delta-modules` (vllm 0.33) skips deltadq serve's check
        # (vLLM's ModelConfig always lists them; stand-in configs of unit tests may not)
        archs = getattr(vllm_config.model_config, "architectures", None)
        if archs is not None:
            check_architecture(archs, f"the base model {model}")
        self.base_dir = model if settings.get("check_base", True) else None
        self._manager: DeltaModelManager | None = None
        self.in_use: set[int] = set()    # adapter ids unfinished requests need (engine core)
        self.retired: set[int] = set()   # unloaded, kept until their requests finish
        self._over_capacity_logged = False
        self.events = DeltaEvents()   # loads / evictions per fine-tune (metrics)
        global _current
        _current = self

    # ------------------------------------------------------------------ setup

    @property
    def is_enabled(self) -> bool:
        return True

    def create_lora_manager(self, model: torch.nn.Module, vllm_config=None):
        rows = routing_rows(self.vllm_config)
        self._manager = DeltaModelManager(model, n_slots=self.max_loras,
                                          capacity=self.max_cpu_loras, device=self.device,
                                          settings=self.settings,
                                          base_dir=self.vllm_config.model_config.model,
                                          max_tokens=rows, max_rows=rows)
        return model

    @property
    def manager(self) -> DeltaModelManager:
        if self._manager is None:
            raise RuntimeError("deltadq: create_lora_manager was not called")
        return self._manager

    def supports_tower_connector_lora(self) -> bool:
        return False

    # ------------------------------------------------------------------ adapters

    def _load(self, request):
        t0 = time.perf_counter()
        m = self.manager
        path, digest = parse_stamp(request.lora_path)
        if digest is None:
            raise DeltaDQError(
                f"adapter {request.lora_name!r} ({path}) was not loaded through deltadq, "
                "whose API server checks every delta before the engine reads it",
                "load fine-tunes with --delta-modules or POST /v1/load_delta")
        d = load_delta(request.lora_name, path, m.targets, self.base_dir,
                       verify_files=self.settings.get("verify_files", True),
                       expect_digest=digest)
        served = m.vocab_size or m.base_vocab
        if d.vocab_size and served and d.vocab_size > served:
            raise DeltaDQError(
                f"fine-tune {request.lora_name!r} has a vocabulary of {d.vocab_size} tokens but "
                f"this server emits {served}",
                f"restart the server with --delta-vocab-size {d.vocab_size} (or list the "
                "fine-tune in --delta-modules)")
        log.info("deltadq: loaded delta %r from %s (%.1f MB host, %.2f s)", request.lora_name,
                 path, d.nbytes() / 1e6, time.perf_counter() - t0)
        return d

    # Metrics (residency.DeltaEvents) are counted where the work happens: a host load in
    # _load_host (from admit, or the in-step fallback of add_adapter), a host eviction in
    # _evict_host (from _make_host_room), a device load and the slot evictions it causes in
    # _activate. Unloads (remove_adapter, a retired delta leaving) are not evictions.

    def _load_host(self, request):
        """Read and check `request`'s delta from disk (a host-tier load)."""
        t0 = time.perf_counter()
        delta = self._load(request)
        self.events.loaded(request.lora_name, "host", time.perf_counter() - t0)
        return delta

    def _evict_host(self, victim: int) -> None:
        m = self.manager
        if victim in self.retired:   # unloaded earlier; its last requests are done
            self.retired.discard(victim)
            m.remove_adapter(victim)
            return
        with self.events.watch_evictions(m):   # host, and its slot if it had one
            m.remove_adapter(victim)

    def _activate(self, aid: int) -> None:
        """Put adapter `aid` in a slot (a device-tier load unless it is there already)."""
        m = self.manager
        with self.events.watch_evictions(m, keep=aid):
            t0 = time.perf_counter()
            if m.activate_adapter(aid):
                self.events.loaded(m.registered[aid].name, "device", time.perf_counter() - t0)

    def _make_host_room(self, keep: set[int]) -> None:
        """Evict least recently used host copies until one more fits, never one in `keep`
        (needed by unfinished requests or this step) or pinned. When every copy is needed,
        the cache grows past --max-cpu-deltas until those requests finish (a re-read inside
        a step could fail, and a step must not)."""
        m = self.manager
        while len(m) + 1 > m.capacity:
            victim = next((a for a in m.registered
                           if a not in keep and a not in m.pinned and a not in m.protected), None)
            if victim is None:
                if not self._over_capacity_logged:
                    log.warning("deltadq: %d fine-tunes in host memory, more than "
                                "--max-cpu-deltas %d: unfinished requests need all of them",
                                len(m) + 1, m.capacity)
                    self._over_capacity_logged = True
                return
            self._evict_host(victim)

    def admit(self, request, in_use) -> dict:
        """Make adapter `request` resident in host memory (reading and checking it if it is
        not), without evicting any adapter in `in_use`. Never raises: returns
        {"error": message or None, "registered": [ids]} (called by the engine core)."""
        m = self.manager
        self.in_use = set(in_use)
        aid = request.lora_int_id
        if aid not in m.registered:
            try:
                delta = self._load_host(request)
            except (DeltaDQError, OSError, ValueError) as e:
                return {"error": f"cannot load fine-tune {request.lora_name!r}: {e}",
                        "registered": list(m.registered)}
            self._make_host_room(self.in_use | {aid})
            m.add_adapter(aid, delta)
        else:
            m.registered.move_to_end(aid)
        return {"error": None, "registered": list(m.registered)}

    def retire(self, adapter_id: int) -> None:
        """An unloaded adapter that unfinished requests still use: first to be evicted once
        they are done (removing it now would make their next step re-read it)."""
        if adapter_id in self.manager.registered:
            self.manager.registered.move_to_end(adapter_id, last=False)
            self.retired.add(adapter_id)

    def add_adapter(self, request) -> bool:
        m = self.manager
        aid = request.lora_int_id
        loaded = False
        if aid not in m.registered or getattr(request, "load_inplace", False):
            if aid not in m.registered:
                log.warning("deltadq: adapter %r (id %d) was not admitted before this step; "
                            "reading it now", request.lora_name, aid)
            try:
                delta = self._load_host(request)   # load (and validate) before evicting anything
            except DeltaDQError as e:
                raise ValueError(f"deltadq: cannot load delta {request.lora_name!r}: {e}") from None
            m.remove_adapter(aid)   # an in-place reload replaces the old copy: no eviction
            self._make_host_room(self.in_use | m.protected | {aid})
            loaded = m.add_adapter(aid, delta)
        self._activate(aid)
        return loaded

    def set_active_adapters(self, requests, mapping) -> None:
        ids = {r.lora_int_id: r for r in requests if r}
        # vLLM hands over a *set* of LoRARequests, which compare by name: two loads of one
        # name in a step (requests admitted before an unload/reload and after it) arrive as
        # one. Every id is in the mapping, and admission keeps each one resident, so the
        # others are activated by id (else their tokens would silently get no delta).
        others = set()
        if mapping is not None:
            others = {i for i in (*mapping.index_mapping, *mapping.prompt_mapping)
                      if i > 0} - set(ids)
        m = self.manager
        if len(ids) + len(others) > m.n_slots:
            raise RuntimeError(f"deltadq: {len(ids) + len(others)} fine-tunes in one step "
                               f"but only {m.n_slots} slots")
        missing = [i for i in others if i not in m.registered]
        if missing:
            raise RuntimeError(f"deltadq: adapter ids {missing} are mapped in this step but "
                               "were never admitted (no request for them was seen)")
        m.protected = set(ids) | others   # room for one is never made by evicting another
        try:
            for r in ids.values():
                self.add_adapter(r)
            for aid in others:
                self._activate(aid)
        finally:
            m.protected = set()
        if mapping is not None:
            self.manager.set_adapter_mapping(mapping)

    def remove_adapter(self, adapter_id: int) -> bool:
        self.retired.discard(adapter_id)
        return self.manager.remove_adapter(adapter_id)

    def remove_all_adapters(self) -> None:
        self.retired.clear()
        self.manager.remove_all_adapters()

    def list_adapters(self) -> set[int]:
        return set(self.manager.registered)

    def pin_adapter(self, adapter_id: int) -> bool:
        if adapter_id in self.manager.registered:
            self._activate(adapter_id)   # counted; pinning then finds it in its slot
        return self.manager.pin_adapter(adapter_id)

    # ------------------------------------------------------------------ warm-up

    @contextlib.contextmanager
    def dummy_lora_cache(self):
        yield

    def add_dummy_lora(self, request, rank: int) -> bool:
        m = self.manager
        if request.lora_int_id in m.registered:
            return False
        return m.add_adapter(request.lora_int_id, m.create_dummy(request.lora_int_id))

    def get_dummy_lora_warmup_rank(self, default_rank: int) -> int:
        return default_rank

    # ------------------------------------------------------------------ introspection

    def deltadq_stats(self) -> dict:
        m = self.manager
        return {"slots": m.n_slots, "active": {str(a): s for a, s in m.active.items()},
                "registered": [d.name for d in m.registered.values()], **m.resident_bytes(),
                "deltas": residency(m, retired=self.retired), "events": self.events.as_list()}


# ---------------------------------------------------------------------- admission RPCs
# Run on every worker through the executor's collective_rpc (admission.py); module-level
# functions, so a multi-process executor pickles them by reference.


def rpc_admit(worker, lora_request, in_use) -> dict:
    if _current is None:
        return {"error": None, "registered": None}
    return _current.admit(lora_request, in_use)


def rpc_retire(worker, adapter_id: int) -> None:
    if _current is not None:
        _current.retire(adapter_id)
