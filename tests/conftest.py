"""Test-session setup that must happen before any test module is imported.

TRITON_INTERPRET=1: the Triton tests (test_kernels.py, test_graph_safety.py, ...) run the
real kernels on the CPU through Triton's interpreter, which Triton decides when it is
first imported. Test modules that import vllm (which imports triton) are collected
before them in the suite's order (test_admission.py, ...), so setting the variable in
each Triton test module is too late when the whole suite runs: it is set here, once,
before collection. (This machine has no GPU; on a GPU box run the GPU checks under
benchmarks/gpu/ instead.)
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
