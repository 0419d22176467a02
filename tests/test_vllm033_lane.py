"""The vLLM 0.33 lane: what GPU users run, checked on this CPU machine without a GPU.

vllm 0.33.0's Python is put in front of the venv's packages (tests/vllm_side.py:
downloaded once, cached; CPU platform forced) and, in a subprocess, these run against
it: `deltadq serve --help` and `--help=all` (vLLM 0.33's own parser with the delta
flags), every vLLM name deltadq uses (test_vllm_compat.py: moved names, plugin and
endpoint-plugin loading through vLLM's loaders, the worker extension, the stats hooks),
flag parsing and translation (test_flags.py), the engine-core admission wrappers with
the real worker manager (test_admission.py), and the vLLM-agnostic worker and slot
manager units (test_model_manager.py, test_metrics.py).

Needs PyPI the first time (vllm 0.33.0's wheel, 336 MB, of which ~60 MB of Python is
kept); fails with that message if it cannot be reached.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_side

TESTS = Path(__file__).parent
LANE = ["test_vllm_compat.py", "test_flags.py", "test_admission.py", "test_model_manager.py",
        "test_metrics.py",
        "test_serve_cli.py::test_help_shows_delta_flags_first_without_vllm",
        "test_serve_cli.py::test_vllm_help_still_lists_every_flag"]

pytestmark = pytest.mark.skipif(os.environ.get("DELTADQ_EXPECT_VLLM") is not None,
                                reason="already inside a vLLM lane")


def test_vllm_033_lane():
    try:
        env = vllm_side.env()
    except vllm_side.SideEnvError as e:
        pytest.fail(str(e))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
           *[str(TESTS / t) for t in LANE]]
    p = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True,
                       timeout=1800)
    out = p.stdout + p.stderr
    summary = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    assert p.returncode == 0, f"vLLM {vllm_side.VERSION} lane failed:\n{out[-6000:]}"
    assert summary and "skipped" not in summary[-1] and "passed" in summary[-1], out[-3000:]
