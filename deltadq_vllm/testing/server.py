"""Start `deltadq serve` in a subprocess and wait until it answers (demo, benchmarks, tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

# deltadq serve sizes the KV cache to the free memory on a CPU (cpu_memory.py); nothing
# here overrides that, so tests and the demo run what a user runs
ENGINE_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`deltadq serve BASE ARGS` in a subprocess (loopback); its log goes to a file.

    dtype float32 and eager mode by default (exactness checks); pass extra flags to change."""

    def __init__(self, base, args: list, log_dir, timeout: float = 300,
                 defaults: tuple = ("--dtype", "float32", "--enforce-eager", "--max-model-len",
                                    "512", "--max-num-seqs", "32"), env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir) / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "deltadq_vllm.cli", "serve", str(base), "--host", "127.0.0.1",
               "--port", str(self.port), *map(str, defaults), *map(str, args)]
        env = {**os.environ, **ENGINE_ENV, **(env or {})}
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not become ready in {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        if not self._log.closed:   # closed by stop(), e.g. after a start that timed out
            self._log.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="test", max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
