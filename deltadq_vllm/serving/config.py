"""The typed serving config of a worker: `additional_config["deltadq"]` as a dataclass.

engine_flags.translate writes the dict (it travels to every worker inside vLLM's config);
workers read it once through `DeltaConfig.from_settings`, and the delta backend is
chosen from it once (kernels/backends.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass(frozen=True)
class DeltaConfig:
    backend: str = "auto"                 # auto | triton | cpu (kernels/backends.py)
    cpu_strategy: str | None = "merged"   # CPU backend: how an active delta is held
    min_ratio: float = 8.0                # default arena when no deltas are known at start
    arena_mb: float | None = None         # --delta-arena-mb: the arena's size, fixed
    arena_reserve_mb: float = 0.0         # --delta-arena-reserve-mb: room beyond the deltas given
    delta_paths: tuple[str, ...] = ()     # --delta-modules paths (default arena size, kp)
    base_vocab: int | None = None
    vocab_size: int | None = None
    check_base: bool = True
    verify_files: bool = True
    kernel_kp: int | None = None          # Triton decode chunk (default: from the deltas given)
    straddle: bool = True                 # Triton: read codes that straddle 32-bit words
    max_tokens: int | None = None         # rows of the per-step metadata (default: vLLM's)
    max_rows: int | None = None           # sampled rows per step (default: vLLM's)
    extra: dict = field(default_factory=dict)   # keys this version does not know

    @classmethod
    def from_settings(cls, settings: dict | None) -> "DeltaConfig":
        settings = dict(settings or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: settings.pop(k) for k in list(settings) if k in known}
        if "delta_paths" in kw:
            kw["delta_paths"] = tuple(kw["delta_paths"] or ())
        for k in ("arena_reserve_mb",):
            if kw.get(k) is None:
                kw.pop(k, None)
        return cls(**kw, extra=settings)

    def select_backend(self, device: torch.device | str):
        from ..kernels.backends import select_backend

        return select_backend(self.backend, device, self.cpu_strategy,
                              kp=self.kernel_kp or 8, straddle=self.straddle)
