"""Per-fine-tune Prometheus metrics on vLLM's `/metrics` (API-server process).

Label `model`: the name a client puts in the OpenAI `model` field (a fine-tune's
`--delta-modules` name, or the base's served name for base requests). Label `tier`:
`host` (compressed delta in host memory) or `device` (in a slot the kernels read;
serving/residency.py).

    deltadq:requests_total{model,finished_reason}   counter    finished requests
    deltadq:prompt_tokens_total{model}               counter
    deltadq:generation_tokens_total{model}           counter
    deltadq:time_to_first_token_seconds{model}       histogram  arrival -> first token
    deltadq:inter_token_latency_seconds{model}       histogram  between a request's tokens
    deltadq:delta_loads_total{model,tier}            counter    (worker numbers from here on)
    deltadq:delta_evictions_total{model,tier}        counter    pushed out for another delta
    deltadq:delta_load_seconds{model,tier}           histogram  disk -> host, host -> slot
    deltadq:delta_resident{model,tier}               gauge      1 = resident in that tier
    deltadq:delta_resident_bytes{model,tier}         gauge      bytes (summed over TP ranks)
    deltadq:delta_slots{state=total|used}            gauge

Request series are prometheus_client metrics fed from vLLM's own per-request stats
(vllm_compat.hook_request_stats), so they need vLLM's stats on (the default; not with
`--disable-log-stats`); with `--api-server-count > 1`, vLLM's multiprocess collector
sums them over the API processes. The worker series live in the engine's workers (another
process): when `/metrics` is requested, `MetricsMiddleware` asks every worker for its
numbers (`collective_rpc("deltadq_stats")`, waiting at most REFRESH_TIMEOUT_S, else the
last answer is shown) and appends them to vLLM's page.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("deltadq")

REFRESH_TIMEOUT_S = 2.0
# vLLM's own buckets for these two (vllm/v1/metrics/loggers.py), so dashboards compare
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)

_request_metrics = None


class RequestMetrics:
    """The request series (one set per process: prometheus_client names are global)."""

    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.requests = Counter("deltadq:requests", "Finished requests per model (fine-tune "
                                "or base) and finish reason.", ["model", "finished_reason"])
        self.prompt_tokens = Counter("deltadq:prompt_tokens", "Prompt tokens per model.",
                                     ["model"])
        self.generation_tokens = Counter("deltadq:generation_tokens",
                                         "Generated tokens per model.", ["model"])
        self.ttft = Histogram("deltadq:time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first token, per model.",
                              ["model"], buckets=TTFT_BUCKETS)
        self.itl = Histogram("deltadq:inter_token_latency_seconds",
                             "Seconds between consecutive outputs of a request, per model.",
                             ["model"], buckets=ITL_BUCKETS)


def request_metrics() -> RequestMetrics:
    global _request_metrics
    if _request_metrics is None:
        _request_metrics = RequestMetrics()
    return _request_metrics


class DeltaMetrics:
    """Everything the endpoint plugin needs for metrics: hooks into vLLM's request stats,
    the fine-tunes ever served (label values), and the workers' latest numbers."""

    def __init__(self):
        self.engine_client = None
        self.base_name = "base"
        self.known: list[str] = []          # fine-tunes served at some point, in order
        self.worker_stats: list[dict] = []  # one per worker (tensor-parallel rank)
        self._pending = None
        self._warned = False
        self._rpc_warned = False

    # ------------------------------------------------------------------ request series

    def install(self, engine_client, base_name: str) -> None:
        from .. import vllm_compat

        self.engine_client = engine_client
        self.base_name = base_name
        request_metrics()
        if not vllm_compat.hook_request_stats(engine_client, self._on_output, self._on_finished):
            log.warning("deltadq: this vLLM has no per-request stats hook; per-fine-tune "
                        "request metrics are off")

    def add(self, name: str) -> None:
        if name not in self.known:
            self.known.append(name)

    def _label(self, lora_name) -> str:
        return lora_name if lora_name is not None else self.base_name

    def _safely(self, fn) -> None:
        try:
            fn()
        except Exception:  # metrics must never break serving
            if not self._warned:
                self._warned = True
                log.exception("deltadq: could not record a request metric (reported once)")

    def _on_output(self, lora_name, prefilling, prompt_tokens, new_tokens, ttft, itl) -> None:
        def record():
            m, label = request_metrics(), self._label(lora_name)
            if prefilling:
                m.prompt_tokens.labels(label).inc(prompt_tokens)
            if ttft is not None:
                m.ttft.labels(label).observe(ttft)
            if itl is not None:
                m.itl.labels(label).observe(itl)
            if new_tokens:
                m.generation_tokens.labels(label).inc(new_tokens)

        self._safely(record)

    def _on_finished(self, lora_name, finish_reason: str) -> None:
        self._safely(lambda: request_metrics().requests.labels(self._label(lora_name),
                                                               finish_reason).inc())

    # ------------------------------------------------------------------ worker series

    async def refresh(self) -> None:
        """Fetch the workers' numbers (at most REFRESH_TIMEOUT_S; else keep the last)."""
        if self.engine_client is None:
            return
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(
                self.engine_client.collective_rpc("deltadq_stats"))
            self._pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            answers = await asyncio.wait_for(asyncio.shield(self._pending), REFRESH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return
        except Exception as e:  # e.g. a user's own --worker-extension-cls: keep serving
            if not self._rpc_warned:   # /metrics, without the worker series; say it once
                self._rpc_warned = True
                log.warning("deltadq: could not read the workers' delta statistics (%s); "
                            "/metrics shows the request series only", e)
            return
        self.worker_stats = [a for a in (answers or []) if isinstance(a, dict)]

    def collect(self):
        """prometheus_client collector protocol: the worker series."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        from .residency import LOAD_BUCKETS, TIERS

        labels = ["model", "tier"]
        loads = CounterMetricFamily("deltadq:delta_loads", "Delta loads per fine-tune into a "
                                    "tier (host: from disk; device: into a slot).", labels=labels)
        evictions = CounterMetricFamily("deltadq:delta_evictions", "Deltas pushed out of a tier "
                                        "to make room for another.", labels=labels)
        latency = HistogramMetricFamily("deltadq:delta_load_seconds", "Seconds per delta load "
                                        "into a tier.", labels=labels)
        resident = GaugeMetricFamily("deltadq:delta_resident", "1 if the fine-tune's delta is "
                                     "resident in the tier, else 0.", labels=labels)
        resident_bytes = GaugeMetricFamily("deltadq:delta_resident_bytes", "Bytes the "
                                           "fine-tune's delta occupies in the tier (all ranks).",
                                           labels=labels)
        slots = GaugeMetricFamily("deltadq:delta_slots", "Delta slots (--max-deltas): total "
                                  "and used.", labels=["state"])
        known = set(self.known)
        if self.worker_stats:
            first = self.worker_stats[0]
            for e in first.get("events", []):
                if e["name"] not in known:  # e.g. vLLM's warm-up dummies
                    continue
                key = [e["name"], e["tier"]]
                loads.add_metric(key, e["loads"])
                evictions.add_metric(key, e["evictions"])
                cum, buckets = 0, []
                for le, n in zip(LOAD_BUCKETS, e["load_seconds_buckets"]):
                    cum += n
                    buckets.append((repr(float(le)), cum))
                buckets.append(("+Inf", e["loads"]))
                latency.add_metric(key, buckets, e["load_seconds_sum"])
            # a reload beside the retired old load of one name: the new one tells where
            deltas = sorted(first.get("deltas", []), key=lambda d: not d.get("retired"))
            where = {d["name"]: d for d in deltas}
            nbytes: dict[tuple[str, str], int] = {}
            for rank in self.worker_stats:
                for d in rank.get("deltas", []):
                    for tier in TIERS:
                        key = (d["name"], tier)
                        nbytes[key] = nbytes.get(key, 0) + d[f"{tier}_bytes"]
            for name in self.known:
                d = where.get(name)
                on = {"host": d is not None, "device": d is not None and d["slot"] is not None}
                for tier in TIERS:
                    resident.add_metric([name, tier], 1.0 if on[tier] else 0.0)
                    resident_bytes.add_metric([name, tier], nbytes.get((name, tier), 0)
                                              if on[tier] else 0)
            slots.add_metric(["total"], first.get("slots", 0))
            slots.add_metric(["used"], len(first.get("active", {})))
        return [loads, evictions, latency, resident, resident_bytes, slots]

    async def exposition(self) -> bytes:
        """The worker series in Prometheus text format, freshly fetched."""
        from prometheus_client import CollectorRegistry, generate_latest

        await self.refresh()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)


class MetricsMiddleware:
    """ASGI middleware: on `/metrics`, append the workers' delta series to vLLM's page.

    The request is passed on without Accept / Accept-Encoding headers so vLLM answers in
    the plain text format (no gzip, no OpenMetrics `# EOF` trailer) that the appended
    families share."""

    def __init__(self, app, metrics: DeltaMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("path", "").rstrip("/") != "/metrics" \
                or self.metrics.engine_client is None:
            return await self.app(scope, receive, send)
        from .responses import rewrite_response

        extra = await self.metrics.exposition()
        drop = (b"accept", b"accept-encoding")
        scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", [])
                                     if k.lower() not in drop])

        def append(status, body):
            if not body.endswith(b"\n") and body:
                body += b"\n"
            return body + extra

        await rewrite_response(self.app, scope, receive, send, lambda status: status == 200,
                               append)
