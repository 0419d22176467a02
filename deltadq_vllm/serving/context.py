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
import logging

import torch

from ..kernels.metadata import Routing, StepSlots

log = logging.getLogger("deltadq")

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
        self._last_miss = ""
        self.anchor: tuple[int, int, int] | None = None

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

    def note_hidden_states(self, h) -> None:
        """Where the step's hidden states live (storage, element offset of row 0, row
        stride): recorded by the model's wrapped forward, the anchor `locate` measures row
        offsets from. (A replayed CUDA graph does not run it; its output buffer is static.)"""
        if torch.compiler.is_compiling():   # a model whose top-level forward is compiled:
            return                          # no anchor, row offsets from the storage start
        if isinstance(h, torch.Tensor) and h.dim() == 2:
            self.anchor = (h.untyped_storage().data_ptr(), h.storage_offset(), h.stride(0))

    def locate(self, x: torch.Tensor) -> Routing | None:
        """The routing of an LM-head input `x` [n, hidden]: the sampler's rows (a fresh
        gather of the step's hidden states: vLLM's hidden_states[logits_indices]), or token
        rows [a, a + n) when x is a row slice of the step's hidden states (prompt logprobs:
        hidden_states[a:a + n]). Tensor views made under inference mode carry no `_base`,
        so a slice is recognised by its storage: the recorded hidden states' storage, or one
        holding at least the step's token rows. Reads only metadata: no device access."""
        n = x.shape[0]
        T = self.tokens.num_tokens
        fresh = x.storage_offset() == 0 and x.untyped_storage().nbytes() == x.numel() * x.element_size()
        if n == self.samples.num_tokens and fresh and (n != T or self.anchor is None
                                                      or not self._on_anchor(x)):
            return self.samples.routing
        start = self._row_offset(x)
        if start is not None and start + n <= T:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("deltadq: LM-head call on token rows [%d, %d) of %d; step slots %s",
                          start, start + n, T, sorted(self.tokens.active))
            return self.tokens.routing if (start, n) == (0, T) else self.tokens.rows(start, n)
        if n == self.samples.num_tokens:
            return self.samples.routing
        self._last_miss = self._describe(x)
        return None

    def _on_anchor(self, x: torch.Tensor) -> bool:
        return self.anchor is not None and self.anchor[0] == x.untyped_storage().data_ptr()

    def _row_offset(self, x: torch.Tensor) -> int | None:
        """Row of the step's hidden states where x starts, when x is a row slice of them."""
        if x.dim() != 2 or x.stride(1) != 1 or x.stride(0) < x.shape[1]:
            return None
        row = x.stride(0)
        if self._on_anchor(x) and self.anchor[2] == row:
            off = x.storage_offset() - self.anchor[1]
        elif x.untyped_storage().nbytes() // x.element_size() >= self.tokens.num_tokens * row:
            off = x.storage_offset()   # a buffer of >= T rows: row 0 at its start
        else:
            return None
        if off < 0 or off % row:
            return None
        return off // row

    @staticmethod
    def _describe(x: torch.Tensor) -> str:
        return (f"x {tuple(x.shape)} strides {x.stride()} offset {x.storage_offset()} of a "
                f"storage of {x.untyped_storage().nbytes()} bytes")

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
                f"logits for them (this vLLM model runner is not supported; {self._last_miss})")
        return routing
