"""Slot and host-cache LRU of the worker-side delta manager (no engine needed)."""

import pytest
import torch

pytest.importorskip("vllm")

from deltadq_vllm.serving.loaded import empty_delta  # noqa: E402
from deltadq_vllm.serving.model_manager import DeltaModelManager  # noqa: E402


class Mapping:
    def __init__(self, tokens, samples):
        self.index_mapping, self.prompt_mapping = tuple(tokens), tuple(samples)


def manager(slots=2, capacity=3):
    return DeltaModelManager(torch.nn.Linear(2, 2), n_slots=slots, capacity=capacity,
                             device=torch.device("cpu"), settings={})


def test_slots_are_reused_least_recently_used_first():
    m = manager()
    for i in (1, 2, 3):
        assert m.add_adapter(i, empty_delta(str(i)))
    m.activate_adapter(1)
    m.activate_adapter(2)
    assert m.active == {1: 0, 2: 1}
    m.activate_adapter(1)          # touch 1: 2 becomes the LRU slot
    m.activate_adapter(3)
    assert m.active == {1: 0, 3: 1} and m.slot_ids == [1, 3]
    m.pin_adapter(1)
    m.activate_adapter(2)          # 1 is pinned, so 3 goes
    assert set(m.active) == {1, 2}


def test_mapping_turns_adapter_ids_into_slots():
    m = manager()
    m.add_adapter(7, empty_delta("a"))
    m.add_adapter(9, empty_delta("b"))
    m.activate_adapter(9)
    m.activate_adapter(7)
    m.set_adapter_mapping(Mapping([0, 9, 9, 7, 0], [9, 7, 0]))
    assert m.ctx.token_slots.tolist() == [-1, 0, 0, 1, -1]
    assert m.ctx.sample_slots.tolist() == [0, 1, -1]
    assert m.ctx.step_slots == {0, 1}
    m.set_adapter_mapping(Mapping([0, 0], [0]))
    assert m.ctx.token_meta is None and not m.ctx.active


def test_host_cache_evicts_inactive_first_and_remove_frees_slot():
    m = manager(slots=1, capacity=2)
    m.add_adapter(1, empty_delta("a"))
    m.add_adapter(2, empty_delta("b"))
    m.activate_adapter(1)
    assert m.remove_oldest_adapter() and set(m.registered) == {1}  # 2 was inactive
    assert m.remove_adapter(1) and m.slot_ids == [None] and not m.active


# ---------------------------------------------------------------- GPU arena (kernel layout)

def _arena_manager(slots, arena_kb, inp=64, out=32):
    """A manager with one linear layer whose deltas live in a small shared arena (the GPU
    layout, here on the CPU: cpu_strategy None)."""
    from deltadq_vllm.kernels import DeltaSlots

    m = DeltaModelManager(torch.nn.Linear(2, 2), n_slots=slots, capacity=8,
                          device=torch.device("cpu"),
                          settings={"cpu_strategy": None, "arena_mb": arena_kb / 1024})
    m.linear_slots = {"layer": DeltaSlots(slots, inp, [out], cpu_strategy=None, arena=m.arena)}
    return m


def _delta(name, seed, ratio, inp=64, out=32):
    """A random hash_groupwise delta of about `ratio` x vs bf16 (4-bit codes)."""
    from deltadq_vllm.layouts import encode_hash_groupwise
    from deltadq_vllm.serving.loaded import LoadedDelta

    g = 16
    k = min(g, max(1, round(4 * g / ratio)))  # 16 bf16 bits per weight vs 4-bit codes
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp // g * k), generator=gen)
    enc = encode_hash_groupwise((out, inp), codes, torch.full((out,), 1e-3).bfloat16(),
                                torch.full((out,), -4e-3).bfloat16(), group_size=g, keep=k,
                                bits=4, seed=seed, rows_per_scale=1, flat=True)
    return LoadedDelta(name, f"/deltas/{name}", linears={"layer": [enc]})


def test_arena_evicts_lru_for_room_and_never_a_delta_the_step_needs():
    m = _arena_manager(slots=4, arena_kb=3)          # room for ~2 of these deltas
    for i in (1, 2, 3):
        m.add_adapter(i, _delta(str(i), i, ratio=4))
    m.activate_adapter(1)
    m.activate_adapter(2)
    used = m.arena.used_bytes
    assert m.device_bytes(m.active[1]) <= m.registered[1].nbytes() + 16
    m.activate_adapter(3)                            # a free slot, but no room: 1 (LRU) goes
    assert set(m.active) == {2, 3} and m.arena.used_bytes <= used
    m.protected = {2, 3}                             # both needed by this step
    with pytest.raises(RuntimeError, match="--delta-arena-mb"):
        m.activate_adapter(1)
    assert set(m.active) == {2, 3}                   # nothing was evicted for nothing
    m.protected = set()
    stats = m.resident_bytes()
    assert stats["arena_used_bytes"] == m.arena.used_bytes > 0
    assert set(stats["device_bytes_per_delta"]) == {"2", "3"}


def test_arena_compacts_when_free_bytes_are_fragmented():
    # units table (32 B) + three 16x deltas (384 B each) + a 512 B tail
    m = _arena_manager(slots=4, arena_kb=(32 + 3 * 384 + 512) / 1024)
    small = [_delta(str(i), i, ratio=16) for i in (1, 2, 3)]
    assert sum(m.arena_words(small[0])) * 4 == 384 + 32   # + the units table of g=16
    for i, d in enumerate(small, 1):
        m.add_adapter(i, d)
        m.activate_adapter(i)
    m.deactivate_adapter(1)
    m.deactivate_adapter(3)
    # free bytes now lie on both sides of delta 2: a big delta needs them joined
    big = _delta("big", 9, ratio=4)
    need = sum(m.arena_words(big)) * 4
    assert m.arena.largest_free_bytes < need <= m.arena.free_bytes - 64
    m.add_adapter(9, big)
    m.activate_adapter(9)
    assert set(m.active) == {2, 9}
    slots = m.linear_slots["layer"]
    for aid, d in ((2, small[1]), (9, big)):         # both intact after the move
        back = slots.encoded(m.active[aid], 0)
        from deltadq_vllm.layouts import to_row_packed
        assert torch.equal(back.tensors["codes"], to_row_packed(d.linears["layer"][0]).tensors["codes"])


def test_decode_rows_reads_flat_and_row_packed_codes():
    from deltadq_vllm.layouts import decode, encode_hash_groupwise
    from deltadq_vllm.serving.layers import decode_rows

    gen = torch.Generator().manual_seed(5)
    for flat, (out, inp, g, k, bits) in [(True, (37, 48, 16, 1, 3)), (False, (37, 48, 16, 1, 3)),
                                         (True, (20, 64, 8, 3, 5)), (True, (9, 32, 32, 2, 1))]:
        codes = torch.randint(0, 1 << bits, (out, inp // g * k), generator=gen)
        nb = (out + 2) // 3
        enc = encode_hash_groupwise((out, inp), codes, torch.rand(nb, generator=gen).bfloat16(),
                                    -torch.rand(nb, generator=gen).bfloat16(), group_size=g,
                                    keep=k, bits=bits, seed=int(torch.randint(0, 2**31, (1,))),
                                    rows_per_scale=3, flat=flat)
        rows = torch.randint(0, out, (25,), generator=gen)
        assert torch.equal(decode_rows(enc, rows), decode(enc)[rows])
