"""`deltadq merge`: base + delta -> a complete HF checkpoint of the reconstructed fine-tune.

This is the ground truth the server must reproduce. Tensors are streamed one at a
time into shards of at most `shard_bytes`, and the directory is published atomically.
"""

from __future__ import annotations

import json
import shutil
import sys

from safetensors.torch import save_file
from tqdm import tqdm

from deltadq_vllm.format.artifact import DeltaArtifact
from deltadq_vllm.atomic import AtomicDir
from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.format.reconstruct import reconstruct

DEFAULT_SHARD_BYTES = 2 * 1024**3


def merge(base_dir, delta_dir, out_dir, force: bool = False, progress: bool = True,
          shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    base = Checkpoint(base_dir, "base")
    art = DeltaArtifact(delta_dir)
    art.check_base(base)
    names = list(base.names()) + [n for n in art.entries if n not in base.tensors]
    with AtomicDir(out_dir, force) as out:
        shards, pending, pending_bytes, weight_map = [], {}, 0, {}

        def flush():
            nonlocal pending, pending_bytes
            if pending:
                fname = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(pending, str(out.path / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in pending})
                shards.append(fname)
                pending, pending_bytes = {}, 0

        total = 0
        for name in tqdm(names, desc="merge", unit="tensor", disable=not progress,
                         file=sys.stderr):
            w_base = base.get(name) if name in base.tensors else None
            w = reconstruct(art, name, w_base) if name in art.entries else w_base
            pending[name] = w.contiguous()
            pending_bytes += w.numel() * w.element_size()
            total += w.numel() * w.element_size()
            if pending_bytes >= shard_bytes:
                flush()
        flush()
        _finalize_names(out.path, shards, weight_map, total)
        ft = art.manifest["finetune"]
        (out.path / "config.json").write_text(json.dumps(ft["config"], indent=2))
        gen = ft.get("generation_config")
        if gen is not None:
            (out.path / "generation_config.json").write_text(json.dumps(gen, indent=2))
        elif (base.path / "generation_config.json").exists():
            shutil.copy(base.path / "generation_config.json", out.path)
        # the fine-tune's own tokenizer files, rebuilt exactly (or the base's)
        for name, data in art.tokenizer_files(base.path).items():
            (out.path / name).write_bytes(data)
        path = out.commit()
    return {"out": str(path), "tensors": len(names), "bytes": total, "shards": len(shards)}


def _finalize_names(dirpath, shards, weight_map, total):
    """HF naming: one file is model.safetensors; several get -0000i-of-0000n and an index."""
    if len(shards) == 1:
        (dirpath / shards[0]).rename(dirpath / "model.safetensors")
        return
    n = len(shards)
    renamed = {s: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(shards)}
    for old, new in renamed.items():
        (dirpath / old).rename(dirpath / new)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (dirpath / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
