"""Budget by sensitivity (issue #13, item 3): the probe's allocation against element share.
Fresh random layers and inputs; no model, no engine."""

from __future__ import annotations

import pytest
import torch

from deltadq_vllm.tools.budget import (PROBE_MULTIPLIERS, Curve, allocate, objective,
                                       probe_matrix)
from deltadq_vllm.tools.methods import Calibration, MethodOptions, compress_dare, compress_deltadq


def _inputs(n: int, inp: int, gen: torch.Generator) -> torch.Tensor:
    basis = torch.linalg.qr(torch.randn(inp, inp, generator=gen))[0]
    return (torch.randn(n, inp, generator=gen) * torch.logspace(0, -1.5, inp)) @ basis.T


def _layers(seed: int):
    """Layers of very different sensitivity: deltas of rank 2 (a few coherent directions:
    error falls fast with bytes), pure noise (dropout's worst case) and mixtures, of
    different sizes and norms."""
    gen = torch.Generator().manual_seed(seed)
    kinds = [(64, 128, "lowrank"), (128, 128, "noise"), (96, 128, "mixed"),
             (64, 256, "lowrank"), (128, 256, "noise"), (32, 128, "mixed")]
    out = []
    for i, (o, n, kind) in enumerate(kinds):
        x = _inputs(768, n, gen)
        if kind == "lowrank":
            d = torch.randn(o, 2, generator=gen) @ torch.randn(2, n, generator=gen)
        elif kind == "noise":
            d = torch.randn(o, n, generator=gen)
        else:
            d = (torch.randn(o, 4, generator=gen) @ torch.randn(4, n, generator=gen)
                 + 0.5 * torch.randn(o, n, generator=gen))
        out.append((f"m{i}", d * (0.01 * (1 + i) / d.norm()), x))
    return out


@pytest.mark.parametrize("method,ratio,seed,min_gain", [
    ("deltadq", 16, 1, 0.5), ("deltadq", 128, 2, 0.5), ("dare", 32, 3, 0.5),
    ("dare", 512, 4, 0.5), ("deltadq", 128, 5, 0.0), ("dare", 512, 6, 0.0)])
def test_sensitivity_never_worse_than_element_share(method, ratio, seed, min_gain):
    """At equal total bytes, the probe's allocation gives a calibrated objective (sum over
    matrices of the squared relative held-out output error of what the real method stores)
    no worse than element-share allocation, and spends no more bytes; under the default
    value rule (min gain 0.5: refined values only where they keep the delta) and the
    error-only one (0)."""
    layers = _layers(seed)
    fn = compress_deltadq if method == "deltadq" else compress_dare
    # (widths by the error alone, as compress_pass sets for --budget sensitivity)
    opt = MethodOptions(quant_range="search" if ratio >= 512 else "minmax", min_gain=min_gain,
                        width_gain=None)
    total = sum(d.numel() * 2 / ratio for _, d, _ in layers)
    numel = sum(d.numel() for _, d, _ in layers)
    shares = {n: total * d.numel() / numel for n, d, _ in layers}
    # the probe sees 256 calibration rows of each layer, as compress's probe pass does
    curves = {n: probe_matrix(method, d, x[:256], d.shape[0], shares[n], opt, 9)
              for n, d, x in layers}
    plan = allocate(curves, total)
    assert sum(plan.values()) == pytest.approx(total)
    assert objective(curves, plan) <= objective(curves, shares) + 1e-9

    def stored(alloc):
        e2, used = 0.0, 0
        for n, d, x in layers:
            c = fn(n, d, Calibration.split(x, factors_cache={}), alloc[n], opt, 9)
            assert c.enc.nbytes() <= alloc[n]
            e2 += c.error ** 2
            used += c.enc.nbytes()
        return e2, used

    share_e2, _ = stored(shares)
    sens_e2, used = stored(plan)
    assert used <= total
    assert sens_e2 <= share_e2, (sens_e2, share_e2)


@pytest.mark.parametrize("method", ["deltadq", "dare"])
def test_probe_scores_what_the_value_rule_stores(method):
    """A pure-noise delta at 512x: plain dropout values are far worse than nothing. The
    error-only rule (min gain 0) shrinks them below 1 and the probe caps its curve at 1
    (what stays above is dropped); the default rule stores the plain values, so the probe
    must see their real error (> 1, falling with bytes) or it would starve such matrices
    of bytes. Fresh random layer and inputs."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(128, 256, generator=gen) * 0.01
    x = _inputs(256, 256, gen)
    share = d.numel() * 2 / 512
    old = probe_matrix(method, d, x, 128, share, MethodOptions(quant_range="search",
                                                                min_gain=0.0), 9)
    new = probe_matrix(method, d, x, 128, share, MethodOptions(quant_range="search"), 9)
    assert old.points and all(e <= 1.0 for _, e in old.points), seed
    assert new.points and new.points[0][1] > 1.0, (seed, new.points)
    assert new.points[-1][1] < new.points[0][1], (seed, new.points)  # bytes still help


def test_allocate_is_optimal_on_convex_curves():
    """On convex curves the greedy allocation matches a brute-force search over the probed
    points, keeps every matrix inside its probed range and spends the total exactly."""
    import itertools

    gen = torch.Generator().manual_seed(0)
    curves = {}
    for i in range(4):
        share = float(100 * (i + 1))
        rate = float(torch.rand(1, generator=gen)) * 3 + 0.2
        pts = [(share * m, float(torch.exp(torch.tensor(-rate * m)))) for m in PROBE_MULTIPLIERS]
        curves[f"m{i}"] = Curve(numel=int(share) * 8, share=share, points=pts)
    total = sum(c.share for c in curves.values())
    plan = allocate(curves, total)
    assert sum(plan.values()) == pytest.approx(total)
    for n, c in curves.items():
        assert c.points[0][0] - 1e-6 <= plan[n] <= c.points[-1][0] + 1e-6
    best = min(sum(c.points[j][1] for c, j in zip(curves.values(), combo))
               for combo in itertools.product(range(len(PROBE_MULTIPLIERS)), repeat=4)
               if sum(c.points[j][0] for c, j in zip(curves.values(), combo)) <= total + 1e-9)
    assert objective(curves, plan) <= best + 1e-9


def test_allocate_without_probe_points_keeps_the_share():
    """A matrix the probe could not fit at any multiplier keeps its element share; the rest
    share what is left."""
    curves = {"a": Curve(numel=100, share=50.0, points=[]),
              "b": Curve(numel=100, share=50.0, points=[(12.5, 0.9), (25, 0.5), (50, 0.2),
                                                          (100, 0.1), (200, 0.05)])}
    plan = allocate(curves, 100.0)
    assert plan["a"] == 50.0 and plan["b"] == pytest.approx(50.0)


def test_rewrites_reuse_results_and_write_the_same_artifact(tmp_path, monkeypatch):
    """The ratio rewrites reuse the per-matrix results of earlier passes (ResultMemo): the
    artifact is byte-identical to one written with nothing reused, and results were reused
    (the large-delta fixture at 128x needs rewrites: unsafe drops in the first pass)."""
    import hashlib

    from deltadq_vllm.testing.fixtures import build_fixture
    from deltadq_vllm.tools import methods as M
    from deltadq_vllm.tools.compress import CompressOptions, compress

    base, ft = build_fixture("llama-gqa"), build_fixture("llama-gqa--math")

    def digest(d):
        h = hashlib.sha256()
        for p in sorted(d.rglob("*")):
            if p.is_file():
                h.update(p.name.encode() + p.read_bytes())
        return h.hexdigest()

    s = compress(base, ft, tmp_path / "a", CompressOptions(ratio=128, progress=False))
    assert s["budget_retry"]["reused_results"] > 0
    monkeypatch.setattr(M.ResultMemo, "put", lambda self, *a, **k: None)
    s2 = compress(base, ft, tmp_path / "b", CompressOptions(ratio=128, progress=False))
    assert s2["budget_retry"]["reused_results"] == 0
    assert s["true_ratio"] == s2["true_ratio"]
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
