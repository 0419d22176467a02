"""Cost of the base check: the content hash of every tensor of a base (deltadq_vllm/
content_hash.py), first computation and cached re-check.

    python benchmarks/base_hash/run.py --checkpoint /path/to/base          # a real base
    python benchmarks/base_hash/run.py --make-gb 4 --work /tmp/hashbench   # synthetic file

Prints a table and writes benchmarks/results/base_hash/<label>.json. The first pass
reads the files (from the page cache if they were read recently: the table says how
much of the checkpoint fit in free memory), the second is the cached path every later
`deltadq serve`, load and re-read takes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from deltadq_vllm import content_hash
from deltadq_vllm.checkpoint import Checkpoint

OUT = Path(__file__).resolve().parents[1] / "results" / "base_hash"


def make_checkpoint(work: Path, gb: float, tensor_mb: int = 256) -> Path:
    """A safetensors checkpoint of `gb` GB of bf16 tensors, written shard by shard (2 GB
    shards, like HF). Random bytes (one random block, each tensor's first bytes made
    unique): sha256 runs at the same speed on any content."""
    d = work / f"synthetic-{gb:g}gb"
    if (d / "config.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    n = max(1, int(gb * 1024 / tensor_mb))
    per_shard = max(1, 2048 // tensor_mb)
    nbytes = tensor_mb << 20
    block = bytearray(os.urandom(nbytes))
    weight_map = {}
    for s in range(0, n, per_shard):
        names = [f"model.layers.{i}.w" for i in range(s, min(n, s + per_shard))]
        header = {k: {"dtype": "BF16", "shape": [nbytes // 2],
                      "data_offsets": [j * nbytes, (j + 1) * nbytes]}
                  for j, k in enumerate(names)}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        name = f"model-{s // per_shard:05d}.safetensors"
        with open(d / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for k in names:
                block[:8] = hash(k).to_bytes(8, "little", signed=True)
                f.write(block)
        weight_map.update({k: name for k in names})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--make-gb", type=float)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltadq-hashbench")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--label", default=None)
    args = ap.parse_args(argv)
    if args.checkpoint is None:
        if not args.make_gb:
            ap.error("pass --checkpoint DIR or --make-gb N")
        args.checkpoint = make_checkpoint(args.work, args.make_gb)
    cache = Path(tempfile.mkdtemp(prefix="hash-cache-"))
    os.environ[content_hash.CACHE_ENV] = str(cache)
    ckpt = Checkpoint(args.checkpoint)
    total = ckpt.total_bytes()
    load = os.getloadavg()
    t0 = time.perf_counter()
    fp = content_hash.content_fingerprint(ckpt, args.threads)
    first = time.perf_counter() - t0
    content_hash._memo.clear()
    t0 = time.perf_counter()
    again = content_hash.content_fingerprint(Checkpoint(args.checkpoint), args.threads)
    cached = time.perf_counter() - t0
    assert again == fp
    try:
        avail = int(next(line.split()[1] for line in open("/proc/meminfo")
                         if line.startswith("MemAvailable"))) * 1024
    except (OSError, StopIteration):
        avail = None
    row = {"checkpoint": str(args.checkpoint), "bytes": total, "tensors": fp["tensors"],
           "threads": args.threads or min(32, os.cpu_count() or 1), "first_s": round(first, 2),
           "first_GB_per_s": round(total / first / 1e9, 3), "cached_s": round(cached, 4),
           "est_7b_13_5GB_s": round(13.5e9 / (total / first), 1),
           "loadavg_before": [round(x, 2) for x in load], "cpus": os.cpu_count(),
           "mem_available_bytes": avail, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "machine": platform.node(), "processor": platform.processor()}
    label = args.label or Path(args.checkpoint).name
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{label}.json").write_text(json.dumps(row, indent=2) + "\n")
    print(f"{'checkpoint':<28} {'GB':>7} {'tensors':>8} {'thr':>4} {'first s':>8} "
          f"{'GB/s':>6} {'cached s':>9} {'7B (13.5 GB) s':>15}")
    print(f"{label:<28} {total / 1e9:>7.2f} {fp['tensors']:>8} {row['threads']:>4} "
          f"{first:>8.2f} {row['first_GB_per_s']:>6.2f} {cached:>9.4f} "
          f"{row['est_7b_13_5GB_s']:>15.1f}")
    print(f"load average before: {row['loadavg_before']}, {os.cpu_count()} CPUs, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
