"""The delta artifact on disk: a gzip-compressed JSON manifest plus one safetensors file.

Layout (docs/format.md, version 3):

    deltadq.json.gz     manifest (gzip of compact UTF-8 JSON)
    delta.safetensors   one 1-D *blob* per dtype ("U8", "BF16", "F32", ...); every
                        stored role of every tensor is a byte range of its dtype's blob,
                        in manifest order, so the file header stays a few hundred bytes
                        however many tensors a delta has (at 1000x+ compression per-tensor
                        headers would otherwise be a visible share of the bytes)

A fine-tune's tokenizer is stored in the manifest as what differs from the base's
(tokenizer_diff.py); format-2 artifacts kept whole files in `tokenizer/` and stay
readable. Reading goes through artifact_files.ArtifactFiles (resolved path, no
symlinks followed, every file size- and checksum-verified) before anything uses a
byte; the writer is artifact_writer.py.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from .artifact_files import MANIFEST, ArtifactFiles
from .bitpack import packed_row_bytes
from ..checkpoint import (DTYPE_NAMES, SAFETENSORS_DTYPES, Checkpoint, TensorInfo, parse_header,
                         read_header)
from ..errors import DeltaDQError
from .layouts import LAYOUTS, EncodedTensor, col_bits
from .positions import tensor_seed

FORMAT_NAME = "deltadq-delta"
FORMAT_VERSION = 3            # what writers write
READABLE_VERSIONS = (2, 3)    # 2: tokenizer as whole files in tokenizer/, sampled base check
DATA_FILE = "delta.safetensors"
TOKENIZER_DIR = "tokenizer"   # format 2 (and kv-compress pass-through): whole files
TENSOR_CLASSES = ("linear", "embedding", "lm_head", "norm", "bias", "other")
# blobs in order of decreasing item size, so every blob starts aligned to its item size
BLOB_ORDER = ("F64", "I64", "F32", "I32", "BF16", "F16", "I16", "U8")
log = logging.getLogger("deltadq")


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def read_manifest(path: str | os.PathLike) -> dict:
    """The decoded manifest of artifact directory `path` (no validation)."""
    with gzip.open(Path(path) / MANIFEST, "rt", encoding="utf-8") as f:
        return json.load(f)


def write_manifest(path: str | os.PathLike, doc: dict) -> None:
    """Write a manifest (compact JSON, gzip level 9, no timestamp: same content, same bytes)."""
    raw = json.dumps(doc, separators=(",", ":")).encode()
    tmp = Path(path) / (MANIFEST + ".part")
    with open(tmp, "wb") as f:
        f.write(gzip.compress(raw, compresslevel=9, mtime=0))
    os.replace(tmp, Path(path) / MANIFEST)


@dataclass
class DeltaEntry:
    """One tensor's manifest entry, with the defaults the manifest leaves out filled in."""

    name: str
    cls: str
    layout: str
    shape: tuple[int, ...]       # shape of the fine-tune tensor
    base_shape: tuple[int, ...] | None  # None: tensor absent from the base (stored absolute)
    dtype: str                   # the fine-tune's dtype, for merge
    params: dict
    stored: list[str]            # roles, in storage order
    extra_rows: int              # rows appended by an extended vocabulary (stored densely)

    @property
    def absolute(self) -> bool:
        return self.base_shape is None

    @property
    def rows_shape(self) -> tuple[int, ...]:
        """Shape of the compressed part (the base's rows)."""
        return self.base_shape or self.shape


def _bad(problem: str) -> DeltaDQError:
    return DeltaDQError(problem, "the artifact is corrupt or incomplete; copy it again or "
                                 "re-run `deltadq compress`")


class DeltaArtifact:
    """A validated, opened delta artifact.

    path:          the artifact directory (or a stamped "DIR#sha256=HEX" path: artifact_files)
    verify_files:  check every file's sha256 (sizes are always checked)
    expect_digest: the manifest digest a previous load recorded: anything else is refused
    in_memory:     read every file once into memory and parse those bytes (what a server
                   loads is then exactly what was verified); otherwise tensors are read
                   lazily from the data file, one at a time (CLI tools on large deltas)
    """

    def __init__(self, path: str | os.PathLike, verify_files: bool = True,
                 expect_digest: str | None = None, in_memory: bool = False,
                 resolved: bool = False):
        self.files = ArtifactFiles(path, expect_digest=expect_digest, verify=verify_files,
                                   keep=in_memory, resolved=resolved)
        self.path = Path(self.files.dir)
        self.digest = self.files.digest
        self.manifest = self.files.manifest
        self._check_version()
        self._infos: dict[tuple[str, str], TensorInfo] = {}
        self._buffer = self.files.data.get(DATA_FILE)
        if DATA_FILE not in self.manifest["files"]:
            blobs = {}
        elif self._buffer is not None:
            blobs = parse_header(self._buffer, self.path / DATA_FILE)
        else:
            blobs = read_header(self.path / DATA_FILE)
        cursor = {dt: info.start for dt, info in blobs.items()}
        self.entries: dict[str, DeltaEntry] = {}
        for name, e in self.manifest["tensors"].items():
            self.entries[name] = self._parse_entry(name, e, blobs, cursor)
        for dt, info in blobs.items():
            if cursor[dt] != info.end:
                raise _bad(f"delta {self.path}: blob {dt} holds {info.nbytes} bytes but the "
                           f"manifest accounts for {cursor[dt] - info.start}")

    # ---------------------------------------------------------------- validation

    def _check_version(self) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise DeltaDQError(f"{self.path / MANIFEST} is not a {FORMAT_NAME} manifest",
                               "pass a directory written by `deltadq compress`")
        v = m.get("format_version")
        if v not in READABLE_VERSIONS:
            raise DeltaDQError(
                f"delta {self.path} uses format version {v}, but this deltadq-vllm "
                f"({__version__}) reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}",
                "install the deltadq-vllm release that wrote it, or re-compress the fine-tune "
                "with this one")
        for key in ("method", "seed", "base", "finetune", "tensors", "files", "sizes"):
            if key not in m:
                raise DeltaDQError(f"manifest of {self.path} lacks the field {key!r}",
                                   "re-run `deltadq compress` to rewrite the artifact")

    def _parse_entry(self, name: str, e: dict, blobs: dict, cursor: dict) -> DeltaEntry:
        try:
            shape = tuple(int(s) for s in e["shape"])
            base_shape = e.get("base_shape", list(shape))
            entry = DeltaEntry(
                name=name, cls=e["class"], layout=e["layout"], shape=shape,
                base_shape=tuple(int(s) for s in base_shape) if base_shape is not None else None,
                dtype=e.get("dtype", self.manifest["finetune"].get("dtype", "F32")),
                params=_full_params(e["layout"], dict(e.get("params", {})), shape, base_shape,
                                    self.manifest["seed"], name),
                stored=[], extra_rows=int(e.get("extra_rows", 0)))
            raw = e["stored"] if "stored" in e else \
                default_stored(e, self.manifest["finetune"].get("dtype", "F32"))
            if raw is None:
                raise KeyError("stored")
            stored = [(str(r), str(dt), tuple(int(s) for s in sh)) for r, dt, sh in raw]
            entry.stored = [r for r, _, _ in stored]
        except (KeyError, TypeError, ValueError) as ex:
            raise _bad(f"manifest entry for {name} is malformed ({ex!r})") from None
        if entry.layout not in LAYOUTS:
            raise DeltaDQError(f"tensor {name} uses unknown layout {entry.layout!r}",
                               "upgrade deltadq-vllm or re-compress")
        if entry.cls not in TENSOR_CLASSES:
            raise _bad(f"tensor {name} has unknown class {entry.cls!r}")
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise _bad(f"tensor {name} has unknown dtype {entry.dtype!r}")
        for role, dt, shape in stored:
            blob = blobs.get(dt)
            if blob is None:
                raise _bad(f"delta {self.path} has no {dt} blob for {name}::{role}")
            dtype = SAFETENSORS_DTYPES[dt]
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            start = cursor[dt]
            if start + nbytes > blob.end:
                raise _bad(f"delta {self.path}: {name}::{role} runs past the end of blob {dt}")
            self._infos[(name, role)] = TensorInfo(f"{name}::{role}", blob.file, dtype, shape,
                                                   start, start + nbytes)
            cursor[dt] = start + nbytes
        _check_layout_shapes(entry, {r: self._infos[(name, r)] for r in entry.stored})
        return entry

    # ---------------------------------------------------------------- access

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def base_fingerprint(self) -> dict:
        return self.manifest["base"]["fingerprint"]

    def role_info(self, name: str, role: str) -> TensorInfo:
        return self._infos[(name, role)]

    def read(self, name: str, role: str) -> torch.Tensor:
        info = self._infos[(name, role)]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._buffer is not None:   # verified bytes in memory: a view, no copy
            return torch.frombuffer(self._buffer, dtype=info.dtype, count=info.numel,
                                    offset=info.start).reshape(info.shape)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            buf = bytearray(f.read(info.nbytes))
        if len(buf) != info.nbytes:
            raise _bad(f"delta file {info.file} is shorter than its header says")
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def encoded(self, name: str) -> EncodedTensor:
        """The compressed part of a tensor (rows of the base shape)."""
        e = self.entries[name]
        tensors = {r: self.read(name, r) for r in e.stored if r != "extra_rows"}
        shape = tuple(e.rows_shape)
        if e.layout == "hash_groupwise" and len(shape) != 2:  # 8-bit 1-D deltas: a [1, n] view
            shape = (1, math.prod(shape))
        return EncodedTensor(e.layout, shape, dict(e.params), tensors)

    def extra_rows(self, name: str) -> torch.Tensor | None:
        e = self.entries[name]
        return self.read(name, "extra_rows") if e.extra_rows else None

    def file_bytes(self) -> int:
        """Bytes of every file in the artifact, manifest included (the true-ratio denominator)."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    # ---------------------------------------------------------------- tokenizer

    @property
    def tokenizer_spec(self):
        """`finetune.tokenizer`: a diff (format 3), a directory name (format 2), or None."""
        return self.manifest["finetune"].get("tokenizer")

    def tokenizer_files(self, base_dir) -> dict[str, bytes]:
        """The fine-tune's tokenizer files, rebuilt exactly (the base's when it has none)."""
        from ..tokenizer_diff import rebuild_files

        spec = self.tokenizer_spec
        stored = None
        if isinstance(spec, str):
            prefix = spec.rstrip("/") + "/"
            stored = {k: self.files.read(k) for k in self.manifest["files"]
                      if k.startswith(prefix)}
        return rebuild_files(spec, base_dir, stored, where=f"delta {self.path}")

    # ---------------------------------------------------------------- base check

    def check_base(self, base: Checkpoint) -> None:
        """Refuse a base that is not the one this delta was computed from: same
        architecture and, with `sha256-content-v1`, the same bytes in every tensor."""
        arch = self.manifest["base"].get("architecture", {})
        got = base.architecture()
        for k, v in arch.items():
            if got.get(k) != v:
                raise DeltaDQError(
                    f"delta {self.path} was made for a base with {k}={v!r}, but {base.path} has "
                    f"{k}={got.get(k)!r}", "pass the base model the delta was compressed from")
        names = sorted(n for n, e in self.entries.items() if not e.absolute)
        missing = [n for n in names if n not in base.tensors]
        if missing:
            raise DeltaDQError(f"base {base.path} lacks tensor {missing[0]} that the delta needs",
                               "pass the base model the delta was compressed from")
        fp = self.base_fingerprint
        algorithm = fp.get("algorithm")
        if algorithm == "sha256-content-v1":
            from ..content_hash import content_fingerprint

            got_fp = content_fingerprint(base)["digest"]
        elif algorithm == "sha256-sampled-v1":
            # artifacts of format 2: 4 KiB per tensor the delta changes were sampled
            log.warning("deltadq: delta %s records only a sampled fingerprint of its base "
                        "(written by an older deltadq-vllm): a base differing in a few values "
                        "would not be detected; re-compress it for a full check", self.path)
            got_fp = base.fingerprint(names)["digest"]
        else:
            raise DeltaDQError(f"delta {self.path} fingerprints its base with unknown "
                               f"algorithm {algorithm!r}", "upgrade deltadq-vllm")
        if got_fp != fp.get("digest"):
            raise DeltaDQError(
                f"delta {self.path} does not belong to base {base.path}: the base's weights "
                f"differ from those the delta was made from (content hash {got_fp[:16]}..., "
                f"expected {str(fp.get('digest'))[:16]}...)",
                "pass the base model the delta was compressed from (same weights, same dtype)")


def _codes_shape(out: int, n_kept: int, bits: int, flat: bool) -> list[int]:
    if flat:
        return [1, packed_row_bytes(out * n_kept, bits)]
    return [out, packed_row_bytes(n_kept, bits)]


_TORCH_TO_ST = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def default_stored(e: dict, default_dtype: str):
    """The `stored` list a tensor entry implies (None when it must be explicit):
    hash_groupwise -> codes, step, minv; dense -> values; then extra_rows."""
    shape = list(e["shape"])
    base_shape = e.get("base_shape", shape)
    if base_shape is None:
        return None
    layout, p = e["layout"], e.get("params", {})
    if layout == "hash_groupwise":
        out, inp = base_shape if len(base_shape) == 2 else (1, math.prod(base_shape))
        try:
            g, k, bits, rps = p["group_size"], p["keep"], p["bits"], p["rows_per_scale"]
        except KeyError:
            return None
        nb = (out + rps - 1) // rps
        roles = [["codes", "U8", _codes_shape(out, inp // g * k, bits, p.get("flat", False))],
                 ["step", "BF16", [nb]], ["minv", "BF16", [nb]]]
    elif layout == "dense" and p.get("dtype") in _TORCH_TO_ST:
        roles = [["values", _TORCH_TO_ST[p["dtype"]], list(base_shape)]]
    else:
        return None
    extra = e.get("extra_rows", 0)
    if extra:
        roles.append(["extra_rows", e.get("dtype", default_dtype), [extra] + shape[1:]])
    return roles


def _full_params(layout: str, p: dict, shape, base_shape, global_seed: int, name: str) -> dict:
    """Fill in the params the manifest leaves implicit (docs/format.md, "Implicit params")."""
    rows = tuple(base_shape) if base_shape is not None else tuple(shape)
    if layout in ("hash_groupwise", "bernoulli"):
        p.setdefault("seed", tensor_seed(global_seed, name))
    if layout == "hash_groupwise":
        out, inp = rows if len(rows) == 2 else (1, math.prod(rows))
        p.setdefault("row_offset", 0)
        p.setdefault("group_offset", 0)
        p.setdefault("n_groups_total", inp // p["group_size"])
        p.setdefault("n_rows_total", out)
    return p


def _check_layout_shapes(e: DeltaEntry, infos: dict[str, TensorInfo]) -> None:
    """Stored tensor sizes must be exactly what the layout params imply."""
    rows = e.rows_shape
    p = e.params

    def expect(role, shape, dtype=None):
        got = infos[role].shape if role in infos else None
        if got != tuple(shape):
            raise _bad(f"tensor {e.name}: stored {role} has shape {got}, layout {e.layout} with "
                       f"params {p} implies {tuple(shape)}")
        if dtype is not None and infos[role].dtype != dtype:
            raise _bad(f"tensor {e.name}: stored {role} is {infos[role].dtype}, expected {dtype}")

    try:
        if e.layout == "dense":
            expect("values", rows)
        elif e.layout == "hash_groupwise":
            out, inp = rows if len(rows) == 2 else (1, math.prod(rows))
            g, k = p["group_size"], p["keep"]
            if inp % g or not 1 <= k <= g or not 1 <= p["bits"] <= 16:
                raise _bad(f"tensor {e.name}: layout params {p} do not fit shape {rows}")
            expect("codes", _codes_shape(out, inp // g * k, p["bits"], p.get("flat", False)),
                   torch.uint8)
            nb = (out + p["rows_per_scale"] - 1) // p["rows_per_scale"]
            expect("step", (nb,), torch.bfloat16)
            expect("minv", (nb,), torch.bfloat16)
        elif e.layout == "sparse_rows":
            out, inp = rows
            expect("cols", (out, packed_row_bytes(p["per_row"], col_bits(inp))), torch.uint8)
        elif e.layout == "lowrank":
            expect("u", (rows[0], p["rank"]))
            expect("v", (p["rank"], rows[1]))
    except (KeyError, ValueError, TypeError) as ex:
        raise _bad(f"tensor {e.name}: layout params {p} are incomplete ({ex!r})") from None
    if e.extra_rows:
        expect("extra_rows", (e.extra_rows,) + tuple(e.shape[1:]))
