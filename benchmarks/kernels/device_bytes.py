"""Device bytes per loaded fine-tune vs its bytes on disk (issues #6/#7 memory target).

Loads each artifact the way the GPU server holds it (deltadq_vllm/serving/model_manager.py):
every 2-D hash_groupwise tensor as one segment of a shared DeltaArena (codes as one bit
stream + bf16 scales; kernels/arena.py), a low-rank LM head or embedding as its bf16
factors (and, for comparison, as the 16-bit conversion servers made of it before:
`device_bytes_converted`), other layouts converted, a tied embedding as a view of the LM
head's segment (no second copy), norm/bias deltas as bf16 vectors. The arena here lives in host
memory (no GPU on the machine that made the committed numbers), but its byte layout is the
device one: the count is exact, not an estimate.

    .venv/bin/python benchmarks/kernels/device_bytes.py [ARTIFACT_DIR ...]

With no arguments: the DeltaDQ artifacts of the fidelity benchmark's cache
(~/.cache/deltadq-vllm/bench/deltas/<fine-tune>/deltadq-<ratio>). Writes
benchmarks/results/kernels/device_bytes.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "finetunes"))

from deltadq_vllm.format.artifact import DeltaArtifact  # noqa: E402
from deltadq_vllm.kernels import DeltaSlots  # noqa: E402
from deltadq_vllm.kernels.arena import DeltaArena  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "kernels" / "device_bytes.json"


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def dense_changed_bytes(art: DeltaArtifact) -> int:
    """bf16 bytes of everything the fine-tune changes (the true-ratio numerator)."""
    n = 0
    for e in art.entries.values():
        numel = 1
        for d in e.shape:
            numel *= d
        n += 2 * numel
    return n


def _arena_bytes(art: DeltaArtifact, factors: bool) -> tuple[int, int, int, int]:
    """(segment bytes, units-table bytes, bf16 vector bytes, matrices) of one fine-tune as
    a GPU server holds it: every matrix a segment of one arena (hash codes as they are; a
    low-rank LM head / embedding as its factors when `factors`, else, like every other
    layout, converted to 16-bit codes), norm and bias deltas as bf16 vectors."""
    encs, vectors = {}, 0
    for name, e in art.entries.items():
        if len(e.rows_shape) == 2:
            encs[name] = (art.encoded(name), factors and e.cls in ("embedding", "lm_head"))
        else:
            vectors += 2 * int(torch.tensor(e.shape).prod())   # bf16 VectorSlots row
    need = (1 << 20) + sum(
        (enc.nbytes() if enc.layout == "hash_groupwise" or lowrank
         else 2 * enc.shape[0] * enc.shape[1] + 8 * enc.shape[0]) + 1024
        for enc, lowrank in encs.values())
    arena = DeltaArena(need)
    for enc, lowrank in encs.values():
        out, inp = enc.shape
        DeltaSlots(1, inp, [out], cpu_strategy=None, arena=arena, lowrank=lowrank).load(0, [enc])
    return arena.used_bytes - arena.units_bytes(), arena.units_bytes(), vectors, len(encs)


def measure(path: Path) -> dict:
    art = DeltaArtifact(path)
    segments, units, vectors, n = _arena_bytes(art, factors=True)
    layouts = sorted({art.entries[k].layout for k in art.entries
                      if len(art.entries[k].rows_shape) == 2})
    disk = du_bytes(path)
    dense = dense_changed_bytes(art)
    device = segments + vectors
    row = {"path": str(path), "method": art.method, "true_ratio": round(dense / disk, 1),
           "layouts": layouts, "disk_bytes": disk, "arena_segment_bytes": segments,
           "vector_bytes": vectors, "device_bytes": device,
           "device_over_disk": round(device / disk, 4), "shared_units_table_bytes": units,
           "tensors": n}
    if "lowrank" in layouts:   # what the server held before factor segments (16-bit codes)
        conv = _arena_bytes(art, factors=False)
        row["device_bytes_converted"] = conv[0] + conv[2]
    return row


def default_artifacts() -> list[Path]:
    import build as FT  # benchmarks/finetunes/build.py: cache root

    root = FT.cache_root() / "deltas"
    found = [p for p in root.glob("*/deltadq-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: (p.parent.name, float(p.name.split("-")[1])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON (default {OUT.name})")
    args = ap.parse_args()
    paths = args.artifacts or default_artifacts()
    if not paths:
        sys.exit("no artifacts given and none cached: run benchmarks/fidelity/run.py first")
    rows = [measure(p) for p in paths]
    print(f"{'artifact':44s} {'true x':>8s} {'disk KB':>9s} {'device KB':>10s} {'dev/disk':>9s} "
          f"{'units KB (shared)':>18s} {'converted KB':>13s}")
    for r in rows:
        name = "/".join(Path(r["path"]).parts[-2:])
        if "error" in r:
            print(f"{name:44s} {r['error']}")
            continue
        print(f"{name:44s} {r['true_ratio']:8.1f} {r['disk_bytes'] / 1e3:9.1f} "
              f"{r['device_bytes'] / 1e3:10.1f} {r['device_over_disk']:9.3f} "
              f"{r['shared_units_table_bytes'] / 1e3:18.1f} "
              f"{r.get('device_bytes_converted', float('nan')) / 1e3:13.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "note": __doc__.split("\n\n")[1]}, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
