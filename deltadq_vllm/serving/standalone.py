"""The `deltadq` load format: vLLM's default loader with the base's tensors rewritten
on their way into vLLM's weight loaders. Two uses:

* one compressed fine-tune served as its own model:

      vllm serve BASE --load-format deltadq --model-loader-extra-config '{"delta": "/d/math"}'
      deltadq serve BASE --standalone-delta /d/math            (sets the above for you)

  each tensor the delta changes becomes `base + decode(delta)` (exactly `deltadq
  merge`'s reconstruction): the rebuilt fine-tune, with no per-token delta cost and no
  merged copy on disk;
* `{"pad_vocab": N}` (set by the delta flags when fine-tunes add tokens): the base's
  embedding and LM head get zero rows up to a vocabulary of N.
"""

from __future__ import annotations

import dataclasses

from .. import vllm_compat
from ..format.artifact import DeltaArtifact
from ..checkpoint import Checkpoint
from ..errors import DeltaDQError
from ..format.reconstruct import reconstruct

LOAD_FORMAT = "deltadq"
_done = False


def _loader_cls():
    Default = vllm_compat.default_model_loader_cls()

    class DeltaMergeLoader(Default):
        """DefaultModelLoader whose weights are base + delta."""

        def __init__(self, load_config):
            extra = dict(load_config.model_loader_extra_config or {})
            path = extra.pop("delta", None)
            self.pad_vocab = int(extra.pop("pad_vocab", 0) or 0)
            if not path and not self.pad_vocab:
                raise DeltaDQError("--load-format deltadq needs the delta directory",
                                   "pass --model-loader-extra-config '{\"delta\": \"/path\"}'")
            super().__init__(dataclasses.replace(load_config, load_format="safetensors",
                                                 model_loader_extra_config=extra))
            self.delta_path = path

        def get_all_weights(self, model_config, model):
            weights = super().get_all_weights(model_config, model)
            if self.delta_path:
                weights = _merged(weights, self.delta_path, model_config.model)
            if self.pad_vocab:
                weights = _padded(weights, self.pad_vocab)
            yield from weights

    return DeltaMergeLoader


def _merged(weights, delta_path: str, base_dir: str):
    art = DeltaArtifact(delta_path)
    art.check_base(Checkpoint(base_dir, "served base"))
    seen = set()
    for name, w in weights:
        if name in art.entries:
            seen.add(name)
            yield name, reconstruct(art, name, w.cpu()).to(w.device)
        else:
            yield name, w
    for name, e in art.entries.items():  # tensors the base lacks
        if name not in seen and e.absolute:
            yield name, reconstruct(art, name, None)


VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "output.weight")


def _padded(weights, vocab: int):
    """Zero rows appended to the embedding / LM head up to `vocab` rows."""
    import torch

    for name, w in weights:
        if name.endswith(VOCAB_TENSORS) and w.dim() == 2 and w.shape[0] < vocab:
            pad = torch.zeros(vocab - w.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
            w = torch.cat([w, pad], 0)
        yield name, w


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    vllm_compat.register_model_loader(LOAD_FORMAT)(_loader_cls())
