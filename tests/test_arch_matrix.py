"""Architecture conformance matrix: every architecture the plugin serves, against plain vLLM.

Per row: a tiny trained base, a fine-tune that adds two tokens (a large delta, compressed
exactly: `--method dense`) and a short light fine-tune (a small delta, compressed 16x).
One `deltadq serve` per row serves the base and both fine-tunes; one burst of concurrent
requests for all three (mixed batches, two delta slots) must equal plain vLLM (every
plugin disabled, float32) serving
* the vocabulary fine-tune's own folder (exact delta),
* `deltadq merge`'s output of the 16x delta,
* the base folder,
token for token (a divergence only at a genuine tie) with the top-5 log-probs of the first
steps within float32 tolerance, on prompts tokenized to the same ids. An architecture the
plugin does not list is refused before the engine starts, naming it.

Cost: one served engine per row (module-scoped, started while the reference process runs)
and one reference process per row whose three plain engines run in-process. Measured on
the project's 2-core VM (cpuacct cgroup, docs/serving.md "Supported architectures"):
398 CPU-s with the fixtures cached; the fixtures cold add 235 CPU-s (165 of them models
only this module uses).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random

import pytest
import torch

from deltadq_vllm.testing.fixtures import build_fixture, eval_problems, generic_corpus
from deltadq_vllm.testing.reference import reference_run
from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.tools.merge import merge

from serving_utils import Server

# row: (base, vocabulary fine-tune: dense delta, small fine-tune: 16x delta)
ROWS = {
    "llama-gqa": ("llama-gqa", "llama-gqa--ext", "llama-gqa--small"),
    "llama-mha": ("llama-mha", "llama-mha--ext", "llama-mha--small"),
    "qwen2": ("qwen2", "qwen2--ext", "qwen2--small"),
    "qwen3": ("qwen3", "qwen3--ext", "qwen3--small"),
    "mistral": ("mistral", "mistral--ext", "mistral--small"),
    "phi3": ("phi3", "phi3--ext", "phi3--small"),
    "gemma2": ("gemma2", "gemma2--ext", "gemma2--small"),
    "olmo2": ("olmo2", "olmo2--ext", "olmo2--small"),
}
MODELS = ("base", "ext", "small")
NEW_TOKENS = 8
LOGPROB_STEPS = 4   # top-5 log-probs compared on the first steps
TOP = 5
# float32 tolerance on log-probs: the server adds the delta to the base GEMM's output (or
# to W_base once, "merged"), batches differ from the reference's; measured max |diff|
# is printed per row (see docs/serving.md, "Supported architectures")
LP_TOL = 2e-4
TIE = 1e-4          # a greedy divergence is accepted only where the top-2 are this close
# the engine starts while the reference process runs its three engines: on a loaded
# 2-core machine (load 12) one start took over 300 s
START_TIMEOUT = 900


def _prompts(rng: random.Random) -> list[str]:
    ext = [p for p, _ in rng.sample(eval_problems("ext", 100), 3)]
    code = [p for p, _ in rng.sample(eval_problems("code"), 2)]
    text = " ".join(generic_corpus(1, rng.randrange(10 ** 6))[0].split()[:3])
    return ext + code + [text, "<|user|>say hello.\n<|assistant|>"]


def _served(client, model: str, prompt: str) -> dict:
    r = client.completions.create(
        model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=TOP,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    ch = r.choices[0]
    top = [{k.removeprefix("token_id:"): v for k, v in (d or {}).items()}
           for d in ch.logprobs.top_logprobs]
    return {"prompt_ids": list(ch.prompt_token_ids or []), "tokens": list(ch.token_ids),
            "top": top}


@pytest.fixture(scope="module", params=list(ROWS))
def row(request, tmp_path_factory):
    name = request.param
    base_fx, ext_fx, small_fx = ROWS[name]
    work = tmp_path_factory.mktemp(f"matrix-{name}")
    base, ext, small = build_fixture(base_fx), build_fixture(ext_fx), build_fixture(small_fx)
    compress(base, ext, work / "ext", CompressOptions(method="dense", progress=False))
    compress(base, small, work / "small", CompressOptions(ratio=16, progress=False))
    merge(base, work / "small", work / "small-merged", progress=False)
    seed = random.randrange(10 ** 9)
    prompts = _prompts(random.Random(seed))
    ref = reference_run({"base": base, "ext": ext, "small": work / "small-merged"}, prompts,
                        work, NEW_TOKENS, TOP)
    server = None
    try:
        server = Server(base, ["--delta-modules", f"ext={work / 'ext'},small={work / 'small'}",
                               "--max-deltas", "2", "--served-model-name", "base"], work,
                        timeout=START_TIMEOUT)
        jobs = [(m, i) for i in range(len(prompts)) for m in MODELS]
        random.Random(seed).shuffle(jobs)
        client = server.client()
        with cf.ThreadPoolExecutor(len(jobs)) as ex:
            got = list(ex.map(lambda j: _served(client, j[0], prompts[j[1]]), jobs))
        log = server.tail(80)
    finally:
        if server is not None:
            server.stop()
        else:
            ref.kill()
    refs = ref.result()
    served = {m: [None] * len(prompts) for m in MODELS}
    for (m, i), g in zip(jobs, got):
        served[m][i] = g
    base_vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    return {"name": name, "seed": seed, "prompts": prompts, "served": served, "ref": refs,
            "log": log, "base_vocab": base_vocab}


def compare(ref: dict, got: dict) -> tuple[str | None, float]:
    """(None or what differs, max |logprob difference| seen) for one prompt."""
    worst = 0.0
    for i, t in enumerate(ref["tokens"]):
        if i >= len(got["tokens"]):
            return f"server stopped after {len(got['tokens'])} tokens, reference has more", worst
        rtop = {int(k): v for k, v in ref["top"][i].items()}
        gtop = {int(k): v for k, v in got["top"][i].items()}
        if got["tokens"][i] != t:
            g = got["tokens"][i]
            if g in rtop and abs(rtop[t] - rtop[g]) < TIE:
                return None, worst  # a genuine tie: both continuations are right
            return f"token {i}: server {g}, reference {t} (reference top: {rtop})", worst
        if i < LOGPROB_STEPS:
            for a, b in ((rtop, gtop), (gtop, rtop)):
                floor = sorted(a.values(), reverse=True)[:TOP][-1]
                for tok, lp in a.items():
                    if lp <= floor + LP_TOL:
                        continue  # at the top-5 boundary: may be 5th on one side, 6th on the other
                    if tok not in b:
                        return f"token {i}: {tok} ({lp:.6f}) in one top-{TOP} only", worst
                    worst = max(worst, abs(lp - b[tok]))
            if worst > LP_TOL:
                return f"token {i}: top-{TOP} log-probs differ by {worst:.2e}", worst
    if len(got["tokens"]) > len(ref["tokens"]):
        return f"server generated {len(got['tokens'])} tokens, reference {len(ref['tokens'])}", worst
    return None, worst


def _check(row, model: str) -> None:
    failures, worst, n_tokens = [], 0.0, 0
    for p, ref, got in zip(row["prompts"], row["ref"][model], row["served"][model]):
        if got["prompt_ids"] != ref["prompt_ids"]:
            failures.append(f"{p!r}: prompt ids {got['prompt_ids']} vs the folder's "
                            f"{ref['prompt_ids']}")
            continue
        msg, w = compare(ref, got)
        worst, n_tokens = max(worst, w), n_tokens + len(ref["tokens"])
        if msg:
            failures.append(f"{p!r}: {msg}")
    print(f"[matrix] {row['name']} {model}: {len(row['prompts']) - len(failures)}/"
          f"{len(row['prompts'])} prompts equal ({n_tokens} tokens), max |d logprob| top-{TOP} "
          f"of the first {LOGPROB_STEPS} steps {worst:.1e}")
    assert not failures, (f"{row['name']} {model} (prompt seed {row['seed']}):\n"
                          + "\n".join(failures) + "\n" + row["log"])


def test_exact_delta_equals_the_finetune_folder(row):
    _check(row, "ext")


def test_compressed_delta_equals_the_merged_checkpoint(row):
    _check(row, "small")


def test_base_requests_equal_the_base_folder(row):
    _check(row, "base")


def test_added_tokens_are_generated_only_by_their_finetune(row):
    vocab = row["base_vocab"]
    ext_new = [t for g in row["served"]["ext"] for t in g["tokens"] if t >= vocab]
    assert ext_new, f"{row['name']}: the vocabulary fine-tune never generated an added token"
    # (any probability the others' logits leave on the added tokens, e.g. -inf turned into
    # -30 by soft-capping, shifts every log-prob they report: the comparisons above see it)
    for m in ("base", "small"):
        assert all(t < vocab for g in row["served"][m] for t in g["tokens"]), m


# ----------------------------------------------------------- unsupported architectures


def _tiny_gpt2(path, tokenizer_dir, seed: int, noise: float = 0.0):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=1, n_head=2,
                                       n_positions=128))
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_unsupported_architecture_is_refused_at_startup(tmp_path, capsys):
    """GPT-2 (LayerNorm with biases, learned positions, Conv1D weights): vLLM serves it, the
    delta layers were never checked on it, so `deltadq serve` refuses it before importing
    an engine, naming the architecture and what is supported."""
    from deltadq_vllm.cli import main

    tok = build_fixture("tokenizer")
    base = _tiny_gpt2(tmp_path / "gpt2", tok, 0)
    ft = _tiny_gpt2(tmp_path / "gpt2-ft", tok, 1, noise=0.01)
    compress(base, ft, tmp_path / "d", CompressOptions(method="dense", progress=False))
    for flags in (["--delta-modules", f"ft={tmp_path / 'd'}"],
                  ["--enable-runtime-deltas", "--delta-root", str(tmp_path)]):
        rc = main(["serve", str(base), *flags])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err and "fix:" in err, err


# ---------------------------------------------------- fused checkpoint tensors (no engine)


def test_fused_checkpoint_tensor_slices_match_vllm_weight_loaders():
    """Phi-3 stores qkv_proj and gate_up_proj fused. vLLM's loaders split a fused tensor
    into its q/k/v (or gate/up) blocks by total sizes, then take each block's rows for
    this rank; our slices must name the same rows of the fused tensor for every rank."""
    import inspect

    from deltadq_vllm import vllm_compat
    from deltadq_vllm.serving.targets import _linear_target

    c = vllm_compat.layer_classes()
    QKV, Merged = c["QKVParallelLinear"], c["MergedColumnParallelLinear"]
    for tp, heads, kv_heads, hd in [(1, 4, 4, 8), (2, 4, 2, 8), (4, 4, 2, 8), (2, 2, 1, 16)]:
        hidden = heads * hd
        fused = torch.arange((heads + 2 * kv_heads) * hd * hidden, dtype=torch.float32)
        fused = fused.reshape(-1, hidden)
        q, k, v = fused.split([heads * hd, kv_heads * hd, kv_heads * hd])
        inter = 3 * hidden
        gate_up = torch.arange(2 * inter * hidden, dtype=torch.float32).reshape(-1, hidden)
        gate, up = gate_up.split([inter, inter])
        for rank in range(tp):
            layer = object.__new__(QKV)  # geometry only; no process group needed
            torch.nn.Module.__init__(layer)
            layer.tp_rank, layer.tp_size = rank, tp
            layer.head_size = layer.v_head_size = hd
            layer.total_num_heads, layer.total_num_kv_heads = heads, kv_heads
            layer.num_heads = heads // tp
            if tp >= kv_heads:
                layer.num_kv_heads, layer.num_kv_head_replicas = 1, tp // kv_heads
            else:
                layer.num_kv_heads, layer.num_kv_head_replicas = kv_heads // tp, 1
            layer.input_size_per_partition = hidden
            layer.bias = None
            t = _linear_target("model.layers.0.self_attn.qkv_proj", layer, c,
                               {"qkv_proj": ["qkv_proj"]})
            kv_rank = rank // layer.num_kv_head_replicas
            ql, kl = layer.num_heads * hd, layer.num_kv_heads * hd
            expect = [q[rank * ql:(rank + 1) * ql], k[kv_rank * kl:(kv_rank + 1) * kl],
                      v[kv_rank * kl:(kv_rank + 1) * kl]]
            assert [s.hf_name for s in t.slices] == ["model.layers.0.self_attn.qkv_proj.weight"] * 3
            for s, e in zip(t.slices, expect):
                assert torch.equal(fused[s.rows[0]:s.rows[1]], e), (tp, rank, s)
                assert s.size == e.shape[0]

            mlp = object.__new__(Merged)
            torch.nn.Module.__init__(mlp)
            mlp.tp_rank, mlp.tp_size = rank, tp
            mlp.output_sizes = [inter, inter]
            mlp.input_size_per_partition = hidden
            mlp.bias = None
            t = _linear_target("model.layers.0.mlp.gate_up_proj", mlp, c,
                               {"gate_up_proj": ["gate_up_proj"]})
            local = inter // tp
            for s, block in zip(t.slices, (gate, up)):
                assert s.hf_name == "model.layers.0.mlp.gate_up_proj.weight"
                assert torch.equal(gate_up[s.rows[0]:s.rows[1]],
                                   block[rank * local:(rank + 1) * local]), (tp, rank, s)
    # vLLM's rule for a fused tensor (loaded_shard_id None): split by total sizes first
    loader = inspect.getsource(QKV.weight_loader)
    assert "loaded_shard_id is None" in loader and "total_num_heads * self.head_size" in loader
    assert "loaded_shard_id is None" in inspect.getsource(Merged.weight_loader)


def test_worker_refuses_an_unsupported_architecture():
    """`vllm serve BASE --delta-modules ...` (vllm 0.33) never runs deltadq serve's check;
    the worker's delta manager refuses the engine's resolved architecture itself."""
    from types import SimpleNamespace

    from deltadq_vllm.errors import DeltaDQError
    from deltadq_vllm.serving.worker_manager import DeltaWorkerManager

    def config(archs):
        return SimpleNamespace(lora_config=SimpleNamespace(max_loras=2, max_cpu_loras=2),
                               model_config=SimpleNamespace(model="/m", architectures=archs))

    with pytest.raises(DeltaDQError, match="GPT2LMHeadModel"):
        DeltaWorkerManager(config(["GPT2LMHeadModel"]), "cpu", {})
    DeltaWorkerManager(config(["Qwen3ForCausalLM"]), "cpu", {})  # supported: no error
