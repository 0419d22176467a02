"""One delta backend per platform, chosen once: how deltas are held and applied.

| backend  | deltas live in                         | a layer's step                                  |
|----------|----------------------------------------|-------------------------------------------------|
| triton   | one device arena, the kernels' layout  | deltadq::apply_deltas / embedding_rows (Triton; |
|          | (any artifact layout converted at      | every tensor read is an argument; CUDA-graph    |
|          | host-cache time, slots.to_kernel_layout)| and torch.compile safe)                        |
| cpu      | host expansions per active slot        | deltadq::apply_deltas_cpu / linear_cpu /        |
|          | (cpu.py strategies: dense, merged, ...)| embedding_cpu (host work inside the opaque op)  |

`select_backend` picks one from the serving config and device; every serving layer calls
the backend's methods and never branches on the device type or CPU strategy itself.
The Triton backend also runs on CPU tensors through the Triton interpreter
(TRITON_INTERPRET=1), which is how the GPU path is tested on a machine without a GPU.
"""

from __future__ import annotations

import torch

from .metadata import Routing
from .kernel_layout import stage
from .slots import DeltaSlots


class DeltaBackend:
    """Interface; see TritonBackend and CpuBackend."""

    name = "?"
    kernel_layout = False   # deltas live in a DeltaArena in the kernels' layout

    def make_slots(self, n_slots: int, in_features: int, slice_sizes, *, device, arena=None,
                   base_weight=None, dtype=None, lowrank: bool = False) -> DeltaSlots:
        """lowrank: slots that keep low-rank deltas as factors (LM head, embedding)."""
        raise NotImplementedError

    def host_form(self, enc, lowrank: bool = False):
        """What the host cache keeps of one matrix delta (before any slot load); lowrank:
        for slots made with lowrank=True."""
        return enc

    def bind(self, store):
        """The per-layer state `apply` / `embedding` take (made once, when a layer is
        wrapped, so the traced forward reads only plain attributes)."""
        return store

    def apply(self, y: torch.Tensor, x: torch.Tensor, routing: Routing, bound) -> None:
        """y[t] += x[t] @ D_slot(t)^T in place (bound: bind(slots))."""
        raise NotImplementedError

    def bind_linear(self, slots: DeltaSlots, base_fn):
        """State for `linear` (whole-layer path), or None when the backend adds deltas to
        the base output instead."""
        return None

    def linear(self, x: torch.Tensor, routing: Routing, bound) -> torch.Tensor:
        raise NotImplementedError

    def embedding(self, out: torch.Tensor, ids: torch.Tensor, routing: Routing, bound) -> None:
        """out[t] += delta_slot(t)[ids[t]] for ids inside the delta's rows (bound: bind(store))."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def warmup(self, slots_list, max_tokens: int, dtype: torch.dtype, lookups=()) -> list:
        """Compile every kernel a step can launch, before serving (nothing to do here);
        lookups: embedding slots (their row lookups only)."""
        return []


class TritonBackend(DeltaBackend):
    """kp: decode chunk of kept values (any value is correct; baked into captured graphs).
    straddle: compile the code reader for codes straddling 32-bit words (3/5/6/7 bits);
    True is always correct and is the default, so deltas loaded after graph capture with
    such widths are served right."""

    name = "triton"
    kernel_layout = True

    def __init__(self, kp: int = 8, straddle: bool = True, pin: bool | None = None):
        self.kp = max(1, min(1 << max(0, int(kp) - 1).bit_length(), 32))
        self.straddle = bool(straddle)
        self.pin = pin

    def make_slots(self, n_slots, in_features, slice_sizes, *, device, arena=None,
                   base_weight=None, dtype=None, lowrank: bool = False) -> DeltaSlots:
        return DeltaSlots(n_slots, in_features, slice_sizes, device=device, cpu_strategy=None,
                          arena=arena, any_bits=self.straddle, lowrank=lowrank)

    def host_form(self, enc, lowrank: bool = False):
        pin = self.pin if self.pin is not None else torch.cuda.is_available()
        return stage(enc, pin=pin, lowrank=lowrank)

    def apply(self, y, x, routing, slots) -> None:
        torch.ops.deltadq.apply_deltas(y, x, *routing.meta.tensors(), slots.arena.words,
                                       slots.arena.halves, slots.meta, slots.slice_sizes,
                                       self.kp, self.straddle, -1, -1, slots.lowrank)

    def embedding(self, out, ids, routing, store: DeltaSlots) -> None:
        T = out.shape[0]
        torch.ops.deltadq.embedding_rows(out, ids, routing.slot_ids[:T], store.arena.words,
                                         store.arena.halves, store.meta, self.kp, self.straddle,
                                         store.lowrank)

    def describe(self) -> str:
        return f"triton (kp {self.kp}, straddle {self.straddle})"

    def warmup(self, slots_list, max_tokens: int, dtype: torch.dtype, lookups=()) -> list:
        """Compile, before serving, every (layer shape, token bucket up to max_tokens) launch
        `apply` can make with this backend's fixed kp / straddle (triton_delta.warmup: the
        config table's choices, launched once on an all-empty batch), and the low-rank
        kernels of slots that keep factors (triton_lowrank.warmup_lowrank), so no Triton
        JIT runs inside a step or a CUDA-graph capture."""
        from .triton_delta import warmup
        from .triton_lowrank import warmup_lowrank

        return (warmup(slots_list, max_tokens, dtype=dtype, kps=(self.kp,),
                       straddles=(self.straddle,))
                + warmup_lowrank(list(slots_list) + list(lookups), max_tokens, dtype=dtype))


class CpuBackend(DeltaBackend):
    """The CPU path (kernels/cpu.py) with one load-time expansion strategy."""

    name = "cpu"

    def __init__(self, strategy: str = "merged"):
        from .cpu import STRATEGIES

        if strategy not in STRATEGIES:
            raise ValueError(f"unknown CPU strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        self.strategy = strategy

    def make_slots(self, n_slots, in_features, slice_sizes, *, device, arena=None,
                   base_weight=None, dtype=None, lowrank: bool = False) -> DeltaSlots:
        strategy = self.strategy   # host slots keep any layout and expand it (cpu.py)
        if strategy == "merged" and base_weight is None:
            strategy = "dense"   # no base weight to merge with (quantized base, no checkpoint)
        return DeltaSlots(n_slots, in_features, slice_sizes, device="cpu", cpu_strategy=strategy,
                          cpu_dtype=dtype, base_weight=base_weight)

    def bind(self, store):
        from .cpu import CpuLayer

        return CpuLayer(store)

    def apply(self, y, x, routing, bound) -> None:
        torch.ops.deltadq.apply_deltas_cpu(y, x, *routing.meta.tensors(), routing.info,
                                           bound.key)

    def bind_linear(self, slots, base_fn):
        if slots.cpu_strategy != "merged":
            return None
        from .cpu import CpuLinear

        return CpuLinear(slots, base_fn)

    def linear(self, x, routing, bound) -> torch.Tensor:
        return torch.ops.deltadq.linear_cpu(x, *routing.meta.tensors(), routing.info,
                                            bound.key, bound.slots.out_total)

    def embedding(self, out, ids, routing, bound) -> None:
        torch.ops.deltadq.embedding_cpu(out, ids, *routing.meta.tensors(), routing.info,
                                        bound.key)

    def describe(self) -> str:
        return f"cpu ({self.strategy})"


BACKEND_NAMES = ("auto", "triton", "cpu")


def select_backend(kind: str, device: torch.device | str, cpu_strategy: str | None = "merged",
                   kp: int = 8, straddle: bool = True) -> DeltaBackend:
    """auto: a CUDA device -> triton; a CPU device -> cpu (or triton, the kernels' layout
    through the interpreter, when cpu_strategy is None)."""
    from . import ops  # noqa: F401  (registers the custom ops)

    device = torch.device(device)
    if kind not in BACKEND_NAMES:
        raise ValueError(f"unknown delta backend {kind!r}; known: {', '.join(BACKEND_NAMES)}")
    if kind == "auto":
        kind = "cpu" if device.type == "cpu" and cpu_strategy is not None else "triton"
    if kind == "cpu":
        if device.type != "cpu":
            raise ValueError(f"the cpu delta backend runs on a CPU device, not {device}")
        return CpuBackend(cpu_strategy or "dense")
    return TritonBackend(kp=kp, straddle=straddle)
