"""Bit packing, regenerated positions, quantization and layouts: exact round trips."""

import math

import pytest
import torch

from deltadq_vllm.format.bitpack import pack_bits, unpack_bits
from deltadq_vllm.format.layouts import (decode, decode_bernoulli, encode_bernoulli,
                                         encode_hash_groupwise, encode_sparse_rows,
                                         hash_groupwise_columns, slice_hash_groupwise,
                                         sparse_rows_entries)
from deltadq_vllm.format.positions import (BernoulliMasks, bernoulli_mask, group_positions,
                                          kept_columns, kept_columns_by_group,
                                          kept_columns_of_rows, mix32, units)
from deltadq_vllm.format.quant import dequantize, quantize


def rng():
    # fresh inputs every run; the seed is printed on failure through the test id
    seed = torch.randint(0, 2**31 - 1, ()).item()
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 11])
def test_bitpack_roundtrip_and_offsets(bits):
    g = rng()
    rows, count = 5, int(torch.randint(1, 200, (), generator=g))
    codes = torch.randint(0, 1 << bits, (rows, count), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, math.ceil(count * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, count), codes)
    if bits <= 8:   # the compressor holds codes of up to 8 bits as uint8 (tools/refine.py)
        assert torch.equal(pack_bits(codes.to(torch.uint8), bits), packed)
    start = int(torch.randint(0, count, (), generator=g))
    n = count - start
    assert torch.equal(unpack_bits(packed, bits, n, start=start), codes[:, start:])


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bitpack_byte_aligned_path_matches_bit_planes(bits):
    """1/2/4/8-bit codes take a whole-codes-per-byte path: its bytes and codes are the
    bit-plane reference's (the format's definition), any row length and offset."""
    from deltadq_vllm.format.bitpack import _pack, _unpack
    g = rng()
    rows, count = 7, int(torch.randint(1, 300, (), generator=g))
    codes = torch.randint(0, 1 << bits, (rows, count), generator=g)
    packed = pack_bits(codes, bits)
    assert torch.equal(packed, _pack(codes, bits, aligned=False))
    start = int(torch.randint(0, count, (), generator=g))
    n = int(torch.randint(0, count - start + 1, (), generator=g))
    assert torch.equal(unpack_bits(packed, bits, n, start=start),
                       _unpack(packed, bits, n, start, aligned=False))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 11])
def test_flat_stream_packed_in_pieces_as_whole(bits, monkeypatch):
    """A one-row stream longer than FLAT_PIECE is packed piece by piece (byte-aligned
    pieces): the bytes of packing it whole, whatever its length."""
    from deltadq_vllm.format import bitpack
    g = rng()
    count = int(torch.randint(100, 400, (), generator=g))
    codes = torch.randint(0, 1 << bits, (1, count), generator=g)
    whole = bitpack._pack(codes, bits, aligned=True)
    monkeypatch.setattr(bitpack, "FLAT_PIECE", 24)
    assert torch.equal(pack_bits(codes, bits), whole)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, count), codes)


def test_bitpack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([[4]]), 2)


def test_mix32_matches_python_uint32():
    def ref(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        x ^= x >> 16
        return x

    xs = torch.randint(0, 2**32 - 1, (1000,), dtype=torch.int64, generator=rng())
    got = mix32(xs)
    assert [int(v) for v in got] == [ref(int(v)) for v in xs]


@pytest.mark.parametrize("g,k", [(1, 1), (8, 1), (12, 3), (64, 5), (9, 9), (96, 48)])
def test_exact_keep_count_per_group(g, k):
    seed = int(torch.randint(0, 2**31, (), generator=rng()))
    pos = group_positions(seed, 37, 11, g, k)
    assert pos.shape == (37, 11, k)
    assert int(pos.min()) >= 0 and int(pos.max()) < g
    # distinct inside every group: exactly k kept
    mask = torch.zeros(37, 11, g, dtype=torch.int64).scatter_add_(
        2, pos, torch.ones_like(pos))
    assert torch.equal(mask.sum(-1), torch.full((37, 11), k))
    assert int(mask.max()) == 1
    assert torch.equal(pos, group_positions(seed, 37, 11, g, k))  # reproducible


def test_positions_uniform_marginal():
    # every input kept with probability k/g: chi-square-like bound on counts
    g, k, rows, groups = 16, 2, 4000, 8
    pos = group_positions(1234, rows, groups, g, k)
    counts = torch.bincount(pos.flatten(), minlength=g).float()
    expected = rows * groups * k / g
    assert torch.all((counts - expected).abs() < 5 * math.sqrt(expected)), counts


def test_positions_of_arbitrary_rows_are_those_of_the_matrix():
    """kept_columns_of_rows (the scorer's sampled windows, the embedding's batch rows) gives
    each global row the positions it has in the whole matrix."""
    g = rng()
    rows, inp = 300, 96
    seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
    for gs, k in ((8, 3), (32, 1), (96, 50)):
        full = kept_columns(seed, rows, inp, gs, k)
        pick = torch.randperm(rows, generator=g)[:40]
        assert torch.equal(kept_columns_of_rows(seed, pick, inp, gs, k), full[pick])


def test_positions_of_a_smaller_keep_are_a_prefix_in_every_group():
    """The compressor hashes a group size once for all its candidates' keeps
    (deltadq_search._Positions): that needs keep k's positions to be the first k of any
    larger keep's, in every group, at any row offset."""
    g = rng()
    inp = 240
    seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
    rows = torch.randint(0, 100000, (37,), generator=g)
    for gs in (1, 2, 8, 48, 240):
        kmax = int(torch.randint(1, gs + 1, (), generator=g))
        big = kept_columns_by_group(seed, rows, inp, gs, kmax)
        for k in range(1, kmax + 1):
            assert torch.equal(big[:, :, :k].reshape(len(rows), -1),
                               kept_columns_of_rows(seed, rows, inp, gs, k))


def test_the_scorers_position_cache_returns_kept_columns():
    """deltadq_search._Positions: cached, sliced, evicted or bypassed, every call returns
    exactly kept_columns' positions of the rows asked for."""
    from deltadq_vllm.tools import deltadq_search as ds

    g = rng()
    out, inp = 64, 96
    seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
    keep_max = {8: 5, 12: 7, 96: 40}
    for cap in (ds.POSITION_CACHE_BYTES, 40_000, 1):   # roomy, evicting, bypassed
        old, ds.POSITION_CACHE_BYTES = ds.POSITION_CACHE_BYTES, cap
        try:
            pos = ds._Positions(seed, inp, keep_max, out)
            for _ in range(30):
                gs = [8, 12, 96][int(torch.randint(0, 3, (), generator=g))]
                # (up to 2 above keep_max: a keep no candidate announced re-hashes)
                k = int(torch.randint(1, min(gs, keep_max[gs] + 2) + 1, (), generator=g))
                r0 = int(torch.randint(0, 4, (), generator=g)) * 16
                got = pos.columns(gs, k, torch.arange(r0, r0 + 16), (r0, r0 + 16))
                assert torch.equal(got, kept_columns(seed, 16, inp, gs, k, row_offset=r0))
            assert pos.bytes == sum(t.numel() * t.element_size() for t in pos.cache.values())
            assert cap >= ds.POSITION_CACHE_BYTES or pos.bytes <= max(cap, 16 * 96 * 8)
        finally:
            ds.POSITION_CACHE_BYTES = old


def test_units_are_coprime():
    for g in (1, 2, 3, 12, 64, 576):
        assert all(math.gcd(u, g) == 1 for u in units(g)) or g <= 2


def test_positions_are_pinned_across_runs_and_platforms():
    """Kept positions are never stored, so the hash is part of the format: these values
    (computed once, on x86-64 Linux) must come out identical on every run, machine and
    release; a change here breaks every artifact ever written (bump FORMAT_VERSION)."""
    assert kept_columns(20261123, 3, 48, 16, 2).tolist() == [
        [7, 0, 31, 20, 32, 35], [11, 6, 29, 22, 42, 45], [1, 0, 30, 23, 33, 38]]
    assert kept_columns(7, 2, 40, 8, 1, row_offset=5).tolist() == [
        [7, 14, 21, 28, 36], [2, 8, 23, 30, 39]]


def test_positions_identical_for_tensor_parallel_slices():
    seed, out, inp, g, k = 99, 24, 96, 16, 3
    full = kept_columns(seed, out, inp, g, k)
    part = kept_columns(seed, 8, 48, g, k, row_offset=8, group_offset=3,
                        n_groups_total=inp // g)
    assert torch.equal(part + 48, full[8:16, 3 * k: 6 * k])


def test_bernoulli_mask_rate():
    m = bernoulli_mask(7, 200, 300, 0.1)
    assert abs(m.float().mean().item() - 0.1) < 0.01


@pytest.mark.parametrize("chunk", [1 << 20, 500, 1])
def test_bernoulli_masks_hashed_once_are_bernoulli_mask(chunk, monkeypatch):
    """The compressor's candidates share one hash of the matrix (int32, offset by 2**31,
    hashed a few rows at a time): their masks are bernoulli_mask's bit for bit, at the
    extremes of the probability too."""
    import deltadq_vllm.format.positions as P

    monkeypatch.setattr(P, "HASH_CHUNK", chunk)
    seed, out, inp = int(torch.randint(0, 2**32, ()).item()), 97, 131
    masks = BernoulliMasks(seed, out, inp)
    probs = [1.0, 0.0, 1e-12, 1 - 1e-12, 0.5, *torch.rand(6).tolist()]
    whole = P.bernoulli_hash(seed, out, inp)   # (the hash of every element at once)
    part = P.bernoulli_hash(seed, 40, 50, row_offset=7, n_cols_total=inp, col_offset=60)
    for p in probs:
        t = P.bernoulli_threshold(p)
        assert torch.equal(bernoulli_mask(seed, out, inp, p), whole < t), p
        assert torch.equal(masks.mask(p), whole < t), p
        assert torch.equal(bernoulli_mask(seed, 40, 50, p, row_offset=7, n_cols_total=inp,
                                          col_offset=60), part < t), p
    assert masks.mask(1.0).all() and not masks.mask(0.0).any()


@pytest.mark.parametrize("chunk", [10**6, 100, 53, 1])
def test_kept_rows_and_bernoulli_decode_equal_the_indexing_they_replace(chunk, monkeypatch):
    """kept_rows is mask.nonzero()[:, 0] (its row counts taken a few rows at a time where
    HASH_CHUNK is small); decode_bernoulli's masked_scatter puts each value where
    dense[mask] = vals does (fresh random masks, empty rows and all-kept rows too)."""
    from deltadq_vllm.format import positions
    from deltadq_vllm.format.positions import kept_rows

    monkeypatch.setattr(positions, "HASH_CHUNK", chunk)

    g = rng()
    out, inp = 37, 53
    p = float(torch.rand((), generator=g)) * 0.9 + 0.05
    mask = torch.rand(out, inp, generator=g) < p
    mask[3] = False
    mask[5] = True
    assert torch.equal(kept_rows(mask), mask.nonzero()[:, 0])
    assert kept_rows(torch.zeros(4, 6, dtype=torch.bool)).numel() == 0
    seed = int(torch.randint(0, 2**31, (), generator=g))
    m = bernoulli_mask(seed, out, inp, p)
    n = int(m.sum())
    step = (torch.rand(out // 4 + 1, generator=g) + 0.1).to(torch.bfloat16)
    minv = torch.randn(out // 4 + 1, generator=g).to(torch.bfloat16)
    codes = torch.randint(0, 8, (n,), generator=g)
    enc = encode_bernoulli((out, inp), codes, step, minv, keep_prob=p, bits=3, seed=seed,
                           rows_per_scale=4)
    rows = m.nonzero()[:, 0]
    want = torch.zeros(out, inp)
    want[m] = minv.float()[rows // 4] + step.float()[rows // 4] * codes.float()
    assert torch.equal(decode(enc), want)
    assert torch.equal(decode_bernoulli(enc, m), want)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("bits,rps", [(1, 1), (2, 1), (4, 3), (8, 1), (3, 1000)])
def test_quantize_codes_roundtrip(bits, rps, clip):
    vals = torch.randn(20, 33, generator=rng()) * 1e-3
    codes, step, minv = quantize(vals, bits, rps, clip)
    assert int(codes.min()) >= 0 and int(codes.max()) < (1 << bits)
    deq = dequantize(codes, step, minv, rps)
    blk = torch.arange(20) // rps
    s, m = step.float()[blk].unsqueeze(1), minv.float()[blk].unsqueeze(1)
    # the grid the reader sees gives back exactly the stored codes
    codes2 = torch.round((deq - m) / s)
    assert torch.equal(codes, codes2.long())
    # inside the block's range: error at most half a step (plus bf16 rounding of the scale);
    # min-max ranges hold every value
    tol = 0.5 * s  # a value within half a step past the range still rounds to its end
    inside = (vals >= m - tol) & (vals <= m + s * ((1 << bits) - 1) + tol)
    assert clip or inside.all()
    assert torch.all((deq - vals).abs()[inside] <= (s * 0.51 + 1e-9).expand_as(vals)[inside])
    # the range search never does worse than min-max, block by block
    ref = dequantize(*quantize(vals, bits, rps, False), rps)
    sse = lambda d: ((d - vals) ** 2).sum(1).view(-1).split(  # noqa: E731
        [min(rps, 20 - i) for i in range(0, 20, rps)])
    for a, b in zip(sse(deq), sse(ref)):
        assert float(a.sum()) <= float(b.sum()) * (1 + 1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_range_search_cuts_error_of_heavy_tailed_values(bits):
    """What the search is for: few levels and outliers (rescaled sparse deltas)."""
    g = rng()
    vals = torch.distributions.Laplace(0.0, 1e-3).sample((64, 96))
    err = {}
    for clip in (False, True):
        c, st, mn = quantize(vals, bits, 8, clip)
        err[clip] = float(((dequantize(c, st, mn, 8) - vals) ** 2).sum())
    assert err[True] < 0.8 * err[False], err
    del g


def _random_hash_groupwise(out, inp, g, k, bits, rps, gen):
    codes = torch.randint(0, 1 << bits, (out, inp // g * k), generator=gen)
    nb = (out + rps - 1) // rps
    step = (torch.rand(nb, generator=gen) * 1e-3 + 1e-5).to(torch.bfloat16)
    minv = (torch.randn(nb, generator=gen) * 1e-3).to(torch.bfloat16)
    enc = encode_hash_groupwise((out, inp), codes, step, minv, group_size=g, keep=k, bits=bits,
                                seed=int(torch.randint(0, 2**31, (), generator=gen)),
                                rows_per_scale=rps)
    return enc, codes


def test_hash_groupwise_decode_places_codes():
    gen = rng()
    enc, codes = _random_hash_groupwise(10, 48, 12, 2, 3, 4, gen)
    dense = decode(enc)
    cols = hash_groupwise_columns(enc)
    vals = dequantize(codes, enc.tensors["step"], enc.tensors["minv"], 4)
    assert torch.equal(torch.gather(dense, 1, cols), vals)
    nonkept = dense.clone()
    nonkept.scatter_(1, cols, 0.0)
    assert torch.count_nonzero(nonkept) == 0


@pytest.mark.parametrize("rows,cols", [((0, 10), None), ((3, 9), (12, 36)), (None, (24, 48)),
                                       ((5, 6), (0, 12))])
def test_hash_groupwise_slices_decode_to_dense_slices(rows, cols):
    enc, _ = _random_hash_groupwise(10, 48, 12, 2, 3, 4, rng())
    dense = decode(enc)
    part = slice_hash_groupwise(enc, rows, cols)
    r0, r1 = rows or (0, 10)
    c0, c1 = cols or (0, 48)
    assert torch.equal(decode(part), dense[r0:r1, c0:c1])
    # slicing a slice again still agrees
    if r1 - r0 > 1:
        again = slice_hash_groupwise(part, (1, r1 - r0))
        assert torch.equal(decode(again), dense[r0 + 1:r1, c0:c1])


def test_slice_rejects_unaligned_columns():
    enc, _ = _random_hash_groupwise(4, 48, 12, 2, 3, 1, rng())
    with pytest.raises(ValueError, match="aligned"):
        slice_hash_groupwise(enc, None, (5, 24))


@pytest.mark.parametrize("bits,m", [(4, 0), (4, 2), (3, 3), (2, 1), (8, 3)])
def test_separate_quantization_decompose_roundtrip(bits, m):
    gen = rng()
    out, inp, k = 9, 70, 11
    cols = torch.stack([torch.randperm(inp, generator=gen)[:k] for _ in range(out)])
    codes = torch.randint(0, 1 << bits, (out, k), generator=gen)
    step = torch.full((out,), 0.5).to(torch.bfloat16)
    minv = torch.zeros(out).to(torch.bfloat16)
    enc = encode_sparse_rows((out, inp), cols, codes, step, minv, bits=bits, decompose_bits=m,
                             rows_per_scale=1)
    if m:
        assert enc.tensors["part_counts"].shape == (out, 1 << m)
        assert (bits - m == 0) == ("codes" not in enc.tensors)
    got_cols, got_codes = sparse_rows_entries(enc)
    # same (column, code) pairs per row; order is part-major when decomposed
    for r in range(out):
        want = sorted(zip(cols[r].tolist(), codes[r].tolist()))
        assert sorted(zip(got_cols[r].tolist(), got_codes[r].tolist())) == want
        if m:
            parts = (got_codes[r] >> (bits - m)).tolist()
            assert parts == sorted(parts)
    dense = decode(enc)
    assert torch.equal(torch.gather(dense, 1, cols), codes.float() * 0.5)


@pytest.mark.parametrize("out,inp,g,k,bits", [(10, 48, 48, 1, 2), (7, 60, 20, 1, 3),
                                              (5, 48, 12, 1, 1)])
def test_flat_packing_decodes_slices_and_repacks_like_rows(out, inp, g, k, bits):
    """Flat codes (one bit stream, for rows holding a few bits) decode, slice and repack
    exactly like byte-aligned rows, in fewer bytes."""
    from deltadq_vllm.format.layouts import encode_hash_groupwise, to_row_packed, wants_flat

    gen = rng()
    n_kept = inp // g * k
    codes = torch.randint(0, 1 << bits, (out, n_kept), generator=gen)
    step = (torch.rand(out, generator=gen) + 0.1).to(torch.bfloat16)
    minv = (-torch.rand(out, generator=gen)).to(torch.bfloat16)
    kw = dict(group_size=g, keep=k, bits=bits, seed=int(torch.randint(0, 2**31, ())),
              rows_per_scale=1)
    flat = encode_hash_groupwise((out, inp), codes, step, minv, flat=True, **kw)
    rows = encode_hash_groupwise((out, inp), codes, step, minv, **kw)
    assert wants_flat(n_kept, bits)
    assert flat.tensors["codes"].numel() < rows.tensors["codes"].numel()
    assert torch.equal(decode(flat), decode(rows))
    assert torch.equal(to_row_packed(flat).tensors["codes"], rows.tensors["codes"])
    part = slice_hash_groupwise(flat, (1, out), None)
    assert torch.equal(decode(part), decode(rows)[1:])


@pytest.mark.parametrize("flat", [False, True])
def test_hash_groupwise_decodes_the_same_in_row_blocks(flat):
    """decode() works through the rows in blocks (a 7B LM head's kept columns, codes and
    values at once were ~1.5 GB): any block size, flat or byte-aligned codes, and a row
    slice (row and scale offsets) give the one-shot reconstruction, bit for bit."""
    from deltadq_vllm.format.layouts import (_decode_hash_groupwise, encode_hash_groupwise,
                                             hash_groupwise_values)

    gen = rng()
    out, inp, g, k, bits, rps = 23, 48, 12, 2, 3, 4
    codes = torch.randint(0, 1 << bits, (out, inp // g * k), generator=gen)
    step = (torch.rand(-(-out // rps), generator=gen) + 0.1).to(torch.bfloat16)
    minv = (-torch.rand(-(-out // rps), generator=gen)).to(torch.bfloat16)
    enc = encode_hash_groupwise((out, inp), codes, step, minv, group_size=g, keep=k,
                                bits=bits, seed=int(torch.randint(0, 2**31, (), generator=gen)),
                                rows_per_scale=rps, flat=flat)
    for e in (enc, slice_hash_groupwise(enc, (5, 21), (12, 36))):
        want = torch.zeros(e.shape)
        want.scatter_(1, hash_groupwise_columns(e), hash_groupwise_values(e))
        for block_kept in (1, 7, 8, 50, 10**6):
            assert torch.equal(_decode_hash_groupwise(e, block_kept), want), block_kept
