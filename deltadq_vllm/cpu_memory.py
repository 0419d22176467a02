"""KV-cache size for `deltadq serve` on a CPU: what fits the machine, said in one line.

vLLM's CPU backend reserves `--gpu-memory-utilization` (default 0.92) of the whole
NUMA node's memory and refuses to start when that much is not free, which on a
shared machine is almost always (the error is buried in a long log). Unless the user
chose (`--kv-cache-memory-bytes`, `--gpu-memory-utilization` or the legacy
`VLLM_CPU_KVCACHE_SPACE`), `deltadq serve` sets `--kv-cache-memory-bytes` itself:

    room      = free memory - the engine's own estimate (weights in the serving dtype,
                one expansion per delta slot for the dense/merged CPU strategies, the
                compressed deltas in the host cache) - PROCESS_OVERHEAD
    KV cache  = KV bytes of KV_SEQUENCES full-length sequences, between KV_MIN and
                KV_MAX, at most half of room

When not even one sequence of the model's context fits, the context is shortened to
what fits (a multiple of 256 tokens; said in the log line), or, if the user gave
`--max-model-len`, `deltadq serve` stops with one line naming the flags to pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DeltaDQError

GiB = 1 << 30
MiB = 1 << 20
KV_SEQUENCES = 4
KV_MIN = 256 * MiB
KV_MAX = 4 * GiB
PROCESS_OVERHEAD = int(1.5 * GiB)   # API server, engine core and worker processes
LEN_STEP = 256
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


@dataclass
class KVPlan:
    kv_bytes: int
    max_model_len: int | None   # set only when shortened to fit
    context: int                # the sequence length the plan was made for
    free_bytes: int
    engine_bytes: int

    def describe(self) -> str:
        short = (f", context shortened to {self.max_model_len} tokens to fit"
                 if self.max_model_len else "")
        return (f"deltadq serve: CPU: KV cache {self.kv_bytes / GiB:.2f} GiB "
                f"(--kv-cache-memory-bytes; {self.free_bytes / GiB:.1f} GiB free, about "
                f"{self.engine_bytes / GiB:.1f} GiB for the model and deltas){short}; pass "
                "--kv-cache-memory-bytes or --max-model-len to choose")


def kv_bytes_per_token(config: dict, elem_bytes: int) -> int:
    c = config.get("text_config", config)
    layers = c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return 2 * layers * kv_heads * head_dim * elem_bytes


def choose(per_token: int, context: int, user_max_len: bool, free: int, engine: int) -> KVPlan:
    """The KV size for `context`-token sequences given free memory and the engine's
    estimate; raises DeltaDQError (one line, the flags to pass) when nothing fits."""
    room = free - engine - PROCESS_OVERHEAD
    budget = room // 2
    one = per_token * context
    kv = min(max(KV_SEQUENCES * one, KV_MIN), KV_MAX, max(budget, 0))
    if kv >= one:
        return KVPlan(kv, None, context, free, engine)
    fit = (max(budget, 0) // per_token) // LEN_STEP * LEN_STEP
    if user_max_len or fit < LEN_STEP:
        need = (one + engine + PROCESS_OVERHEAD) / GiB
        raise DeltaDQError(
            f"not enough free memory to serve {context}-token sequences on this CPU: "
            f"{free / GiB:.1f} GiB free, about {need:.1f} GiB needed (model and deltas "
            f"{engine / GiB:.1f} GiB, KV cache for one sequence {one / GiB:.2f} GiB)",
            f"pass a smaller --max-model-len (e.g. {max(fit, LEN_STEP)}), fewer slots "
            "(--max-deltas), or --kv-cache-memory-bytes to set the KV cache yourself")
    return KVPlan(fit * per_token, fit, fit, free, engine)


def _dir_bytes(path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def _engine_bytes(base_dir: str, config: dict, elem: int, args) -> int:
    ckpt_elem = _DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype")), 2)
    weights = _dir_bytes(base_dir, "*.safetensors") * elem // ckpt_elem
    strategy = getattr(args, "delta_cpu_strategy", None)
    n_slots = getattr(args, "max_loras", 0) if getattr(args, "enable_lora", False) else 0
    # dense/merged expand a delta to a bf16 matrix per linear: about the weights in bf16
    per_slot = weights * 2 // elem if strategy in ("dense", "merged") else weights // 8
    host = sum(_dir_bytes(m.path) for m in getattr(args, "delta_modules", None) or [])
    return weights + n_slots * per_slot + host


USER_CHOICES = ("kv_cache_memory_bytes", "gpu_memory_utilization", "max_model_len")


def user_choices(args, parser) -> set[str]:
    """Which of USER_CHOICES the user set (command line or --config file): the parsed
    value differs from the parser's default."""
    return {k for k in USER_CHOICES if getattr(args, k, None) != parser.get_default(k)}


def plan(args, chosen: set[str], environ=os.environ) -> KVPlan | None:
    """Set args.kv_cache_memory_bytes (and maybe args.max_model_len) for a CPU server;
    None when the user chose the KV memory or the base is not a local folder. `chosen`:
    the names of USER_CHOICES the user set (user_choices)."""
    if ({"kv_cache_memory_bytes", "gpu_memory_utilization"} & chosen
            or environ.get("VLLM_CPU_KVCACHE_SPACE", "") != ""):
        return None
    base = os.path.expanduser(args.model or "")
    try:
        config = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    import psutil

    c = config.get("text_config", config)
    dtype = str(getattr(args, "dtype", "auto") or "auto")
    elem = _DTYPE_BYTES.get(dtype) or _DTYPE_BYTES.get(str(c.get("torch_dtype")
                                                           or config.get("dtype")), 2)
    kv_elem = 1 if str(getattr(args, "kv_cache_dtype", "auto")).startswith("fp8") else elem
    user_len = getattr(args, "max_model_len", None)
    context = int(user_len or c.get("max_position_embeddings") or 2048)
    p = choose(kv_bytes_per_token(c, kv_elem), context, "max_model_len" in chosen,
               psutil.virtual_memory().available, _engine_bytes(base, c, elem, args))
    args.kv_cache_memory_bytes = p.kv_bytes
    if p.max_model_len:
        args.max_model_len = p.max_model_len
    return p
