"""One fine-tune served alone: `deltadq serve BASE --standalone-delta DIR` merges the delta
while vLLM loads the base (load format `deltadq`): same tokens as HF transformers on the
merged checkpoint, with the fine-tune's own (extended) vocabulary and tokenizer."""

import pytest

from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.testing.fixtures import build_fixture, eval_problems
from deltadq_vllm.tools.merge import merge

from serving_utils import Server, check_model


def test_standalone_delta_equals_merged_checkpoint(tmp_path):
    base = build_fixture("llama-mha")
    delta, merged = tmp_path / "ext", tmp_path / "ext-merged"
    compress(base, build_fixture("llama-mha--ext"), delta, CompressOptions(ratio=4,
                                                                           progress=False))
    merge(base, delta, merged, progress=False)
    prompts = [p for p, _ in eval_problems("ext", 3)]
    s = Server(base, ["--standalone-delta", delta], tmp_path)
    try:
        client = s.client()
        assert [m.id for m in client.models.list().data] == ["ext"]
        failures, _ = check_model(client, "ext", merged, prompts, 10)
        assert not failures, "\n".join(failures) + "\n" + s.tail()
    finally:
        s.stop()


def test_standalone_refuses_wrong_base(tmp_path, capsys):
    from deltadq_vllm.cli import main

    delta = tmp_path / "d"
    compress(build_fixture("llama-mha"), build_fixture("llama-mha--math"), delta,
             CompressOptions(ratio=8, progress=False))
    rc = main(["serve", str(build_fixture("llama-gqa")), "--standalone-delta", str(delta)])
    err = capsys.readouterr().err
    assert rc == 2 and "was made for a base" in err and "fix:" in err
