"""The sweep's server: one `deltadq serve` of the base, deltas loaded at run time, and
the measurements taken through its OpenAI endpoints."""

from __future__ import annotations

import math
import time
from pathlib import Path

import requests

from sweep_common import FT, SERVE, T, log, results_dir


class Bench:
    """One `deltadq serve` of the base with runtime deltas; started on first use."""

    def __init__(self, n_eval: int, texts: list[str]):
        self.n_eval = n_eval
        self.texts = texts
        self.server = None

    def start(self):
        if self.server is None:
            from deltadq_vllm.testing.server import Server

            log_dir = results_dir() / "logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            self.server = Server(
                FT.base_dir(),
                ["--enable-runtime-deltas", "--delta-root", FT.cache_root() / "deltas",
                 "--max-deltas", "1", "--max-cpu-deltas", "1", "--served-model-name", "base",
                 "--seed", "0"],
                log_dir, timeout=900,
                defaults=("--dtype", SERVE["dtype"], "--enforce-eager", "--max-model-len", "512",
                          "--max-num-seqs", "64"))
            log(f"server up in {time.time() - t0:.0f} s ({self.server.url})")
        return self.server

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _post(self, path: str, body: dict, timeout: float = 1800) -> dict:
        r = requests.post(self.start().url + path, json=body, timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"{path} -> {r.status_code}: {r.text[:500]}")
        return r.json()

    def load(self, name: str, path: Path) -> None:
        self._post("/v1/load_delta", {"delta_name": name, "delta_path": str(path)})

    def unload(self, name: str) -> None:
        try:
            self._post("/v1/unload_delta", {"delta_name": name})
        except Exception as e:  # noqa: BLE001
            log(f"unload {name}: {e}")

    def accuracy(self, model: str, task: str) -> tuple[float, list[str]]:
        t = T.get_task(task)
        probs = t.eval_set(self.n_eval)
        res = self._post("/v1/completions", {
            "model": model, "prompt": [p.prompt for p in probs], "max_tokens": t.max_new_tokens,
            "temperature": 0, "seed": 0})
        texts = [""] * len(probs)
        for ch in res["choices"]:
            texts[ch["index"]] = ch["text"]
        return T.score_completions(t, texts, probs), texts

    def text_stats(self, model: str) -> tuple[float, list[list[int]]]:
        """Perplexity over the held-out passages and the top-1 token at every position."""
        res = self._post("/v1/completions", {
            "model": model, "prompt": self.texts, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 1, "return_token_ids": True})
        nll, n = 0.0, 0
        top1 = [None] * len(self.texts)
        for ch in res["choices"]:
            ids = ch.get("prompt_token_ids")
            plp = ch["prompt_logprobs"]
            best = []
            for pos in range(1, len(plp)):
                entry = plp[pos] or {}
                if ids is not None:
                    lp = entry.get(str(ids[pos]))
                else:  # the prompt token is the entry that is not rank 1, or the only one
                    others = [v for v in entry.values() if v.get("rank") != 1]
                    lp = others[0] if others else next(iter(entry.values()), None)
                if lp is not None:
                    nll -= lp["logprob"]
                    n += 1
                ranked = [(int(t), v.get("rank", 99)) for t, v in entry.items()]
                best.append(min(ranked, key=lambda tv: tv[1])[0] if ranked else -1)
            top1[ch["index"]] = best
        return math.exp(nll / max(n, 1)), top1

    @staticmethod
    def agreement(a, b) -> float | None:
        if not a or not b:
            return None
        same = total = 0
        for x, y in zip(a, b):
            for u, v in zip(x, y):
                same += u == v
                total += 1
        return same / max(total, 1)

    def measure(self, model: str, tasks: list[str]) -> dict:
        t0 = time.time()
        by_task, examples = {}, {}
        for task in tasks:
            acc, texts = self.accuracy(model, task)
            by_task[task] = acc
            examples[task] = texts[:3]
        t1 = time.time()
        ppl, top1 = self.text_stats(model)
        t2 = time.time()
        return {"accuracy": sum(by_task.values()) / len(by_task), "accuracy_by_task": by_task,
                "perplexity": ppl, "top1": top1, "examples": examples,
                "eval_seconds": round(t1 - t0, 1), "text_seconds": round(t2 - t1, 1)}
