"""The base-check hash without deltadq or torch (for machines that only have Python):
per-tensor sha256 over "name|dtype|shape" and the bytes, read with pread in 16 MiB
chunks, tensors in a thread pool - the algorithm of deltadq_vllm/content_hash.py - over
50 random 256 MiB tensors (13.4 GB, a 7B model in bf16), from the page cache with 1, 4
and 16 threads, then cold (page cache dropped) where the machine allows it.

    python3 benchmarks/base_hash/algorithm_only.py [DIR]

Run on the lent device (16-core Intel Xeon with SHA-NI, 128 GiB); results in
benchmarks/results/base_hash/device-16core-13.4gb.json.
"""
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor as P

d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/hb"
os.makedirs(d, exist_ok=True)
N, S = 50, 256 << 20
b = bytearray(os.urandom(S))
t = time.perf_counter()
for i in range(N):
    b[:8] = i.to_bytes(8, "little")
    with open(f"{d}/t{i}", "wb") as f:
        f.write(b)
print("wrote", N * S / 1e9, "GB in", round(time.perf_counter() - t, 1), "s", flush=True)


def dig(i):
    h = hashlib.sha256(f"t{i}|BF16|[{S // 2}]".encode())
    fd = os.open(f"{d}/t{i}", os.O_RDONLY)
    o = 0
    while o < S:
        c = os.pread(fd, min(16 << 20, S - o), o)
        h.update(c)
        o += len(c)
    os.close(fd)
    return h.hexdigest()


def run(th, tag):
    t = time.perf_counter()
    with P(th) as p:
        list(p.map(dig, range(N)))
    dt = time.perf_counter() - t
    print(tag, th, "threads", round(dt, 2), "s", round(N * S / dt / 1e9, 2), "GB/s", flush=True)


for th in (1, 4, 16):
    run(th, "page-cache")
if os.system("sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null") == 0:
    run(16, "cold")
else:
    print("cannot drop caches")
