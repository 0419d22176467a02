"""The bit width of plain values is chosen among the widths that keep the delta (issue #13).

At extreme ratios a narrow width's range search clips its few levels toward zero: 1-bit
plain values of a heavy-tailed delta carry ~0.3 of its output at a lower held-out error
than 2-bit ones at the same bytes, and a model built from such matrices loses the task
(benchmarks/README.md "Bits against density"). The gain (measure.py) is the share of the
delta's output an approximation carries along it. Where no width beats storing nothing
(every plain error >= 1), widths below WIDTH_MIN_GAIN compete only where no width reaches
it; where one does, the error alone decides, as before. Fresh random layers and inputs,
both dropout methods.
"""

import pytest
import torch

from deltadq_vllm.format.layouts import decode
from deltadq_vllm.tools import method_base as MB
from deltadq_vllm.tools.methods import Calibration, MethodOptions, compress_dare, compress_deltadq

METHODS = {"deltadq": compress_deltadq, "dare": compress_dare}


@pytest.mark.parametrize("mode", ["inputs", "rows", "weights"])
def test_gain_is_the_share_of_the_delta_carried_along_it(mode):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, (1,))))
    out, inp = 24, 40
    delta = torch.randn(out, inp, generator=gen)
    calib = {"inputs": Calibration(x=torch.randn(64, inp, generator=gen)),
             "rows": Calibration(rows=torch.tensor([1, 5, 7, 20])),
             "weights": Calibration()}[mode]

    def proj(m):
        return {"inputs": lambda: calib.x @ m.T, "rows": lambda: m[calib.rows],
                "weights": lambda: m}[mode]()

    noise = torch.randn(out, inp, generator=gen)
    for approx in (delta, 0.4 * delta, torch.zeros_like(delta), 0.7 * delta + noise):
        err, gain = calib.error_and_gain(delta, delta - approx)
        a, p = proj(delta), proj(approx)
        assert gain == pytest.approx(float((a * p).sum() / a.square().sum()), rel=1e-4,
                                     abs=1e-5)
        assert err == pytest.approx(float((a - p).norm() / a.norm()), rel=1e-4, abs=1e-5)
    assert calib.error_and_gain(delta, 0.6 * delta)[1] == pytest.approx(0.4, abs=1e-5)


def _heavy_tailed_layer(seed):
    gen = torch.Generator().manual_seed(seed)
    out, inp = 256, 512
    x = torch.randn(1024, inp, generator=gen)
    delta = 0.01 * torch.randn(out, inp, generator=gen) ** 3
    return delta, Calibration.split(x)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_width_that_loses_the_delta_is_not_chosen(method):
    """1024x on a heavy-tailed delta, where the search by error alone (floor 0, or none as
    under --budget sensitivity) stores 1-bit plain values that carry less than
    WIDTH_MIN_GAIN of the delta: the rule stores another configuration (a wider width; for
    dare, possibly other scale blocks) that carries at least that, at a higher error (every
    width's is >= 1 here), with and without refinement."""
    fn = METHODS[method]
    opt = MethodOptions(quant_range="search", refine=False)
    for _ in range(8):   # a layer where the error picks a width that loses the delta
        seed = int(torch.randint(0, 1 << 30, (1,)))
        delta, calib = _heavy_tailed_layer(seed)
        budget = delta.numel() * 2 / 1024
        by_error = [fn("t", delta, calib, budget, MethodOptions(
            quant_range="search", refine=False, width_gain=floor), 5) for floor in (0.0, None)]
        assert by_error[0].enc.params == by_error[1].enc.params, seed
        err1, gain1 = calib.error_and_gain(delta, delta - decode(by_error[0].enc).float())
        if gain1 < MB.WIDTH_MIN_GAIN:
            break
    assert gain1 < MB.WIDTH_MIN_GAIN, (seed, gain1)       # the case the rule is for
    assert err1 >= 1, (seed, err1)

    chosen = fn("t", delta, calib, budget, opt, 5)
    err, gain = calib.error_and_gain(delta, delta - decode(chosen.enc).float())
    # another configuration: a wider width (for dare possibly other scale blocks)
    assert chosen.enc.params != by_error[0].enc.params, seed
    assert gain >= MB.WIDTH_MIN_GAIN and err > err1, (seed, err, gain, err1)
    # refinement (calibrated values, shrinkage) compares widths too: the same rule holds
    refined = fn("t", delta, calib, budget, MethodOptions(quant_range="search"), 5)
    assert refined.enc.params != by_error[0].enc.params, (seed, refined.values)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_where_a_width_beats_zero_the_error_alone_decides(method):
    """16x on a low-rank delta: the most accurate width beats storing nothing (error < 1).
    With a floor that it misses and another width reaches, the width stored is still the one
    with the lowest error (what the search chose before the rule)."""
    fn = METHODS[method]
    seed = int(torch.randint(0, 1 << 30, (1,)))
    gen = torch.Generator().manual_seed(seed)
    out, inp = 64, 128
    basis = torch.linalg.qr(torch.randn(inp, inp, generator=gen))[0]
    x = (torch.randn(768, inp, generator=gen) * torch.logspace(0, -1.5, inp)) @ basis.T
    delta = torch.randn(out, 8, generator=gen) @ torch.randn(8, inp, generator=gen) * 1e-3
    calib = Calibration.split(x)
    budget = out * inp * 2 / 16
    per_width = {}
    for b in MB.DEFAULT_BITS:
        try:
            c = fn("t", delta, calib, budget, MethodOptions(bits=b, quant_range="search",
                                                            refine=False), 5)
        except MB.UnfitError:
            continue
        per_width[b] = calib.error_and_gain(delta, delta - decode(c.enc).float())
    lowest = min(per_width, key=lambda b: per_width[b][0])
    assert per_width[lowest][0] < 1, (seed, per_width)
    # a floor between the lowest-error width's gain and a width that carries more
    richest = max(per_width, key=lambda b: per_width[b][1])
    assert per_width[richest][1] > per_width[lowest][1], (seed, per_width)
    floor = (per_width[richest][1] + per_width[lowest][1]) / 2
    opt = MethodOptions(quant_range="search", refine=False, width_gain=floor)
    assert fn("t", delta, calib, budget, opt, 5).enc.params["bits"] == lowest, (seed, per_width)
