"""Public entry points and the torch custom ops of the delta path.

    meta = build_meta(slot_ids, slots.n_slots, device)      # once per step, all layers
    y = base_linear(x)
    apply_deltas(y, x, meta, slots)                          # y[t] += x[t] @ D_slot(t)^T

The ops are registered the way vLLM registers its kernels
(vllm.utils.torch_utils.direct_register_custom_op: `Library.define` + `impl` per
dispatch key + a fake impl), without importing vllm, so torch.compile and CUDA graphs
see opaque ops with declared mutations:

    deltadq::apply_deltas(y!, x, token_order, seg_slot, seg_start, seg_len,
                          words, halves, slot_meta, slice_sizes, kp, straddle,
                          num_entries, max_seg_len)
        the Triton kernels (CUDA; on CPU tensors the Triton interpreter). Every tensor
        the kernels read is an argument: the step's routing and the layer's arena bytes
        and slot metadata, so graph capture and compilation see the true dependencies.
    deltadq::embedding_rows(out!, ids, slot_ids, words, halves, slot_meta, kp, straddle)
        embedding delta rows decoded on the device (triton_rows.py).
    deltadq::apply_deltas_cpu(y!, x, token_order, seg_slot, seg_start, seg_len, info, layer)
    deltadq::linear_cpu(x, token_order, seg_slot, seg_start, seg_len, info, layer, out) -> y
    deltadq::embedding_cpu(out!, ids, token_order, seg_slot, seg_start, seg_len, info, layer)
        the CPU path (cpu.py). Its per-slot expansions are host objects (oneDNN-prepacked
        weights), found through `layer`, a one-element int64 tensor holding the layer's
        handle (a tensor input, read from the live layer at every call, so compiled graphs
        cached across processes stay right); nothing is captured on a CPU, the op runs every
        step, and its host work (grouping, GEMM calls) stays inside it.
        `info` ([fill counter, rows]) keys a per-step cache of the grouping, so the 100+
        layers of a step share one.

Which ops a server uses is its backend's choice (backends.py), made once.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import torch

from .metadata import DeltaBatchMeta, INFO_FIELDS
from .slots import DeltaSlots

BACKENDS = ("auto", "triton", "cpu")

_LIB = torch.library.Library("deltadq", "FRAGMENT")  # noqa: TOR901 - lives as long as the module


def _infer_schema(fn, mutates_args):
    infer = getattr(torch.library, "infer_schema", None)
    if infer is None:  # torch < 2.5
        from torch._library.infer_schema import infer_schema as infer
    return infer(fn, mutates_args=mutates_args)


def direct_register_custom_op(op_name: str, op_func: Callable, mutates_args: Optional[list] = None,
                              fake_impl: Optional[Callable] = None,
                              target_lib: Optional[torch.library.Library] = None,
                              dispatch_keys: tuple = ("CPU", "CUDA"), tags: tuple = ()) -> None:
    """vLLM's direct_register_custom_op, for several dispatch keys and without vllm."""
    lib = target_lib or _LIB
    schema = _infer_schema(op_func, mutates_args or [])
    lib.define(op_name + schema, tags=tags)
    for key in dispatch_keys:
        lib.impl(op_name, op_func, dispatch_key=key)
    if fake_impl is not None:
        lib._register_fake(op_name, fake_impl)


def _register(name: str, fn: Callable, mutates: list, fake: Callable) -> None:
    if not hasattr(torch.ops.deltadq, name):
        direct_register_custom_op(name, fn, mutates_args=mutates, fake_impl=fake)


# ---------------------------------------------------------------- Triton ops


class KernelSlots:
    """What triton_apply_deltas reads of a DeltaSlots, built from the op's arguments only
    (so the kernels read no tensor the op was not given)."""

    def __init__(self, words: torch.Tensor, halves: torch.Tensor, slot_meta: torch.Tensor,
                 in_features: int, slice_sizes: list[int], kp: int, straddle: bool):
        sizes = [int(s) for s in slice_sizes]
        self.n_slots, self.n_slices = slot_meta.shape[0], slot_meta.shape[1]
        self.in_features = in_features
        self.slice_sizes = sizes
        self.slice_offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.out_total = sum(sizes)
        self.meta = slot_meta
        self.arena = SimpleNamespace(words=words, halves=halves)
        self.max_keep = kp
        self.straddle = self.any_bits = bool(straddle)
        self.version = 0
        # what the launcher reads of the loaded deltas, made static: a (g = 1, k = 1) entry
        # gives the most work units per row, so launch sizes derived from it (decode v4's
        # split) cover any delta loaded later (they only set the parallelism anyway)
        self.params = [[{"group_size": 1, "keep": 1}]]


def _launch_kwargs(fn) -> set:
    import inspect

    got = getattr(fn, "_deltadq_params", None)
    if got is None:
        got = set(inspect.signature(fn).parameters)
        try:
            fn._deltadq_params = got
        except AttributeError:
            pass
    return got


def _triton_launch(fn, *args, **kwargs) -> None:
    """Run a Triton launcher; under the interpreter its host-side emulation is exempt from
    the host-sync checks of tests/graph_utils.py (it is not what runs on a GPU)."""
    from .triton_delta import interpreting

    if interpreting():
        from . import hostsync
        with hostsync.exempt():
            fn(*args, **kwargs)
    else:
        fn(*args, **kwargs)


def _apply_deltas_impl(y: torch.Tensor, x: torch.Tensor, token_order: torch.Tensor,
                       seg_slot: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                       words: torch.Tensor, halves: torch.Tensor, slot_meta: torch.Tensor,
                       slice_sizes: list[int], kp: int, straddle: bool, num_entries: int,
                       max_seg_len: int, lowrank: bool) -> None:
    from .triton_delta import triton_apply_deltas

    view = KernelSlots(words, halves, slot_meta, x.shape[1], slice_sizes, kp, straddle)
    kw = {"kp": kp}
    if "straddle" in _launch_kwargs(triton_apply_deltas):
        kw["straddle"] = bool(straddle)
    _triton_launch(triton_apply_deltas, y, x, token_order, seg_slot, seg_start, seg_len, view,
                   num_entries=None if num_entries < 0 else num_entries,
                   max_seg_len=None if max_seg_len < 0 else max_seg_len, **kw)
    if lowrank:   # slots that may hold low-rank factors: their entries (the above skip them)
        from .triton_lowrank import triton_lowrank_apply
        _triton_launch(triton_lowrank_apply, y, x, token_order, seg_slot, seg_start, seg_len,
                       halves, slot_meta, slice_sizes,
                       num_entries=None if num_entries < 0 else num_entries,
                       max_seg_len=None if max_seg_len < 0 else max_seg_len)


def _apply_deltas_fake(y, x, token_order, seg_slot, seg_start, seg_len, words, halves,
                       slot_meta, slice_sizes, kp, straddle, num_entries, max_seg_len,
                       lowrank) -> None:
    return None


def _embedding_rows_impl(out: torch.Tensor, ids: torch.Tensor, slot_ids: torch.Tensor,
                         words: torch.Tensor, halves: torch.Tensor, slot_meta: torch.Tensor,
                         kp: int, straddle: bool, lowrank: bool) -> None:
    from .triton_rows import triton_embedding_rows

    _triton_launch(triton_embedding_rows, out, ids, slot_ids, words, halves, slot_meta, kp=kp,
                   straddle=straddle)
    if lowrank:
        from .triton_lowrank import triton_lowrank_rows
        _triton_launch(triton_lowrank_rows, out, ids, slot_ids, halves, slot_meta)


def _embedding_rows_fake(out, ids, slot_ids, words, halves, slot_meta, kp, straddle,
                         lowrank) -> None:
    return None


_register("apply_deltas", _apply_deltas_impl, ["y"], _apply_deltas_fake)
_register("embedding_rows", _embedding_rows_impl, ["out"], _embedding_rows_fake)


# ---------------------------------------------------------------- CPU ops


def _apply_deltas_cpu_impl(y: torch.Tensor, x: torch.Tensor, token_order: torch.Tensor,
                           seg_slot: torch.Tensor, seg_start: torch.Tensor,
                           seg_len: torch.Tensor, info: torch.Tensor, layer: torch.Tensor) -> None:
    from . import cpu, hostsync

    with hostsync.exempt():   # host work inside the op is the CPU path's design
        plan = cpu.plan_of(token_order, seg_slot, seg_start, seg_len, info, x.shape[0])
        cpu.cpu_apply_deltas(y, x, plan, cpu.layer_of(layer))


def _apply_deltas_cpu_fake(y, x, token_order, seg_slot, seg_start, seg_len, info, layer) -> None:
    return None


def _linear_cpu_impl(x: torch.Tensor, token_order: torch.Tensor, seg_slot: torch.Tensor,
                     seg_start: torch.Tensor, seg_len: torch.Tensor, info: torch.Tensor,
                     layer: torch.Tensor, out_features: int) -> torch.Tensor:
    from . import cpu, hostsync

    with hostsync.exempt():
        plan = cpu.plan_of(token_order, seg_slot, seg_start, seg_len, info, x.shape[0])
        rec = cpu.layer_of(layer)
        out = cpu.cpu_linear_with_deltas(x, plan, rec.slots, base_gemm=rec.base_fn)
    return out.contiguous()


def _linear_cpu_fake(x, token_order, seg_slot, seg_start, seg_len, info, layer, out_features):
    return x.new_empty(x.shape[0], out_features)


def _embedding_cpu_impl(out: torch.Tensor, ids: torch.Tensor, token_order: torch.Tensor,
                        seg_slot: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                        info: torch.Tensor, layer: torch.Tensor) -> None:
    from . import cpu, hostsync

    with hostsync.exempt():
        plan = cpu.plan_of(token_order, seg_slot, seg_start, seg_len, info, out.shape[0])
        cpu.layer_of(layer).add_to(out, ids, plan)


def _embedding_cpu_fake(out, ids, token_order, seg_slot, seg_start, seg_len, info, layer) -> None:
    return None


_register("apply_deltas_cpu", _apply_deltas_cpu_impl, ["y"], _apply_deltas_cpu_fake)
_register("linear_cpu", _linear_cpu_impl, [], _linear_cpu_fake)
_register("embedding_cpu", _embedding_cpu_impl, ["out"], _embedding_cpu_fake)


def no_info(device) -> torch.Tensor:
    """An `info` tensor that disables the CPU path's per-step grouping cache."""
    return torch.full((INFO_FIELDS,), -1, dtype=torch.int32, device=device)


# ---------------------------------------------------------------- public API


def _compiling() -> bool:
    comp = getattr(torch, "compiler", None)
    return bool(comp is not None and hasattr(comp, "is_compiling") and comp.is_compiling())


def resolve_backend(backend: str, x: torch.Tensor, slots: DeltaSlots) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}")
    if backend == "auto":
        backend = "cpu" if slots.arena is None or x.device.type == "cpu" else "triton"
    if backend == "triton" and slots.arena is None:
        raise ValueError("these slots serve the CPU path only (cpu_strategy set on a CPU "
                         "device); build them with cpu_strategy=None for the kernels")
    return backend


def apply_deltas(y: torch.Tensor, x: torch.Tensor, meta, slots: DeltaSlots,
                 backend: str = "auto", graph_safe: bool = False,
                 info: torch.Tensor | None = None) -> torch.Tensor:
    """y[t, slices] += x[t] @ dequant(delta[slot(t)])^T, in place; returns y.

    y: [T, out_total] (unit column stride; a column slice of a wider tensor is fine),
    x: [T, in_features], same device. meta: DeltaBatchMeta from build_meta (or a
    StepSlots' `meta`), or a 1-D slot-id tensor (-1 = base only; grouped here).
    backend: "auto" (kernel slots on a GPU -> Triton, else the CPU path), "triton", "cpu".
    graph_safe: ignore host-side counts (grid over all S slots), for CUDA-graph capture.
    info: a StepSlots' `info` (keys the CPU path's per-step grouping cache).
    """
    backend = resolve_backend(backend, x, slots)
    if not isinstance(meta, DeltaBatchMeta):
        from .metadata import build_meta
        meta = build_meta(meta, slots.n_slots, device=x.device)
    if x.shape[0] == 0:
        return y
    if backend == "cpu":
        if meta.groups is not None and not _compiling():   # eager, grouping at hand
            from .cpu import cpu_apply_deltas
            cpu_apply_deltas(y, x, meta.cpu_plan or meta.groups, slots)
            return y
        from .cpu import CpuLayer
        torch.ops.deltadq.apply_deltas_cpu(y, x, *meta.tensors(),
                                           info if info is not None else no_info(x.device),
                                           CpuLayer(slots).key)
        return y
    n_ent = -1 if graph_safe or meta.num_active is None else meta.num_active
    mseg = -1 if graph_safe or meta.max_seg_len is None else meta.max_seg_len
    from .triton_delta import KP_MAX
    kp = min(1 << max(0, slots.max_keep - 1).bit_length(), KP_MAX)
    torch.ops.deltadq.apply_deltas(y, x, *meta.tensors(), slots.arena.words, slots.arena.halves,
                                   slots.meta, slots.slice_sizes, kp, bool(slots.straddle),
                                   n_ent, mseg, bool(slots.lowrank))
    return y


def linear_with_deltas(x: torch.Tensor, meta, slots: DeltaSlots,
                       base_weight: Optional[torch.Tensor] = None,
                       base_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The whole layer: x @ (W_base + D_slot(t))^T (no bias).

    On the CPU with slots built with cpu_strategy="merged" each active delta costs one
    GEMM *instead of* the base GEMM for its tokens (the fastest CPU choice, see
    docs/kernels.md); elsewhere it is the base GEMM followed by apply_deltas.
    The base GEMM is `base_fn(x)` when given (e.g. the serving engine's own prepacked
    GEMM; it must not add a bias), else F.linear with `base_weight`, else the slots'
    base_weight (prepacked once on the CPU).
    """
    if not isinstance(meta, DeltaBatchMeta):
        from .metadata import build_meta
        meta = build_meta(meta, slots.n_slots, device=x.device)
    if base_fn is None and base_weight is not None:
        base_fn = lambda xs: torch.nn.functional.linear(xs, base_weight.to(xs.device, xs.dtype))  # noqa: E731
    if x.device.type == "cpu" and meta.groups is not None and not _compiling():
        from .cpu import cpu_linear_with_deltas
        return cpu_linear_with_deltas(x, meta.cpu_plan or meta.groups, slots, base_gemm=base_fn)
    if base_fn is not None:
        y = base_fn(x)
    else:
        y = torch.nn.functional.linear(x, slots.base_weight.to(x.device, x.dtype))
    return apply_deltas(y, x, meta, slots)
