"""Reading an artifact's files so that what was checked is what is used.

A served delta is read more than once: when it is loaded, and again whenever a
worker re-reads it after evicting it from host memory. Every read goes through
`ArtifactFiles`:

* the directory is the *resolved* path stored at the first load (symlinks resolved
  once, then never followed again): it is opened one component at a time from `/`
  with O_NOFOLLOW, so a symlink swapped in later (e.g. inside `--delta-root`,
  re-pointed outside it) makes the read fail instead of being followed;
* every file is opened relative to that directory descriptor, also with O_NOFOLLOW,
  and must be a regular file;
* the manifest's bytes are hashed: their sha256 is the artifact's identity (the
  manifest lists the size and sha256 of every other file); a re-read must find the
  same identity, so a moved, replaced or edited artifact is refused, never served;
* every other file is read once, size- and sha256-checked; with `keep=True` its bytes
  stay in memory and are what the reader parses (no second read a file could change
  in between).

`stamp` / `parse_stamp` attach the identity to a path ("DIR#sha256=HEX"): the
worker receives it as the adapter's path, so it loads exactly the artifact the API
process checked, and vLLM's prefix-cache key (adapter name + path) changes when the
content does.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
from pathlib import Path

from ..errors import DeltaDQError

MANIFEST = "deltadq.json.gz"
STAMP_SEP = "#sha256="
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 16 << 20
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def stamp(resolved_dir: str, digest: str) -> str:
    return f"{resolved_dir}{STAMP_SEP}{digest}"


def parse_stamp(path: str) -> tuple[str, str | None]:
    """(directory, expected manifest digest or None) of a possibly stamped path."""
    head, sep, digest = str(path).rpartition(STAMP_SEP)
    if sep and _HEX64.fullmatch(digest):
        return head, digest
    return str(path), None


def _changed(path, why: str) -> DeltaDQError:
    return DeltaDQError(f"delta {path} cannot be read safely: {why}",
                        "restore the artifact directory as it was when the fine-tune was "
                        "loaded, or load it again (unload, then load) to serve what is there now")


def open_dir_nofollow(path: str) -> int:
    """An O_RDONLY descriptor of absolute directory `path`, opened component by component
    without following any symlink (ELOOP/ENOTDIR where one appeared)."""
    parts = Path(path).parts
    if not parts or parts[0] != os.sep:
        raise ValueError(f"not an absolute path: {path}")
    fd = os.open(os.sep, os.O_RDONLY | _O_DIRECTORY)
    try:
        for part in parts[1:]:
            nfd = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file_nofollow(dir_fd: int, rel: str) -> int:
    """Descriptor of regular file `rel` (may contain '/') under dir_fd, no symlinks."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"bad file name in manifest: {rel!r}")
    fd = os.dup(dir_fd)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(parts[-1], os.O_RDONLY | _O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(ffd).st_mode):
        os.close(ffd)
        raise IsADirectoryError(f"{rel} is not a regular file")
    return ffd


def _read_fd(fd: int, size: int, hasher=None, keep: bool = True) -> bytearray | None:
    """Read exactly `size` bytes from fd (hashing them); the bytes, or None with keep=False."""
    buf = bytearray(size) if keep else None
    view = memoryview(buf) if keep else None
    off = 0
    while off < size:
        chunk = os.pread(fd, min(_CHUNK, size - off), off)
        if not chunk:
            break
        if hasher is not None:
            hasher.update(chunk)
        if keep:
            view[off:off + len(chunk)] = chunk
        off += len(chunk)
    if off != size or os.pread(fd, 1, size):
        raise EOFError(f"expected {size} bytes")
    return buf if keep else None


def file_identity(st: os.stat_result) -> tuple:
    """What changes whenever a file's content does (ctime cannot be set back)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ArtifactFiles:
    """The verified files of one artifact directory (see the module docstring).

    path:          the artifact directory; resolved here unless `resolved=True`
    expect_digest: the manifest sha256 a previous load recorded (None: first load)
    verify:        check every file's sha256 (sizes are always checked)
    keep:          keep every file's bytes in memory (`data`)
    """

    def __init__(self, path, expect_digest: str | None = None, verify: bool = True,
                 keep: bool = False, resolved: bool = False):
        self.given = str(path)
        self.dir = str(path) if resolved else os.path.realpath(path)
        self.data: dict[str, bytes] = {}
        self.identities: dict[str, tuple] = {}
        try:
            dir_fd = open_dir_nofollow(self.dir)
        except FileNotFoundError:
            if expect_digest is not None:
                raise _changed(self.dir, "the directory is gone (moved or deleted)") from None
            raise DeltaDQError(f"delta directory {self.given} does not exist",
                               "pass a directory written by `deltadq compress`") from None
        except NotADirectoryError:
            if expect_digest is not None:
                raise _changed(self.dir, "a path component is no longer a directory "
                                         "(replaced by a file or a symlink)") from None
            raise DeltaDQError(f"delta path {self.given} is not a directory",
                               "pass a directory written by `deltadq compress`") from None
        except OSError as e:  # ELOOP: a symlink appeared where a directory was resolved
            raise _changed(self.dir, f"cannot open it without following symlinks ({e})") \
                from None
        try:
            self._read_all(dir_fd, expect_digest, verify, keep)
        finally:
            os.close(dir_fd)

    def _open(self, dir_fd: int, rel: str, first: bool) -> int:
        try:
            return open_file_nofollow(dir_fd, rel)
        except FileNotFoundError:
            if rel == MANIFEST and first:
                old = os.path.exists(os.path.join(self.dir, "deltadq.json"))
                raise DeltaDQError(
                    f"{self.given} is not a deltadq artifact (no {MANIFEST})"
                    + (" but has deltadq.json, the manifest of the pre-release format 1"
                       if old else ""),
                    "re-run `deltadq compress` with this deltadq-vllm" if old
                    else "pass a directory written by `deltadq compress`") from None
            if first:
                raise DeltaDQError(f"delta {self.given} is missing its file {rel}",
                                   "copy the whole artifact directory") from None
            raise _changed(self.dir, f"its file {rel} is gone") from None
        except (OSError, ValueError) as e:
            why = f"{rel} is a symlink or not a regular file ({e})"
            if first:
                raise DeltaDQError(f"delta {self.given}: {why}",
                                   "artifact files must be regular files inside the artifact "
                                   "directory; copy it with `cp -rL`") from None
            raise _changed(self.dir, why) from None

    def _read_all(self, dir_fd: int, expect_digest, verify: bool, keep: bool) -> None:
        first = expect_digest is None
        fd = self._open(dir_fd, MANIFEST, first)
        try:
            st = os.fstat(fd)
            h = hashlib.sha256()
            raw = _read_fd(fd, st.st_size, h)
            self.identities[MANIFEST] = file_identity(st)
        finally:
            os.close(fd)
        self.digest = h.hexdigest()
        if expect_digest is not None and self.digest != expect_digest:
            raise _changed(self.dir, "its manifest differs from the one checked when it was "
                                     "loaded (the artifact was replaced or edited)")
        try:
            self.manifest = json.loads(gzip.decompress(raw))
        except (OSError, ValueError, EOFError) as e:
            raise DeltaDQError(f"corrupt manifest {Path(self.dir) / MANIFEST}: {e}",
                               "re-run `deltadq compress` to rewrite the artifact") from None
        files = self.manifest.get("files") if isinstance(self.manifest, dict) else None
        if not isinstance(files, dict):
            return   # the reader reports the malformed manifest with its own message
        for rel, meta in files.items():
            fd = self._open(dir_fd, rel, first)
            try:
                st = os.fstat(fd)
                if st.st_size != meta.get("bytes"):
                    msg = (f"delta file {Path(self.dir) / rel} has {st.st_size} bytes, the "
                           f"manifest says {meta.get('bytes')} (truncated or modified)")
                    if first:
                        raise DeltaDQError(msg, "copy the artifact again")
                    raise _changed(self.dir, msg)
                fh = hashlib.sha256() if verify else None
                try:
                    data = _read_fd(fd, st.st_size, fh, keep)
                except EOFError:
                    raise _changed(self.dir, f"{rel} changed size while it was read") from None
                if fh is not None and fh.hexdigest() != meta.get("sha256"):
                    msg = f"delta file {Path(self.dir) / rel} does not match its checksum"
                    if first:
                        raise DeltaDQError(msg + " (corrupt)", "copy the artifact again or "
                                                              "re-run `deltadq compress`")
                    raise _changed(self.dir, msg + " (edited after the fine-tune was loaded)")
                if keep:
                    self.data[rel] = data
                self.identities[rel] = file_identity(st)
            finally:
                os.close(fd)

    def current_identities(self) -> dict[str, tuple] | str:
        """The files' identities now (same walk, no symlinks followed), or a message saying
        what changed. Cheap (a few syscalls): the per-request check of a served fine-tune."""
        try:
            dir_fd = open_dir_nofollow(self.dir)
        except FileNotFoundError:
            return f"its directory {self.dir} is gone (moved or deleted)"
        except OSError as e:   # ENOTDIR / ELOOP: a symlink or a file where a directory was
            return f"its directory {self.dir} was replaced by a symlink or a file (symlinks " \
                   f"are not followed after the load: {e.strerror or e})"
        try:
            out = {}
            for rel in self.identities:
                try:
                    fd = open_file_nofollow(dir_fd, rel)
                except (OSError, ValueError) as e:
                    return f"its file {rel} is gone or replaced ({getattr(e, 'strerror', e)})"
                try:
                    out[rel] = file_identity(os.fstat(fd))
                finally:
                    os.close(fd)
            return out
        finally:
            os.close(dir_fd)

    def unchanged(self) -> str | None:
        """None when every file is exactly as when it was read, else what changed."""
        now = self.current_identities()
        if isinstance(now, str):
            return now
        for rel, ident in self.identities.items():
            if now[rel] != ident:
                was, got = ident, now[rel]
                what = ("replaced" if got[:2] != was[:2] else
                        f"truncated or extended ({was[2]} -> {got[2]} bytes)" if got[2] != was[2]
                        else "modified")
                return f"its file {rel} was {what} after it was loaded"
        return None

    def recheck(self) -> str | None:
        """None when the artifact is still exactly the one loaded: unchanged files, or files
        whose identity changed (copied back, rsync'ed) but whose bytes still match every
        checksum and the digest (then their new identities are adopted); else what changed."""
        what = self.unchanged()
        if what is None:
            return None
        try:
            again = ArtifactFiles(self.dir, expect_digest=self.digest, resolved=True)
        except DeltaDQError as e:
            return f"{what}: {e.problem}"
        self.identities = again.identities
        return None

    def read(self, rel: str) -> bytes:
        """One listed file's bytes: kept ones from memory, others read again the same way
        (no symlinks) and checked against the manifest's sha256."""
        if rel in self.data:
            return bytes(self.data[rel])
        meta = self.manifest["files"][rel]
        dir_fd = open_dir_nofollow(self.dir)
        try:
            fd = open_file_nofollow(dir_fd, rel)
        except (OSError, ValueError) as e:
            raise _changed(self.dir, f"its file {rel} cannot be read ({e})") from None
        finally:
            os.close(dir_fd)
        try:
            h = hashlib.sha256()
            data = _read_fd(fd, os.fstat(fd).st_size, h)
        except EOFError:
            raise _changed(self.dir, f"{rel} changed size while it was read") from None
        finally:
            os.close(fd)
        if h.hexdigest() != meta.get("sha256"):
            raise _changed(self.dir, f"its file {rel} no longer matches its checksum")
        return bytes(data)
