"""`deltadq serve` refuses bad deltas and flags in about a second, before any engine starts."""

import pytest

from deltadq_vllm.cli import main
from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.testing.fixtures import build_fixture


@pytest.fixture(scope="module")
def delta(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "math"
    compress(build_fixture("llama-gqa"), build_fixture("llama-gqa--math"), d,
             CompressOptions(ratio=8, progress=False))
    return d


def serve(capsys, *args):
    try:
        rc = main(["serve", *map(str, args)])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def test_missing_delta_dir(capsys, tmp_path):
    rc, err = serve(capsys, build_fixture("llama-gqa"), "--delta-modules", f"m={tmp_path}/nope")
    assert rc == 2 and "does not exist" in err and "fix:" in err


def test_delta_of_another_base(capsys, delta):
    rc, err = serve(capsys, build_fixture("qwen2"), "--delta-modules", f"m={delta}")
    assert rc == 2 and "was made for a base" in err


def test_duplicate_and_malformed_names(capsys, delta):
    rc, err = serve(capsys, build_fixture("llama-gqa"), "--delta-modules",
                    f"m={delta},m={delta}")
    assert rc == 2 and "used twice" in err
    rc, err = serve(capsys, build_fixture("llama-gqa"), "--delta-modules", "just-a-name")
    assert rc == 2 and "name=path" in err


def test_runtime_loading_needs_a_root(capsys, delta):
    rc, err = serve(capsys, build_fixture("llama-gqa"), "--delta-modules", f"m={delta}",
                    "--enable-runtime-deltas")
    assert rc == 2 and "--delta-root" in err


def test_help_lists_vllm_and_delta_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "deltadq" in out  # vLLM's help lists groups
    with pytest.raises(SystemExit):
        main(["serve", "--help=all"])
    out = capsys.readouterr().out
    assert "--delta-modules" in out and "--tensor-parallel-size" in out


def test_a_finetune_named_like_the_base_is_refused_before_the_engine(capsys, delta):
    base = build_fixture("llama-gqa")
    rc, err = serve(capsys, base, "--served-model-name", "chat", "--delta-modules",
                    f"chat={delta}")
    assert rc == 2 and "served under" in err and "fix:" in err
    rc, err = serve(capsys, base, "--delta-modules", f"bad<name>={delta}")
    assert rc == 2 and "invalid fine-tune name" in err
