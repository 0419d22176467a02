"""`deltadq kv-compress` chooses per layer (issue 14): what the candidates are judged by (HF's
own attention), the root cause in isolation (uncentred key SVD chasing a key mean the
softmax ignores), never worse than mean-pooling on fresh held-out text for every fixture,
and the issue's symptom end to end."""

import json
import os

import pytest
import torch

from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.cli import main as cli
from deltadq_vllm.tools.kv_compress import kv_compress
from deltadq_vllm.tools.kv_maps import build_layer_maps
from deltadq_vllm.tools.kv_stats import StatsAccumulator

from kv_fixture import COMPRESSIBLE_BASES, build_fixture, generic_corpus
from test_kv_compress import _rng, kv, load, make_model, opts


# ------------------------------------- what the conversion is judged by, and why

def _rope_tables(t, d, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)


def test_attention_output_matches_transformers(tmp_path):
    """The attention output the candidates are judged by is HF Qwen2's own attention (q/k/v
    biases, GQA, RoPE), on fresh random inputs."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from deltadq_vllm.tools.kv_calibration import attention_layout, layer_weights
    from deltadq_vllm.tools.kv_select import HeldOut, attention_output

    src = make_model(tmp_path / "m", "qwen2", heads=4, kv=2, pairs=(), layers=1,
                     seed=int.from_bytes(os.urandom(2), "little"))
    model = load(src)
    model.config._attn_implementation = "eager"
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # non-zero biases (the random init leaves them at zero)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.bias.normal_(0, 0.5)
    g = _rng(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(3, 40, 128, generator=g)
    pos = torch.arange(40)[None]
    cos, sin = Qwen2RotaryEmbedding(model.config)(x, pos)
    mask = torch.full((40, 40), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        ref = attn(x, position_embeddings=(cos, sin), attention_mask=mask)[0].double()
    ckpt = Checkpoint(src)
    lay = attention_layout(ckpt)
    w = layer_weights(ckpt, lay, 0)
    for role, t in (("q_bias", attn.q_proj.bias), ("k_bias", attn.k_proj.bias),
                    ("v_bias", attn.v_proj.bias)):
        setattr(w, role, t.detach().double())
    got = attention_output(w, HeldOut(x, cos[0].double(), sin[0].double()), 4, 32)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def _slow_key_mean_layer(g, heads=4, d=32, hidden=64):
    """One attention layer whose two KV heads read the same content, and whose first head's
    keys carry a large constant at the slowest RoPE frequencies (a k_proj bias, as Qwen2
    models grow them): invisible to the softmax, so mean-pooling the heads is nearly
    lossless."""
    from deltadq_vllm.tools.kv_select import AttnWeights

    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    wk, wv = f(d, hidden) * 2 / hidden ** 0.5, f(d, hidden) / hidden ** 0.5
    bk = torch.zeros(2 * d, dtype=torch.float64)
    h = d // 2
    bk[h - 6:h] = 20.0 * (1 + f(6).abs())      # frequencies 10..15 of head 0 (real part)
    bk[2 * h - 6:2 * h] = -10.0 * (1 + f(6).abs())  # (imaginary part)
    return AttnWeights(f(heads * d, hidden) * 2 / hidden ** 0.5, torch.cat([wk, wk]),
                       torch.cat([wv, wv]), f(hidden, heads * d) / (heads * d) ** 0.5,
                       None, bk, None)


def test_uncentred_key_svd_chases_a_mean_the_softmax_ignores():
    """Issue 14's root cause, isolated. The seed's SVD-a fits the uncentred key moments:
    per frequency it keeps the direction of the large mean key (head 0's bias), so head 1
    loses its content there - the attention output error is far above mean-pooling's,
    although the uncentred energy kept looks excellent. Fitting the keys as the softmax sees
    them (centred on each query's attention-weighted mean) keeps the content."""
    from deltadq_vllm.tools.kv_select import HeldOut, attention_output, output_error

    g = _rng(int.from_bytes(os.urandom(4), "little"))
    heads, d, t = 4, 32, 64
    w = _slow_key_mean_layer(g)
    cos, sin = _rope_tables(t, d)
    x = torch.randn(16, t, 64, generator=g, dtype=torch.float64)
    acc = StatsAccumulator(heads, 2, d)
    fit = x[:12]
    acc.add(fit @ w.q.T, fit @ w.k.T + w.k_bias, fit @ w.v.T, cos, sin)
    stats = acc.finish(w.o)
    held = HeldOut(x[12:], cos, sin)
    ref = attention_output(w, held, heads, d)
    err, kept = {}, {}
    for keys, values in (("svd-uncentred", "svd"), ("meanpool", "meanpool"), ("svd", "svd")):
        m = build_layer_maps(stats, heads, 1, keys, values, "adjacent", "attention", True)
        err[keys] = output_error(ref, w.mapped(m), held, heads, d)
        kept[keys] = 1 - m.k_residual
    assert kept["svd-uncentred"] > 0.95  # "energy kept" says all is well ...
    assert err["svd-uncentred"] > 10 * err["meanpool"], err  # ... the attention says not
    assert err["svd"] <= 1.05 * err["meanpool"], err


# ------------------------------------------- never worse than mean-pooling, held out


def _heldout_windows(model_dir, lines, width=48, count=48):
    """Held-out text as the model is used: windows of whole lines, each starting with bos."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    windows, cur = [], []
    for line in lines:
        ids = tok(line)["input_ids"] + [tok.eos_token_id]
        if len(cur) + len(ids) > width:
            if len(cur) >= width // 2:
                windows.append(cur[: width // 2])
            cur = []
        cur += ids
        if len(windows) == count:
            break
    return torch.tensor(windows)


@torch.no_grad()
def _ppl(model_dir, windows):
    logp = torch.log_softmax(load(model_dir)(windows).logits[:, :-1].double(), -1)
    return float(torch.exp(-logp.gather(-1, windows[:, 1:, None]).mean()))


@pytest.mark.parametrize("name,n,calibration", [
    *((name, n, "builtin") for name, n in COMPRESSIBLE_BASES),  # llama-gqa 2->1, llama-mha 4->2
    ("qwen2-gqa-narrow", 1, "builtin"),      # issue 14's shape, out-of-domain calibration
    ("qwen2-gqa-narrow", 1, "in-domain"),    # ... and calibration from its own domain
])
def test_never_worse_than_meanpool_on_heldout_text(tmp_path, capsys, name, n, calibration):
    """The default conversion keeps, per layer, the candidate with the least held-out
    attention-output error, so on held-out text it is never worse than mean-pooling; the
    JSON summary reports every candidate's error and which one won."""
    from kv_fixture import CALIB_SEED, TRAIN_SEED, narrow_model, narrow_text

    # fresh held-out text every run (never the training or calibration text's seeds)
    seed = int.from_bytes(os.urandom(4), "little") | (1 << 32)
    assert seed not in (TRAIN_SEED, CALIB_SEED)
    if name == "qwen2-gqa-narrow":
        model, held = narrow_model(), narrow_text(400, seed)
    else:
        model, held = build_fixture(name), generic_corpus(400, seed=seed)
    extra = []
    if calibration == "in-domain":
        text = tmp_path / "calib.txt"
        text.write_text("\n".join(narrow_text(600, CALIB_SEED)))
        extra = ["--calibration", str(text)]
    assert cli([str(a) for a in kv(model, tmp_path / "auto", "--kv-heads", n, "--json",
                                   *extra)]) == 0
    s = json.loads(capsys.readouterr().out)
    mp = kv_compress(model, tmp_path / "mp", opts(kv_heads=n, method="meanpool",
                                                   grouping="adjacent"))
    assert s["method"] == "auto" and s["calibration"]["heldout_separate"]
    for row in s["per_layer"]:
        err = {c["name"]: c["attn_error"] for c in row["candidates"]}
        assert {"svd/svd", "meanpool/meanpool", "svd-uncentred/svd"} <= set(err)
        assert row["attn_error"] == min(err.values()) <= err["meanpool/meanpool"], err
        assert err[row["chosen"]] == row["attn_error"]
        assert 0 <= row["k_energy_kept"] <= 1 and 0 <= row["v_energy_kept"] <= 1
    windows = _heldout_windows(model, held)
    ppl_auto, ppl_mp = _ppl(tmp_path / "auto", windows), _ppl(tmp_path / "mp", windows)
    print(f"{name} -> {n} KV heads, calibration {calibration}, held-out seed {seed}: "
          f"perplexity chosen {ppl_auto:.4f}, mean-pool {ppl_mp:.4f}")
    assert ppl_auto <= ppl_mp, (seed, ppl_auto, ppl_mp, mp["per_layer"], s["per_layer"])


def test_issue14_regime_seed_svd_loses_to_meanpool_and_the_default_does_not(tmp_path):
    """Issue 14's symptom end to end, in a checkpoint: where mean-pooling two KV heads is
    nearly lossless and one head carries a large key mean the softmax ignores, the seed's
    SVD is worse than mean-pooling on held-out text (calibrated in-domain, as in the issue),
    and the default conversion is not. SVD and mean-pool are both nearly exact here, so
    they tie up to the noise of compounding layer errors (it may pick SVD on a lower held-out
    attention error): 0.1% tolerance. Measured over 9 fresh texts: the seed 0.15-0.7% above
    mean-pool's perplexity, the default 0.02-0.15% below."""
    from kv_fixture import CALIB_SEED, TRAIN_SEED, narrow_text, shared_content_model

    model = shared_content_model(tmp_path / "m")
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(narrow_text(600, CALIB_SEED)))
    seed = int.from_bytes(os.urandom(4), "little") | (1 << 32)
    assert seed not in (TRAIN_SEED, CALIB_SEED)
    windows = _heldout_windows(model, narrow_text(1200, seed), count=144)  # ties: more text
    ppl = {}
    for method, grouping in (("svd-uncentred", "adjacent"), ("meanpool", "adjacent"),
                             ("auto", "auto")):
        s = kv_compress(model, tmp_path / method, opts(
            kv_heads=1, method=method, grouping=grouping, calibration=str(text)))
        ppl[method] = _ppl(tmp_path / method, windows)
    for row in s["per_layer"]:  # the auto run: the seed's maps, judged, lose by far
        err = {c["name"]: c["attn_error"] for c in row["candidates"]}
        assert err["svd-uncentred/svd"] > 4 * err["meanpool/meanpool"], err
        assert row["chosen"].split("/")[0] != "svd-uncentred", row
    print(f"held-out seed {seed}: perplexity {ppl}")
    assert ppl["svd-uncentred"] > ppl["meanpool"], (seed, ppl)  # by 0.15-0.7% measured
    assert ppl["auto"] <= 1.001 * ppl["meanpool"], (seed, ppl)
