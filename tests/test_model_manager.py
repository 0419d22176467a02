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
