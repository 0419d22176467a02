"""Shared helpers of the kernel benchmarks (bench_cpu.py, bench_gpu.py).

* realistic_delta: a synthetic fine-tune delta (low-rank part + row-scaled noise),
  the kind of matrix the compressor sees (no real fine-tune of these shapes exists
  offline; speed does not depend on the values, only on the chosen g / k / bits).
* compressed_deltas: n deltas of one matrix made by the real compressor
  (tools/methods.py): the first one picks its config with compress_deltadq at the
  target true ratio, the others reuse that config with deltadq_encode (new values,
  new seed), as distinct fine-tunes compressed the same way would.
* save_json / environment: results files.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results" / "kernels"


from deltadq_vllm.kernels.synthetic import realistic_delta  # noqa: E402  (shared with the tuner)


def compressed_deltas(out: int, inp: int, n: int, ratio: float, seed: int = 0,
                      bits: int | None = None, cache: dict | None = None):
    """n hash_groupwise EncodedTensors [out, in] at true ratio >= `ratio` (vs bf16)."""
    from deltadq_vllm.tools.methods import (Calibration, MethodOptions, compress_deltadq,
                                            deltadq_encode)
    key = (out, inp, ratio, bits)
    gen = torch.Generator().manual_seed(seed * 1000003 + out * 7 + inp)
    if cache is not None and key in cache:
        cfg = cache[key]
    else:
        budget = out * inp * 2 / ratio
        d0 = realistic_delta(out, inp, gen)
        choice = compress_deltadq(f"bench.{out}x{inp}", d0, Calibration(), budget,
                                  MethodOptions(bits=bits), seed=seed)
        p = choice.enc.params
        cfg = (p["group_size"], p["keep"], p["bits"], p["rows_per_scale"])
        if cache is not None:
            cache[key] = cfg
    g, k, b, rps = cfg
    encs = []
    for i in range(n):
        d = realistic_delta(out, inp, gen)
        encs.append(deltadq_encode(d, g, k, b, (seed * 7919 + i * 104729 + out) & 0xFFFFFFFF, rps))
    for e in encs:
        assert out * inp * 2 / e.nbytes() >= ratio * 0.999, (out, inp, e.nbytes())
    return encs, {"group_size": g, "keep": k, "bits": b, "rows_per_scale": rps,
                  "true_ratio": out * inp * 2 / encs[0].nbytes(),
                  "compressed_bytes": encs[0].nbytes()}


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def quantile(xs, q):
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        env["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return env


def save_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
    return path
