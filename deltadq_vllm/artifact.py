"""The delta artifact on disk: a JSON manifest plus safetensors shards (docs/format.md).

Writing goes to a temporary sibling directory that is renamed into place only when
everything (shards, tokenizer, manifest) is written, so a crash or a bad input
never leaves a half-written artifact. Reading validates the manifest against the
stored tensors before anything uses them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__
from .atomic import AtomicDir
from .bitpack import packed_row_bytes
from .checkpoint import DTYPE_NAMES, Checkpoint, TensorInfo, read_header
from .errors import DeltaDQError
from .layouts import LAYOUTS, EncodedTensor, col_bits

FORMAT_NAME = "deltadq-delta"
FORMAT_VERSION = 1
MANIFEST = "deltadq.json"
TOKENIZER_DIR = "tokenizer"
TENSOR_CLASSES = ("linear", "embedding", "lm_head", "norm", "bias", "other")
DEFAULT_SHARD_BYTES = 2 * 1024**3


def storage_key(name: str, role: str) -> str:
    return f"{name}::{role}"


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


# ====================================================================== writing


class ArtifactWriter:
    """Collects compressed tensors, writes shards, then atomically publishes the directory.

    with ArtifactWriter(out, force=False) as w:
        w.add(name, entry, tensors)
        w.finish(manifest_fields)
    """

    def __init__(self, out_dir: str | os.PathLike, force: bool = False,
                 shard_bytes: int = DEFAULT_SHARD_BYTES):
        self._dir = AtomicDir(out_dir, force)
        self.tmp = self._dir.path
        self.shard_bytes = shard_bytes
        self.entries: dict[str, dict] = {}
        self.weight_map: dict[str, str] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[str] = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return self._dir.__exit__(exc_type, exc, tb)

    @property
    def staging_dir(self) -> Path:
        return self.tmp

    def add(self, name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> None:
        if name in self.entries:
            raise ValueError(f"tensor {name} added twice")
        entry = dict(entry)
        entry["stored"] = sorted(tensors)
        self.entries[name] = entry
        for role, t in tensors.items():
            key = storage_key(name, role)
            self._pending[key] = t.contiguous()
            self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        fname = f"delta-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._pending, str(self.tmp / fname), metadata={"format": FORMAT_NAME})
        for key in self._pending:
            self.weight_map[key] = fname
        self._shards.append(fname)
        self._pending, self._pending_bytes = {}, 0

    def finish(self, manifest: dict) -> Path:
        """Write the manifest, then rename the staging directory to the output path."""
        self._flush()
        files = {}
        for f in sorted(p for p in self.tmp.rglob("*") if p.is_file()):
            files[str(f.relative_to(self.tmp))] = {"bytes": f.stat().st_size,
                                                   "sha256": _sha256(f)}
        doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
               "created_by": f"deltadq-vllm {__version__}", **manifest,
               "tensors": self.entries, "weight_map": self.weight_map, "files": files}
        tmp_manifest = self.tmp / (MANIFEST + ".part")
        tmp_manifest.write_text(json.dumps(doc, indent=1, sort_keys=False))
        os.replace(tmp_manifest, self.tmp / MANIFEST)
        return self._dir.commit()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ====================================================================== reading


@dataclass
class DeltaEntry:
    """One tensor's manifest entry."""

    name: str
    cls: str
    layout: str
    shape: tuple[int, ...]       # shape of the fine-tune tensor
    base_shape: tuple[int, ...] | None  # None: tensor absent from the base (stored absolute)
    dtype: str                   # the fine-tune's dtype, for merge
    params: dict
    stored: list[str]
    extra_rows: int              # rows appended by an extended vocabulary (stored densely)

    @property
    def absolute(self) -> bool:
        return self.base_shape is None


class DeltaArtifact:
    """A validated, opened delta artifact. Tensors are read lazily, one at a time."""

    def __init__(self, path: str | os.PathLike, verify_files: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise DeltaDQError(f"delta directory {self.path} does not exist",
                               "pass a directory written by `deltadq compress`")
        if not mpath.exists():
            raise DeltaDQError(f"{self.path} is not a deltadq artifact (no {MANIFEST})",
                               "pass a directory written by `deltadq compress`")
        try:
            self.manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise DeltaDQError(f"corrupt manifest {mpath}: {e}",
                               "re-run `deltadq compress` to rewrite the artifact") from None
        self._check_version()
        self._check_files(verify_files)
        self._infos: dict[str, TensorInfo] = {}
        for fname in sorted(set(self.manifest["weight_map"].values())):
            self._infos.update(read_header(self.path / fname))
        self.entries = {n: self._parse_entry(n, e) for n, e in self.manifest["tensors"].items()}

    # ---------------------------------------------------------------- validation

    def _check_version(self) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise DeltaDQError(f"{self.path / MANIFEST} is not a {FORMAT_NAME} manifest",
                               "pass a directory written by `deltadq compress`")
        v = m.get("format_version")
        if v != FORMAT_VERSION:
            raise DeltaDQError(
                f"delta {self.path} uses format version {v}, but this deltadq-vllm "
                f"({__version__}) reads only version {FORMAT_VERSION}",
                "install the deltadq-vllm release that wrote it, or re-compress the fine-tune "
                "with this one")
        for key in ("method", "base", "tensors", "weight_map", "files"):
            if key not in m:
                raise DeltaDQError(f"manifest of {self.path} lacks the field {key!r}",
                                   "re-run `deltadq compress` to rewrite the artifact")

    def _check_files(self, verify_hashes: bool) -> None:
        for fname, meta in self.manifest["files"].items():
            f = self.path / fname
            if not f.exists():
                raise DeltaDQError(f"delta {self.path} is missing its file {fname}",
                                   "copy the whole artifact directory")
            if f.stat().st_size != meta["bytes"]:
                raise DeltaDQError(
                    f"delta file {f} has {f.stat().st_size} bytes, the manifest says "
                    f"{meta['bytes']} (truncated or modified)", "copy the artifact again")
            if verify_hashes and _sha256(f) != meta["sha256"]:
                raise DeltaDQError(f"delta file {f} does not match its checksum (corrupt)",
                                   "copy the artifact again or re-run `deltadq compress`")

    def _parse_entry(self, name: str, e: dict) -> DeltaEntry:
        try:
            entry = DeltaEntry(name=name, cls=e["class"], layout=e["layout"],
                               shape=tuple(e["shape"]),
                               base_shape=tuple(e["base_shape"]) if e.get("base_shape") else None,
                               dtype=e["dtype"], params=e.get("params", {}),
                               stored=list(e["stored"]), extra_rows=int(e.get("extra_rows", 0)))
        except (KeyError, TypeError, ValueError) as ex:
            raise DeltaDQError(f"manifest entry for {name} is malformed ({ex})",
                               "re-run `deltadq compress`") from None
        if entry.layout not in LAYOUTS:
            raise DeltaDQError(f"tensor {name} uses unknown layout {entry.layout!r}",
                               "upgrade deltadq-vllm or re-compress")
        if entry.cls not in TENSOR_CLASSES:
            raise DeltaDQError(f"tensor {name} has unknown class {entry.cls!r}",
                               "re-run `deltadq compress`")
        for role in entry.stored:
            key = storage_key(name, role)
            if key not in self._infos:
                raise DeltaDQError(f"delta {self.path} lacks stored tensor {key}",
                                   "the artifact is incomplete; re-run `deltadq compress`")
        _check_layout_shapes(entry, {r: self._infos[storage_key(name, r)] for r in entry.stored})
        return entry

    # ---------------------------------------------------------------- access

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def base_fingerprint(self) -> dict:
        return self.manifest["base"]["fingerprint"]

    def read(self, name: str, role: str) -> torch.Tensor:
        info = self._infos[storage_key(name, role)]
        with open(info.file, "rb") as f:
            f.seek(info.start)
            buf = bytearray(f.read(info.nbytes))
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def encoded(self, name: str) -> EncodedTensor:
        """The compressed part of a tensor (rows of the base shape)."""
        e = self.entries[name]
        rows = (e.base_shape or e.shape)
        tensors = {r: self.read(name, r) for r in e.stored if r != "extra_rows"}
        return EncodedTensor(e.layout, tuple(rows), dict(e.params), tensors)

    def extra_rows(self, name: str) -> torch.Tensor | None:
        e = self.entries[name]
        return self.read(name, "extra_rows") if e.extra_rows else None

    def file_bytes(self) -> int:
        """Bytes of every file in the artifact, manifest included (the true-ratio denominator)."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def check_base(self, base: Checkpoint) -> None:
        """Refuse a base that is not the one this delta was computed from."""
        arch = self.manifest["base"].get("architecture", {})
        got = base.architecture()
        for k, v in arch.items():
            if got.get(k) != v:
                raise DeltaDQError(
                    f"delta {self.path} was made for a base with {k}={v!r}, but {base.path} has "
                    f"{k}={got.get(k)!r}", "pass the base model the delta was compressed from")
        expected = self.base_fingerprint["tensors"]
        for name, digest in expected.items():
            if name not in base.tensors:
                raise DeltaDQError(f"base {base.path} lacks tensor {name} that the delta needs",
                                   "pass the base model the delta was compressed from")
            if base.tensor_fingerprint(name) != digest:
                raise DeltaDQError(
                    f"delta {self.path} does not belong to base {base.path}: tensor {name} "
                    f"differs (base fingerprint {self.base_fingerprint['digest']} expected)",
                    "pass the base model the delta was compressed from (same weights, same "
                    "dtype)")


def _check_layout_shapes(e: DeltaEntry, infos: dict[str, TensorInfo]) -> None:
    """Stored tensor sizes must be exactly what the layout params imply."""
    rows = (e.base_shape or e.shape)
    p = e.params

    def expect(role, shape):
        got = infos[role].shape if role in infos else None
        if got != tuple(shape):
            raise DeltaDQError(f"tensor {e.name}: stored {role} has shape {got}, layout "
                               f"{e.layout} with params {p} implies {tuple(shape)}",
                               "the artifact is corrupt; re-run `deltadq compress`")

    try:
        if e.layout == "dense":
            expect("values", rows)
        elif e.layout == "hash_groupwise":
            out, inp = rows
            n_kept = inp // p["group_size"] * p["keep"]
            expect("codes", (out, packed_row_bytes(n_kept, p["bits"])))
        elif e.layout == "sparse_rows":
            out, inp = rows
            expect("cols", (out, packed_row_bytes(p["per_row"], col_bits(inp))))
        elif e.layout == "lowrank":
            expect("u", (rows[0], p["rank"]))
            expect("v", (p["rank"], rows[1]))
    except (KeyError, ValueError, TypeError) as ex:
        raise DeltaDQError(f"tensor {e.name}: layout params {p} are incomplete ({ex})",
                           "re-run `deltadq compress`") from None
    if e.extra_rows:
        expect("extra_rows", (e.extra_rows,) + tuple(e.shape[1:]))
