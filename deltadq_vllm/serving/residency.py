"""Worker-side numbers behind the per-fine-tune metrics (serving/metrics.py shows them).

Per fine-tune and tier: loads, evictions and load latency, and where it is resident
with how many bytes. Tiers:

    host    the compressed delta in host memory (the `--max-cpu-deltas` LRU cache);
            a load reads, checksums and slices the artifact from disk
    device  the delta in a slot the kernels read (`--max-deltas`): on a GPU its bytes
            in the delta arena, on a CPU the slot's expansion (`--delta-cpu-strategy`,
            e.g. merged W_base + D); a load copies/expands it from the host cache

An eviction is a delta pushed out of a tier to make room for another; unloading a
fine-tune over HTTP is not an eviction (nor is a delta unloaded while requests still
used it leaving once they are done). The worker manager counts each event where it
happens: host loads when the engine core admits a request or loads an adapter
(`DeltaWorkerManager.admit`, admission.py), host evictions when it makes room in the
host cache (`_make_host_room`), device loads and slot evictions when a step activates
its deltas (`set_active_adapters`). The API process reads `DeltaWorkerManager.
deltadq_stats()` of every worker through a collective RPC (`DeltaStatsExtension`,
installed with vLLM's `--worker-extension-cls`) each time /metrics is scraped.
"""

from __future__ import annotations

import bisect
import contextlib

from .. import vllm_compat

TIERS = ("host", "device")
# seconds; a device load of a small delta takes milliseconds, a host load of a 7B
# fine-tune's delta seconds (read + checksum)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0)


class DeltaEvents:
    """Cumulative loads, evictions and load-latency histograms per (fine-tune, tier)."""

    def __init__(self):
        self._by_key: dict[tuple[str, str], dict] = {}

    def _entry(self, name: str, tier: str) -> dict:
        e = self._by_key.get((name, tier))
        if e is None:
            e = self._by_key[(name, tier)] = {
                "name": name, "tier": tier, "loads": 0, "evictions": 0, "load_seconds_sum": 0.0,
                "load_seconds_buckets": [0] * len(LOAD_BUCKETS)}
        return e

    def loaded(self, name: str, tier: str, seconds: float) -> None:
        e = self._entry(name, tier)
        e["loads"] += 1
        e["load_seconds_sum"] += seconds
        i = bisect.bisect_left(LOAD_BUCKETS, seconds)
        if i < len(LOAD_BUCKETS):
            e["load_seconds_buckets"][i] += 1   # per bucket; the exporter accumulates

    def evicted(self, name: str, tier: str) -> None:
        self._entry(name, tier)["evictions"] += 1

    @contextlib.contextmanager
    def watch_evictions(self, manager, keep: int | None = None):
        """Count the deltas that leave the host cache or the slots while the block runs
        (except `keep`, the id being (re)loaded)."""
        names = {a: d.name for a, d in manager.registered.items()}
        host, device = set(manager.registered), set(manager.active)
        try:
            yield
        finally:
            for a in host - set(manager.registered) - {keep}:
                self.evicted(names[a], "host")
            for a in device - set(manager.active) - {keep}:
                self.evicted(names[a], "device")

    def as_list(self) -> list[dict]:
        return [dict(e, load_seconds_buckets=list(e["load_seconds_buckets"]))
                for e in self._by_key.values()]


def _expansion_bytes(manager, slot: int) -> int:
    """CPU path: bytes of the slot's load-time expansions (e.g. merged W_base + D)."""
    n = 0
    for sl in getattr(manager, "linear_slots", {}).values():
        entry = getattr(sl, "cpu_cache", {}).get(slot)
        if entry is not None:
            n += entry.nbytes()
    return n


def residency(manager, retired=frozenset()) -> list[dict]:
    """Every fine-tune in the host cache: its host bytes, and its slot and device bytes
    when it is in a slot. `retired`: ids of unloaded deltas kept only until the requests
    admitted with them finish (a reload of the same name may be resident beside them)."""
    out = []
    for aid, d in manager.registered.items():
        slot = manager.active.get(aid)
        device_bytes = 0
        if slot is not None:
            device_bytes = manager.device_bytes(slot) + _expansion_bytes(manager, slot)
        out.append({"name": d.name, "id": aid, "host_bytes": d.nbytes(), "slot": slot,
                    "device_bytes": device_bytes, "pinned": aid in manager.pinned,
                    "retired": aid in retired})
    return out


class DeltaStatsExtension:
    """Mixed into vLLM's worker class (`--worker-extension-cls`, set by engine_flags) so
    the API process can call `collective_rpc("deltadq_stats")`."""

    def deltadq_stats(self):
        manager = vllm_compat.worker_adapter_manager(self)
        stats = getattr(manager, "deltadq_stats", None)
        return stats() if stats is not None else None
