"""Refinement of a large chunk a slice of rows at a time (tools/refine_chunk.py): a scale
block of all the rows of a 7B embedding or LM head (extreme ratios) is measured in row
slices, and must store what measuring it whole stores. Small random layers with
SLICE_ABOVE lowered so that they are sliced; no model, no engine."""

from __future__ import annotations

import math

import pytest
import torch

from deltadq_vllm.format.layouts import decode
from deltadq_vllm.tools import refine as REF
from deltadq_vllm.tools import refine_chunk as RC
from deltadq_vllm.tools.deltadq_search import deltadq_encode
from deltadq_vllm.tools.method_base import Choice
from deltadq_vllm.tools.methods import Calibration, MethodOptions, compress_dare

OUT, INP = 200, 96


def _fresh() -> tuple[int, torch.Generator]:
    """A fresh seed each run (named in the failure message) and its generator."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    return seed, torch.Generator().manual_seed(seed)

KINDS = ["split", "inputs", "tied", "rows", "weights"]


def _calibration(kind: str, gen: torch.Generator) -> Calibration:
    basis = torch.linalg.qr(torch.randn(INP, INP, generator=gen))[0]
    x = (torch.randn(768, INP, generator=gen) * torch.logspace(0, -1.5, INP)) @ basis.T
    if kind == "split":          # a linear layer: held-out rows and fit rows
        return Calibration.split(x)
    if kind == "inputs":         # no fit rows: the scale fits use the held-out rows
        return Calibration(x=x)
    if kind == "tied":           # a tied embedding: the LM head's inputs and its rows
        return Calibration.split(x, input_rows=True)
    if kind == "rows":           # an embedding: the rows of the tokens seen
        return Calibration(rows=torch.unique(torch.randint(0, OUT, (120,), generator=gen)))
    return Calibration()         # weight space


def _delta(gen: torch.Generator, large: bool) -> torch.Tensor:
    d = torch.randn(OUT, 6, generator=gen) @ torch.randn(6, INP, generator=gen)
    d = d / d.norm() + 0.4 * torch.randn(OUT, INP, generator=gen) / (OUT * INP) ** 0.5
    return (0.3 if large else 0.01) * d


def _record(monkeypatch, calls: list):
    real = RC.set_variants

    def recording(subs, *args):
        got = real(subs, *args)
        calls.append((len(subs), got))
        return got
    monkeypatch.setattr(REF, "set_variants", recording)


def _equal_calls(sliced, whole, seed):
    assert len(sliced) == len(whole), seed
    for (n_s, a), (n_w, b) in zip(sliced, whole):
        assert n_w == 1 and n_s > 1, (n_s, n_w)      # the sliced run was sliced
        assert [v[0] for v in a] == [v[0] for v in b], seed
        for va, vb in zip(a, b):
            assert torch.equal(va[1], vb[1]) and torch.equal(va[2], vb[2]), (va[0], seed)
            for x, y in zip(va[3:], vb[3:]):
                assert (x is None) == (y is None)
                if x is not None:
                    assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-12), (va[0], x, y, seed)


def _both(monkeypatch, run):
    """(result, set_variants calls) of run() measured whole, then in slices of 7 rows (not
    a divisor of the chunk: the last slice is short)."""
    whole, sliced = [], []
    _record(monkeypatch, whole)
    a = run()
    monkeypatch.setattr(RC, "SLICE_ABOVE", 0)
    monkeypatch.setattr(RC, "SLICE_ELEMENTS", 7 * INP)
    _record(monkeypatch, sliced)
    b = run()
    return a, b, whole, sliced


def _same_choice(a, b, seed):
    """The same stored encoding, or (the sums over slices round differently) another
    candidate whose error ties the whole run's choice: shrunk and refit grids often differ
    by < 1e-7 (every variant's grid and error are compared by _equal_calls)."""
    assert math.isclose(a.error, b.error, rel_tol=1e-5), (a.error, b.error, seed)
    if a.values == b.values:
        for k, t in a.enc.tensors.items():
            assert torch.equal(b.enc.tensors[k], t), (k, seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("large", [False, True])
def test_deltadq_block_refined_in_slices_as_whole(kind, large, monkeypatch):
    """One scale block for all rows (rows_per_scale = out, as extreme ratios choose):
    every grid variant (as encoded, shrunk, refit) of every set (plain, calibrated) gets the
    same grid and the same errors sliced as whole, and the same encoding is stored."""
    seed, gen = _fresh()
    calib, delta = _calibration(kind, gen), _delta(gen, large)
    plain_enc = deltadq_encode(delta, 8, 2, 2, seed % 1000, OUT)
    err = calib.relative_error(delta, decode(plain_enc).float())
    plain = Choice(plain_enc, err, 2, OUT * INP // 4, plain_error=err)
    opt = MethodOptions(min_gain=0.0)   # (refined variants eligible: their grids count)
    a, b, whole, sliced = _both(
        monkeypatch, lambda: REF.refine_hash_groupwise(delta, calib, plain, opt))
    _equal_calls(sliced, whole, seed)
    _same_choice(a, b, seed)
    labels = [v[0] for _, got in whole for v in got]
    assert {"", "shrunk", "refit"} <= set(labels)


@pytest.mark.parametrize("kind", ["split", "rows", "weights"])
def test_dare_block_refined_in_slices_as_whole(kind, monkeypatch):
    """DARE at an extreme ratio (scale blocks of 16 rows or one for all rows, either cut by
    the slices of 7 rows): the same through the whole compressor, its refinement sliced or
    not."""
    seed, gen = _fresh()
    calib, delta = _calibration(kind, gen), _delta(gen, True)
    budget = OUT * INP * 2 / 512
    opt = MethodOptions(min_gain=0.0)
    a, b, whole, sliced = _both(
        monkeypatch, lambda: compress_dare("t", delta, calib, budget, opt, seed % 1000))
    assert a.enc.params["rows_per_scale"] > 7, seed
    _equal_calls(sliced, whole, seed)
    _same_choice(a, b, seed)


def test_small_chunks_are_one_slice():
    """A chunk up to SLICE_ABOVE elements is itself (every SmolLM2-135M matrix: its
    refinement computed as before slicing existed); a larger one is cut into slices of
    whole rows that cover it once, in order."""
    _, gen = _fresh()
    calib = _calibration("split", gen)
    d = torch.randn(OUT, INP, generator=gen)
    ch = RC._Chunk(calib, d, 0)
    assert RC.sub_chunks(ch, d) == [(slice(0, OUT), ch)]
    old = RC.SLICE_ABOVE, RC.SLICE_ELEMENTS
    try:
        RC.SLICE_ABOVE, RC.SLICE_ELEMENTS = OUT * INP - 1, 64 * INP
        subs = RC.sub_chunks(ch, d)
    finally:
        RC.SLICE_ABOVE, RC.SLICE_ELEMENTS = old
    assert [(s.start, s.stop) for s, _ in subs] == [(0, 64), (64, 128), (128, 192), (192, 200)]
    for s, sub in subs:
        assert sub.r0 == s.start and torch.allclose(sub.a_held, ch.a_held[:, s])
