"""One compressed fine-tune served as its own model: the `deltadq` load format.

    vllm serve BASE --load-format deltadq --model-loader-extra-config '{"delta": "/d/math"}'
    deltadq serve BASE --standalone-delta /d/math            (sets the above for you)

The loader streams the base checkpoint as vLLM's default loader does and replaces
each tensor the delta changes by `base + decode(delta)` (exactly `deltadq merge`'s
reconstruction) on its way into vLLM's weight loaders, so the served model is the
rebuilt fine-tune with no per-token delta cost and no merged copy on disk.
"""

from __future__ import annotations

import dataclasses

from .. import vllm_compat
from ..artifact import DeltaArtifact
from ..checkpoint import Checkpoint
from ..errors import DeltaDQError
from ..reconstruct import reconstruct

LOAD_FORMAT = "deltadq"
_done = False


def _loader_cls():
    Default = vllm_compat.default_model_loader_cls()

    class DeltaMergeLoader(Default):
        """DefaultModelLoader whose weights are base + delta."""

        def __init__(self, load_config):
            extra = dict(load_config.model_loader_extra_config or {})
            path = extra.pop("delta", None)
            if not path:
                raise DeltaDQError("--load-format deltadq needs the delta directory",
                                   "pass --model-loader-extra-config '{\"delta\": \"/path\"}'")
            super().__init__(dataclasses.replace(load_config, load_format="safetensors",
                                                 model_loader_extra_config=extra))
            self.delta_path = path

        def get_all_weights(self, model_config, model):
            art = DeltaArtifact(self.delta_path)
            art.check_base(Checkpoint(model_config.model, "served base"))
            seen = set()
            for name, w in super().get_all_weights(model_config, model):
                if name in art.entries:
                    seen.add(name)
                    yield name, reconstruct(art, name, w.cpu()).to(w.device)
                else:
                    yield name, w
            for name, e in art.entries.items():  # tensors the base lacks
                if name not in seen and e.absolute:
                    yield name, reconstruct(art, name, None)

    return DeltaMergeLoader


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    vllm_compat.register_model_loader(LOAD_FORMAT)(_loader_cls())
