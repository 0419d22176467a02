"""Every bad input: a clear message naming problem and fix, exit code 2, nothing half-written."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltadq_vllm.format.artifact import (DATA_FILE, FORMAT_VERSION, MANIFEST, read_manifest,
                                   write_manifest)
from deltadq_vllm.cli import main as cli
from deltadq_vllm.testing.fixtures import build_fixture

from cli_utils import fails


@pytest.fixture(scope="module")
def models():
    return {n: build_fixture(n) for n in ("llama-gqa", "llama-gqa--math", "llama-gqa--code",
                                          "llama-mha")}


@pytest.fixture(scope="module")
def delta(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("delta") / "math"
    assert cli(["compress", "--base", str(models["llama-gqa"]), "--finetune",
                str(models["llama-gqa--math"]), "--out", str(out), "--no-progress"]) == 0
    return out


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def compress_args(base, ft, out, *extra):
    return ["compress", "--base", base, "--finetune", ft, "--out", out, "--no-progress", *extra]


def test_missing_dir(models, tmp_path, capsys):
    fails(capsys, compress_args(tmp_path / "nope", models["llama-gqa--math"], tmp_path / "o"),
          "does not exist", out_dir=tmp_path / "o")


def test_non_safetensors_weights(models, tmp_path, capsys):
    ft = tmp_path / "ft"
    ft.mkdir()
    shutil.copy(models["llama-gqa--math"] / "config.json", ft)
    torch.save({"w": torch.zeros(2)}, ft / "pytorch_model.bin")
    fails(capsys, compress_args(models["llama-gqa"], ft, tmp_path / "o"),
          "non-safetensors", "safe_serialization", out_dir=tmp_path / "o")


def test_truncated_safetensors(models, tmp_path, capsys):
    ft = copy_model(models["llama-gqa--math"], tmp_path / "ft")
    f = ft / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    fails(capsys, compress_args(models["llama-gqa"], ft, tmp_path / "o"), "truncated",
          str(f), out_dir=tmp_path / "o")


def test_garbage_safetensors_header(models, tmp_path, capsys):
    ft = copy_model(models["llama-gqa--math"], tmp_path / "ft")
    (ft / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    fails(capsys, compress_args(models["llama-gqa"], ft, tmp_path / "o"), "corrupt",
          out_dir=tmp_path / "o")


def test_architecture_mismatch(models, tmp_path, capsys):
    fails(capsys, compress_args(models["llama-mha"], models["llama-gqa--math"], tmp_path / "o"),
          "architecture mismatch", out_dir=tmp_path / "o")


def test_shape_mismatch(models, tmp_path, capsys):
    ft = copy_model(models["llama-gqa--math"], tmp_path / "ft")
    tensors = load_file(ft / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:8]
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    fails(capsys, compress_args(models["llama-gqa"], ft, tmp_path / "o"), "shape mismatch",
          "up_proj", out_dir=tmp_path / "o")


def test_ratio_cannot_be_met(models, tmp_path, capsys):
    fails(capsys, compress_args(models["llama-gqa"], models["llama-gqa--math"], tmp_path / "o",
                                "--ratio", "100000"), "cannot be met", out_dir=tmp_path / "o")


def test_unknown_method(models, tmp_path, capsys):
    fails(capsys, compress_args(models["llama-gqa"], models["llama-gqa--math"], tmp_path / "o",
                                "--method", "zip"), "unknown method", "deltadq",
          out_dir=tmp_path / "o")


@pytest.mark.parametrize("budget", ["share", "sensitivity"])
def test_group_size_not_dividing(models, tmp_path, capsys, budget):
    # sensitivity: the budget probe encodes matrices before the compressor does; the
    # check must come first there too (a ValueError from kept_columns escaped it)
    fails(capsys, compress_args(models["llama-gqa"], models["llama-gqa--math"], tmp_path / "o",
                                "--group-size", "7", "--budget", budget),
          "does not divide", out_dir=tmp_path / "o")


def test_existing_output_needs_force(models, delta, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = compress_args(models["llama-gqa"], models["llama-gqa--math"], out)
    fails(capsys, args, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "user data"  # untouched
    assert cli([str(a) for a in args] + ["--force"]) == 0
    assert (out / MANIFEST).exists() and not (out / "keep.txt").exists()


def test_merge_refuses_wrong_base(models, delta, tmp_path, capsys):
    # same architecture, different weights: only the fingerprint can tell
    fails(capsys, ["merge", "--base", models["llama-gqa--code"], "--delta", delta, "--out",
                   tmp_path / "m", "--no-progress"], "does not belong to base",
          out_dir=tmp_path / "m")
    fails(capsys, ["merge", "--base", models["llama-mha"], "--delta", delta, "--out",
                   tmp_path / "m2", "--no-progress"], "was made for a base",
          out_dir=tmp_path / "m2")


def test_unknown_format_version(delta, tmp_path, capsys):
    d = copy_model(delta, tmp_path / "d")
    m = read_manifest(d)
    m["format_version"] = 99
    write_manifest(d, m)
    fails(capsys, ["inspect", d], "format version 99", f"reads versions 2, {FORMAT_VERSION}")


def test_corrupt_delta_file(delta, tmp_path, capsys):
    d = copy_model(delta, tmp_path / "d")
    shard = d / DATA_FILE
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    fails(capsys, ["inspect", d], "checksum")
    shard.write_bytes(bytes(data[:-100]))
    fails(capsys, ["inspect", d], "truncated")


def test_not_an_artifact(tmp_path, capsys):
    fails(capsys, ["inspect", tmp_path], "not a deltadq artifact")
