"""The compressor's peak-RSS report (tools/rss.py): a benchmark that compresses many
artifacts in one process resets the peak before each, so a row's number is its own."""

import numpy as np
import pytest

from deltadq_vllm.tools.rss import peak_rss_bytes, reset_peak_rss

MB = 1 << 20


def test_reset_peak_rss_forgets_an_earlier_peak():
    if not reset_peak_rss():
        pytest.skip("the peak resident set cannot be reset here (not Linux)")
    size = 256 * MB + int(np.random.default_rng().integers(0, 32)) * MB
    block = np.ones(size // 8)          # touched: resident
    high = peak_rss_bytes()
    del block
    assert reset_peak_rss()
    after = peak_rss_bytes()
    assert high - after > size // 2, (high / MB, after / MB)
    block = np.ones(size // 8)          # a new peak is seen again after the reset
    assert peak_rss_bytes() - after > size // 2
    del block
