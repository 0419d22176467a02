"""The command line explains itself: every option has help, every --help ends with an
example, --no-progress works everywhere, `deltadq --help` lists every command, and
`inspect` prints whole tensor names with a legend."""

import argparse

import pytest

from deltadq_vllm import cli

COMMANDS = ("compress", "inspect", "merge", "kv-compress")


def _subparsers():
    p = cli.build_parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return p, action.choices


def test_top_help_lists_every_command_with_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for c in ("serve", *COMMANDS):
        assert f"  {c} " in out or f"  {c}\n" in out, c
        assert f"deltadq {c} " in out, c   # an example of each


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_help_ends_with_an_example(command, capsys):
    _, subs = _subparsers()
    sp = subs[command]
    undocumented = [a.dest for a in sp._actions if not a.help or a.help == argparse.SUPPRESS]
    assert not undocumented, undocumented
    assert any("--no-progress" in a.option_strings for a in sp._actions)
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-2].strip() == "example:" and out[-1].strip().startswith(f"deltadq {command} ")


def test_no_progress_is_accepted_by_every_command():
    p, _ = _subparsers()
    required = {"compress": ["--base", "b", "--finetune", "f", "--out", "o"],
                "inspect": ["d"], "merge": ["--base", "b", "--delta", "d", "--out", "o"],
                "kv-compress": ["--model", "m", "--out", "o"]}
    for command in COMMANDS:
        assert p.parse_args([command, *required[command], "--no-progress"]).no_progress


def test_dense_dtype_choices_are_what_compress_accepts():
    from deltadq_vllm.tools.compress import DENSE_DTYPES

    assert cli.DENSE_DTYPES == DENSE_DTYPES


def test_inspect_prints_whole_names_and_a_legend():
    from deltadq_vllm.tools.inspect_delta import format_quality

    long = "model.language_model.layers.31.self_attn.very_long_projection_name.weight"
    text = format_quality([{"name": long, "weight_rel_error": 0.5, "output_rel_error": 1.2},
                           {"name": "model.norm.weight", "weight_rel_error": 0.0}])
    assert long in text
    for needle in ("w err", "out err", ">= 1", "unsafe", "BIR"):
        assert needle in text.split("columns")[1], needle


def test_tune_kernels_help_documents_every_option_and_ends_with_an_example():
    from deltadq_vllm.kernels.tune import build_parser

    p = build_parser()
    assert not [a.dest for a in p._actions if not a.help]
    assert p.parse_args(["--out", "t.json", "--no-progress"]).no_progress
    assert p.format_help().rstrip().splitlines()[-1].strip().startswith("deltadq tune-kernels ")


def test_compress_without_flags_uses_the_compressors_own_defaults(monkeypatch):
    """`deltadq compress` with only the required paths builds exactly CompressOptions()'s
    defaults (the CLI once defaulted --min-gain to 0.5 while the compressor's default, the
    measured one, is 0.9: every CLI user got the other rule)."""
    import dataclasses

    from deltadq_vllm.tools import compress as C

    seen = {}

    class Captured(Exception):
        pass

    def fake(base, ft, out, opt):
        seen["opt"] = opt
        raise Captured

    monkeypatch.setattr(C, "compress", fake)
    with pytest.raises(Captured):
        cli.main(["compress", "--base", "b", "--finetune", "f", "--out", "o"])
    got, want = seen["opt"], C.CompressOptions()
    differ = {f.name: (getattr(got, f.name), getattr(want, f.name))
              for f in dataclasses.fields(want)
              if f.name != "progress" and getattr(got, f.name) != getattr(want, f.name)}
    assert not differ, differ
    # plain values unless asked (benchmarks/README.md, "Plain values by default")
    assert not want.calibrated


def test_compress_check_flags_reach_the_options(monkeypatch, tmp_path):
    """`--check warn|off` and `--check-text FILE` are passed to the compressor as given."""
    from deltadq_vllm.tools import compress as C

    seen = []

    class Captured(Exception):
        pass

    def fake(base, ft, out, opt):
        seen.append(opt)
        raise Captured

    monkeypatch.setattr(C, "compress", fake)
    text = tmp_path / "domain.txt"
    text.write_text("some domain text")
    for flags, want in ((["--check", "warn", "--check-text", str(text)], ("warn", str(text))),
                        (["--check", "off"], ("off", None))):
        with pytest.raises(Captured):
            cli.main(["compress", "--base", "b", "--finetune", "f", "--out", "o", *flags])
        assert (seen[-1].check, seen[-1].check_text) == want
    with pytest.raises(SystemExit):
        cli.main(["compress", "--base", "b", "--finetune", "f", "--out", "o", "--check", "x"])


def test_sigterm_during_compress_leaves_nothing_behind(tmp_path, capsys):
    """SIGTERM (a scheduler's timeout, `kill`) in the middle of `deltadq compress` unwinds
    like Ctrl-C: exit code 143, no --out and no staging directory beside it, and the
    previous SIGTERM handler is back afterwards."""
    import os
    import signal

    from deltadq_vllm.testing.fixtures import build_fixture
    from deltadq_vllm.tools import model_check

    base, ft = build_fixture("llama-gqa"), build_fixture("llama-gqa--light")
    out = tmp_path / "d"
    real = model_check.ModelCheck.run

    def killed_midway(self, *a, **kw):   # the fit is staged beside --out by now
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".")]
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **kw)

    before = signal.getsignal(signal.SIGTERM)
    model_check.ModelCheck.run = killed_midway
    try:
        rc = cli.main(["compress", "--base", str(base), "--finetune", str(ft), "--out",
                       str(out), "--ratio", "16", "--no-progress"])
    finally:
        model_check.ModelCheck.run = real
    assert rc == 143, capsys.readouterr().err
    assert "terminated; nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before
