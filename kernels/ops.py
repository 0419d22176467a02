"""Public entry point: apply the resident deltas of one layer to a batch, as a torch custom op.

    meta = build_meta(slot_ids, slots.n_slots, device)      # once per step, all layers
    y = base_linear(x)
    apply_deltas(y, x, meta, slots)                          # y[t] += x[t] @ D_slot(t)^T

`torch.ops.deltadq.apply_deltas` is registered the way vLLM registers its kernels
(vllm.utils.torch_utils.direct_register_custom_op: `Library.define` + `impl` per
dispatch key + a fake impl), so torch.compile and CUDA graphs see one opaque op
that mutates y. vllm is not imported. CUDA tensors go to the Triton kernel; CPU
tensors to the CPU path (cpu.py), or to the Triton kernel with backend="triton"
(the interpreter, for tests).
"""

import weakref
from typing import Callable, Optional

import torch

from .cpu import cpu_apply_deltas, cpu_linear_with_deltas
from .metadata import DeltaBatchMeta, groups_from_tensors
from .slots import DeltaSlots

BACKENDS = ("auto", "triton", "cpu")

_LIB = torch.library.Library("deltadq", "FRAGMENT")  # noqa: TOR901 - lives as long as the module
_SLOTS: "weakref.WeakValueDictionary[int, DeltaSlots]" = weakref.WeakValueDictionary()
_NEXT = [1]


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


def slots_handle(slots: DeltaSlots) -> int:
    """Integer id of a DeltaSlots for the custom op (which takes tensors and scalars only)."""
    h = getattr(slots, "_op_handle", None)
    if h is None:
        h = _NEXT[0]
        _NEXT[0] += 1
        slots._op_handle = h
        _SLOTS[h] = slots
    return h


def _apply_deltas_impl(y: torch.Tensor, x: torch.Tensor, token_order: torch.Tensor,
                       seg_slot: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                       slots_handle: int, num_entries: int, max_seg_len: int,
                       backend: str) -> None:
    slots = _SLOTS[slots_handle]
    if backend == "triton" or (backend == "auto" and x.device.type != "cpu"):
        from .triton_delta import triton_apply_deltas
        triton_apply_deltas(y, x, token_order, seg_slot, seg_start, seg_len, slots,
                            num_entries=None if num_entries < 0 else num_entries,
                            max_seg_len=None if max_seg_len < 0 else max_seg_len)
    else:
        cpu_apply_deltas(y, x, groups_from_tensors(token_order, seg_slot, seg_start, seg_len), slots)


def _apply_deltas_fake(y: torch.Tensor, x: torch.Tensor, token_order: torch.Tensor,
                       seg_slot: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                       slots_handle: int, num_entries: int, max_seg_len: int,
                       backend: str) -> None:
    return None


if not hasattr(torch.ops.deltadq, "apply_deltas"):
    direct_register_custom_op("apply_deltas", _apply_deltas_impl, mutates_args=["y"],
                              fake_impl=_apply_deltas_fake)


def _compiling() -> bool:
    comp = getattr(torch, "compiler", None)
    return bool(comp is not None and hasattr(comp, "is_compiling") and comp.is_compiling())


def apply_deltas(y: torch.Tensor, x: torch.Tensor, meta, slots: DeltaSlots,
                 backend: str = "auto", graph_safe: bool = False) -> torch.Tensor:
    """y[t, slices] += x[t] @ dequant(delta[slot(t)])^T, in place; returns y.

    y: [T, out_total] (unit column stride; a column slice of a wider tensor is fine),
    x: [T, in_features], same device. meta: DeltaBatchMeta from build_meta, or a
    1-D slot-id tensor (-1 = base only; grouped here, which costs a little per call).
    backend: "auto" (CUDA -> Triton, CPU -> CPU path), "triton", "cpu".
    graph_safe: ignore host-side counts (grid over all S slots), for CUDA-graph capture.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}")
    if not isinstance(meta, DeltaBatchMeta):
        from .metadata import build_meta
        meta = build_meta(meta, slots.n_slots, device=x.device)
    if x.shape[0] == 0:
        return y
    cpu = backend == "cpu" or (backend == "auto" and x.device.type == "cpu")
    if cpu and meta.groups is not None and not _compiling():
        cpu_apply_deltas(y, x, meta.cpu_plan or meta.groups, slots)  # eager: no dispatcher
        return y
    n_ent = -1 if graph_safe or meta.num_active is None else meta.num_active
    mseg = -1 if graph_safe or meta.max_seg_len is None else meta.max_seg_len
    torch.ops.deltadq.apply_deltas(y, x, *meta.tensors(), slots_handle(slots), n_ent, mseg, backend)
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
        return cpu_linear_with_deltas(x, meta.cpu_plan or meta.groups, slots, base_gemm=base_fn)
    if base_fn is not None:
        y = base_fn(x)
    else:
        y = torch.nn.functional.linear(x, slots.base_weight.to(x.device, x.dtype))
    return apply_deltas(y, x, meta, slots)
