"""Delta-serving kernels: y[t] += x[t] @ dequant(delta[slot(t)])^T from compressed slots.

deltadq_vllm.kernels.slots      DeltaSlots (per-layer slot buffers)
deltadq_vllm.kernels.arena      DeltaArena (one device buffer for every resident delta)
deltadq_vllm.kernels.kernel_layout  any layout -> the kernels' layout; pinned arena images
deltadq_vllm.kernels.staging    DeviceStager (slot writes: pinned, side stream)
deltadq_vllm.kernels.metadata   build_meta, StepSlots (per-step token grouping, persistent)
deltadq_vllm.kernels.ops        apply_deltas / linear_with_deltas, the torch custom ops
deltadq_vllm.kernels.backends   DeltaBackend: triton (GPU) / cpu, chosen once
deltadq_vllm.kernels.triton_delta  the Triton kernels (GPU; TRITON_INTERPRET=1 on a CPU)
deltadq_vllm.kernels.triton_rows   embedding rows decoded on the device (Triton)
deltadq_vllm.kernels.cpu        the CPU path
deltadq_vllm.kernels.hostsync   a guard failing on host syncs during a forward (tests)
deltadq_vllm.kernels.reference  the plain reference
See docs/kernels.md.
"""

if __name__ == "kernels":
    # Imported under a top-level name: the repository root is on sys.path (a server started
    # from the checkout) and transformers probes for the Hugging Face `kernels` package by
    # importing that name. A second copy would register the custom ops with its own layer
    # registry, which the serving code (deltadq_vllm.kernels) never fills: hand out the one
    # real package instead.
    import importlib as _importlib
    import sys as _sys

    _sys.modules[__name__] = _importlib.import_module("deltadq_vllm.kernels")
else:
    from .metadata import DeltaBatchMeta, build_meta
    from .ops import apply_deltas, linear_with_deltas
    from .reference import reference_apply_deltas
    from .slots import DeltaSlots

__all__ = ["DeltaSlots", "DeltaBatchMeta", "build_meta", "apply_deltas", "linear_with_deltas",
           "reference_apply_deltas"]
