"""Deterministic tiny-model fixtures, built on first use and cached (test support).

Everything is generated locally (no model hub): tokenizers trained on a generated corpus,
tiny base models pre-trained on it, and real fine-tunes (recipes.py). `build_fixture(name)`
returns a fixture's folder, building it and what it depends on if they are not cached;
`build_all(names)` builds many in parallel processes.

Cache layout: `$DELTADQ_FIXTURE_CACHE` (default `~/.cache/deltadq-vllm/fixtures`) holds one
folder per fixture, `<name>-<hash>`, where the hash covers FIXTURE_VERSION, the training
thread count, the fixture's spec and the hash of what it is built from: changing one
recipe rebuilds that fixture and the ones built from it, nothing else. Folders of old
recipes are never read again and can be deleted. Builds go to a temp folder that is
`os.replace`d into place under a per-fixture `flock`, so concurrent builders (parallel
test runs, other users of a shared cache) never see or corrupt a half-written fixture.

CLI: python -m deltadq_vllm.testing.fixtures [--only NAME ...] [--jobs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from .recipes import (BASES, FINETUNES, MATRIX_BASES, TOKENIZERS, BaseSpec,  # noqa: F401
                      FinetuneSpec, build, dependency, spec_of)
from .tasks import N_EVAL, TASKS, eval_problems, generic_corpus, train_problems  # noqa: F401
from .training import (TRAIN_THREADS, deterministic_torch, greedy_complete,  # noqa: F401
                       task_accuracy)
from .vocab import INFO_FILE, TokenizerSpec, load_tokenizer  # noqa: F401

FIXTURE_VERSION = 3
CACHE_ENV = "DELTADQ_FIXTURE_CACHE"
JOBS_ENV = "DELTADQ_FIXTURE_JOBS"
TOKENIZER = TOKENIZERS["tokenizer"]
FIXTURE_NAMES = (*TOKENIZERS, *BASES, *FINETUNES)


@lru_cache(maxsize=None)
def fixture_hash(name: str) -> str:
    """Short hash of a fixture's recipe and of everything it is built from."""
    dep = dependency(name)
    payload = {"version": FIXTURE_VERSION, "threads": TRAIN_THREADS,
               "spec": dataclasses.asdict(spec_of(name)),
               "from": fixture_hash(dep) if dep else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def fixture_root() -> Path:
    """The cache folder: $DELTADQ_FIXTURE_CACHE, else ~/.cache/deltadq-vllm/fixtures."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "deltadq-vllm" / "fixtures"


def fixture_path(name: str, root: Path | None = None) -> Path:
    """Where fixture `name` lives in the cache (built or not)."""
    return (Path(root) if root is not None else fixture_root()) / f"{name}-{fixture_hash(name)}"


def is_built(name: str, root: Path | None = None) -> bool:
    return fixture_path(name, root).is_dir()


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive flock on `path` (one lock file per fixture, so no nested self-locking)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _summary(path: Path) -> str:
    info = json.loads((path / INFO_FILE).read_text())
    out = f"{info.get('build_seconds', 0):.0f} s"
    if "build_cpu_seconds" in info:
        out += f" ({info['build_cpu_seconds']:.0f} CPU-s)"
    if "accuracy" in info:
        out += f", held-out accuracy {info['accuracy']:.2f} (base {info['base_accuracy']:.2f})"
    return out


def build_fixture(name: str, root: Path | None = None, progress: bool = True) -> Path:
    """Path of fixture `name`, building it (and what it depends on) if not cached.

    progress: print step, loss and ETA while training (stderr)."""
    if name not in FIXTURE_NAMES:
        raise KeyError(f"unknown fixture {name!r}; known: {', '.join(FIXTURE_NAMES)}")
    root = Path(root) if root is not None else fixture_root()
    final = fixture_path(name, root)
    if final.is_dir():
        return final
    dep = dependency(name)
    dep_dir = build_fixture(dep, root, progress) if dep else None  # locks are never nested
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        for stale in root.glob(f".tmp-{final.name}-*"):  # left by a crashed builder
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # "Writing model shards": our lines say more
            with deterministic_torch():
                build(name, tmp, dep_dir, progress)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if progress:
        print(f"[fixtures] {name}: built in {_summary(final)}", file=sys.stderr, flush=True)
    return final


def with_dependencies(names) -> list[str]:
    """names and everything they are built from, dependencies first."""
    out: list[str] = []
    for n in names:
        chain = []
        while n is not None and n not in out and n not in chain:
            chain.append(n)
            n = dependency(n)
        out += reversed(chain)
    return out


def _build_cost(name: str) -> int:
    """Training steps: the scheduler starts the longest builds first."""
    return getattr(spec_of(name), "steps", 0)


def default_jobs() -> int:
    """Parallel build processes: $DELTADQ_FIXTURE_JOBS, else one per core (at most 4)."""
    env = os.environ.get(JOBS_ENV)
    return max(1, int(env)) if env else max(1, min(4, os.cpu_count() or 1))


def build_all(names=FIXTURE_NAMES, root: Path | None = None, jobs: int | None = None,
              progress: bool = True) -> dict[str, Path]:
    """Build `names` (and what they depend on) in up to `jobs` processes, each on one thread;
    a fixture starts as soon as the one it is built from is done. Returns {name: path}."""
    import concurrent.futures as cf
    import multiprocessing

    root = Path(root) if root is not None else fixture_root()
    todo = [n for n in with_dependencies(names) if not is_built(n, root)]
    jobs = max(1, min(jobs or default_jobs(), len(todo)))
    t0 = time.perf_counter()
    if todo and progress:
        print(f"[fixtures] building {len(todo)} tiny models into {root} in {jobs} "
              f"process(es), cached after the first run: {', '.join(todo)}",
              file=sys.stderr, flush=True)
    if jobs == 1:
        for n in todo:
            build_fixture(n, root, progress)
    elif todo:
        # spawn, not fork: the caller may hold threads (pytest, vLLM) that fork would copy
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as ex:
            pending: dict[cf.Future, str] = {}
            waiting = list(todo)
            while waiting or pending:
                busy = set(waiting) | set(pending.values())
                ready = [n for n in waiting if dependency(n) not in busy]
                for n in sorted(ready, key=lambda n: (n in FINETUNES, -_build_cost(n))):
                    waiting.remove(n)
                    pending[ex.submit(build_fixture, n, root, progress)] = n
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    pending.pop(f)
                    f.result()  # a failed build raises here, with its traceback
    if todo and progress:
        print(f"[fixtures] {len(todo)} built in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    return {n: build_fixture(n, root, progress) for n in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help=f"cache folder (default: ${CACHE_ENV} or ~/.cache/deltadq-vllm/fixtures)")
    ap.add_argument("--only", nargs="+", choices=FIXTURE_NAMES, default=None, metavar="NAME",
                    help="these fixtures (and what they are built from); default: all")
    ap.add_argument("--jobs", type=int, default=None,
                    help=f"parallel build processes (default: ${JOBS_ENV} or one per core, max 4)")
    ap.add_argument("--no-progress", action="store_true", help="no training progress lines")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = build_all(args.only or FIXTURE_NAMES, args.out, args.jobs, not args.no_progress)
    for name, path in paths.items():
        info = json.loads((path / INFO_FILE).read_text())
        acc = info.get("accuracy")
        print(f"{name}\t{path}" + (f"\taccuracy={acc:.2f}" if acc is not None else ""))
    print(f"total {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
