"""Per-fine-tune metrics without an engine: worker-side event counting on the real slot
manager, the Prometheus exposition of worker numbers, vLLM's stats hook, and the two
response-rewriting middlewares (a running server is tested in test_serving.py)."""

import asyncio
import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from deltadq_vllm import vllm_compat  # noqa: E402
from deltadq_vllm.serving.loaded import empty_delta  # noqa: E402
from deltadq_vllm.serving.metrics import DeltaMetrics, MetricsMiddleware  # noqa: E402
from deltadq_vllm.serving.model_manager import DeltaModelManager  # noqa: E402
from deltadq_vllm.serving.residency import LOAD_BUCKETS, DeltaEvents, residency  # noqa: E402
from deltadq_vllm.serving.responses import UnknownModelMiddleware  # noqa: E402


def test_events_count_evictions_per_tier_and_residency_follows_the_manager():
    m = DeltaModelManager(torch.nn.Linear(2, 2), n_slots=1, capacity=2,
                          device=torch.device("cpu"), settings={})
    ev = DeltaEvents()
    for aid, name in ((1, "a"), (2, "b")):   # one slot: activating "b" pushes "a" out
        with ev.watch_evictions(m, keep=aid):
            m.add_adapter(aid, empty_delta(name))
            m.activate_adapter(aid)
    with ev.watch_evictions(m, keep=3):   # host cache full: the inactive "a" goes
        m.remove_oldest_adapter()
        m.add_adapter(3, empty_delta("c"))
        m.activate_adapter(3)             # the one slot: "b" goes
    got = {(e["name"], e["tier"]): e["evictions"] for e in ev.as_list()}
    assert got == {("a", "device"): 1, ("a", "host"): 1, ("b", "device"): 1}
    where = {d["name"]: d for d in residency(m)}
    assert set(where) == {"b", "c"} and where["c"]["slot"] == 0 and where["b"]["slot"] is None
    ev.loaded("c", "device", 0.003)
    ev.loaded("c", "device", 100.0)   # beyond the last bucket: counted only in +Inf
    e = next(e for e in ev.as_list() if e["name"] == "c")
    assert e["loads"] == 2 and sum(e["load_seconds_buckets"]) == 1
    assert e["load_seconds_buckets"][LOAD_BUCKETS.index(0.005)] == 1


def _snapshot(slot_of_a, host_bytes=100, device_bytes=40):
    return {"slots": 2, "active": {"1": 0} if slot_of_a is not None else {},
            "deltas": [{"name": "a", "id": 1, "host_bytes": host_bytes, "slot": slot_of_a,
                        "device_bytes": device_bytes if slot_of_a is not None else 0,
                        "pinned": False},
                       {"name": "warmup_9", "id": 9, "host_bytes": 1, "slot": None,
                        "device_bytes": 0, "pinned": False}],
            "events": [{"name": "a", "tier": "device", "loads": 3, "evictions": 2,
                        "load_seconds_sum": 0.5,
                        "load_seconds_buckets": [0] * 6 + [3] + [0] * (len(LOAD_BUCKETS) - 7)},
                       {"name": "warmup_9", "tier": "host", "loads": 1, "evictions": 0,
                        "load_seconds_sum": 0.0, "load_seconds_buckets": [1] + [0] * 14}]}


def _families(metrics):
    return {f.name: {tuple(sorted(s.labels.items())) + ((s.name,) if "bucket" in s.name
                                                        or "sum" in s.name else ()): s.value
                     for s in f.samples} for f in metrics.collect()}


def test_worker_series_sum_ranks_and_hide_names_never_served():
    mt = DeltaMetrics()
    mt.add("a")
    mt.add("b")   # served, never loaded by a worker yet
    mt.worker_stats = [_snapshot(0), _snapshot(0, host_bytes=50, device_bytes=20)]
    fam = _families(mt)
    assert fam["deltadq:delta_loads"][(("model", "a"), ("tier", "device"))] == 3
    assert fam["deltadq:delta_evictions"][(("model", "a"), ("tier", "device"))] == 2
    assert not any("warmup_9" in str(k) for f in fam.values() for k in f)
    res = fam["deltadq:delta_resident"]
    assert res[(("model", "a"), ("tier", "device"))] == 1
    assert res[(("model", "b"), ("tier", "host"))] == 0
    nbytes = fam["deltadq:delta_resident_bytes"]
    assert nbytes[(("model", "a"), ("tier", "host"))] == 150      # both ranks
    assert nbytes[(("model", "a"), ("tier", "device"))] == 60
    hist = fam["deltadq:delta_load_seconds"]
    key = (("le", "0.1"), ("model", "a"), ("tier", "device"), "deltadq:delta_load_seconds_bucket")
    assert hist[key] == 3
    assert fam["deltadq:delta_slots"] == {(("state", "total"),): 2, (("state", "used"),): 1}
    mt.worker_stats = [_snapshot(None)]
    assert _families(mt)["deltadq:delta_resident"][(("model", "a"), ("tier", "device"))] == 0


class _FakeOutputProcessor:
    def __init__(self):
        self.calls = []

    def _update_stats_from_output(self, req_state, output, ts, iteration_stats):
        if req_state.is_prefilling:
            req_state.stats.first_token_latency = 0.25
        req_state.stats.last_token_ts = ts

    def _update_stats_from_finished(self, req_state, finish_reason, iteration_stats):
        self.calls.append(finish_reason)


def test_request_stats_hook_reports_ttft_itl_tokens_and_finish():
    op = _FakeOutputProcessor()
    seen, done = [], []
    assert vllm_compat.hook_request_stats(SimpleNamespace(output_processor=op),
                                          lambda *a: seen.append(a), lambda *a: done.append(a))
    req = SimpleNamespace(lora_name="math", is_prefilling=True, prompt_len=7,
                          stats=SimpleNamespace(last_token_ts=0.0, first_token_latency=0.0))
    op._update_stats_from_output(req, SimpleNamespace(new_token_ids=[5]), 10.0, object())
    req.is_prefilling = False
    op._update_stats_from_output(req, SimpleNamespace(new_token_ids=[6]), 10.5, object())
    op._update_stats_from_output(req, SimpleNamespace(new_token_ids=[7]), 11.0, None)  # no stats
    op._update_stats_from_finished(req, "length", object())
    assert seen == [("math", True, 7, 1, 0.25, None), ("math", False, 7, 1, None, 0.5)]
    assert done == [("math", "length")] and op.calls == ["length"]


def _call(app, path, method="GET", headers=()):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": method, "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start, body, scope


def _app(status, body, seen_headers=None):
    async def app(scope, receive, send):
        if seen_headers is not None:
            seen_headers.extend(scope["headers"])
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", str(len(body)).encode())]})
        half = len(body) // 2
        await send({"type": "http.response.body", "body": body[:half], "more_body": True})
        await send({"type": "http.response.body", "body": body[half:]})
    return app


def test_metrics_middleware_appends_worker_series_in_plain_text():
    class Engine:
        async def collective_rpc(self, method):
            assert method == "deltadq_stats"
            return [_snapshot(0)]

    mt = DeltaMetrics()
    mt.engine_client = Engine()
    mt.add("a")
    seen = []
    app = MetricsMiddleware(_app(200, b"vllm:x 1\n", seen), mt)
    start, body, _ = _call(app, "/metrics", headers=[(b"accept-encoding", b"gzip"),
                                                     (b"accept", b"application/openmetrics-text")])
    text = body.decode()
    assert text.startswith("vllm:x 1\n")
    assert 'deltadq:delta_resident{model="a",tier="device"} 1.0' in text
    assert dict(start["headers"])[b"content-length"] == str(len(body)).encode()
    assert not any(k in (b"accept", b"accept-encoding") for k, _ in seen)   # plain, no gzip
    _, body, _ = _call(app, "/v1/models")
    assert body == b"vllm:x 1\n"   # other paths untouched


def test_unknown_model_404_names_the_finetunes():
    vllm_body = json.dumps({"error": {"message": "The model `nope` does not exist. Valid "
                                      "aliases: /models/base.", "type": "NotFoundError",
                                      "param": "model", "code": 404}}).encode()
    mw = UnknownModelMiddleware(_app(404, vllm_body), lambda: (["base"], ["math", "code"]))
    start, body, _ = _call(mw, "/v1/completions", method="POST")
    msg = json.loads(body)["error"]["message"]
    assert start["status"] == 404 and "`nope` does not exist" in msg
    assert "`math`, `code`" in msg and "`base`" in msg and "Valid aliases" not in msg
    other = json.dumps({"error": {"message": "something else", "code": 404}}).encode()
    _, body, _ = _call(UnknownModelMiddleware(_app(404, other), lambda: (["b"], ["m"])),
                       "/v1/completions", method="POST")
    assert body == other
