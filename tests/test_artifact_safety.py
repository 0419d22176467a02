"""What is checked is what is read: resolved paths without symlinks, checksums, the manifest
digest recorded at load; and the base check by a content hash of every tensor."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltadq_vllm import content_hash
from deltadq_vllm.format.artifact import DATA_FILE, MANIFEST, DeltaArtifact
from deltadq_vllm.format.artifact_files import ArtifactFiles, parse_stamp, stamp
from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.errors import DeltaDQError
from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.testing.fixtures import build_fixture


@pytest.fixture(scope="module")
def delta(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "math"
    compress(build_fixture("llama-gqa"), build_fixture("llama-gqa--math"), out,
             CompressOptions(progress=False))
    return out


@pytest.fixture
def copy(delta, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    d = root / "math"
    shutil.copytree(delta, d)
    return d


def _reread(first: ArtifactFiles):
    return ArtifactFiles(first.dir, expect_digest=first.digest, resolved=True, keep=True)


def test_stamp_round_trip():
    d = "/a/b#c"
    assert parse_stamp(stamp(d, "ab" * 32)) == (d, "ab" * 32)
    assert parse_stamp("/a/b") == ("/a/b", None)
    assert parse_stamp("/a/b#sha256=xyz") == ("/a/b#sha256=xyz", None)


def test_reread_of_an_unchanged_artifact_gives_the_same_bytes(copy):
    first = ArtifactFiles(copy)
    again = _reread(first)
    assert again.digest == first.digest and again.data[DATA_FILE] == (copy / DATA_FILE).read_bytes()
    assert first.unchanged() is None


@pytest.mark.parametrize("fault", ["delete", "truncate", "bitflip", "replace_dir", "move"])
def test_changed_files_are_refused_on_reread(copy, fault):
    first = ArtifactFiles(copy)
    data = copy / DATA_FILE
    if fault == "delete":
        data.unlink()
    elif fault == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif fault == "bitflip":
        b = bytearray(data.read_bytes())
        b[len(b) // 2] ^= 1
        st = os.stat(data)
        data.write_bytes(bytes(b))
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))   # mtime put back: ctime tells
    elif fault == "replace_dir":   # another (valid) artifact moved into place
        other = copy.parent / "other"
        shutil.copytree(copy, other)
        m = other / MANIFEST
        m.write_bytes(m.read_bytes() + b"")   # same content, new inode
        shutil.rmtree(copy)
        os.rename(other, copy)
    elif fault == "move":
        os.rename(copy, copy.parent / "moved")
    assert first.unchanged() is not None
    if fault == "replace_dir":   # same bytes in a new directory: verified again, served
        assert _reread(first).digest == first.digest
        assert first.recheck() is None and first.unchanged() is None
        return
    assert first.recheck() is not None
    with pytest.raises(DeltaDQError) as e:
        _reread(first)
    assert "fix:" in str(e.value)


def test_a_symlink_swapped_in_after_load_is_not_followed(copy, tmp_path):
    """--delta-root escape: the resolved path is stored at load; a symlink re-pointed (or
    put) in its place later is refused, never followed."""
    outside = tmp_path / "outside"
    shutil.copytree(copy, outside)          # a valid artifact outside the root
    link = copy.parent / "current"
    os.symlink(copy, link)
    first = ArtifactFiles(link)             # resolved once: .../root/math
    assert first.dir == str(copy.resolve())
    shutil.rmtree(copy)
    os.symlink(outside, copy)               # the resolved path is now a symlink outside
    assert "symlink" in first.unchanged()
    with pytest.raises(DeltaDQError, match="symlink"):
        _reread(first)
    # a symlinked file inside an artifact is refused at the first load as well
    d2 = tmp_path / "d2"
    shutil.copytree(outside, d2)
    (d2 / DATA_FILE).unlink()
    os.symlink(outside / DATA_FILE, d2 / DATA_FILE)
    with pytest.raises(DeltaDQError, match="regular files"):
        ArtifactFiles(d2)


def test_in_memory_artifact_reads_the_verified_bytes(copy):
    art = DeltaArtifact(copy, in_memory=True)
    lazy = DeltaArtifact(copy)
    (copy / DATA_FILE).write_bytes(b"x" * (copy / DATA_FILE).stat().st_size)  # after verifying
    name = next(iter(art.entries))
    enc = art.encoded(name)
    for role, t in enc.tensors.items():
        assert t.numel() > 0
    with pytest.raises(DeltaDQError):
        DeltaArtifact(copy)
    assert lazy.digest == art.digest


def _base_copy(tmp_path, name="llama-gqa"):
    d = tmp_path / name
    shutil.copytree(build_fixture(name), d)
    return d


def test_content_hash_sees_a_single_changed_value(tmp_path, monkeypatch):
    monkeypatch.setenv(content_hash.CACHE_ENV, str(tmp_path / "cache"))
    base = _base_copy(tmp_path)
    before = content_hash.content_fingerprint(Checkpoint(base))
    assert before["algorithm"] == "sha256-content-v1"
    assert before["tensors"] == len(Checkpoint(base).tensors)
    tensors = load_file(base / "model.safetensors")
    name = sorted(tensors)[len(tensors) // 2]
    t = tensors[name].clone()
    t.view(-1)[t.numel() // 3] = torch.nextafter(t.view(-1)[t.numel() // 3], torch.tensor(1e9))
    tensors[name] = t
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    after = content_hash.content_fingerprint(Checkpoint(base))
    assert after["digest"] != before["digest"]


def test_content_hash_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    monkeypatch.setenv(content_hash.CACHE_ENV, str(tmp_path / "cache"))
    base = _base_copy(tmp_path)
    first = content_hash.content_fingerprint(Checkpoint(base))
    content_hash._memo.clear()
    calls = []
    real = content_hash.tensor_digest
    monkeypatch.setattr(content_hash, "tensor_digest", lambda i: calls.append(i) or real(i))
    assert content_hash.content_fingerprint(Checkpoint(base)) == first
    assert not calls                          # from the on-disk cache
    content_hash._memo.clear()
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes())             # same bytes, new ctime: re-hashed
    assert content_hash.content_fingerprint(Checkpoint(base)) == first
    assert calls


def test_a_base_differing_in_one_value_is_refused(delta, tmp_path, monkeypatch):
    monkeypatch.setenv(content_hash.CACHE_ENV, str(tmp_path / "cache"))
    base = _base_copy(tmp_path)
    DeltaArtifact(delta).check_base(Checkpoint(base))
    tensors = load_file(base / "model.safetensors")
    # a tensor the delta does not store changes the fine-tune just as much
    name = "model.norm.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0] += 1e-3
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DeltaDQError, match="does not belong to base"):
        DeltaArtifact(delta).check_base(Checkpoint(base))
