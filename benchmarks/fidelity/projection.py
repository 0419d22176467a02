"""How much of the true delta a compressed artifact keeps: per matrix, the projection of
the stored delta on the true one, <stored, true> / |true|^2 (weight space; 1 for unbiased
rescaled dropout, ~0 for a delta shrunk away), and its median over the matrices.

    .venv/bin/python benchmarks/fidelity/projection.py BASE FINETUNE ARTIFACT [ARTIFACT...]

(issue #13: the value choice by calibration error shrank arith-light's deltas to a median
of 0.065 at 1024x; see benchmarks/README.md.)"""

from __future__ import annotations

import statistics
import sys

from deltadq_vllm.format.artifact import DeltaArtifact
from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.format.layouts import decode


def projections(base: Checkpoint, ft: Checkpoint, artifact: str) -> dict[str, float]:
    art = DeltaArtifact(artifact)
    out = {}
    for name, e in art.entries.items():
        if e.absolute or e.base_shape is None or len(e.base_shape) != 2:
            continue
        true = ft.get(name)[: e.base_shape[0]].float() - base.get(name).float()
        stored = decode(art.encoded(name)).reshape(true.shape).float()
        out[name] = float((stored * true).sum() / true.square().sum().clamp_min(1e-30))
    return out


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    base, ft = Checkpoint(argv[0], "base"), Checkpoint(argv[1], "fine-tune")
    for path in argv[2:]:
        p = projections(base, ft, path)
        print(f"{path}: {len(p)} matrices, median projection "
              f"{statistics.median(p.values()):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
