"""DARE's candidates encoded a chunk of whole scale blocks at a time (tools/methods.py,
_dare_encode): the encoding and the residual are those of the whole matrix at once, as
the compressor made them before (the reference below is that code)."""

from __future__ import annotations

import pytest
import torch

from deltadq_vllm.format.layouts import decode_bernoulli, encode_bernoulli
from deltadq_vllm.format.positions import bernoulli_mask, kept_rows
from deltadq_vllm.tools import methods as M


def _whole(delta, mask, p, bits, rps, clip, seed):
    """The whole-matrix encoding: every kept value, its row and code at once."""
    vals = delta.masked_select(mask).div_(p)
    codes, step, minv = M._quantize_ragged(vals, kept_rows(mask), delta.shape[0], bits, rps,
                                           clip)
    enc = encode_bernoulli(delta.shape, codes, step, minv, keep_prob=p, bits=bits, seed=seed,
                           rows_per_scale=rps)
    return enc, delta - decode_bernoulli(enc, mask)


@pytest.mark.parametrize("rps", [1, 3, 16, 90])
@pytest.mark.parametrize("bits,clip", [(1, True), (2, False), (3, True), (4, True)])
def test_dare_encoded_in_chunks_as_whole(rps, bits, clip, monkeypatch):
    seed = int(torch.randint(0, 2**31 - 1, ()))   # fresh inputs; the seed in the message
    g = torch.Generator().manual_seed(seed)
    out, inp = 90, 48
    delta = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)
    p = float(torch.empty(()).uniform_(0.05, 0.6, generator=g))
    mask = bernoulli_mask(seed % 1000, out, inp, p)
    ref_enc, ref_diff = _whole(delta, mask, p, bits, rps, clip, 7)
    # chunks of about 5 rows' elements (whole scale blocks each: one per block above 5)
    monkeypatch.setattr(M, "CHUNK_ELEMENTS", 5 * inp)
    assert len(M._dare_chunks(out, inp, rps)) > 1 or rps == out
    enc, diff = M._dare_encode(delta, mask, p, bits, rps, clip, 7)
    assert enc.params == ref_enc.params, seed
    for k, t in ref_enc.tensors.items():
        assert torch.equal(enc.tensors[k], t), (k, seed)
    assert torch.equal(diff, ref_diff), seed
