"""Build the tiny model fixtures the selected tests use before the first test runs.

Cold, they take a few minutes to train; built here (in parallel processes, one thread
each) their progress -- step, loss, ETA per model -- reaches the terminal, where a build
started lazily inside a test would be captured and silent. Warm, this costs a directory
listing. A test module's fixtures are the fixture names quoted in its source.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# The Triton kernel tests run in Triton's interpreter on a CPU, which must be on when
# deltadq_vllm.kernels.triton_delta is first imported (its @triton.jit functions are
# made then). test_kernels.py sets it at import, but any module collected before it that
# imports the serving code (test_admission.py) imported triton_delta already, and 36
# kernel tests then failed ("Cannot call @triton.jit'd outside of the scope of a
# kernel"). Set here, before any test module, as test_kernels.py sets it: the same process
# state a full run had once test_kernels.py was collected (servers inherit it either way).
os.environ.setdefault("TRITON_INTERPRET", "1")


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
