"""Training and evaluation loops of the test fixtures: full AdamW training on one thread,
progress lines (step, loss, ETA), batched greedy decoding and held-out task accuracy."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

import torch

from .tasks import TASKS, eval_problems

# One thread per build, parallel builds in processes instead: on a 2-core machine shared with
# other jobs, 2 OpenMP threads per tiny training step spin at barriers while the other
# thread is descheduled; measured here (load ~11, llama-gqa base, 60 steps): 1 thread 38 ms
# CPU per step, 2 threads 485 ms (13x the CPU, 14x the wall). Results depend on the thread
# count (reduction order), so it is part of every fixture's hash.
TRAIN_THREADS = 1


@contextlib.contextmanager
def deterministic_torch(threads: int = TRAIN_THREADS):
    """Pin thread count and deterministic kernels while building; restore afterwards."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def _lr_at(step: int, total: int, peak: float) -> float:
    """Warmup (5%), hold at peak, linear decay over the last 25%: tiny models learn
    algorithmic tasks in a sudden transition that needs a long stretch at high lr."""
    warm, decay = max(1, total // 20), max(1, total // 4)
    if step < warm:
        return peak * (step + 1) / warm
    if step < total - decay:
        return peak
    return peak * max(0.05, (total - step) / decay)


class Progress:
    """Step, loss and ETA of one model's training on stderr: every ~10% of the steps but at
    most every `min_seconds`, and the last step. Builds run in parallel processes, so every
    line names its fixture."""

    def __init__(self, label: str, total: int, enabled: bool = True, min_seconds: float = 5.0):
        self.label, self.total, self.enabled = label, total, enabled
        self.every, self.min_seconds = max(1, total // 10), min_seconds
        self.t0 = self.last = time.perf_counter()

    def __call__(self, step: int, loss: float) -> None:
        done, now = step + 1, time.perf_counter()
        if not self.enabled or (done != self.total and (
                done % self.every or now - self.last < self.min_seconds)):
            return
        self.last = now
        el = now - self.t0
        eta = el / done * (self.total - done)
        print(f"[fixtures] {self.label}: step {done}/{self.total} loss {loss:.3f} "
              f"({el:.0f} s, ETA {eta:.0f} s)", file=sys.stderr, flush=True)


def train(model, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           steps: int, lr: float, progress: Callable[[int, float], None] | None = None) -> float:
    """Full AdamW training of every parameter. batches(step) -> (ids, attn_mask, labels)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    ema = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        ids, mask, labels = batches(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if progress is not None:
            progress(step, ema)
    model.eval()
    return float(ema)


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Batched greedy decoding (left padding, no KV cache: sequences are tiny)."""
    model.eval()
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    done = torch.zeros(len(prompts), dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        nxt = logits.argmax(-1).masked_fill(done, pad)
        new.append(nxt)
        done |= nxt == tokenizer.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, (~done | (nxt == tokenizer.eos_token_id)).long()[:, None]], 1)
        if done.all():
            break
    out = torch.stack(new, 1).tolist()
    return [tokenizer.decode([t for t in row if t not in (pad,)], skip_special_tokens=True)
            for row in out]


def task_accuracy(model, tokenizer, task: str) -> float:
    """Fraction of held-out problems whose greedy completion equals the answer."""
    probs = eval_problems(task)
    outs = greedy_complete(model, tokenizer, [p for p, _ in probs], TASKS[task].max_new_tokens)
    return sum(o.strip() == a for o, (_, a) in zip(outs, probs)) / len(probs)
