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


@torch.no_grad()
def stream_logprobs(model, tok, texts, seq_len: int = 64) -> list[torch.Tensor]:
    """Like next_token_logprobs, but the texts read as one stream (joined by newlines, cut
    into sequences of `seq_len` tokens), as the compressor's whole-model check reads its
    text: every token has the text before it as context."""
    ids = tok("\n".join(texts), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len * seq_len
    if n == 0:
        raise ValueError(f"the texts are shorter than one sequence of {seq_len} tokens")
    seqs = torch.tensor(ids[:n]).view(-1, seq_len)
    return list(torch.log_softmax(model(input_ids=seqs).logits[:, :-1].float(), -1))


def closeness(ref, got) -> dict:
    """{"kl": mean KL(ref || got) per token, "top1_agreement": share of equal argmaxes}."""
    agree = total = 0
    kl = 0.0
    for r, g in zip(ref, got):
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        total += r.shape[0]
        kl += float((r.exp() * (r - g)).sum())
    return {"top1_agreement": agree / total, "kl": kl / total}


def top1_noise(ref, got, base) -> float:
    """Two standard errors of the paired per-token difference in top-1 agreement with `ref`
    between `got` and `base` (lists of log-probs as next_token_logprobs gives): the margin
    within which the compressor's own check (tools/model_check.py, Closeness.top1_noise)
    counts two agreements as a tie rather than a verdict; the check's own formula."""
    from deltadq_vllm.tools.model_check import two_standard_errors

    def agree(lps):
        return torch.cat([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, lps)])
    return two_standard_errors(agree(got), agree(base), torch.float32)
