"""deltadq-vllm: compress fine-tune deltas with DeltaDQ and serve many of them on one base in vLLM."""

__version__ = "0.1.0"
