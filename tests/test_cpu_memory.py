"""KV-cache sizing of `deltadq serve` on a CPU (cpu_memory.py), without an engine."""

import argparse
import json

import pytest

from deltadq_vllm import cpu_memory
from deltadq_vllm.cpu_memory import GiB, KV_MAX, KV_MIN, MiB, choose, kv_bytes_per_token, plan
from deltadq_vllm.errors import DeltaDQError

LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "hidden_size": 4096}


def test_kv_bytes_per_token_counts_kv_heads_layers_and_dtype():
    assert kv_bytes_per_token(LLAMA_8B, 2) == 2 * 32 * 8 * 128 * 2   # 128 KiB
    mha = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 128}
    assert kv_bytes_per_token(mha, 4) == 2 * 2 * 4 * 32 * 4
    wrapped = {"text_config": {**mha, "head_dim": 64}}
    assert kv_bytes_per_token(wrapped, 2) == 2 * 2 * 4 * 64 * 2


def test_room_for_four_sequences_within_bounds():
    per = kv_bytes_per_token(LLAMA_8B, 2)
    p = choose(per, 8192, False, free=64 * GiB, engine=16 * GiB)
    assert p.kv_bytes == min(4 * per * 8192, KV_MAX) and p.max_model_len is None
    tiny = choose(2048, 512, False, free=8 * GiB, engine=0)
    assert tiny.kv_bytes == KV_MIN                      # small models get the floor
    tight = choose(per, 8192, False, free=16 * GiB + int(1.5 * GiB) + 3 * GiB, engine=16 * GiB)
    assert per * 8192 <= tight.kv_bytes <= 1.5 * GiB    # at most half the room


def test_context_shortened_when_one_sequence_does_not_fit_unless_user_chose_it():
    per = kv_bytes_per_token(LLAMA_8B, 2)
    free = 16 * GiB + int(1.5 * GiB) + 1 * GiB            # 0.5 GiB of KV budget
    p = choose(per, 131072, False, free=free, engine=16 * GiB)
    assert p.max_model_len and p.max_model_len % 256 == 0 and p.max_model_len < 131072
    assert p.kv_bytes == p.max_model_len * per <= 0.5 * GiB
    assert "shortened" in p.describe()
    with pytest.raises(DeltaDQError) as e:
        choose(per, 131072, True, free=free, engine=16 * GiB)
    assert "--max-model-len" in str(e.value) and "--kv-cache-memory-bytes" in str(e.value)
    with pytest.raises(DeltaDQError, match="not enough free memory"):
        choose(per, 4096, False, free=8 * GiB, engine=16 * GiB)


def _args(model, **kw):
    d = dict(model=str(model), dtype="float32", kv_cache_dtype="auto", max_model_len=None,
             delta_cpu_strategy="merged", enable_lora=True, max_loras=2, delta_modules=[],
             kv_cache_memory_bytes=None)
    d.update(kw)
    return argparse.Namespace(**d)


def test_user_choices_are_values_that_differ_from_the_parsers_defaults():
    p = argparse.ArgumentParser()
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    p.add_argument("--max-model-len", type=int, default=None)
    assert cpu_memory.user_choices(p.parse_args([]), p) == set()
    got = cpu_memory.user_choices(p.parse_args(["--gpu-memory-utilization", "0.5",
                                                "--max-model-len", "512"]), p)
    assert got == {"gpu_memory_utilization", "max_model_len"}


def test_plan_sets_kv_bytes_and_respects_what_the_user_chose(tmp_path, monkeypatch):
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "hidden_size": 128, "max_position_embeddings": 1024, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * MiB)
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: argparse.Namespace(available=8 * GiB))
    a = _args(tmp_path)
    p = plan(a, set(), environ={})
    assert p is not None and a.kv_cache_memory_bytes == p.kv_bytes >= KV_MIN
    assert p.engine_bytes >= MiB * 2                  # weights + two merged slots
    for user, env in (({"kv_cache_memory_bytes"}, {}), ({"gpu_memory_utilization"}, {}),
                      (set(), {"VLLM_CPU_KVCACHE_SPACE": "1"})):
        b = _args(tmp_path)
        assert plan(b, user, environ=env) is None and b.kv_cache_memory_bytes is None
    hub = _args("Qwen/Qwen3-0.6B")
    assert plan(hub, set(), environ={}) is None      # no local config: vLLM decides
