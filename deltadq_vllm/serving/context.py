"""Per-step routing shared by every delta layer of a model: which slot each row uses.

Two persistent StepSlots (kernels/metadata.py), refilled in place once per step by the
model manager and read by the layers' forward at fixed addresses:

* `tokens`: one row per scheduled token (vLLM's LoRAMapping.index_mapping); rows past the
  step's tokens (CUDA-graph padding) are slot -1;
* `samples`: one row per LM-head row of the sampler's logits call
  (LoRAMapping.prompt_mapping: one entry per sampled token in vLLM's V1 model runner, one
  per request in the V2 runner of vLLM 0.33; without speculative decoding the sampler's
  logits call has exactly that many rows in both).

The LM head runs outside the captured forward, once per logits call. `locate(x)` (called
by the model's wrapped compute_logits) tells the head which rows it got: a slice of the
step's hidden states (prompt logprobs: vLLM passes hidden_states[a:b], a view) maps to the
token rows [a, b); otherwise the sampler's rows. A call that is neither, in a step where
some active fine-tune changes the LM head, raises DeltaRoutingError: it is never answered
with base logits.
"""

from __future__ import annotations

import contextlib

import torch

from ..kernels.metadata import Routing, StepSlots

DEFAULT_MAX_TOKENS = 8192
DEFAULT_MAX_ROWS = 1024


class DeltaRoutingError(RuntimeError):
    """An LM-head call whose rows cannot be mapped to requests (never served with base logits)."""


class DeltaContext:
    def __init__(self, n_slots: int, device: torch.device, max_tokens: int | None = None,
                 max_rows: int | None = None):
        self.n_slots = n_slots
        self.device = torch.device(device)
        self.tokens = StepSlots(max_tokens or DEFAULT_MAX_TOKENS, n_slots, self.device)
        self.samples = StepSlots(max_rows or DEFAULT_MAX_ROWS, n_slots, self.device)
        self._call: tuple[int, Routing | None] | None = None   # (rows, routing) of a logits call

    # ------------------------------------------------------------------ per step (host)

    def set(self, token_slots, sample_slots) -> None:
        self.tokens.fill(token_slots)
        self.samples.fill(sample_slots)

    @property
    def step_slots(self) -> set[int]:
        """Distinct slots of the step (host copy; never read by the forward)."""
        return self.tokens.active | self.samples.active

    @property
    def active(self) -> bool:
        return bool(self.step_slots)

    # ------------------------------------------------------------------ LM-head calls

    def locate(self, x: torch.Tensor) -> Routing | None:
        """The routing of an LM-head input `x` [n, hidden]: token rows when x is a row slice
        of the step's hidden states, the sampler's rows when it has their count, else None.
        Reads only tensor metadata (strides, offsets): no device access."""
        n = x.shape[0]
        base = x._base
        T = self.tokens.num_tokens
        if (base is not None and x.dim() == 2 and base.dim() == 2 and x.stride(1) == 1
                and base.stride(0) == x.stride(0) and base.shape[1] == x.shape[1]
                and base.shape[0] >= T):
            off = x.storage_offset() - base.storage_offset()
            start = off // base.stride(0)
            if off >= 0 and off % base.stride(0) == 0 and start + n <= T:
                return self.tokens.routing if (start, n) == (0, T) else self.tokens.rows(start, n)
        if n == self.samples.num_tokens:
            return self.samples.routing
        return None

    @contextlib.contextmanager
    def logits_call(self, x: torch.Tensor):
        """Around one compute_logits call: the LM head then serves exactly these rows."""
        self._call = (x.shape[0], self.locate(x))
        try:
            yield
        finally:
            self._call = None

    def head_routing(self, n_rows: int, needed) -> Routing | None:
        """Routing of an LM-head call of n_rows rows; None when no active slot changes the
        head (any routing gives the base output then). `needed()` says whether one does."""
        if self._call is not None and self._call[0] == n_rows:
            routing = self._call[1]
        else:   # a call that did not go through compute_logits: the sampler's rows or nothing
            routing = self.samples.routing if n_rows == self.samples.num_tokens else None
        if routing is None and needed():
            raise DeltaRoutingError(
                f"deltadq: an LM-head call of {n_rows} rows is neither the step's sampled rows "
                f"({self.samples.num_tokens}) nor a slice of its {self.tokens.num_tokens} token "
                "rows, in a step whose fine-tunes change the LM head; refusing to return base "
                "logits for them (this vLLM model runner is not supported)")
        return routing
