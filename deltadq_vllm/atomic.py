"""Publish a directory atomically: build it in a temporary sibling, rename when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import DeltaDQError


class AtomicDir:
    """`with AtomicDir(out, force) as d: write into d.path; d.commit()`.

    Nothing appears at `out` unless commit() ran; an existing `out` is replaced only
    with force=True, and only after the new directory is complete.
    """

    def __init__(self, out: str | os.PathLike, force: bool = False):
        self.out = self.check_target(out, force)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.committed = False

    @staticmethod
    def check_target(out: str | os.PathLike, force: bool = False) -> Path:
        """`out` may be published (DeltaDQError saying why not): callers doing long work
        before they publish check first."""
        out = Path(out)
        if out.exists() and not force:
            raise DeltaDQError(f"output directory {out} already exists",
                               "choose a new --out path, or pass --force to replace it")
        if out.exists() and not out.is_dir():
            raise DeltaDQError(f"output path {out} exists and is not a directory",
                               "choose a new --out path")
        parent = out.parent
        if not parent.is_dir():
            raise DeltaDQError(f"parent directory {parent} of the output does not exist",
                               f"create it first (mkdir -p {parent})")
        return out

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)
        return False

    def commit(self) -> Path:
        _normal_permissions(self.path)
        move_into_place(self.path, self.out)
        self.committed = True
        return self.out


def move_into_place(src: Path, out: Path) -> Path:
    """Rename the complete directory `src` to `out` (same filesystem); an existing `out`
    is replaced only after the new one is in place."""
    src, out = Path(src), Path(out)
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(src, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, out)
    return out


def _normal_permissions(root: Path) -> None:
    """mkdtemp creates 0700 (and some writers 0600); publish with the user's umask instead."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
