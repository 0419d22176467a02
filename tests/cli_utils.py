"""Helpers for tests of the `deltadq` command line's bad-input discipline."""

from __future__ import annotations

from pathlib import Path

from deltadq_vllm.cli import main as cli


def fails(capsys, args, *needles, out_dir=None):
    """Run the CLI, expect exit code 2 with an `error:` + `fix:` message containing every
    needle, and (with out_dir) no output directory and no hidden temp leftovers beside it."""
    rc = cli([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and "fix:" in err, err
    for n in needles:
        assert n in err, err
    if out_dir is not None:
        assert not Path(out_dir).exists()
        leftovers = [p for p in Path(out_dir).parent.iterdir() if p.name.startswith(".")]
        assert not leftovers, leftovers
    return err
