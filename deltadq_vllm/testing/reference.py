"""Reference generations from plain vLLM: each model folder served the normal way.

Conformance tests compare `deltadq serve` with this: the same prompts as text, greedy,
with the top-k log-probs of every step. It runs as its own process (`reference_run`),
with every vLLM plugin disabled (VLLM_PLUGINS=""), so deltadq's code is not in the path;
the engines run in-process one after another, which costs ~2 CPU-s each here instead of
~20 for a served engine.

    python -m deltadq_vllm.testing.reference REQUEST.json OUT.json
    REQUEST: {"models": {key: folder}, "prompts": [...], "max_tokens": N, "logprobs": K,
              "max_model_len": L}
    OUT: {key: [{"prompt_ids": [...], "tokens": [...], "top": [{id: logprob}, ...]}]}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = {"VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
       "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _generate(folder: str, prompts: list[str], max_tokens: int, logprobs: int,
              max_model_len: int) -> list[dict]:
    import gc

    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=max_model_len,
              max_num_seqs=8, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs)
    out = []
    for o in llm.generate(prompts, sp, use_tqdm=False):
        c = o.outputs[0]
        out.append({"prompt_ids": list(o.prompt_token_ids), "tokens": list(c.token_ids),
                    "top": [{str(t): lp.logprob for t, lp in step.items()}
                            for step in c.logprobs]})
    del llm
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    req_path, out_path = (argv or sys.argv[1:])[:2]
    req = json.loads(Path(req_path).read_text())
    result = {key: _generate(folder, req["prompts"], req["max_tokens"], req["logprobs"],
                             req.get("max_model_len", 512))
              for key, folder in req["models"].items()}
    tmp = Path(out_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out_path)
    return 0


def reference_run(models: dict[str, str], prompts: list[str], workdir: Path,
                  max_tokens: int, logprobs: int = 5, max_model_len: int = 512):
    """Start the reference process (returns a handle; `.result()` waits and loads OUT)."""
    workdir = Path(workdir)
    req, out, log = workdir / "reference-request.json", workdir / "reference.json", \
        workdir / "reference.log"
    req.write_text(json.dumps({"models": {k: str(v) for k, v in models.items()},
                               "prompts": prompts, "max_tokens": max_tokens,
                               "logprobs": logprobs, "max_model_len": max_model_len}))
    logf = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "deltadq_vllm.testing.reference", str(req),
                             str(out)], stdout=logf, stderr=subprocess.STDOUT,
                            env={**os.environ, **ENV})
    return _Pending(proc, out, log, logf)


class _Pending:
    def __init__(self, proc, out: Path, log: Path, logf):
        self.proc, self.out, self.log, self._logf = proc, out, log, logf

    def result(self, timeout: float = 900) -> dict:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = "timeout"
        self._logf.close()
        if rc != 0:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"vLLM reference run failed ({rc}):\n{tail}")
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._logf.close()


if __name__ == "__main__":
    sys.exit(main())
