"""`deltadq serve` refuses mistakes before vLLM is imported: exit 2, one line with a fix.

Each case runs in a fresh interpreter that reports whether any `vllm` module was
imported (the point is that no engine, not even vLLM's parser, is needed to say what
is wrong). No wall-clock assertions: "fast" is "vLLM was not imported".
"""

import subprocess
import sys

import pytest

from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.testing.fixtures import build_fixture

PROBE = ("import sys\n"
         "from deltadq_vllm.cli import main\n"
         "rc = main(sys.argv[1:])\n"
         "mods = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
         "print('VLLM_MODULES=%d' % len(mods), file=sys.stderr)\n"
         "sys.exit(rc)\n")


def run_serve(*args):
    """(exit code, stdout, stderr lines without the probe's, vLLM imported?)"""
    p = subprocess.run([sys.executable, "-c", PROBE, "serve", *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    probe = [ln for ln in lines if ln.startswith("VLLM_MODULES=")]
    assert probe, p.stderr
    return (p.returncode, p.stdout, [ln for ln in lines if not ln.startswith("VLLM_MODULES=")],
            probe[-1] != "VLLM_MODULES=0")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cli")
    base = build_fixture("llama-gqa")
    d = root / "math"
    compress(base, build_fixture("llama-gqa--math"), d, CompressOptions(ratio=8, progress=False))
    return {"root": root, "base": base, "delta": d}


def fails_fast(*args, needle):
    rc, _, err, vllm_imported = run_serve(*args)
    assert rc == 2, err
    assert len(err) == 1, err                       # one line
    assert err[0].startswith("deltadq serve: error:") and "(fix: " in err[0], err
    assert needle in err[0], err
    assert not vllm_imported, "vLLM was imported before the error"
    return err[0]


def test_malformed_delta_modules(work):
    fails_fast(work["base"], "--delta-modules", "a:./x", needle="not name=path")


def test_missing_delta_path(work):
    fails_fast(work["base"], "--delta-modules", f"m={work['root']}/nope", needle="does not exist")


def test_duplicate_name(work):
    d = work["delta"]
    fails_fast(work["base"], "--delta-modules", f"m={d},m={d}", needle="used twice")
    fails_fast(work["base"], "--delta-modules", f"m={d}", "--delta-modules", f"m={d}",
               needle="used twice")


def test_name_clashing_with_the_base(work):
    fails_fast(work["base"], "--served-model-name", "chat", "--delta-modules",
               f"chat={work['delta']}", needle="served under")


def test_invalid_names(work):
    d = work["delta"]
    fails_fast(work["base"], "--delta-modules", f"bad<name>={d}", needle="invalid fine-tune name")
    fails_fast(work["base"], "--delta-modules", f"{'x' * 201}={d}",
               needle="invalid fine-tune name")


def test_names_are_checked_before_any_delta(work):
    """The name rule runs before any delta is opened or checked against the base (the
    first full base hash of a 7B base takes tens of seconds): a bad name is reported
    even when the delta path is wrong or the delta belongs to other weights."""
    fails_fast(work["base"], "--served-model-name", "chat", "--delta-modules",
               f"chat={work['root']}/nope", needle="served under")
    fails_fast(build_fixture("llama-gqa--code"), "--delta-modules",
               f"bad<name>={work['delta']}", needle="invalid fine-tune name")


def test_base_not_a_model_folder(work):
    fails_fast(work["root"], "--delta-modules", f"m={work['delta']}", needle="no config.json")


def test_base_path_typo_is_one_line_not_a_hub_error(work):
    err = fails_fast(str(work["base"]) + "x", "--delta-modules", f"m={work['delta']}",
                     needle="does not exist")
    assert "HFValidationError" not in err and "Repo id" not in err


def test_delta_of_another_architecture(work):
    fails_fast(build_fixture("qwen2"), "--delta-modules", f"m={work['delta']}",
               needle="was made for a base")


def test_not_an_artifact(work):
    fails_fast(work["base"], "--delta-modules", f"m={work['base']}",
               needle="not a deltadq artifact")


def test_flag_typo_and_flag_combinations(work):
    d = work["delta"]
    fails_fast(work["base"], "--delta-module", f"m={d}", needle="did you mean --delta-modules")
    fails_fast(work["base"], "--delta-modules", f"m={d}", "--enable-runtime-deltas",
               needle="--delta-root")
    fails_fast(work["base"], "--delta-modules", f"m={d}", "--max-deltas", "4",
               "--max-cpu-deltas", "2", needle="--max-cpu-deltas")
    fails_fast(work["base"], "--delta-modules", f"m={d}", "--standalone-delta", d,
               needle="cannot be combined")
    fails_fast("--delta-modules", f"m={d}", needle="no base model given")


def test_weights_of_another_base_found_before_vllm(work):
    """Same architecture, other weights: the fingerprint check (stage 2, with torch)."""
    fails_fast(build_fixture("llama-gqa--code"), "--delta-modules", f"m={work['delta']}",
               needle="does not belong to base")


def test_help_shows_delta_flags_first_without_vllm():
    rc, out, err, vllm_imported = run_serve("--help")
    assert rc == 0 and not vllm_imported, err
    assert out.index("--delta-modules") < out.index("--help=all")   # delta flags first
    assert "deltadq serve --help=all" in out                         # how to see vLLM's
    assert out.rstrip().splitlines()[-3].strip().startswith("deltadq serve ")  # an example
    for flag in ("--max-deltas", "--delta-arena-mb", "--standalone-delta"):
        assert flag in out


def test_vllm_help_still_lists_every_flag(capsys):
    from deltadq_vllm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help=all"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "--delta-modules" in out and "--tensor-parallel-size" in out


def test_hub_repo_ids_are_left_to_vllm():
    from deltadq_vllm.serve_checks import check_base

    assert check_base("Qwen/Qwen3-0.6B", wants_deltas=False) is None
    assert check_base("gpt2", wants_deltas=False) is None


def test_stage_one_reads_manifests_without_torch():
    """serve_checks' first stage reads manifests through artifact_files (the artifact
    format's own reader, torch-free): importing it must not import torch."""
    code = ("import sys\n"
            "import deltadq_vllm.serve_checks as sc\n"
            "from deltadq_vllm.format import artifact_files\n"
            "assert sc.MANIFEST == artifact_files.MANIFEST\n"
            "print('TORCH=%d' % ('torch' in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "TORCH=0" in p.stdout, p.stderr[-2000:]


def test_a_corrupt_delta_is_reported_before_the_base_is_hashed(work, tmp_path):
    """Stage 2 checksums every delta before it hashes the base: a corrupt delta for a base
    with other weights is reported as corrupt (the cheap check), with its name."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(work["delta"], bad)
    data = bad / "delta.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    err = fails_fast(build_fixture("llama-gqa--code"), "--delta-modules",
                     f"m={work['delta']}", "--delta-modules", f"bad={bad}",
                     needle="does not match its checksum")
    assert "fine-tune 'bad'" in err
