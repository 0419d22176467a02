"""The model architectures deltas are served on, and the check that refuses the others.

A delta is added inside vLLM's own layers (serving/targets.py maps checkpoint tensors onto
them), so an architecture is served only after tests/test_arch_matrix.py showed, on a
trained base and fine-tunes of it, that the served fine-tune equals plain vLLM serving the
fine-tune's own folder. Anything else is refused before an engine starts, by name:
serving it could be silently wrong (an unusual norm, a fused tensor, a layer the targets
do not know). A fine-tune of an unlisted architecture can still be served merged
(`deltadq merge`, or `deltadq serve --standalone-delta`, which merges at load).
"""

from __future__ import annotations

import json
import os

from .errors import DeltaDQError

# HF `architectures` name -> what the matrix row checks beyond the Llama layout
SUPPORTED = {
    "LlamaForCausalLM": "GQA and MHA, tied and untied LM head",
    "MistralForCausalLM": "Llama layout, sliding-window config",
    "Qwen2ForCausalLM": "q/k/v biases",
    "Qwen3ForCausalLM": "per-head q/k RMSNorm",
    "Phi3ForCausalLM": "fused qkv_proj and gate_up_proj checkpoint tensors",
    "Gemma2ForCausalLM": "1 + w norms, scaled embeddings, soft-capping",
    "Olmo2ForCausalLM": "post-norms, q/k RMSNorm over the projection (Transformers backend)",
}


def check_architecture(architectures, what: str = "the base model") -> None:
    """Raise DeltaDQError unless every name in `architectures` is supported."""
    names = list(architectures or [])
    bad = [a for a in names if a not in SUPPORTED] or ([] if names else ["(none given)"])
    if bad:
        raise DeltaDQError(
            f"{what} is a {', '.join(bad)}: deltadq does not serve deltas on this "
            f"architecture (supported: {', '.join(SUPPORTED)})",
            "serve the fine-tune merged instead (`deltadq merge`, then plain vLLM, or "
            "`deltadq serve BASE --standalone-delta DELTA`), or open an issue for the "
            "architecture")


def check_model_dir(path: str) -> None:
    """check_architecture for a local model folder; a hub name or a folder without
    config.json is left to the worker's check, which sees vLLM's resolved config."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return
    try:
        with open(cfg) as f:
            archs = json.load(f).get("architectures")
    except (OSError, ValueError):
        return  # the engine reports an unreadable config itself
    check_architecture(archs, f"the base model {path}")
