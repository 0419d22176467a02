"""Build the tiny model fixtures the selected tests use before the first test runs.

Cold, they take a few minutes to train; built here (in parallel processes, one thread
each) their progress -- step, loss, ETA per model -- reaches the terminal, where a build
started lazily inside a test would be captured and silent. Warm, this costs a directory
listing. A test module's fixtures are the fixture names quoted in its source.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

# TRITON_INTERPRET=1: the Triton tests (test_kernels.py, test_graph_safety.py, ...) run the
# real kernels on the CPU through Triton's interpreter, which Triton decides when it is
# first imported. Test modules that import vllm (which imports triton) are collected
# before them in the suite's order (test_admission.py, ...), so setting the variable in
# each Triton test module is too late when the whole suite runs: it is set here, once,
# before collection. (This machine has no GPU; on a GPU box run the GPU checks under
# benchmarks/gpu/ instead.)
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_dynamo_cache():
    """Every test compiles from an empty Dynamo cache. The delta layers' forward code
    objects are shared by every test that compiles them (test_graph_safety.py's
    parametrizations, test_kernels.py), so without this a test's first call evaluates the
    guards a previous test left on objects it has since freed. The suite once aborted
    (SIGABRT, no Python traceback reached the CI log) in such a test's first compiled
    call; not reproduced on this repository's machines, and this is hygiene either way."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
    yield


def _fixtures_used(paths) -> list[str]:
    from deltadq_vllm.testing.fixtures import FIXTURE_NAMES

    quoted = re.compile(r"""["']([A-Za-z0-9_.-]+)["']""")
    used: set[str] = set()
    for path in paths:
        used |= set(quoted.findall(Path(path).read_text())) & set(FIXTURE_NAMES)
    return [n for n in FIXTURE_NAMES if n in used]


def pytest_collection_finish(session):
    if session.config.option.collectonly or not session.items:
        return
    names = _fixtures_used({item.path for item in session.items})
    if not names:
        return
    from deltadq_vllm.testing.fixtures import build_all, is_built

    if all(is_built(n) for n in names):
        return
    capman = session.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print()
        build_all(names)
