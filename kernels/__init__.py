"""Delta-serving kernels: y[t] += x[t] @ dequant(delta[slot(t)])^T from compressed slots.

deltadq_vllm.kernels.slots      DeltaSlots (per-layer slot buffers)
deltadq_vllm.kernels.metadata   build_meta (per-step token grouping)
deltadq_vllm.kernels.ops        apply_deltas / linear_with_deltas (torch custom op)
deltadq_vllm.kernels.triton_delta  the Triton kernels (GPU; TRITON_INTERPRET=1 on a CPU)
deltadq_vllm.kernels.cpu        the CPU path
deltadq_vllm.kernels.reference  the plain reference
See docs/kernels.md.
"""

from .metadata import DeltaBatchMeta, build_meta
from .ops import apply_deltas, linear_with_deltas
from .reference import reference_apply_deltas
from .slots import DeltaSlots

__all__ = ["DeltaSlots", "DeltaBatchMeta", "build_meta", "apply_deltas", "linear_with_deltas",
           "reference_apply_deltas"]
