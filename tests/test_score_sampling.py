"""Issue #13 (7B compress time): configurations of very large matrices are scored on a
sample of row windows (tools/deltadq_search.score_windows); the stored choice is still measured
on every row. Fresh random layers and inputs each run (seed printed)."""

from __future__ import annotations

import pytest
import torch

import deltadq_vllm.tools.deltadq_search as M
from deltadq_vllm.tools.methods import Calibration, MethodOptions, compress_deltadq


@pytest.fixture
def small_windows(monkeypatch):
    # the sampling rule at a testable size: above 2^16 elements, 12 windows of 16 rows
    monkeypatch.setattr(M, "SCORE_SAMPLE_ABOVE", 1 << 16)
    monkeypatch.setattr(M, "SCORE_WINDOW", 16)
    monkeypatch.setattr(M, "SCORE_WINDOWS", 12)


def _layer(seed):
    g = torch.Generator().manual_seed(seed)
    out, inp = 1024, 256
    delta = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)
    x = torch.randn(512, inp, generator=g) * (1 + 3 * torch.rand(inp, generator=g))
    return delta, Calibration.split(x)


def test_windows_cover_the_matrix_evenly(small_windows):
    assert M.score_windows(100, 100) is None            # small: every row
    w = M.score_windows(1024, 256)
    assert len(w) == 12 and w[0][0] == 0 and w[-1][1] == 1024
    assert all(r1 - r0 == 16 and r0 % 16 == 0 for r0, r1 in w)


def test_sampled_scores_estimate_the_full_ones_and_the_choice_is_measured_on_all_rows(
        small_windows):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    print("seed", seed)
    delta, calib = _layer(seed)
    opt = MethodOptions(calibrated=False, refine=False, bits=2)
    budget = 2 * delta.numel() / 16
    sampled = compress_deltadq("m", delta, calib, budget, opt, 7)
    # the error reported for the stored encoding is over every row
    from deltadq_vllm.format.layouts import decode
    full = calib.relative_error_of_difference(delta, delta - decode(sampled.enc))
    assert sampled.error == pytest.approx(full, rel=1e-5)
    # and the sampled estimate of a configuration is close to its full score
    windows = M.score_windows(*delta.shape)
    rows = torch.cat([torch.arange(r0, r1) for r0, r1 in windows])
    est = calib.relative_error_of_difference(delta[rows], (delta - decode(sampled.enc))[rows])
    assert est == pytest.approx(full, rel=0.15)
