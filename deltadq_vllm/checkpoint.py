"""Read HF safetensors checkpoints tensor by tensor, validating as we go.

We parse safetensors headers ourselves and read each tensor with `os.pread` into a
fresh buffer: one tensor is resident at a time and nothing stays mapped, so peak
RSS of a pass over a 70B checkpoint is one tensor, not the model. (A long-lived
mmap would keep every touched page resident and counted in RSS.) Header parsing
also lets us reject corrupt or truncated files with a message naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DeltaDQError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32,
    "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
NON_SAFETENSORS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one .safetensors file's header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise ValueError(f"header length {hlen} does not fit in a {size}-byte file")
            header = json.loads(f.read(hlen))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from None
    return _tensor_infos(header, path, size, 8 + hlen)


def parse_header(data, path: Path) -> dict[str, TensorInfo]:
    """The same for a safetensors file already read into memory (`data`, bytes-like);
    offsets are into `data`."""
    size = len(data)
    try:
        if size < 8:
            raise ValueError("file is shorter than the 8-byte header length")
        (hlen,) = struct.unpack("<Q", bytes(data[:8]))
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise ValueError(f"header length {hlen} does not fit in a {size}-byte file")
        header = json.loads(bytes(data[8:8 + hlen]))
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from None
    return _tensor_infos(header, path, size, 8 + hlen)


def _corrupt(path, e) -> DeltaDQError:
    return DeltaDQError(f"corrupt or truncated safetensors file {path}: {e}",
                        "re-save or re-download the checkpoint (transformers: "
                        "save_pretrained(..., safe_serialization=True))")


def _tensor_infos(header, path: Path, size: int, data_start: int) -> dict[str, TensorInfo]:
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise DeltaDQError(f"corrupt safetensors header in {path}: bad entry for {name!r}",
                               "re-save the checkpoint with safetensors") from None
        info = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if info.end > size or info.end < info.start or info.nbytes != info.numel * itemsize:
            raise DeltaDQError(
                f"corrupt or truncated safetensors file {path}: tensor {name!r} needs bytes "
                f"[{info.start}, {info.end}) but the file has {size}",
                "the file was probably cut short while copying; copy or download it again")
        out[name] = info
    return out


class Checkpoint:
    """An HF model directory: config.json plus safetensors weights (single or sharded)."""

    def __init__(self, path: str | os.PathLike, role: str = "checkpoint"):
        self.path = Path(path)
        self.role = role
        if not self.path.exists():
            raise DeltaDQError(f"{role} directory {self.path} does not exist",
                               f"pass the path of an HF model directory as the {role}")
        if not self.path.is_dir():
            raise DeltaDQError(f"{role} path {self.path} is not a directory",
                               "pass the directory that holds config.json and *.safetensors")
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise DeltaDQError(f"{role} directory {self.path} is not readable",
                               "check its permissions")
        self.config = self._read_config()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            for name, info in read_header(file).items():
                self.tensors.setdefault(name, info)

    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise DeltaDQError(f"{self.role} directory {self.path} has no config.json",
                               "point at a Hugging Face model directory (save_pretrained output)")
        try:
            return json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise DeltaDQError(f"{cfg} is not valid JSON: {e}", "restore the model's config.json") \
                from None

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise DeltaDQError(f"{index} is not a valid safetensors index: {e}",
                                   "restore the index file or re-save the checkpoint") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise DeltaDQError(f"{self.role} {self.path} is missing shards {missing}",
                                   "copy every shard listed in model.safetensors.index.json")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        other = [p.name for pat in NON_SAFETENSORS for p in self.path.glob(pat)]
        if other:
            raise DeltaDQError(
                f"{self.role} {self.path} has weights in a non-safetensors format ({other[0]})",
                "convert it: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir, "
                "safe_serialization=True)")
        raise DeltaDQError(f"{self.role} directory {self.path} holds no *.safetensors weights",
                           "point at a Hugging Face model directory")

    # ------------------------------------------------------------------ access

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into its own memory (no lasting mapping)."""
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        fd = os.open(info.file, os.O_RDONLY)
        try:
            view, done = memoryview(buf), 0
            while done < info.nbytes:
                n = os.preadv(fd, [view[done:]], info.start + done)
                if n <= 0:
                    raise DeltaDQError(f"truncated safetensors file {info.file} while reading "
                                       f"{name!r}", "copy or download the file again")
                done += n
        finally:
            os.close(fd)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def get_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows `rows` (sorted, distinct) of a 2-D tensor, reading only their bytes (runs of
        consecutive rows in one read): a sample of a 32000 x 4096 matrix costs its rows,
        not the matrix."""
        info = self.tensors[name]
        if len(info.shape) != 2:
            raise ValueError(f"{name} is not a matrix")
        row_bytes = info.shape[1] * info.dtype.itemsize
        buf = bytearray(len(rows) * row_bytes)
        view = memoryview(buf)
        fd = os.open(info.file, os.O_RDONLY)
        try:
            i = 0
            while i < len(rows):
                j = i
                while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
                    j += 1
                want, off = (j - i + 1) * row_bytes, info.start + rows[i] * row_bytes
                done = 0
                while done < want:
                    n = os.preadv(fd, [view[i * row_bytes + done:(j + 1) * row_bytes]],
                                  off + done)
                    if n <= 0:
                        raise DeltaDQError(f"truncated safetensors file {info.file} while "
                                           f"reading {name!r}", "copy or download the file again")
                    done += n
                i = j + 1
        finally:
            os.close(fd)
        if not rows:
            return torch.empty((0, info.shape[1]), dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(len(rows), info.shape[1])

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def architecture(self) -> dict:
        """The parts of config.json a delta depends on."""
        c = self.config
        keys = ("model_type", "architectures", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "tie_word_embeddings")
        return {k: c.get(k) for k in keys if k in c}

    def tensor_fingerprint(self, name: str) -> str:
        return tensor_fingerprint(self.info(name))

    def fingerprint(self, names: list[str] | None = None) -> dict:
        """One digest over the sampled digests of `names` (default: all; docs/format.md)."""
        per = {n: self.tensor_fingerprint(n) for n in sorted(names or self.names())}
        overall = hashlib.sha256("".join(f"{n}:{d};" for n, d in per.items()).encode())
        return {"algorithm": FINGERPRINT_ALGORITHM, "digest": overall.hexdigest()[:32]}

    def same_tensor(self, other: "Checkpoint", name: str, chunk: int = 1 << 24) -> bool:
        """Whether tensor `name` is byte-identical in both checkpoints (full comparison,
        read in chunks: a sampled fingerprint can miss a fine-tune that changed a few rows)."""
        a, b = self.info(name), other.info(name)
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        fa, fb = os.open(a.file, os.O_RDONLY), os.open(b.file, os.O_RDONLY)
        try:
            for off in range(0, a.nbytes, chunk):
                n = min(chunk, a.nbytes - off)
                if os.pread(fa, n, a.start + off) != os.pread(fb, n, b.start + off):
                    return False
        finally:
            os.close(fa)
            os.close(fb)
        return True


def _libc_malloc_trim():
    """glibc's malloc_trim, or None (other C libraries, other systems)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim() if sys.platform.startswith("linux") else None


_TRIM_GROWTH = 64 << 20   # resident growth (bytes) since the last trim that calls for one
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_rss_floor = 0             # the lowest resident size seen since the last trim


def resident_bytes() -> int | None:
    """This process's resident set in bytes (/proc/self/statm), else None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def release_freed_memory() -> None:
    """Hand memory freed by the last tensor's work back to the OS (streaming passes call
    it between tensors).

    Temporaries below glibc's mmap threshold (which rises to 32 MB after the first large
    free) come from the heap, and glibc returns freed heap pages only from its top, so
    without this the resident set keeps every tensor's temporaries at their high-water
    mark and grows with fragmentation (measured on a 1.1 GB checkpoint: +300 MB between
    tensors, +350 MB over 9 calibrated layers). A low fixed mmap threshold
    (MALLOC_MMAP_THRESHOLD_) would do it per allocation and doubled `deltadq compress`'s
    run time.

    The trim walks the whole heap (8-17 ms a call measured on SmolLM2, 2-3 s of a 70-140 s
    compress at one call per tensor and layer), so it runs only once the resident size
    has grown by _TRIM_GROWTH above the lowest seen since the last trim: freed heap
    pages are resident, so at most that much is kept back; a 7B layer's temporaries
    (hundreds of MB) still trim at every call."""
    global _rss_floor
    if _MALLOC_TRIM is None:
        return
    rss = resident_bytes()
    if rss is not None:
        _rss_floor = min(_rss_floor, rss) if _rss_floor else rss
        if rss - _rss_floor < _TRIM_GROWTH:
            return
    _MALLOC_TRIM(0)
    _rss_floor = resident_bytes() or 0


FINGERPRINT_ALGORITHM = "sha256-sampled-v1"
_SAMPLES = 64
_SAMPLE_BYTES = 64


def tensor_fingerprint(info: TensorInfo) -> str:
    """sha256 over name, dtype, shape and 64 evenly spaced 64-byte samples of the data.

    Reading 4 KiB per tensor keeps it cheap on a 70B base, and any two trainings of a
    model differ in every sample, so a wrong base is caught.
    """
    h = hashlib.sha256(f"{info.name}|{DTYPE_NAMES.get(info.dtype, str(info.dtype))}|{list(info.shape)}"
                       .encode())
    fd = os.open(info.file, os.O_RDONLY)
    try:
        n = info.nbytes
        if n <= _SAMPLES * _SAMPLE_BYTES:
            h.update(os.pread(fd, n, info.start))
        else:
            stride = (n - _SAMPLE_BYTES) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                h.update(os.pread(fd, _SAMPLE_BYTES, info.start + i * stride))
    finally:
        os.close(fd)
    return h.hexdigest()[:16]
