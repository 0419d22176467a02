"""A fine-tune's tokenizer: stored as what differs from the base's, rebuilt byte for byte,
and loaded as vLLM loads the `deltadq merge` output (same class, ids, special tokens, chat
template), for a tokenizers-built Qwen2 tokenizer whose class comes from the model type."""

import json
import random
import shutil

import pytest

from deltadq_vllm.format.artifact import DeltaArtifact
from deltadq_vllm.errors import DeltaDQError
from deltadq_vllm.tokenizer_diff import (diff_tokenizer, materialize, rebuild_files,
                                         tokenizer_files)
from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.testing.fixtures import build_fixture
from deltadq_vllm.tools.merge import merge

from finetune_variants import ADDED, TEMPLATE, make_finetune, random_texts

def _classes(tok) -> set[str]:
    return {c.__name__ for c in type(tok).__mro__}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    base = build_fixture("qwen2")
    ft = make_finetune(base, root / "ft", add_tokens=ADDED, seed=5, chat_template=TEMPLATE)
    delta = root / "delta"
    compress(base, ft, delta, CompressOptions(method="dense", progress=False))
    merged = root / "merged"
    merge(base, delta, merged, progress=False)
    return {"base": base, "ft": ft, "delta": delta, "merged": merged, "root": root}


def test_stored_as_changes_and_rebuilt_byte_for_byte(qwen):
    art = DeltaArtifact(qwen["delta"])
    spec = art.tokenizer_spec
    assert isinstance(spec, dict) and not (qwen["delta"] / "tokenizer").exists()
    whole = sum(f.stat().st_size for f in tokenizer_files(qwen["ft"]))
    stored = len(json.dumps(spec))
    assert stored < whole / 5, (stored, whole)
    rebuilt = art.tokenizer_files(qwen["base"])
    assert rebuilt == {f.name: f.read_bytes() for f in tokenizer_files(qwen["ft"])}
    for name, data in rebuilt.items():   # and what merge wrote
        assert (qwen["merged"] / name).read_bytes() == data


def test_every_kind_of_change_round_trips(tmp_path):
    base = build_fixture("llama-gqa")
    ft = tmp_path / "ft"
    shutil.copytree(base, ft)
    (ft / "chat_template.jinja").write_text(TEMPLATE)                 # small text: whole
    tj = json.loads((ft / "tokenizer.json").read_text())
    tj["added_tokens"].append({**tj["added_tokens"][-1], "id": 999, "content": "<x>"})
    (ft / "tokenizer.json").write_text(json.dumps(tj, indent=2, ensure_ascii=False))
    (ft / "tokenizer.model").write_bytes(bytes(range(256)) * 3)       # binary, new
    (ft / "tokenizer_config.json").unlink()                            # removed
    diff = diff_tokenizer(base, ft)
    files = rebuild_files(diff, base)
    assert files == {f.name: f.read_bytes() for f in tokenizer_files(ft)}
    assert "tokenizer_config.json" not in files
    assert diff_tokenizer(base, base) is None


def test_a_changed_base_tokenizer_is_refused_not_guessed(qwen, tmp_path):
    base2 = tmp_path / "base2"
    shutil.copytree(qwen["base"], base2)
    tj = json.loads((base2 / "tokenizer.json").read_text())
    tj["added_tokens"] = tj["added_tokens"][:-1]
    (base2 / "tokenizer.json").write_text(json.dumps(tj, indent=2))
    with pytest.raises(DeltaDQError, match="tokenizer.json.*different one") as e:
        DeltaArtifact(qwen["delta"]).tokenizer_files(base2)
    assert "fix:" in str(e.value)


def test_loads_like_vllm_loads_the_merged_folder(qwen):
    """Class, ids, special tokens and chat template equal vLLM's get_tokenizer on the
    `deltadq merge` output (the reference a user would use), for fresh random strings."""
    from vllm.tokenizers.registry import get_tokenizer

    from deltadq_vllm.serving.tokenizers import finetune_tokenizer_dir
    from deltadq_vllm import vllm_compat

    art = DeltaArtifact(qwen["delta"])
    ours = vllm_compat.load_tokenizer(str(finetune_tokenizer_dir(art, qwen["base"])))
    ref = get_tokenizer(str(qwen["merged"]))
    assert type(ours).__name__ == type(ref).__name__
    assert "Qwen2Tokenizer" in _classes(ref)      # resolved from the model type
    assert ours.all_special_tokens == ref.all_special_tokens
    assert len(ours) == len(ref) and ours.eos_token_id == ref.eos_token_id
    texts = random_texts(random.randrange(1 << 30), 400)
    bad = [t for t in texts if ours.encode(t) != ref.encode(t)]
    assert not bad, bad[:3]
    ids = [ref.encode(t) for t in texts[:50]]
    assert [ours.decode(i) for i in ids] == [ref.decode(i) for i in ids]
    msgs = [{"role": "user", "content": texts[0]}]
    assert ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # the bug this guards against: the same files without the fine-tune's config.json
    # resolve another class, which tokenizes some strings differently
    bare = qwen["root"] / "bare"
    bare.mkdir()
    for name, data in art.tokenizer_files(qwen["base"]).items():
        (bare / name).write_bytes(data)
    naive = get_tokenizer(str(bare))
    assert "Qwen2Tokenizer" not in _classes(naive)
    assert any(naive.encode(t) != ref.encode(t) for t in texts)


def test_materialized_dirs_are_content_addressed(qwen, tmp_path):
    files = DeltaArtifact(qwen["delta"]).tokenizer_files(qwen["base"])
    cfg = json.loads((qwen["ft"] / "config.json").read_text())
    a = materialize(files, cfg, tmp_path)
    assert materialize(files, cfg, tmp_path) == a
    changed = dict(files, **{"chat_template.jinja": b"{{ messages }}"})
    b = materialize(changed, cfg, tmp_path)
    assert b != a and (b / "chat_template.jinja").read_bytes() == b"{{ messages }}"
    (a / "tokenizer.json").write_bytes(b"{}")            # a damaged cached copy is replaced
    assert (materialize(files, cfg, tmp_path) / "tokenizer.json").read_bytes() == \
        files["tokenizer.json"]


def test_format_2_artifacts_still_load(qwen, tmp_path):
    """Version 2 kept whole tokenizer files in tokenizer/ (without config.json) and a
    sampled base fingerprint: still read, rebuilt with the fine-tune's config, checked."""
    import hashlib

    from deltadq_vllm.format.artifact import read_manifest, write_manifest
    from deltadq_vllm.checkpoint import Checkpoint
    from deltadq_vllm.serving.tokenizers import finetune_tokenizer_dir
    from vllm.tokenizers.registry import get_tokenizer

    from deltadq_vllm import vllm_compat

    old = tmp_path / "v2"
    shutil.copytree(qwen["delta"], old)
    (old / "tokenizer").mkdir()
    m = read_manifest(old)
    for f in tokenizer_files(qwen["ft"]):
        data = f.read_bytes()
        (old / "tokenizer" / f.name).write_bytes(data)
        m["files"][f"tokenizer/{f.name}"] = {"bytes": len(data),
                                             "sha256": hashlib.sha256(data).hexdigest()}
    names = [n for n, e in m["tensors"].items() if e.get("base_shape", 1) is not None]
    m.update(format_version=2)
    m["finetune"]["tokenizer"] = "tokenizer"
    m["base"]["fingerprint"] = Checkpoint(qwen["base"]).fingerprint(names)
    write_manifest(old, m)
    art = DeltaArtifact(old)
    art.check_base(Checkpoint(qwen["base"]))
    assert art.tokenizer_files(qwen["base"]) == {f.name: f.read_bytes()
                                                 for f in tokenizer_files(qwen["ft"])}
    ours = vllm_compat.load_tokenizer(str(finetune_tokenizer_dir(art, qwen["base"])))
    ref = get_tokenizer(str(qwen["merged"]))
    texts = random_texts(random.randrange(1 << 30), 100)
    assert [ours.encode(t) for t in texts] == [ref.encode(t) for t in texts]
