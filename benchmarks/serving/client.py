"""Load generator for the serving benchmark: OpenAI streaming completions, timed per request.

Traffic: which fine-tune a request asks for (uniform, or Zipf over a fixed random ranking of
the fine-tunes), and when it is sent (Poisson arrivals at a fixed rate, or a closed loop of C
clients that each send their next request as soon as the previous one finished).

Per request: TTFT (send -> first streamed token), TPOT ((last token - first token) /
(tokens - 1)), output tokens (the server's usage count). Per run: output tokens/s over the
run's wall time (first send -> last token), p50/p99 of TTFT and TPOT, errors.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Request:
    model: str
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    model: str
    t_send: float = 0.0
    t_first: float | None = None
    t_end: float | None = None
    tokens: int = 0
    error: str | None = None


def choose_models(names: list[str], n: int, dist: str, seed: int, zipf_s: float = 1.1) -> list[str]:
    """The fine-tune of each of n requests: uniform, or Zipf(s) over a seeded ranking."""
    rng = random.Random(seed)
    if dist == "uniform" or len(names) == 1:
        return [rng.choice(names) for _ in range(n)]
    if dist != "zipf":
        raise ValueError(dist)
    ranked = names[:]
    rng.shuffle(ranked)
    w = [1.0 / (k ** zipf_s) for k in range(1, len(ranked) + 1)]
    return rng.choices(ranked, weights=w, k=n)


def zipf_shares(n: int, s: float) -> list[float]:
    w = [1.0 / (k ** s) for k in range(1, n + 1)]
    tot = sum(w)
    return [x / tot for x in w]


async def _one(client, req: Request, res: Result) -> None:
    res.t_send = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=req.model, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0.0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        n_chunks = 0
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                n_chunks += 1
                if res.t_first is None:
                    res.t_first = now
                res.t_end = now
            if getattr(chunk, "usage", None) is not None:
                res.tokens = chunk.usage.completion_tokens
        if not res.tokens:
            res.tokens = n_chunks
    except Exception as e:  # noqa: BLE001  (reported per request, the run goes on)
        res.error = f"{type(e).__name__}: {e}"[:300]


async def _run(url, reqs: list[Request], mode: str, rate: float | None,
               concurrency: int | None, seed: int, timeout: float) -> tuple[list[Result], float]:
    """url: the server's base URL, or {model: URL} (one server per model)."""
    from openai import AsyncOpenAI
    import httpx

    def make(u):
        return AsyncOpenAI(base_url=u + "/v1", api_key="-", max_retries=0, timeout=timeout,
                           http_client=httpx.AsyncClient(
                               limits=httpx.Limits(max_connections=1024,
                                                   max_keepalive_connections=1024),
                               timeout=timeout))

    urls = url if isinstance(url, dict) else {r.model: url for r in reqs}
    by_url = {u: make(u) for u in set(urls.values())}
    clients = {m: by_url[u] for m, u in urls.items()}
    results = [Result(r.model) for r in reqs]
    t0 = time.perf_counter()
    if mode == "poisson":
        rng = np.random.default_rng(seed)
        gaps = rng.exponential(1.0 / rate, size=len(reqs))
        gaps[0] = 0.0
        at = np.cumsum(gaps)
        tasks = []
        for i, req in enumerate(reqs):
            delay = t0 + at[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(clients[req.model], req, results[i])))
        await asyncio.gather(*tasks)
    elif mode == "closed":
        nxt = iter(range(len(reqs)))

        async def worker():
            for i in nxt:
                await _one(clients[reqs[i].model], reqs[i], results[i])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        raise ValueError(mode)
    for c in by_url.values():
        await c.close()
    return results, t0


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else None


def summarize(results: list[Result], t0: float) -> dict:
    ok = [r for r in results if r.error is None and r.t_first is not None]
    errs = [r.error for r in results if r.error is not None]
    if not ok:
        return {"requests": len(results), "ok": 0, "errors": len(errs),
                "first_error": errs[0] if errs else "no tokens"}
    t_end = max(r.t_end for r in ok)
    wall = t_end - t0
    toks = sum(r.tokens for r in ok)
    ttft = [r.t_first - r.t_send for r in ok]
    tpot = [(r.t_end - r.t_first) / (r.tokens - 1) for r in ok if r.tokens > 1]
    e2e = [r.t_end - r.t_send for r in ok]
    per_model: dict[str, int] = {}
    for r in results:
        per_model[r.model] = per_model.get(r.model, 0) + 1
    return {
        "requests": len(results), "ok": len(ok), "errors": len(errs),
        "first_error": errs[0] if errs else None,
        "wall_s": wall, "output_tokens": toks, "output_tok_s": toks / wall,
        "req_s": len(ok) / wall,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "ttft_mean_s": float(np.mean(ttft)),
        "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
        "tpot_mean_s": float(np.mean(tpot)) if tpot else None,
        "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99),
        "models_used": len(per_model), "max_share": max(per_model.values()) / len(results),
    }


def run_workload(url, reqs: list[Request], mode: str, *, rate: float | None = None,
                 concurrency: int | None = None, seed: int = 0, timeout: float = 600) -> dict:
    results, t0 = asyncio.run(_run(url, reqs, mode, rate, concurrency, seed, timeout))
    out = summarize(results, t0)
    out.update(mode=mode, rate=rate, concurrency=concurrency)
    return out


def warmup(url, names: list[str], prompt: list[int], max_tokens: int = 4,
           timeout: float = 600) -> dict[str, float]:
    """One short request per model, one after the other: loads/activates every fine-tune
    (a delta is expanded into its slot on first use). Returns seconds per model."""
    from openai import OpenAI

    out = {}
    for n in names:
        u = url[n] if isinstance(url, dict) else url
        c = OpenAI(base_url=u + "/v1", api_key="-", max_retries=0, timeout=timeout)
        t = time.perf_counter()
        c.completions.create(model=n, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                             extra_body={"ignore_eos": True})
        out[n] = time.perf_counter() - t
    return out


@dataclass
class Workload:
    name: str          # e.g. "closed-uniform"
    mode: str          # closed | poisson
    dist: str          # uniform | zipf
    n_requests: int
    rate: float | None = None
    concurrency: int | None = None
    extra: dict = field(default_factory=dict)


def build_requests(names: list[str], wl: Workload, prompts: list[list[int]], max_tokens: int,
                   seed: int, zipf_s: float) -> list[Request]:
    models = choose_models(names, wl.n_requests, wl.dist, seed, zipf_s)
    return [Request(m, prompts[i % len(prompts)], max_tokens) for i, m in enumerate(models)]


def tokens_per_second_bound(rate: float, max_tokens: int) -> float:
    return rate * max_tokens if rate else math.inf
