"""The worker-side adapter manager vLLM's model runner talks to, serving deltas.

vLLM's model runner creates its adapter manager through one module global
(vllm_compat.install_worker_manager_factory); `make_worker_manager` returns this
class when the engine was started with deltas (`additional_config["deltadq"]`) and
vLLM's own LoRA manager otherwise, so installing the plugin never changes plain
LoRA serving. The methods are the ones the runner calls on
LRUCacheWorkerLoRAManager; a LoRARequest carries a delta: `lora_int_id` is the
delta id, `lora_path` its artifact directory.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from .. import vllm_compat
from ..errors import DeltaDQError
from .loaded import load_delta
from .model_manager import DeltaModelManager
from .residency import DeltaEvents, residency

log = logging.getLogger("deltadq")
CONFIG_KEY = "deltadq"


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


class DeltaWorkerManager:
    def __init__(self, vllm_config, device, settings: dict):
        self.vllm_config = vllm_config
        self.device = torch.device(device)
        self.settings = settings
        lora = vllm_config.lora_config
        self.max_loras = lora.max_loras
        self.max_cpu_loras = lora.max_cpu_loras or lora.max_loras
        model = vllm_config.model_config.model
        self.base_dir = model if settings.get("check_base", True) else None
        self._manager: DeltaModelManager | None = None
        self.events = DeltaEvents()   # loads / evictions per fine-tune (metrics)

    # ------------------------------------------------------------------ setup

    @property
    def is_enabled(self) -> bool:
        return True

    def create_lora_manager(self, model: torch.nn.Module, vllm_config=None):
        self._manager = DeltaModelManager(model, n_slots=self.max_loras,
                                          capacity=self.max_cpu_loras, device=self.device,
                                          settings=self.settings,
                                          base_dir=self.vllm_config.model_config.model)
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
        d = load_delta(request.lora_name, request.lora_path, m.targets, self.base_dir,
                       verify_files=self.settings.get("verify_files", True))
        served = m.vocab_size or m.base_vocab
        if d.vocab_size and served and d.vocab_size > served:
            raise DeltaDQError(
                f"fine-tune {request.lora_name!r} has a vocabulary of {d.vocab_size} tokens but "
                f"this server emits {served}",
                f"restart the server with --delta-vocab-size {d.vocab_size} (or list the "
                "fine-tune in --delta-modules)")
        seconds = time.perf_counter() - t0
        self.events.loaded(request.lora_name, "host", seconds)
        log.info("deltadq: loaded delta %r from %s (%.1f MB host, %.2f s)", request.lora_name,
                 request.lora_path, d.nbytes() / 1e6, seconds)
        return d

    def add_adapter(self, request) -> bool:
        m = self.manager
        aid = request.lora_int_id
        loaded = False
        with self.events.watch_evictions(m, keep=aid):
            if aid not in m.registered or getattr(request, "load_inplace", False):
                try:
                    delta = self._load(request)   # load (and validate) before evicting anything
                except DeltaDQError as e:
                    raise ValueError(f"deltadq: cannot load delta {request.lora_name!r}: {e}") \
                        from None
                m.remove_adapter(aid)
                while len(m) + 1 > m.capacity and m.remove_oldest_adapter():
                    pass
                loaded = m.add_adapter(aid, delta)
            t0 = time.perf_counter()
            if m.activate_adapter(aid):
                self.events.loaded(request.lora_name, "device", time.perf_counter() - t0)
        return loaded

    def set_active_adapters(self, requests, mapping) -> None:
        ids = {r.lora_int_id: r for r in requests if r}
        if len(ids) > self.manager.n_slots:
            raise RuntimeError(f"deltadq: {len(ids)} fine-tunes in one step but only "
                               f"{self.manager.n_slots} slots")
        self.manager.protected = set(ids)   # room for one is never made by evicting another
        try:
            for r in ids.values():
                self.add_adapter(r)
        finally:
            self.manager.protected = set()
        if mapping is not None:
            self.manager.set_adapter_mapping(mapping)

    def remove_adapter(self, adapter_id: int) -> bool:
        return self.manager.remove_adapter(adapter_id)

    def remove_all_adapters(self) -> None:
        self.manager.remove_all_adapters()

    def list_adapters(self) -> set[int]:
        return set(self.manager.registered)

    def pin_adapter(self, adapter_id: int) -> bool:
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
                "deltas": residency(m), "events": self.events.as_list()}
