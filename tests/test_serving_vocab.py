"""A fine-tune that adds tokens (vocabulary 384 -> 386, untied LM head) served next to
one that does not: the extended fine-tune's added tokens are recognised in its prompts
and generated (and decoded) in its outputs, while the base and the other fine-tune keep
the base tokenizer and never see the new logits."""

import pytest
import requests

from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.testing.fixtures import build_fixture, eval_problems
from deltadq_vllm.tools.merge import merge

from serving_utils import Server, check_model

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    base = build_fixture("llama-mha")
    deltas, merged = {}, {}
    for name, fx in (("ext", "llama-mha--ext"), ("math", "llama-mha--math")):
        deltas[name] = root / name
        compress(base, build_fixture(fx), deltas[name], CompressOptions(method="dense",
                                                                         progress=False))
        merged[name] = root / f"{name}-merged"
        merge(base, deltas[name], merged[name], progress=False)
    spec = ",".join(f"{n}={p}" for n, p in deltas.items())
    server = Server(base, ["--delta-modules", spec], root)
    yield {"base": base, "deltas": deltas, "merged": merged, "server": server}
    server.stop()


def _tokenize(server, model, text):
    r = requests.post(server.url + "/tokenize", json={"model": model, "prompt": text,
                                                      "add_special_tokens": False}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_added_tokens_are_recognised_only_for_their_finetune(work):
    s = work["server"]
    ext_ids = _tokenize(s, "ext", "<calc>1+2</calc>")
    base_ids = _tokenize(s, str(work["base"]), "<calc>1+2</calc>")
    assert 384 in ext_ids and 385 in ext_ids
    assert max(base_ids) < 384 and len(base_ids) > len(ext_ids)
    assert max(_tokenize(s, "math", "<calc>")) < 384


def test_outputs_equal_merged_checkpoints_and_decode_added_tokens(work):
    s, client = work["server"], work["server"].client()
    prompts = [p for p, _ in eval_problems("ext", 3)] + ["<calc>4+4</calc>"]
    failures, texts = [], []
    for model, path in (("ext", work["merged"]["ext"]), ("math", work["merged"]["math"]),
                        (str(work["base"]), work["base"])):
        bad, outputs = check_model(client, model, path, prompts, NEW_TOKENS)
        failures += bad
        if model == "ext":
            texts += outputs
        else:
            assert all(max(ids) < 384 for ids, _ in outputs), (model, outputs)
    assert not failures, "\n".join(failures) + "\n" + s.tail()
    assert any(384 in ids for ids, _ in texts)
    assert any("<calc>" in text for _, text in texts), texts


def test_chat_uses_the_finetune_tokenizer(work):
    r = work["server"].client().chat.completions.create(
        model="ext", messages=[{"role": "user", "content": "Q: 2+2=? A:"}], max_tokens=8,
        temperature=0)
    assert r.choices[0].message.content is not None
