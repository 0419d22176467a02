"""Engine-core side of fault isolation: no delta file is read inside a step.

A step (schedule, forward, sample) that raises kills vLLM's EngineCore and with it
the server. With vLLM's LoRA plumbing alone, a delta evicted from the host cache is
re-read from disk when its next request is scheduled, inside the step: a deleted,
truncated or edited file then killed the engine (issue 11). Instead:

* `EngineCore.add_request` (engine-core process, between steps) first makes the
  request's delta resident in every worker's host cache (worker_manager.admit reads
  and checks it if needed: resolved path, no symlinks, checksums, the digest checked
  at load, the base). If that fails, only this request ends, with an error output
  (FinishReason.ERROR, HTTP 500 from vLLM's API layer; the reason is in the log); it
  never enters the scheduler.
* The workers never evict a delta that an unfinished request needs (the engine core
  passes the adapter ids of the scheduler's requests with every admission), so a
  step only activates deltas already in host memory. Over --max-cpu-deltas, the
  cache grows until those requests finish.
* `EngineCore.add_lora` (runtime and static loads) goes through the same admission;
  `EngineCore.remove_lora` of a delta that unfinished requests still use only marks it
  first-to-evict, so they finish with the load they started with.

The engine core mirrors which adapters the workers hold (every eviction happens in
one of these calls), so a request for a resident delta costs a set lookup.
The API process answers most file faults earlier and more clearly (409, tokenizers.py).
"""

from __future__ import annotations

import logging

from .. import vllm_compat
from .worker_manager import deltadq_settings, rpc_admit, rpc_retire

log = logging.getLogger("deltadq")
_STATE = "_deltadq_resident"


def _enabled(core) -> bool:
    return deltadq_settings(getattr(core, "vllm_config", None)) is not None


def _resident(core) -> set[int]:
    s = getattr(core, _STATE, None)
    if s is None:
        s = set()
        setattr(core, _STATE, s)
    return s


def admit(core, lora_request) -> str | None:
    """Make `lora_request` resident on every worker; an error message, or None."""
    resident = _resident(core)
    if lora_request.lora_int_id in resident:
        return None
    in_use = sorted(vllm_compat.engine_lora_ids_in_use(core))
    try:
        results = vllm_compat.run_on_workers(core, rpc_admit, lora_request, in_use)
    except Exception as e:  # an RPC failure: fail this request, not the engine
        return f"cannot load fine-tune {lora_request.lora_name!r}: {e}"
    errors = [r["error"] for r in results if r and r.get("error")]
    registered = next((r["registered"] for r in results if r and r.get("registered")
                       is not None), None)
    resident.clear()
    if registered is not None:
        resident.update(registered)
    return errors[0] if errors else None


def _add_request(orig, core, request, *args, **kwargs):
    lora = vllm_compat.request_lora(request)
    if lora is None or not _enabled(core):
        return orig(core, request, *args, **kwargs)
    err = admit(core, lora)
    if err is not None:
        log.error("deltadq: request %s for fine-tune %r refused: %s",
                  getattr(request, "request_id", "?"), lora.lora_name, err)
        vllm_compat.fail_engine_request(core, request, err)
        return None
    return orig(core, request, *args, **kwargs)


def _add_lora(orig, core, lora_request):
    if not _enabled(core):
        return orig(core, lora_request)
    err = admit(core, lora_request)
    if err is not None:
        raise ValueError(err)
    return True


def _remove_lora(orig, core, lora_id: int):
    if not _enabled(core):
        return orig(core, lora_id)
    if lora_id in vllm_compat.engine_lora_ids_in_use(core):
        vllm_compat.run_on_workers(core, rpc_retire, lora_id)
        return True
    _resident(core).discard(lora_id)
    return orig(core, lora_id)


def install() -> None:
    """Wrap the engine core's add_request / add_lora / remove_lora (idempotent; the
    wrappers change nothing for engines started without deltas)."""
    vllm_compat.wrap_engine_core(add_request=_add_request, add_lora=_add_lora,
                                 remove_lora=_remove_lora)
