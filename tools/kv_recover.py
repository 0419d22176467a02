"""Short recovery fine-tune of a KV-compressed model: distil the original into it.

The student (converted model) learns to match the teacher's (original model's) next-token
distribution on calibration text: loss = KL(teacher || student), averaged over tokens.
Distillation rather than plain language-model loss, so recovery pulls the converted model
back towards the model it replaces instead of further training it on the calibration text
(which would make "perplexity after recovery" a measure of extra in-domain training).

By default only the attention projections (q/k/v/o) train: the MLPs, norms and embeddings
stay bit-identical to the base, and a fine-tune's delta mapped with the conversion maps
still lands on the same non-attention weights.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

PARAM_SETS = ("attention", "all")


def trainable(name: str, params: str) -> bool:
    if params == "all":
        return True
    return ".self_attn." in name and any(p in name for p in ("q_proj", "k_proj", "v_proj",
                                                              "o_proj"))


def _lr(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def recover(student, teacher, ids: torch.Tensor, steps: int, lr: float = 1e-4, batch: int = 8,
            seq_len: int = 128, params: str = "attention", seed: int = 0,
            bf16: bool = False, progress: bool = True) -> dict:
    """Train `student` in place for `steps` steps on random windows of the 1-D token ids."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    seq_len = min(seq_len, len(ids))
    named = [(n, p) for n, p in student.named_parameters()]
    for n, p in named:
        p.requires_grad_(trainable(n, params))
    train = [p for n, p in named if p.requires_grad]
    opt = torch.optim.AdamW(train, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    teacher.eval()
    student.train()
    losses = []
    bar = tqdm(range(steps), desc="recover", unit="step", disable=not progress, file=sys.stderr)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        hi = max(1, len(ids) - seq_len + 1)
        starts = torch.randint(0, hi, (batch,), generator=gen).tolist()
        x = torch.stack([ids[s:s + seq_len] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits
            s_logits = student(input_ids=x).logits
        loss = kd_loss(s_logits, t_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train, 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix_str(f"kl {losses[-1]:.4f}")
    student.eval()
    for _, p in named:
        p.requires_grad_(False)
    return {"steps": steps, "lr": lr, "batch": batch, "seq_len": seq_len, "params": params,
            "tokens": steps * batch * seq_len, "kl_first": losses[0] if losses else None,
            "kl_last": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
            "seconds": round(time.time() - t0, 1)}
