"""`deltadq kv-compress`: the RoPE algebra, exactness on redundant heads, loading in HF and
vLLM, deltas following the base, and every bad input (the per-layer choice of issue 14:
test_kv_choice.py)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.cli import main as cli
from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.tools.kv_compress import (DeltaMapOptions, KVCompressOptions, apply_to_delta,
                                            kv_compress, load_maps)
from deltadq_vllm.tools.kv_maps import apply_maps, build_layer_maps, complex_block, rope_rotate
from deltadq_vllm.tools.kv_stats import StatsAccumulator
from deltadq_vllm.tools.merge import merge

from cli_utils import fails
from kv_fixture import build_fixture, eval_problems

D = 32  # head_dim of the synthetic models (vLLM CPU attention supports 32)


# ----------------------------------------------------------------------------- helpers


def _rng(seed):
    return torch.Generator().manual_seed(seed)


def _rand_complex(n, g):
    return torch.complex(torch.randn(n, generator=g, dtype=torch.float64),
                         torch.randn(n, generator=g, dtype=torch.float64))


def make_model(out: Path, arch="llama", heads=4, kv=4, pairs=((0, 1), (2, 3)), seed=0,
               layers=2, hidden=128):
    """A random model whose KV head b of each pair (a, b) is exactly redundant with a: its
    keys are a per-frequency complex scaling of a's (commutes with RoPE) and its values an
    invertible linear map of a's. The rest is a normal random init (std 0.1)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tok = build_fixture("tokenizer")
    kw = dict(vocab_size=384, hidden_size=hidden, intermediate_size=2 * hidden,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
              max_position_embeddings=256, initializer_range=0.1, bos_token_id=1,
              eos_token_id=2, pad_token_id=3)
    if arch == "llama":
        config = LlamaConfig(head_dim=hidden // heads, **kw)
    else:
        config = Qwen2Config(**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    d = hidden // heads
    g = _rng(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            at = layer.self_attn
            for a, b in pairs:
                key_map = complex_block(_rand_complex(d // 2, g)).float()
                val_map = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
                for proj, m in ((at.k_proj, key_map), (at.v_proj, val_map)):
                    proj.weight[b * d:(b + 1) * d] = m @ proj.weight[a * d:(a + 1) * d]
                    if proj.bias is not None:
                        proj.bias[b * d:(b + 1) * d] = m @ proj.bias[a * d:(a + 1) * d]
    model.save_pretrained(out)
    for f in Path(tok).iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)
    return out


def load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def attention_outputs(model, ids):
    """Logits and every layer's self-attention output (after o_proj)."""
    outs = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o: outs.append(o[0].clone()))
             for layer in model.model.layers]
    logits = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    return logits, outs


def opts(**kw):
    kw.setdefault("progress", False)
    return KVCompressOptions(**kw)


IDS = torch.randint(4, 384, (2, 48), generator=_rng(5))


# ------------------------------------------------------------------- (1) RoPE algebra


def test_rope_commutes_with_per_frequency_complex_maps():
    """rotate-then-map == map-then-rotate for random per-frequency complex maps, in HF's own
    rotary implementation; a generic real map does not commute."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    g = _rng(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run
    d, t = 64, 37
    cfg = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    pos = torch.randint(0, 4000, (t,), generator=g)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, t, d, dtype=torch.float64),
                                         pos.view(1, t))
    cos, sin = cos.double(), sin.double()

    def hf_rope(x):  # x [t, d]
        q, _ = apply_rotary_pos_emb(x.view(1, 1, t, d), x.view(1, 1, t, d), cos, sin)
        return q.view(t, d)

    x = torch.randn(t, d, generator=g, dtype=torch.float64)
    # our reference rotation == HF's (HF computes angles in float32: loose tolerance)
    assert torch.allclose(hf_rope(x), rope_rotate(x, pos), atol=5e-3)
    for _ in range(5):
        m = complex_block(_rand_complex(d // 2, g))
        assert torch.allclose(hf_rope(x @ m.T), hf_rope(x) @ m.T, atol=1e-9)
    generic = torch.randn(d, d, generator=g, dtype=torch.float64)
    assert (hf_rope(x @ generic.T) - hf_rope(x) @ generic.T).abs().max() > 1e-2

    # a whole group map (r heads -> 1, per-frequency complex coefficients per head) commutes,
    # and the folded query reproduces every original head's RoPE'd attention logits
    r, n = 3, 11
    keys = torch.randn(r, t, d, generator=g, dtype=torch.float64)
    coefs = [complex_block(_rand_complex(d // 2, g)) for _ in range(r)]
    k_map = torch.cat(coefs, 1)  # [d, r*d]
    stacked = keys.permute(1, 0, 2).reshape(t, r * d)
    rotated = torch.stack([hf_rope(k) for k in keys]).permute(1, 0, 2).reshape(t, r * d)
    assert torch.allclose(hf_rope(stacked @ k_map.T), rotated @ k_map.T, atol=1e-8)
    # exactly redundant heads: k_h = c_h * z (per frequency); queries fold with conj(c_h)
    base = torch.randn(t, d, generator=g, dtype=torch.float64)
    c = [_rand_complex(d // 2, g) for _ in range(r)]
    c = [ci / torch.linalg.vector_norm(torch.stack(c), dim=0) for ci in c]  # unit vector u
    heads_k = [base @ complex_block(ci).T for ci in c]
    new_k = sum(h @ complex_block(ci.conj()).T for h, ci in zip(heads_k, c))  # u^H z
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    qpos = torch.randint(0, 4000, (n,), generator=g)
    for h, ci in zip(heads_k, c):
        ref = rope_rotate(q, qpos) @ hf_rope(h).T
        got = rope_rotate(q @ complex_block(ci.conj()).T, qpos) @ hf_rope(new_k).T
        assert torch.allclose(ref, got, atol=1e-8)


def test_plain_svd_fold_without_rope_is_exact():
    """Keys without RoPE: a generic linear redundancy is captured by the plain SVD fold into
    q_proj; the RoPE path (per-frequency complex) cannot represent it."""
    g = _rng(int.from_bytes(os.urandom(4), "little"))
    heads, kv, d, hidden, t = 4, 2, 16, 40, 300
    wq = torch.randn(heads * d, hidden, generator=g, dtype=torch.float64)
    wk = torch.randn(kv * d, hidden, generator=g, dtype=torch.float64)
    wv = torch.randn(kv * d, hidden, generator=g, dtype=torch.float64)
    wo = torch.randn(hidden, heads * d, generator=g, dtype=torch.float64)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    wk[d:] = m @ wk[:d]
    wv[d:] = torch.randn(d, d, generator=g, dtype=torch.float64) @ wv[:d]
    x = torch.randn(t, hidden, generator=g, dtype=torch.float64)
    acc = StatsAccumulator(heads, kv, d)
    acc.add(x @ wq.T, x @ wk.T, x @ wv.T)
    stats = acc.finish(wo)
    for weighting in ("none", "attention"):
        maps = build_layer_maps(stats, heads, 1, "svd", "svd", "adjacent", weighting, rope=False)
        q2, k2 = x @ apply_maps("q_proj.weight", wq, maps).T, x @ apply_maps("k_proj.weight", wk, maps).T
        v2 = x @ apply_maps("v_proj.weight", wv, maps).T
        o2 = apply_maps("o_proj.weight", wo, maps)
        q1, k1, v1 = x @ wq.T, x @ wk.T, x @ wv.T
        out1 = out2 = 0
        for i in range(heads):
            h = i // (heads // kv)
            a1 = torch.softmax(q1[:, i * d:(i + 1) * d] @ k1[:, h * d:(h + 1) * d].T / 4, -1)
            out1 = out1 + a1 @ v1[:, h * d:(h + 1) * d] @ wo[:, i * d:(i + 1) * d].T
            a2 = torch.softmax(q2[:, i * d:(i + 1) * d] @ k2.T / 4, -1)
            out2 = out2 + a2 @ v2 @ o2[:, i * d:(i + 1) * d].T
        assert torch.allclose(out1, out2, rtol=1e-6, atol=1e-6 * out1.abs().max())
    rope_maps = build_layer_maps(stats, heads, 1, "svd", "svd", "adjacent", "none", rope=True)
    assert rope_maps.k_residual > 1e-3 and rope_maps.v_residual < 1e-9


# ------------------------------------------------- (2) exactness on redundant KV heads


@pytest.mark.parametrize("arch,heads,kv,pairs,n,grouping,weighting", [
    ("llama", 4, 4, ((0, 1), (2, 3)), 2, "adjacent", "none"),         # MHA -> 50%
    ("llama", 4, 4, ((0, 1), (0, 2), (0, 3)), 1, "adjacent", "none"),  # MHA -> 75%
    ("llama", 4, 4, ((0, 2), (1, 3)), 2, "similarity", "none"),      # needs the permutation
    ("llama", 8, 4, ((0, 1), (2, 3)), 2, "adjacent", "attention"),    # GQA input
    ("qwen2", 4, 4, ((0, 1), (2, 3)), 2, "adjacent", "none"),         # q/k/v biases
])
def test_converted_attention_equals_original_on_redundant_heads(
        tmp_path, arch, heads, kv, pairs, n, grouping, weighting):
    src = make_model(tmp_path / "src", arch, heads, kv, pairs,
                     seed=int.from_bytes(os.urandom(2), "little"))
    s = kv_compress(src, tmp_path / "out", opts(kv_heads=n, grouping=grouping,
                                                 weighting=weighting))
    assert s["kv_heads_to"] == n and s["k_residual_mean"] < 1e-9 and s["v_residual_mean"] < 1e-9
    # the default (auto) conversion picks the exact SVD maps in every layer
    assert all(r["chosen"] == ("svd/svd+sim" if grouping == "similarity" else "svd/svd")
               and r["attn_error"] < 1e-12 for r in s["per_layer"]), s["per_layer"]
    ref_logits, ref_attn = attention_outputs(load(src), IDS)
    got_logits, got_attn = attention_outputs(load(tmp_path / "out"), IDS)
    for a, b in zip(ref_attn, got_attn):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (a - b).abs().max()
    assert (ref_logits - got_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    if grouping == "similarity":
        assert s["per_layer"][0]["groups"] == [[0, 2], [1, 3]]
        # adjacent grouping pairs non-redundant heads: no longer exact
        adj = kv_compress(src, tmp_path / "adj", opts(kv_heads=n, method="svd",
                                                      grouping="adjacent"))
        assert adj["k_residual_mean"] > 1e-3
        adj_logits, _ = attention_outputs(load(tmp_path / "adj"), IDS)
        assert (ref_logits - adj_logits).abs().max() > 1e-2
    # mean-pooling is not exact on the same model (the redundancy is not equality)
    mp = kv_compress(src, tmp_path / "mp", opts(kv_heads=n, method="meanpool", grouping=grouping))
    mp_logits, _ = attention_outputs(load(tmp_path / "mp"), IDS)
    assert (ref_logits - mp_logits).abs().max() > 1e-2


# ------------------------------------------------------ (3) real checkpoints load, generate


@pytest.fixture(scope="module")
def mha():
    return build_fixture("llama-mha")


@pytest.fixture(scope="module")
def converted(mha, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "mha-kv2"
    assert cli(["kv-compress", "--model", str(mha), "--out", str(out), "--kv-heads", "2",
                "--no-progress"]) == 0
    return out


def test_converted_checkpoint_loads_and_generates(mha, converted, tmp_path):
    from transformers import AutoTokenizer

    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["num_attention_heads"] == 4
    w = load_file(str(converted / "model.safetensors"))
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (64, 128)
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (128, 128)
    base = load_file(str(mha / "model.safetensors"))
    for name, t in base.items():  # only attention projections change
        if ".self_attn." not in name:
            assert torch.equal(t, w[name]), name
    assert not any(n.startswith("layer.") for n in w)  # maps are not in the weights
    tok = AutoTokenizer.from_pretrained(str(converted))
    model = load(converted)
    assert model.config.num_key_value_heads == 2
    ids = tok("Q: 12+34=? A:", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    # close to the original on calibration-like text (a trained 4-head model losing half its
    # KV heads): most next-token predictions agree
    ref = load(mha)
    text = tok("The cat sees the ball in the park. There are 12 stones near the sea.",
               return_tensors="pt")["input_ids"]
    with torch.no_grad():
        agree = (ref(text).logits.argmax(-1) == model(text).logits.argmax(-1)).float().mean()
    assert agree > 0.6, agree
    meta, maps = load_maps(converted)
    assert meta["kv_heads_to"] == 2 and len(maps) == 2


def test_gqa_to_mqa_meanpool_and_similarity_recovery(tmp_path):
    """GQA (2 KV heads) -> 1, both methods; recovery changes only attention tensors and
    lowers the distillation loss."""
    gqa = build_fixture("llama-gqa")
    for method in ("svd", "meanpool"):
        s = kv_compress(gqa, tmp_path / method, opts(kv_heads=1, method=method))
        assert load(tmp_path / method).config.num_key_value_heads == 1
        assert s["kv_bytes_per_token_after"] * 2 == s["kv_bytes_per_token_before"]
    mha = build_fixture("llama-mha")
    plain = kv_compress(mha, tmp_path / "plain", opts(kv_heads=1, grouping="similarity"))
    rec = kv_compress(mha, tmp_path / "rec", opts(kv_heads=1, grouping="similarity",
                                                  recover_steps=10, recover_lr=5e-4,
                                                  recover_batch=4, recover_seq_len=64))
    assert rec["recovery"]["steps"] == 10
    from deltadq_vllm.tools.calibration import default_text
    from deltadq_vllm.tools.kv_recover import kd_loss
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(str(mha))(default_text())["input_ids"][:512]
    ids = torch.tensor(ids).view(4, 128)
    with torch.no_grad():
        teacher = load(mha)(ids).logits
        kl_plain = kd_loss(load(tmp_path / "plain")(ids).logits, teacher)
        kl_rec = kd_loss(load(tmp_path / "rec")(ids).logits, teacher)
    assert kl_rec < kl_plain, (kl_rec, kl_plain)
    a, b = load_file(str(tmp_path / "plain/model.safetensors")), load_file(str(tmp_path / "rec/model.safetensors"))
    changed = {n for n in a if not torch.equal(a[n], b[n])}
    assert changed and all(".self_attn." in n for n in changed)
    assert plain["per_layer"] == rec["per_layer"]


# ------------------------------------------------------ (4) vLLM == transformers, greedy

_VLLM_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        model, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
        llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
                  max_num_seqs=8)
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
""")


@pytest.mark.slow
def test_vllm_greedy_equals_transformers(converted, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted))
    texts = ["Q: 12+34=? A:", "The old man", "<|user|>say hello.\n<|assistant|>",
             "There are 7 clouds"]
    prompts = [tok(t)["input_ids"] for t in texts]
    n = 16
    model = load(converted)
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(n):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
            expected.append(ids[0, len(p):].tolist())
    script = tmp_path / "run_vllm.py"
    script.write_text(_VLLM_SCRIPT)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")  # engine in-process: one start, not two
    r = subprocess.run([sys.executable, str(script), str(converted), json.dumps(prompts), str(n)],
                       capture_output=True, text=True, timeout=600, env=env)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got == expected


# --------------------------------------------------- (5) a fine-tune's delta follows the base


@pytest.fixture(scope="module")
def mha_delta(mha, tmp_path_factory):
    out = tmp_path_factory.mktemp("delta") / "math"
    compress(mha, build_fixture("llama-mha--math"), out,
             CompressOptions(method="deltadq", ratio=8, progress=False))
    return out


def test_mapped_delta_equals_converting_the_merged_finetune(mha, converted, mha_delta, tmp_path):
    # fine-tune served on the compressed base: converted base + mapped delta
    assert cli(["kv-compress", "--model", str(converted), "--apply-to-delta", str(mha_delta),
                "--out", str(tmp_path / "delta-kv2"), "--delta-storage", "dense",
                "--no-progress"]) == 0
    merge(converted, tmp_path / "delta-kv2", tmp_path / "on-compressed", progress=False)
    # reference: merge on the original base, then convert with the base's maps
    merge(mha, mha_delta, tmp_path / "merged", progress=False)
    assert cli(["kv-compress", "--model", str(tmp_path / "merged"), "--maps", str(converted),
                "--out", str(tmp_path / "merged-kv2"), "--no-progress"]) == 0
    a = Checkpoint(tmp_path / "on-compressed")
    b = Checkpoint(tmp_path / "merged-kv2")
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a.get(name), b.get(name)
        assert x.shape == y.shape
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), name
    la, lb = load(tmp_path / "on-compressed"), load(tmp_path / "merged-kv2")
    with torch.no_grad():
        ya, yb = la(IDS).logits, lb(IDS).logits
    assert (ya - yb).abs().max() <= 1e-4 * yb.abs().max()
    assert torch.equal(ya.argmax(-1), yb.argmax(-1))
    assert la.config.num_key_value_heads == 2


def test_mapped_delta_recompressed_keeps_the_ratio(converted, mha_delta, tmp_path):
    dense = apply_to_delta(converted, mha_delta, tmp_path / "dense",
                           DeltaMapOptions(storage="dense", progress=False))
    rec = apply_to_delta(converted, mha_delta, tmp_path / "rec",
                         DeltaMapOptions(storage="recompress", progress=False))
    assert rec["bytes"] < dense["bytes"]
    assert rec["true_ratio"] > 0.8 * rec["source_true_ratio"]
    merge(converted, tmp_path / "rec", tmp_path / "merged-rec", progress=False)
    assert load(tmp_path / "merged-rec").config.num_key_value_heads == 2


@pytest.mark.slow
def test_mapped_delta_served_on_the_converted_base(converted, mha_delta, tmp_path):
    """The product path: `deltadq serve CONVERTED --delta-modules math=MAPPED` gives the same
    greedy tokens as transformers on `deltadq merge CONVERTED MAPPED`, and the base stays
    the base (both in one server)."""
    from serving_utils import Server, check_model

    mapped = tmp_path / "math-kv2"
    apply_to_delta(converted, mha_delta, mapped, DeltaMapOptions(progress=False))
    merge(converted, mapped, tmp_path / "merged", progress=False)
    prompts = [p for p, _ in eval_problems("math", 3)]
    s = Server(converted, ["--delta-modules", f"math={mapped}"], tmp_path)
    try:
        client = s.client()
        failures, _ = check_model(client, "math", tmp_path / "merged", prompts, 10)
        base_failures, _ = check_model(client, str(converted), converted, prompts[:1], 10)
        assert not failures + base_failures, "\n".join(failures + base_failures) + s.tail()
    finally:
        s.stop()


# ------------------------------------------------------------------ (6) every bad input


def kv(model, out, *extra):
    return ["kv-compress", "--model", model, "--out", out, "--no-progress", *extra]


@pytest.mark.parametrize("n,needle", [(3, "does not divide the 4 query heads"),
                                      (4, "does not reduce"), (8, "does not reduce"),
                                      (0, "must be >= 1")])
def test_bad_kv_heads(mha, tmp_path, capsys, n, needle):
    fails(capsys, kv(mha, tmp_path / "o", "--kv-heads", n), needle, out_dir=tmp_path / "o")


def test_kv_heads_required(mha, tmp_path, capsys):
    fails(capsys, kv(mha, tmp_path / "o"), "--kv-heads is required", out_dir=tmp_path / "o")


def test_current_kv_heads_not_a_multiple(tmp_path, capsys):
    # 12 query heads, 6 KV heads -> 4: divides the query heads but not the KV heads
    src = make_model(tmp_path / "m", heads=12, kv=6, pairs=(), layers=1, hidden=384)
    fails(capsys, kv(src, tmp_path / "o", "--kv-heads", 4), "not a multiple of --kv-heads 4",
          out_dir=tmp_path / "o")


def test_missing_model_dir(tmp_path, capsys):
    fails(capsys, kv(tmp_path / "nope", tmp_path / "o", "--kv-heads", 2), "does not exist",
          out_dir=tmp_path / "o")


def test_out_exists_without_force(mha, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    fails(capsys, kv(mha, out, "--kv-heads", 2), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "x"
    assert cli([str(a) for a in kv(mha, out, "--kv-heads", 2, "--force")]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("edit,needle", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"partial_rotary_factor": 0.5}, "partial rotary"),
])
def test_unsupported_architecture(mha, tmp_path, capsys, edit, needle):
    src = tmp_path / "m"
    shutil.copytree(mha, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(edit)
    (src / "config.json").write_text(json.dumps(cfg))
    fails(capsys, kv(src, tmp_path / "o", "--kv-heads", 2), needle, out_dir=tmp_path / "o")


@pytest.mark.parametrize("flag,value,needle", [("--method", "pca", "unknown --method"),
                                               ("--grouping", "random", "unknown --grouping"),
                                               ("--recover-steps", "-1", "--recover-steps"),
                                               ("--calibration", "/nonexistent.txt",
                                                "cannot read calibration")])
def test_bad_options(mha, tmp_path, capsys, flag, value, needle):
    fails(capsys, kv(mha, tmp_path / "o", "--kv-heads", 2, flag, value), needle,
          out_dir=tmp_path / "o")


def test_apply_to_delta_needs_a_converted_model(mha, mha_delta, tmp_path, capsys):
    fails(capsys, kv(mha, tmp_path / "o", "--apply-to-delta", mha_delta),
          "holds no KV-compression maps", out_dir=tmp_path / "o")


def test_apply_to_delta_rejects_kv_heads(converted, mha_delta, tmp_path, capsys):
    fails(capsys, kv(converted, tmp_path / "o", "--apply-to-delta", mha_delta, "--kv-heads", 2),
          "--apply-to-delta", out_dir=tmp_path / "o")


def test_delta_from_a_different_base(mha, converted, tmp_path, capsys):
    # a different architecture: a delta against the GQA fixture
    gqa_delta = tmp_path / "gqa-delta"
    compress(build_fixture("llama-gqa"), build_fixture("llama-gqa--math"), gqa_delta,
             CompressOptions(method="dense", progress=False))
    fails(capsys, kv(converted, tmp_path / "o", "--apply-to-delta", gqa_delta),
          "was made for a base with", out_dir=tmp_path / "o")
    # same architecture, different weights: convert a perturbed copy of the base
    other = tmp_path / "other"
    shutil.copytree(mha, other)
    from safetensors.torch import save_file
    w = load_file(str(other / "model.safetensors"))
    w["model.layers.0.mlp.up_proj.weight"] += 0.01
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    kv_compress(other, tmp_path / "other-kv2", opts(kv_heads=2, method="meanpool"))
    delta = tmp_path / "mha-delta"
    compress(mha, build_fixture("llama-mha--math"), delta,
             CompressOptions(method="dense", progress=False))
    fails(capsys, kv(tmp_path / "other-kv2", tmp_path / "o", "--apply-to-delta", delta),
          "does not belong to the base", out_dir=tmp_path / "o")


def test_kv_modules_import_in_either_order():
    """kv_delta and kv_compress import each other; either may be imported first (a fresh
    interpreter per order: an import-time cycle only shows on the first import)."""
    import subprocess
    import sys

    for first, second in (("kv_delta", "kv_compress"), ("kv_compress", "kv_delta")):
        code = (f"import deltadq_vllm.tools.{first}, deltadq_vllm.tools.{second}; "
                "from deltadq_vllm.tools.kv_compress import DeltaMapOptions, apply_to_delta")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0, (first, r.stderr[-2000:])
