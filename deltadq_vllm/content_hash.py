"""The base check: a content hash of every tensor of a checkpoint, computed once and cached.

A delta is only correct on the exact base it was compressed against: a base that
differs in a single value gives a different fine-tune. Every artifact therefore
records a digest over the full bytes of every base tensor (docs/format.md,
`sha256-content-v1`), and serving / merging recomputes it on the base at hand.

Hashing a 7B base reads 13.5 GB, so per-tensor digests are cached per weight file,
in memory and on disk (`$DELTADQ_CACHE_DIR`, default `~/.cache/deltadq-vllm`, under
`content-hashes/`). The cache key is the file's resolved path plus
(device, inode, size, mtime_ns, ctime_ns): any write to the file changes its ctime
(which, unlike mtime, cannot be set back), and replacing the file changes its inode,
so a changed base is always re-hashed. Tensors are hashed in parallel threads
(hashlib releases the GIL), each read with pread in 16 MiB chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .checkpoint import DTYPE_NAMES, Checkpoint, TensorInfo
from .errors import DeltaDQError

ALGORITHM = "sha256-content-v1"
CACHE_ENV = "DELTADQ_CACHE_DIR"
_CHUNK = 16 << 20
_memo: dict[tuple, dict[str, str]] = {}
_memo_lock = threading.Lock()
log = logging.getLogger("deltadq")


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "deltadq-vllm"


def tensor_digest(info: TensorInfo) -> str:
    """sha256 over "name|dtype|shape" and the tensor's raw bytes (hex)."""
    h = hashlib.sha256(f"{info.name}|{DTYPE_NAMES.get(info.dtype, str(info.dtype))}|"
                       f"{list(info.shape)}".encode())
    fd = os.open(info.file, os.O_RDONLY)
    try:
        off, end = info.start, info.end
        while off < end:
            chunk = os.pread(fd, min(_CHUNK, end - off), off)
            if not chunk:
                raise DeltaDQError(f"{info.file} ended while hashing tensor {info.name!r}",
                                   "the checkpoint file was truncated; copy it again")
            h.update(chunk)
            off += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _file_key(path: Path) -> tuple:
    real = os.path.realpath(path)
    st = os.stat(real)
    return (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _cache_file(key: tuple) -> Path:
    return cache_root() / "content-hashes" / (hashlib.sha256(key[0].encode()).hexdigest()[:32]
                                              + ".json")


def _read_cache(key: tuple) -> dict[str, str] | None:
    try:
        doc = json.loads(_cache_file(key).read_text())
    except (OSError, ValueError):
        return None
    if doc.get("algorithm") != ALGORITHM or doc.get("key") != list(key):
        return None
    tensors = doc.get("tensors")
    return tensors if isinstance(tensors, dict) else None


def _write_cache(key: tuple, tensors: dict[str, str]) -> None:
    target = _cache_file(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"algorithm": ALGORITHM, "key": list(key), "tensors": tensors}, f)
        os.replace(tmp, target)
    except OSError as e:  # a read-only home: hashes stay in this process only
        log.debug("deltadq: cannot cache content hashes in %s: %s", target.parent, e)


def tensor_digests(ckpt: Checkpoint, threads: int | None = None) -> dict[str, str]:
    """{tensor name: digest} for every tensor of the checkpoint (cached per weight file)."""
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in ckpt.tensors.values():
        by_file.setdefault(info.file, []).append(info)
    out: dict[str, str] = {}
    todo: list[tuple[tuple, list[TensorInfo]]] = []
    for file, infos in by_file.items():
        key = _file_key(file)
        with _memo_lock:
            hit = _memo.get(key)
        if hit is None:
            hit = _read_cache(key)
        if hit is not None and all(i.name in hit for i in infos):
            out.update({i.name: hit[i.name] for i in infos})
            with _memo_lock:
                _memo[key] = hit
        else:
            todo.append((key, infos))
    if todo:
        infos = sorted((i for _, group in todo for i in group), key=lambda i: -i.nbytes)
        n = threads or min(32, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=n) as pool:
            digests = dict(zip((i.name for i in infos), pool.map(tensor_digest, infos)))
        for key, group in todo:
            per_file = {i.name: digests[i.name] for i in group}
            if _file_key(Path(key[0])) != key:
                # the file changed while it was hashed: never cache (or trust) that
                raise DeltaDQError(f"{key[0]} changed while its content hash was computed",
                                   "wait until the checkpoint is no longer being written, "
                                   "then retry")
            with _memo_lock:
                _memo[key] = per_file
            _write_cache(key, per_file)
            out.update(per_file)
    return out


def content_fingerprint(ckpt: Checkpoint, threads: int | None = None) -> dict:
    """The manifest's `base.fingerprint`: one digest over every tensor's content digest."""
    per = tensor_digests(ckpt, threads)
    overall = hashlib.sha256("".join(f"{n}:{per[n]};" for n in sorted(per)).encode())
    return {"algorithm": ALGORITHM, "digest": overall.hexdigest(), "tensors": len(per)}
