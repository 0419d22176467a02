"""Writing a delta artifact (docs/format.md): stream every stored role to a per-dtype
scratch file inside a temporary sibling directory; `finish` assembles the safetensors
file, writes the manifest and renames the directory into place, so a crash or a bad
input never leaves a half-written artifact."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from .. import __version__
from .artifact import (BLOB_ORDER, DATA_FILE, FORMAT_NAME, FORMAT_VERSION,
                       default_stored, dtype_name, write_manifest)
from ..atomic import AtomicDir
from ..checkpoint import SAFETENSORS_DTYPES


class ArtifactWriter:
    """Collects compressed tensors, streams their bytes to disk, then atomically publishes.

    with ArtifactWriter(out, force=False) as w:
        w.add(name, entry, tensors)
        w.finish(manifest_fields)
    """

    def __init__(self, out_dir: str | os.PathLike, force: bool = False,
                 default_dtype: str = "F32"):
        self._dir = AtomicDir(out_dir, force)
        self.tmp = self._dir.path
        self.default_dtype = default_dtype   # the manifest's finetune.dtype
        self.entries: dict[str, dict] = {}
        self._blobs: dict[str, object] = {}     # dtype name -> open scratch file
        self._blob_bytes: dict[str, int] = {}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        for f in self._blobs.values():
            f.close()
        return self._dir.__exit__(exc_type, exc, tb)

    @property
    def staging_dir(self) -> Path:
        return self.tmp

    def add(self, name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Store `tensors` (role -> tensor, in the order given) for manifest entry `name`."""
        if name in self.entries:
            raise ValueError(f"tensor {name} added twice")
        entry = dict(entry)
        stored = []
        for role, t in tensors.items():
            dt = dtype_name(t.dtype)
            if dt not in BLOB_ORDER:
                raise ValueError(f"{name}::{role}: dtype {dt} cannot be stored")
            f = self._blobs.get(dt)
            if f is None:
                f = self._blobs[dt] = open(self.tmp / f".blob-{dt}", "wb")
                self._blob_bytes[dt] = 0
            data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
            f.write(data)
            self._blob_bytes[dt] += len(data)
            stored.append([role, dt, list(t.shape)])
        if stored != default_stored(entry, self.default_dtype):
            entry["stored"] = stored   # omitted when the layout implies it (docs/format.md)
        self.entries[name] = entry

    def _write_data_file(self) -> None:
        header, offset = {}, 0
        order = [dt for dt in BLOB_ORDER if dt in self._blobs]
        for dt in order:
            self._blobs[dt].close()
            n = self._blob_bytes[dt]
            item = torch.empty((), dtype=SAFETENSORS_DTYPES[dt]).element_size()
            header[dt] = {"dtype": dt, "shape": [n // item], "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {"format": FORMAT_NAME}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        with open(self.tmp / DATA_FILE, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for dt in order:
                src = self.tmp / f".blob-{dt}"
                with open(src, "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
                src.unlink()

    def finish(self, manifest: dict) -> Path:
        """Assemble the data file, write the manifest, rename the staging dir into place."""
        self._write_data_file()
        files = {}
        for f in sorted(p for p in self.tmp.rglob("*") if p.is_file()):
            files[str(f.relative_to(self.tmp))] = {"bytes": f.stat().st_size,
                                                   "sha256": _sha256(f)}
        doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
               "created_by": f"deltadq-vllm {__version__}", **manifest,
               "tensors": self.entries, "files": files}
        write_manifest(self.tmp, doc)
        return self._dir.commit()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
