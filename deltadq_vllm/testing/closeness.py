"""How close a model is to a fine-tune on held-out text, in transformers: next-token
log-probs per text, then mean KL(fine-tune || model) per token and top-1 agreement. Shared
by the never-worse-than-the-base test and benchmarks/fidelity/small_pairs.py."""

from __future__ import annotations

import torch


@torch.no_grad()
def next_token_logprobs(model, tok, texts) -> list[torch.Tensor]:
    """[len(ids) - 1, vocab] log-probs of every next token, one tensor per text."""
    out = []
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        out.append(torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1))
    return out


def closeness(ref, got) -> dict:
    """{"kl": mean KL(ref || got) per token, "top1_agreement": share of equal argmaxes}."""
    agree = total = 0
    kl = 0.0
    for r, g in zip(ref, got):
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        total += r.shape[0]
        kl += float((r.exp() * (r - g)).sum())
    return {"top1_agreement": agree / total, "kl": kl / total}
