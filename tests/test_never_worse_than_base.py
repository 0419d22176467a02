"""Issue #13: a compressed fine-tune is never further from the fine-tune than the base is.

Judged the way a user would: transformers runs the fine-tune's own folder (the truth), the
base, and `deltadq merge`'s output of the compressed delta, each loaded the normal way; on
fresh held-out text (corpus lines from a random seed, printed, plus held-out task prompts)
the merged model's KL to the fine-tune must be lower than the base's, each text on its own
and as one stream, and its top-1 agreement on the stream not lower beyond the compressor's
own tie rule (two paired standard errors). The pair is the large-delta fixture (llama-gqa
-> llama-gqa--math, fully fine-tuned on a new skill, TIED embeddings) at 256x, where the
tied embedding used to be judged only as the LM head: its stored rows came out 4.9x the
true delta's norm and the merged model's KL was 42.5 nats against the base's 6.5.
"""

from __future__ import annotations

import json

import pytest
import torch

from deltadq_vllm.testing.closeness import (closeness, next_token_logprobs, stream_logprobs,
                                            top1_noise)
from deltadq_vllm.tools.methods import Calibration


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(path)))


def _logprobs(path, texts, stream):
    """(per text, as one stream) log-probs of the model at `path`, loaded once."""
    model, tok = _load(path)
    return next_token_logprobs(model, tok, texts), stream_logprobs(model, tok, stream)


@pytest.mark.parametrize("method", ["deltadq", "dare"])
def test_large_delta_never_further_than_the_base(tmp_path, method):
    from deltadq_vllm.testing.fixtures import build_fixture
    from deltadq_vllm.testing.tasks import eval_problems, generic_corpus
    from deltadq_vllm.tools.compress import CompressOptions, compress
    from deltadq_vllm.tools.merge import merge

    base, ft = build_fixture("llama-gqa"), build_fixture("llama-gqa--math")
    assert json.loads((ft / "config.json").read_text()).get("tie_word_embeddings")
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    print("held-out text seed", seed)
    task = json.loads((ft / "fixture_info.json").read_text())["task"]
    texts = generic_corpus(24, seed) + [f"{p} {a}" for p, a in eval_problems(task)[:24]]

    # the compressor's own check reads text of the model's domain, as a user of such a
    # model passes --check-text: the builtin English prose is out of this fixture's domain
    # (top-1 agreement ~0.01-0.02 there, noise: a fixture trained on an AVX2 machine was
    # refused at 0.010 vs the base's 0.021 while closer on KL, 6.49 vs 7.80, and on this
    # test's text on both counts); another seed than the texts judged below
    check_text = tmp_path / "check.txt"
    check_text.write_text("\n".join(generic_corpus(400, seed + 1)))
    s = compress(base, ft, tmp_path / "delta", CompressOptions(
        method=method, ratio=256, progress=False, check_text=str(check_text)))
    # never above the budget; within 3% for deltadq. (DARE on this tiny model: matrices of
    # tens of bytes flip between unsafe and stored as the budget moves, and no rewrite
    # lands in [256, 264]x: it keeps the one that fitted, measured 277x)
    assert s["true_ratio"] >= 256 * 0.999
    if method == "deltadq":
        assert s["true_ratio"] <= 256 * 1.03
    merge(base, tmp_path / "delta", tmp_path / "merged", progress=False)

    # the same texts as one stream: the corpus lines and the problems interleaved, as the
    # compressor's check reads its text
    stream = [x for pair in zip(texts[:24], texts[24:]) for x in pair]
    (ref, ref_s), (lp_base, lp_base_s), (lp, lp_s) = (
        _logprobs(p, texts, stream) for p in (ft, base, tmp_path / "merged"))
    # each text on its own (every line starts without context): KL lower than the base's
    c_base, c = closeness(ref, lp_base), closeness(ref, lp)
    print(f"{method} 256x, per text: KL {c['kl']:.3f} top-1 {c['top1_agreement']:.3f}; "
          f"base KL {c_base['kl']:.3f} top-1 {c_base['top1_agreement']:.3f}")
    assert c["kl"] < c_base["kl"]
    # as one stream: KL lower, and top-1 agreement not lower beyond the check's own tie rule
    # (two paired standard errors). (Per text, on the fixture built on an AVX512 machine,
    # the merged model agreed with the fine-tune on 3-5.5% of tokens against the base's
    # 6-9%, every seed, though its KL was 2 nats lower; the same lines read as one stream
    # (with the context a stream gives) tie, 0.105 vs 0.108 and 0.100 vs 0.100, KL 4.6 vs
    # 6.3. This fully fine-tuned pair is 4-9 nats from the base: at 256x top-1 agreement
    # is at the level of chance here.)
    c_base, c = closeness(ref_s, lp_base_s), closeness(ref_s, lp_s)
    noise = top1_noise(ref_s, lp_s, lp_base_s)
    print(f"{method} 256x, stream: KL {c['kl']:.3f} top-1 {c['top1_agreement']:.3f}; base KL "
          f"{c_base['kl']:.3f} top-1 {c_base['top1_agreement']:.3f}; tie margin {noise:.3f}")
    assert c["kl"] < c_base["kl"]
    assert c["top1_agreement"] >= c_base["top1_agreement"] - noise

    # the tied embedding, if stored, is within its input role's bound (rows vs the
    # fine-tune's own rows), not only the LM head's
    emb = "model.embed_tokens.weight"
    row = next(r for r in s["tensors"] if r["name"] == emb)
    if row["status"] == "stored":
        from deltadq_vllm.checkpoint import Checkpoint

        w_ft = Checkpoint(ft).get(emb).float()
        got = Checkpoint(tmp_path / "merged").get(emb).float()
        assert float((got - w_ft).norm() / w_ft.norm()) < 1


def test_tied_embedding_error_is_the_worse_role():
    """A candidate that is exact on the LM head's inputs but adds a large component in the
    directions those inputs never span (fresh random, rank-deficient inputs) has a small
    LM-head error and a large row error: input_rows reports the row error, plain
    calibration does not."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    vocab, hidden, rank = 300, 32, 8
    basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen))[0]
    x = torch.randn(256, rank, generator=gen) @ basis[:, :rank].T   # inputs span `rank` dims
    delta = 0.05 * torch.randn(vocab, hidden, generator=gen)
    null = torch.randn(vocab, hidden - rank, generator=gen) @ basis[:, rank:].T
    approx = delta + null * (3 * delta.norm() / null.norm())
    w_ft = torch.randn(vocab, hidden, generator=gen).to(torch.bfloat16)  # as checkpoints hold it
    lm_only = Calibration.split(x)
    tied = Calibration.split(x, input_rows=True)
    assert lm_only.relative_error(delta, approx) < 1e-3
    assert tied.relative_error(delta, approx) == pytest.approx(3.0, rel=1e-3)
    roles = tied.role_errors(delta, delta - approx, w_ft)
    assert roles["output"] < 1e-3
    wf = w_ft.float()
    assert roles["rows"] == pytest.approx(float((approx - delta).norm() / wf.norm()), rel=1e-4)
    assert roles["output"] == pytest.approx(
        float((x[::4] @ (delta - approx).T).norm() / (x[::4] @ wf.T).norm()), rel=1e-3)


def test_tied_embedding_takes_rank_one_where_its_share_is_worse_than_nothing():
    """A tied embedding whose delta is nearly rank 1 (a fine-tune moving every row along a
    few directions), at a share below low-rank's smallest encoding: the method's 1-2 bit
    codes at that share are worse than no delta in the rows' role; with room for rank 1
    within LOWRANK_STRETCH x the share, rank 1 is stored (below error 1), the bytes beyond
    the share paid by later matrices; without room (the last matrix), the method's
    encoding stays."""
    from types import SimpleNamespace

    from deltadq_vllm.tools.choose import LOWRANK_STRETCH, choose
    from deltadq_vllm.tools.compress_options import CompressOptions
    from deltadq_vllm.tools.methods import MethodOptions

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    vocab, hidden = 4096, 64
    u, v = torch.randn(vocab, 1, generator=gen), torch.randn(1, hidden, generator=gen)
    delta = u @ v + 0.02 * torch.randn(vocab, hidden, generator=gen)
    x = torch.randn(512, hidden, generator=gen)
    calib = Calibration.split(x, input_rows=True)
    rank1 = (vocab + hidden) * 2
    share = 0.6 * rank1                     # within the stretch, below rank 1
    assert share * LOWRANK_STRETCH >= rank1
    p = SimpleNamespace(name="model.embed_tokens.weight", cls="embedding")
    opt = CompressOptions(ratio=1024, progress=False)
    topts = MethodOptions(bits=1, seed=0)
    held = choose(opt, p, delta, calib, share, topts, 0, room=share)
    assert held.method is None and held.enc.nbytes() <= share
    assert held.error >= 1            # its codes swamp the rows: worse than nothing there
    took = choose(opt, p, delta, calib, share, topts, 0, room=10 * share)
    assert took.method == "lowrank" and took.enc.nbytes() == rank1
    assert took.error < 1 and took.plain_error == pytest.approx(held.error)
    # beyond the stretch: the method's encoding, whatever the room
    far = choose(opt, p, delta, calib, rank1 / LOWRANK_STRETCH * 0.9, topts, 0, room=10 * rank1)
    assert far.method is None
