"""Issue #13: the whole-model check of `deltadq compress` (tools/model_check.py).

The check runs the fine-tune, the base and base + delta layer by layer on held-out text
and refuses (or, with --check warn, flags) a compressed fine-tune further from the
fine-tune than the base; a per-layer shrink of the deltas is published where it is closer.
Its verdicts are compared here with the reference a user would use: transformers running
the fine-tune's own folder, the base's, and `deltadq merge`'s output of the artifact.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltadq_vllm.format.artifact import DeltaArtifact
from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.errors import DeltaDQError
from deltadq_vllm.format.layouts import (decode, encode_bernoulli, encode_dense, encode_hash_groupwise,
                                  encode_lowrank, encode_sparse_rows, scale_encoded)
from deltadq_vllm.format.positions import bernoulli_mask
from deltadq_vllm.testing.fixtures import BASES, build_fixture
from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.tools.check_publish import (check_and_publish, read_check_text,
                                              rewrite_artifact)
from deltadq_vllm.tools.model_check import Closeness, ModelCheck, closeness


def _gen():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    print("seed", seed)
    return torch.Generator().manual_seed(seed)


def _random_encodings(gen):
    out, inp, rps = 12, 48, 4
    nb = out // rps

    def scales():
        return ((torch.rand(nb, generator=gen) + 0.1).to(torch.bfloat16),
                (torch.randn(nb, generator=gen)).to(torch.bfloat16))
    step, minv = scales()
    yield encode_dense(torch.randn(out, inp, generator=gen), torch.bfloat16)
    yield encode_hash_groupwise((out, inp), torch.randint(0, 8, (out, 8), generator=gen), step,
                                minv, group_size=12, keep=2, bits=3, seed=5, rows_per_scale=rps)
    n = int(bernoulli_mask(7, out, inp, 0.25).sum())
    yield encode_bernoulli((out, inp), torch.randint(0, 4, (n,), generator=gen), step, minv,
                           keep_prob=0.25, bits=2, seed=7, rows_per_scale=rps)
    cols = torch.stack([torch.randperm(inp, generator=gen)[:5] for _ in range(out)])
    yield encode_sparse_rows((out, inp), cols, torch.randint(0, 16, (out, 5), generator=gen),
                             step, minv, bits=4, decompose_bits=2, rows_per_scale=rps)
    yield encode_lowrank(torch.randn(out, 3, generator=gen), torch.randn(3, inp, generator=gen))


def test_scaled_encodings_decode_to_the_scaled_delta():
    """Every layout: decode(scale_encoded(e, a)) = a * decode(e) up to one bf16 rounding of
    the scales; positions, codes and byte counts unchanged (the readers see the same
    format)."""
    gen = _gen()
    for enc in _random_encodings(gen):
        a = float(torch.rand((), generator=gen) * 2.5 - 0.5)
        got = scale_encoded(enc, a)
        ref = a * decode(enc)
        tol = 2 ** -7 * (decode(enc).abs().max() * abs(a) + 1e-6) * 2
        assert (decode(got) - ref).abs().max() <= tol, enc.layout
        assert got.nbytes() == enc.nbytes() and got.params == enc.params
        for role in ("codes", "cols", "part_counts"):
            if role in enc.tensors:
                assert torch.equal(got.tensors[role], enc.tensors[role])


@pytest.mark.parametrize("arch", sorted(BASES))
def test_layerwise_logits_match_transformers(arch):
    """The check's layer-by-layer run of a checkpoint equals transformers running the
    folder (every fixture architecture: Gemma 2's scaled embeddings and soft-capped
    logits, Phi-3's fused projections, sliding windows, ...)."""
    from transformers import AutoModelForCausalLM

    path = build_fixture(arch)
    ck = Checkpoint(path)
    check = ModelCheck(ck, ck, read_check_text(None)[0], n_seqs=2, seq_len=32)
    ours = check.logits(lambda n: ck.get(n).float())
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=check.cal.input_ids).logits.reshape(ours.shape)
    assert torch.allclose(ours, ref, atol=2e-4 * float(ref.abs().max()), rtol=1e-3), \
        float((ours - ref).abs().max())


def _reference_closeness(tmp_path, base, ft, art_dir, ids, tag):
    """KL / top-1 of `deltadq merge`'s output (and of the base) to the fine-tune's own
    folder, each run by transformers on token ids `ids`."""
    from transformers import AutoModelForCausalLM

    from deltadq_vllm.tools.merge import merge

    merged = tmp_path / f"merged-{tag}"
    merge(base, art_dir, merged, progress=False)

    def logits(path):
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            out = m(input_ids=ids).logits
        return out.reshape(-1, out.shape[-1])
    ref = torch.log_softmax(logits(ft), -1)
    base_logits = logits(base)
    if base_logits.shape[1] < ref.shape[1]:
        base_logits = torch.cat([base_logits, base_logits.new_full(
            (base_logits.shape[0], ref.shape[1] - base_logits.shape[1]), -1e4)], 1)
    return closeness(ref, logits(merged)), closeness(ref, base_logits)


def _scalable(art):
    return [n for n, e in art.entries.items() if not e.absolute and e.layout != "dense"]


def _unchecked(tmp_path_factory, ft_name):
    base, ft = build_fixture("llama-gqa"), build_fixture(ft_name)
    out = tmp_path_factory.mktemp("c") / "delta"
    compress(base, ft, out, CompressOptions(ratio=16, check="off", progress=False))
    return base, ft, out


@pytest.fixture(scope="module")
def light_16x(tmp_path_factory):
    """llama-gqa -> llama-gqa--light (a small delta) at 16x, unchecked (sabotaged below)."""
    return _unchecked(tmp_path_factory, "llama-gqa--light")


@pytest.fixture(scope="module")
def large_16x(tmp_path_factory):
    """llama-gqa -> llama-gqa--math (a large delta, tied embeddings) at 16x, unchecked."""
    return _unchecked(tmp_path_factory, "llama-gqa--math")


def test_a_delta_worse_than_the_base_is_refused_and_nothing_is_written(tmp_path, light_16x):
    """A delta that moves the model away from the fine-tune (the stored deltas negated and
    doubled) is refused by --check fail with the numbers, nothing is left behind; with
    --check warn it is written and the summary says so. The verdict agrees with the user's
    reference (merge + transformers)."""
    base, ft, good = light_16x
    art = DeltaArtifact(good)
    bad = rewrite_artifact(art, tmp_path / "bad", {n: -2.0 for n in _scalable(art)}, False)
    text, source = read_check_text(None)
    out = tmp_path / "published"
    for shrink in ("never", "if_needed"):
        # (the shrink, tried because it fails, drives every layer's factor to 0: the base
        # itself, which is not closer than the base)
        with pytest.raises(DeltaDQError, match="further from the fine-tune than the base") as e:
            check_and_publish(base, ft, bad, out, "fail", text, source, False, shrink=shrink)
        assert "lower --ratio" in e.value.fix
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]   # no staging left

    rec = check_and_publish(base, ft, bad, out, "warn", text, source, False, shrink="never")
    assert rec["passed"] is False and rec["final"]["kl"] > rec["base"]["kl"]
    from deltadq_vllm.tools.compress_summary import check_lines
    assert "FURTHER FROM THE FINE-TUNE THAN THE BASE" in check_lines(rec)[0]

    ids = ModelCheck(Checkpoint(base), Checkpoint(ft), text).cal.input_ids
    merged, base_c = _reference_closeness(tmp_path, base, ft, out, ids, "bad")
    assert merged.kl > base_c.kl
    # the check's numbers are the reference's (same tokens, float32 both)
    assert rec["final"]["kl"] == pytest.approx(merged.kl, rel=2e-3, abs=1e-4)
    assert rec["base"]["kl"] == pytest.approx(base_c.kl, rel=2e-3, abs=1e-4)


def test_the_per_layer_shrink_is_published_where_it_is_closer(tmp_path, light_16x):
    """Stored deltas scaled 3x (overshooting the fine-tune: further from it than the base):
    the check (default: shrink only when needed, --check fail) scales each layer back by
    about 1/3, publishes the scaled artifact (exactly factor x the stored deltas, same
    bytes) and measures it as written; the reference agrees it is closer than the
    unscaled one.
    (On the large-delta pair the factors that bring each layer's output closest are not
    the ones that bring the logits closest: there the check keeps the unscaled artifact,
    which the next test covers.)"""
    base, ft, good = light_16x
    art = DeltaArtifact(good)
    over = rewrite_artifact(art, tmp_path / "over", {n: 3.0 for n in _scalable(art)}, False)
    text, source = read_check_text(None)
    out = tmp_path / "published"
    rec = check_and_publish(base, ft, over, out, "fail", text, source, False)
    assert not Closeness(**rec["unscaled"]).closer_than(Closeness(**rec["base"]))
    assert rec["passed"] and rec["scaled_tensors"] > 0
    assert rec["final"]["kl"] < rec["unscaled"]["kl"]
    assert all(0.2 <= a <= 0.5 for a in rec["layer_scale"]), rec["layer_scale"]
    src, pub = DeltaArtifact(over), DeltaArtifact(out)
    # same tensor bytes; the gzipped manifest differs only by the data file's checksum
    assert abs(pub.file_bytes() - src.file_bytes()) <= 16
    changed = 0
    for name in src.entries:
        a, b = decode(src.encoded(name)), decode(pub.encoded(name))
        if not torch.equal(a, b):
            changed += 1
            ratio = float((b * a).sum() / (a * a).sum())   # the factor it was scaled by
            assert 0 <= ratio <= 2.01
            assert torch.allclose(b, ratio * a, atol=2 ** -7 * float(a.abs().max()) * 3)
    assert changed == rec["scaled_tensors"]

    ids = ModelCheck(Checkpoint(base), Checkpoint(ft), text).cal.input_ids
    published, _ = _reference_closeness(tmp_path, base, ft, out, ids, "pub")
    unscaled, _ = _reference_closeness(tmp_path, base, ft, over, ids, "over")
    assert published.kl < unscaled.kl
    assert rec["final"]["kl"] == pytest.approx(published.kl, rel=2e-3, abs=1e-4)


def test_one_check_judges_several_artifacts_as_fresh_checks_do(tmp_path, light_16x):
    """compress() hands every check of one fine-tune the same ModelCheck, which runs the
    fine-tune's and the base's streams for the first artifact only: each artifact's record
    (a good fit, one that needs the shrink, one refused) equals a fresh check's, and the
    published artifacts are the same bytes."""
    from deltadq_vllm.tools.check_publish import check_maker

    base, ft, good = light_16x
    art = DeltaArtifact(good)
    gen = _gen()
    arts = {"good": good,
            "over": rewrite_artifact(art, tmp_path / "over", {n: 2.5 + float(torch.rand(
                (), generator=gen)) for n in _scalable(art)}, False),
            "bad": rewrite_artifact(art, tmp_path / "bad", {n: -2.0 for n in _scalable(art)},
                                    False)}
    text, source = read_check_text(None)
    shared = check_maker(base, ft, text)
    for name, staged in arts.items():
        got = check_and_publish(base, ft, staged, tmp_path / f"{name}-shared", "warn", text,
                                source, False, make_check=shared)
        want = check_and_publish(base, ft, staged, tmp_path / f"{name}-fresh", "warn", text,
                                 source, False)
        timing = ("phase_seconds",)
        assert {k: v for k, v in got.items() if k not in timing} == \
            {k: v for k, v in want.items() if k not in timing}, name
        a, b = DeltaArtifact(tmp_path / f"{name}-shared"), DeltaArtifact(tmp_path / f"{name}-fresh")
        for t in a.entries:
            for role in a.entries[t].stored:
                assert torch.equal(a.read(t, role), b.read(t, role)), (name, t, role)
    assert shared()._reference is not None   # one check, kept across the three


def test_a_shrink_that_is_not_closer_is_not_published(tmp_path, large_16x):
    """The published artifact is the closer (by KL) of scaled and unscaled: on the
    large-delta pair with 2.5x deltas the per-layer factors lower each layer's output error
    but not the logits' KL, and the artifact is published unscaled, byte for byte."""
    base, ft, good = large_16x
    art = DeltaArtifact(good)
    over = rewrite_artifact(art, tmp_path / "over", {n: 2.5 for n in _scalable(art)}, False)
    text, source = read_check_text(None)
    rec = check_and_publish(base, ft, over, tmp_path / "pub", "warn", text, source, False,
                            shrink="always")
    if "scaled_float" in rec and rec["scaled_float"]["kl"] >= rec["unscaled"]["kl"]:
        assert rec["scaled_tensors"] == 0 and rec["final"] == rec["unscaled"]
        src, pub = DeltaArtifact(over), DeltaArtifact(tmp_path / "pub")
        for name in src.entries:
            for role in src.entries[name].stored:
                assert torch.equal(src.read(name, role), pub.read(name, role))
    else:   # the factors did help: then they were published
        assert rec["final"]["kl"] <= rec["unscaled"]["kl"] * 1.01


def test_compress_checks_by_default_and_keeps_the_ratio(tmp_path):
    """compress() with default options runs the check, records it in the summary, keeps
    the true ratio it fitted and leaves no staging directories; an existing --out without
    --force fails before any work."""
    base, ft = build_fixture("llama-mha"), build_fixture("llama-mha--math")
    out = tmp_path / "d"
    s = compress(base, ft, out, CompressOptions(ratio=64, progress=False))
    rec = s["model_check"]
    assert rec["ran"] and rec["passed"], rec
    assert rec["final"]["kl"] < rec["base"]["kl"]
    # closer than the base without it: the shrink (a fallback) did not run
    assert rec["scaled_tensors"] == 0 and "scaled_float" not in rec
    assert s["artifact_bytes"] == DeltaArtifact(out).file_bytes()
    assert 64 * 0.999 <= s["true_ratio"] <= 64 * 1.03
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with pytest.raises(DeltaDQError, match="already exists"):
        compress(base, ft, out, CompressOptions(ratio=64, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert math.isfinite(json.loads(json.dumps(rec))["seconds"])


def test_verdict_counts_a_top1_tie_within_noise_as_not_lower():
    """Top-1 agreement is judged paired, per token, with two standard errors of slack: a
    delta that halves the KL but flips a few tokens of 1024 either way is not "further"
    than the base; one that loses many tokens' agreement, or has the higher KL, is."""
    gen = _gen()
    n = 1024
    base_agree = torch.rand(n, generator=gen) < 0.85
    flips = torch.randperm(n, generator=gen)

    def model(lost: int, gained: int, kl: float) -> Closeness:
        a = base_agree.clone()
        on, off = flips[base_agree[flips]], flips[~base_agree[flips]]
        a[on[:lost]] = False
        a[off[:gained]] = True
        return Closeness(kl, float(a.float().mean()), a)

    base = Closeness(0.1, float(base_agree.float().mean()), base_agree)
    tie = model(lost=20, gained=15, kl=0.05)       # 5 tokens lower: a tie
    assert tie.top1 < base.top1 and tie.closer_than(base)
    assert 0.005 < tie.top1_noise(base) < 0.02
    assert not model(lost=60, gained=5, kl=0.05).closer_than(base)    # 55 tokens lower
    assert not model(lost=0, gained=30, kl=0.11).closer_than(base)    # higher KL
    assert not Closeness(base.kl, base.top1, base_agree.clone()).closer_than(base)
    # read back from a record (no per-token data): the plain comparison
    assert not Closeness(0.05, base.top1 - 0.001).closer_than(Closeness(0.1, base.top1))


def test_verdict_needs_a_kl_lower_beyond_noise():
    """KL is judged paired, per token, too: the fit must be closer by more than two
    standard errors of the per-token difference. Per-token KLs are heavy-tailed (fresh
    random exponential draws here); a mean a few percent below the base's is no evidence."""
    gen = _gen()
    n = 1024
    agree = torch.rand(n, generator=gen) < 0.8
    base_tok = torch.empty(n).exponential_(10.0, generator=gen)       # mean ~0.1
    jitter = 2 * torch.rand(n, generator=gen)                         # per-token factor

    def model(scale: float) -> Closeness:
        tok = base_tok * jitter
        tok *= scale * base_tok.mean() / tok.mean()    # the mean exactly scale x the base's
        return Closeness(float(tok.mean()), float(agree.float().mean()), agree.clone(), tok)

    base = Closeness(float(base_tok.mean()), float(agree.float().mean()), agree, base_tok)
    near, far = model(0.98), model(0.5)
    noise = near.kl_noise(base)
    assert 0.001 < noise < 0.02
    # 2% lower on average, the per-token spread ~0.06: within noise (0 of 200 seeds
    # significant, measured)
    assert near.kl < base.kl - 0.0015 and noise > base.kl - near.kl
    assert not near.closer_than(base)
    assert far.kl < base.kl - far.kl_noise(base) and far.closer_than(base)
    assert not base.closer_than(base)


def test_a_shrink_that_retreats_to_the_base_is_not_a_pass(tmp_path, light_16x, large_16x):
    """Another fine-tune's delta (llama-gqa--math's, checked against llama-gqa--light) is
    much further from the fine-tune than the base. The per-layer shrink drives it to
    nearly nothing, which ends a hair closer than the base (KL and top-1 within noise):
    that is a retreat to the base, not a repair (above REPAIR_KL_SHARE of the base's KL),
    so the fit is judged as it is: refused by --check fail, written unscaled (byte for
    byte) by --check warn, the rejected shrink named in the record and the summary."""
    from deltadq_vllm.tools.compress_summary import check_lines
    from deltadq_vllm.tools.check_publish import REPAIR_KL_SHARE, WRITTEN_KL_SLACK

    base, ft_light, _ = light_16x
    _, _, other = large_16x
    text, source = read_check_text(None)
    out = tmp_path / "pub"
    with pytest.raises(DeltaDQError, match="removes most of the delta"):
        check_and_publish(base, ft_light, other, out, "fail", text, source, False)
    assert not out.exists()
    rec = check_and_publish(base, ft_light, other, out, "warn", text, source, False)
    b = rec["base"]
    # written and re-measured where its float measurement was near a repair
    shrunk = rec.get("scaled_written") or rec["scaled_float"]
    if "scaled_written" not in rec:
        assert shrunk["kl"] > REPAIR_KL_SHARE * b["kl"] * (1 + WRITTEN_KL_SLACK)
    assert REPAIR_KL_SHARE * b["kl"] < shrunk["kl"] < b["kl"]     # beat the base, barely
    assert rec["passed"] is False and rec["final"] == rec["unscaled"]
    assert rec["scaled_tensors"] == 0 and "shrink_rejected" in rec
    assert any("not shrunk" in line for line in check_lines(rec))
    src, pub = DeltaArtifact(other), DeltaArtifact(out)
    for name in src.entries:
        for role in src.entries[name].stored:
            assert torch.equal(src.read(name, role), pub.read(name, role))


def test_the_head_grid_equals_the_full_forward(tmp_path):
    """An untied LM head's factor is chosen from logits composed linearly (x W^T + a x D^T,
    with the fine-tune's added vocabulary rows appended unscaled): at every factor of the
    grid, the closeness it reports equals running base + delta with that head factor the
    plain way, layer by layer (llama-mha--ext: untied head, two added tokens; the other
    tensors at fresh random factors)."""
    from deltadq_vllm.tools.model_check import HEAD_ALPHAS, DeltaWeights

    gen = _gen()
    base, ft = build_fixture("llama-mha"), build_fixture("llama-mha--ext")
    fit = tmp_path / "fit"
    compress(base, ft, fit, CompressOptions(ratio=16, check="off", progress=False))
    art = DeltaArtifact(fit)
    head = "lm_head.weight"
    assert art.extra_rows(head) is not None and head in _scalable(art)
    factors = {n: float(torch.rand((), generator=gen) * 1.5) for n in _scalable(art)}
    factor_of = lambda n: factors.get(n, 1.0)  # noqa: E731
    text, _ = read_check_text(None)
    check = ModelCheck(Checkpoint(base), Checkpoint(ft), text)
    ref = check.run(art, shrink="never").ref_logp
    dw = DeltaWeights(Checkpoint(base), art)
    h = check.cal.embed(dw.source(factor_of))
    for i in range(len(check.cal.layers)):
        h = check.cal.forward_layer(i, h, dw.source(factor_of))
    grid = check.head_grid(h, dw, factor_of, ref)
    assert [a for a, _ in grid] == list(HEAD_ALPHAS)
    for a, c in grid:
        plain = closeness(ref, check.logits(
            dw.source(lambda n, a=a: a if n == head else factor_of(n)), dw.forget))
        assert c.kl == pytest.approx(plain.kl, rel=1e-4, abs=1e-6), a
        assert c.top1 == plain.top1, a


def test_embedding_rows_read_alone_equal_the_whole_tables_rows(tmp_path, monkeypatch):
    """The check's embedding streams read only their tokens' rows (DeltaWeights.source's
    `rows`: base rows from the file, the delta's rows decoded alone where the layout allows):
    at a fresh random factor, every layout, with and without rows an extended vocabulary
    adds, the rows equal those of the whole base + factor * delta table (bit for bit;
    low-rank: U's rows times V, within float32 rounding)."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from deltadq_vllm.tools.calibration import WeightSource, checkpoint_rows
    from deltadq_vllm.tools import model_check
    from deltadq_vllm.tools.model_check import DeltaWeights

    decoded_whole = []
    whole_decode = model_check.decode
    monkeypatch.setattr(model_check, "decode",
                        lambda enc: decoded_whole.append(enc.layout) or whole_decode(enc))
    gen = _gen()
    out, inp = 12, 48   # _random_encodings' shape
    weight = torch.randn(out, inp, generator=gen).bfloat16()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"emb": weight, "other": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    base = Checkpoint(tmp_path)
    ids = torch.randint(0, out, (3, 11), generator=gen)
    assert torch.equal(checkpoint_rows(base, "emb", ids), weight[ids])
    for enc in _random_encodings(gen):
        for n_extra in (0, 3):
            extra = torch.randn(n_extra, inp, generator=gen) if n_extra else None
            art = SimpleNamespace(
                entries={"emb": SimpleNamespace(absolute=False, layout=enc.layout,
                                                shape=(out + n_extra, inp))},
                encoded=lambda name, enc=enc: enc,
                extra_rows=lambda name, extra=extra: extra)
            a = float(torch.rand((), generator=gen) * 1.5)
            for factor in (a, 0.0, 1.0):
                src = DeltaWeights(base, art).source(lambda n, f=factor: f)
                assert isinstance(src, WeightSource)
                ids = torch.randint(0, out + n_extra, (2, 7), generator=gen)
                decoded_whole.clear()
                got = src.rows("emb", ids)
                if enc.layout in ("hash_groupwise", "lowrank") and int(ids.max()) < out:
                    assert not decoded_whole, "decoded whole for a few rows"
                want = src("emb")[ids]
                assert got.dtype == torch.float32 and got.shape == (2, 7, inp)
                if enc.layout == "lowrank":
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                else:
                    assert torch.equal(got, want), (enc.layout, n_extra, factor)
