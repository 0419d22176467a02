"""Engine-core admission (serving/admission.py) with the real worker manager: deltas are
read and checked before a request enters the scheduler, never evicted while a request
needs them, and a delta that cannot be read fails only its own requests."""

import types

import pytest
import torch

pytest.importorskip("vllm")

from deltadq_vllm import vllm_compat  # noqa: E402
from deltadq_vllm.errors import DeltaDQError  # noqa: E402
from deltadq_vllm.serving import admission, worker_manager  # noqa: E402
from deltadq_vllm.serving.loaded import empty_delta  # noqa: E402
from deltadq_vllm.serving.model_manager import DeltaModelManager  # noqa: E402


class Lora:
    def __init__(self, aid, name=None):
        self.lora_int_id, self.lora_name = aid, name or f"ft{aid}"
        self.lora_path = f"/d/{self.lora_name}#sha256=" + "0" * 64


class Req:
    def __init__(self, rid, lora=None):
        self.request_id, self.lora_request, self.client_index = rid, lora, 0


class Core:
    """What admission.py uses of vLLM's EngineCore: config, scheduler.requests, executor."""

    def __init__(self, capacity=2, broken=()):
        cfg = types.SimpleNamespace(
            additional_config={"deltadq": {}},
            lora_config=types.SimpleNamespace(max_loras=1, max_cpu_loras=capacity),
            model_config=types.SimpleNamespace(model="/base"))
        self.vllm_config = cfg
        self.wm = worker_manager.DeltaWorkerManager(cfg, "cpu", {"check_base": False})
        self.wm._manager = DeltaModelManager(torch.nn.Linear(2, 2), n_slots=1,
                                             capacity=capacity, device=torch.device("cpu"),
                                             settings={})
        self.reads, self.broken = [], set(broken)

        def load(request):
            self.reads.append(request.lora_int_id)
            if request.lora_int_id in self.broken:
                raise DeltaDQError("delta file gone", "restore it")
            return empty_delta(request.lora_name)

        self.wm._load = load
        self.scheduler = types.SimpleNamespace(requests={})
        self.model_executor = types.SimpleNamespace(
            collective_rpc=lambda fn, args=(): [fn(None, *args)])
        self.errors, self.added = [], []

    def _send_error_outputs_to_client(self, ids, client):
        self.errors += ids

    def orig_add(self, core, request, *a):
        self.added.append(request.request_id)
        self.scheduler.requests[request.request_id] = request

    def finish(self, rid):
        self.scheduler.requests.pop(rid)


def test_a_request_is_admitted_only_with_its_delta_resident():
    c = Core()
    admission._add_request(c.orig_add, c, Req("r1", Lora(1)))
    admission._add_request(c.orig_add, c, Req("r2", Lora(1)))
    admission._add_request(c.orig_add, c, Req("b"))          # base: untouched
    assert c.added == ["r1", "r2", "b"] and c.reads == [1]  # read once, mirrored after
    assert set(c.wm.manager.registered) == {1}


def test_deltas_that_unfinished_requests_need_are_never_evicted():
    c = Core(capacity=2)
    for rid, aid in (("a", 1), ("b", 2)):
        admission._add_request(c.orig_add, c, Req(rid, Lora(aid)))
    admission._add_request(c.orig_add, c, Req("c", Lora(3)))  # 1, 2 in use: cache grows
    assert set(c.wm.manager.registered) == {1, 2, 3}
    c.finish("a")
    admission._add_request(c.orig_add, c, Req("d", Lora(4)))  # 1 is free now: evicted
    assert set(c.wm.manager.registered) == {2, 3, 4}
    # a step activates only resident deltas: no read inside set_active_adapters
    reads = list(c.reads)
    c.wm.set_active_adapters([Lora(2)], None)
    assert c.reads == reads


def test_an_unreadable_delta_fails_its_request_and_nothing_else():
    c = Core(broken={2})
    admission._add_request(c.orig_add, c, Req("ok", Lora(1)))
    admission._add_request(c.orig_add, c, Req("bad", Lora(2)))
    admission._add_request(c.orig_add, c, Req("ok2", Lora(1)))
    assert c.errors == ["bad"] and c.added == ["ok", "ok2"]
    assert 2 not in c.wm.manager.registered
    with pytest.raises(ValueError, match="delta file gone"):   # a load: 4xx to the caller
        admission._add_lora(None, c, Lora(2))


def test_unload_while_requests_run_keeps_their_delta_until_they_finish():
    c = Core(capacity=2)
    admission._add_request(c.orig_add, c, Req("a", Lora(1)))
    removed = []
    assert admission._remove_lora(lambda core, i: removed.append(i), c, 1)
    assert removed == [] and 1 in c.wm.manager.registered      # retired, not dropped
    assert next(iter(c.wm.manager.registered)) == 1            # first to go
    c.finish("a")
    assert admission._remove_lora(lambda core, i: removed.append(i), c, 1) is None
    assert removed == [1]


def test_engines_without_deltas_are_untouched():
    c = Core()
    c.vllm_config.additional_config = {}
    admission._add_request(c.orig_add, c, Req("r", Lora(9)))
    assert c.added == ["r"] and c.reads == []


def test_the_wrappers_are_installed_on_vllms_engine_core():
    from vllm.v1.engine.core import EngineCore

    admission.install()
    admission.install()   # idempotent
    for name in ("add_request", "add_lora", "remove_lora"):
        assert getattr(getattr(EngineCore, name), "_deltadq", False), name
    assert hasattr(vllm_compat, "fail_engine_request")


class Mapping:
    def __init__(self, tokens, samples):
        self.index_mapping, self.prompt_mapping = tuple(tokens), tuple(samples)


def test_two_loads_of_one_name_in_a_step_both_get_their_delta():
    """vLLM passes a set of LoRARequests, equal by name: after a reload, requests of the old
    and the new load of one name can share a step and arrive as one request object."""
    c = Core(capacity=2)
    c.wm._manager = DeltaModelManager(torch.nn.Linear(2, 2), n_slots=2, capacity=2,
                                      device=torch.device("cpu"), settings={})
    admission._add_request(c.orig_add, c, Req("old", Lora(1, "x")))
    admission._add_request(c.orig_add, c, Req("new", Lora(2, "x")))
    collapsed = {Lora(1, "x"), Lora(2, "x")}
    assert len({vllm_compat.lora_request_cls()("x", 1, "/p"),
                vllm_compat.lora_request_cls()("x", 2, "/p")}) == 1   # vLLM's equality
    c.wm.set_active_adapters(list(collapsed)[:1], Mapping([1, 1, 2, 0], [1, 2]))
    m = c.wm.manager
    assert set(m.active) == {1, 2}
    assert m.ctx.tokens.slot_ids[:4].tolist() == [m.active[1], m.active[1], m.active[2], -1]


def _counts(wm):
    return {(e["name"], e["tier"]): (e["loads"], e["evictions"])
            for e in wm.deltadq_stats()["events"]}


def test_metrics_count_each_load_and_eviction_where_it_happens():
    """Host loads are counted at admission (once per read from disk), host evictions where
    admission makes room, device loads and slot evictions when a step activates deltas;
    a failed read, a repeat admission and an unload are not counted."""
    c = Core(capacity=2, broken={9})
    admission._add_request(c.orig_add, c, Req("a", Lora(1, "a")))
    admission._add_request(c.orig_add, c, Req("a2", Lora(1, "a")))    # resident: no read
    admission._add_request(c.orig_add, c, Req("x", Lora(9, "x")))     # unreadable
    assert _counts(c.wm) == {("a", "host"): (1, 0)}
    c.wm.set_active_adapters([Lora(1, "a")], None)                     # a into the one slot
    c.wm.set_active_adapters([Lora(1, "a")], None)                     # already there
    admission._add_request(c.orig_add, c, Req("b", Lora(2, "b")))
    admission._add_request(c.orig_add, c, Req("c", Lora(3, "c")))     # a, b in use: grows
    assert c.reads == [1, 9, 2, 3] and set(c.wm.manager.registered) == {1, 2, 3}
    c.wm.set_active_adapters([Lora(2, "b")], None)                     # b pushes a out
    for rid in ("a", "a2", "b"):
        c.finish(rid)
    admission._add_request(c.orig_add, c, Req("d", Lora(4, "d")))     # room: a, b go
    assert set(c.wm.manager.registered) == {3, 4}
    assert _counts(c.wm) == {("a", "host"): (1, 1), ("a", "device"): (1, 1),
                             ("b", "host"): (1, 1), ("b", "device"): (1, 1),
                             ("c", "host"): (1, 0), ("d", "host"): (1, 0)}
    # "c" is unloaded while its request runs: kept, then leaving it is no eviction
    removed = []
    assert admission._remove_lora(lambda core, i: removed.append(i), c, 3)
    c.finish("c")
    admission._add_request(c.orig_add, c, Req("e", Lora(5, "e")))
    assert set(c.wm.manager.registered) == {4, 5} and removed == []
    counts = _counts(c.wm)
    assert counts[("c", "host")] == (1, 0) and counts[("e", "host")] == (1, 0)
    assert counts[("d", "host")] == (1, 0)
    where = {d["name"]: d for d in c.wm.deltadq_stats()["deltas"]}
    assert set(where) == {"d", "e"} and not any(d["retired"] for d in where.values())
