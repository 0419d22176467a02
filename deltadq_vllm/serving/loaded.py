"""A delta artifact read into host memory for one tensor-parallel rank of one model.

`load_delta` reads the artifact once into memory through ArtifactFiles (resolved
path, no symlinks, every checksum, and the manifest digest the API process checked),
validates it against the served base (architecture and content hash), maps every stored tensor onto a target of the model
(targets.py) and keeps, per target, exactly the part this rank serves:

* `hash_groupwise` matrices stay compressed: a tensor-parallel slice is a slice of
  the packed codes (layouts.slice_hash_groupwise), positions stay regenerable.
* low-rank matrices stay factors (a slice is U's rows, V's columns);
* other layouts (baselines: DARE, magnitude, dense) are kept as they are when this rank
  holds the whole matrix, else decoded once into dense float32 slices; the kernel slots
  convert what they cannot read (kernels/kernel_layout.py).
* norms and biases are small dense float32 vectors.

Nothing a delta changes is ever dropped: a tensor with no target is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..format.artifact import DeltaArtifact
from ..checkpoint import Checkpoint
from ..errors import DeltaDQError
from ..format.layouts import (EncodedTensor, decode, encode_dense, encode_lowrank,
                              slice_hash_groupwise)
from .targets import ModelTargets


@dataclass
class LoadedDelta:
    """Host-resident, rank-sliced deltas of one fine-tune."""

    name: str
    path: str
    linears: dict[str, list[EncodedTensor | None]] = field(default_factory=dict)
    biases: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    embedding: EncodedTensor | None = None
    embedding_extra: torch.Tensor | None = None   # rows of an extended vocabulary
    lm_head: EncodedTensor | None = None
    lm_head_extra: torch.Tensor | None = None
    vocab_size: int | None = None

    def nbytes(self) -> int:
        n = 0
        for encs in self.linears.values():
            n += sum(e.nbytes() for e in encs if e is not None)
        for vs in self.biases.values():
            n += sum(v.numel() * v.element_size() for v in vs if v is not None)
        n += sum(v.numel() * v.element_size() for v in self.norms.values())
        # tied embeddings: the LM head is the embedding's own encoding, counted once
        head = None if self.lm_head is self.embedding else self.lm_head
        for e in (self.embedding, head):
            n += e.nbytes() if e is not None else 0
        for t in (self.embedding_extra, self.lm_head_extra):
            n += t.numel() * t.element_size() if t is not None else 0
        return n

    @property
    def empty(self) -> bool:
        return not (self.linears or self.biases or self.norms or self.embedding is not None
                    or self.lm_head is not None)


def empty_delta(name: str) -> LoadedDelta:
    """A delta that changes nothing (warm-up and memory profiling)."""
    return LoadedDelta(name=name, path="")


def _slice_matrix(name: str, enc: EncodedTensor, rows, cols) -> EncodedTensor:
    """This rank's part of one stored matrix. The whole matrix is `enc` itself (a tied
    embedding and LM head stay one object: the GPU server reads one copy for both);
    hash_groupwise and low-rank slices stay compressed, other layouts become dense."""
    out, inp = enc.shape
    full_rows = rows is None or tuple(rows) == (0, out)
    full_cols = cols is None or tuple(cols) == (0, inp)
    if full_rows and full_cols:
        return enc
    if enc.layout == "lowrank":   # U's rows, V's columns
        u, v = enc.tensors["u"], enc.tensors["v"]
        if not full_rows:
            u = u[rows[0]:rows[1]]
        if not full_cols:
            v = v[:, cols[0]:cols[1]]
        return encode_lowrank(u.contiguous(), v.contiguous(), u.dtype)
    if enc.layout == "hash_groupwise":
        g = enc.params["group_size"]
        if cols is not None and (cols[0] % g or cols[1] % g):
            raise DeltaDQError(
                f"{name}: its group size {g} does not split at the tensor-parallel column "
                f"boundary {cols}", "re-compress the fine-tune with a group size that divides "
                "in_features / tensor_parallel_size (--group-size), or serve with a smaller "
                "--tensor-parallel-size")
        return slice_hash_groupwise(enc, rows if not full_rows else None,
                                    cols if not full_cols else None)
    dense = decode(enc).float()
    if not full_rows:
        dense = dense[rows[0]:rows[1]]
    if not full_cols:
        dense = dense[:, cols[0]:cols[1]]
    return encode_dense(dense.contiguous(), torch.float32)


def _vector(art: DeltaArtifact, name: str) -> torch.Tensor:
    return decode(art.encoded(name)).reshape(-1).float()


def check_against_base(art: DeltaArtifact, base_dir: str) -> None:
    """Refuse a delta made for another base (clear DeltaDQError)."""
    try:
        base = Checkpoint(base_dir, "served base")
    except DeltaDQError as e:
        raise DeltaDQError(f"cannot check delta {art.path} against the served model: {e.problem}",
                           "serve a local model directory (config.json + *.safetensors)") from None
    art.check_base(base)


def load_delta(name: str, path: str, targets: ModelTargets, base_dir: str | None,
               verify_files: bool = True, expect_digest: str | None = None) -> LoadedDelta:
    """`path`: the resolved directory stored at the first load; `expect_digest`: the
    manifest digest checked then (None only for a first, standalone read)."""
    art = DeltaArtifact(path, verify_files=verify_files, expect_digest=expect_digest,
                        in_memory=True, resolved=expect_digest is not None)
    if base_dir is not None:
        check_against_base(art, base_dir)
    out = LoadedDelta(name=name, path=str(path))
    out.vocab_size = art.manifest["finetune"]["config"].get("vocab_size")
    rename = targets.rename or (lambda n: n)
    for hf_name, entry in art.entries.items():
        key = rename(hf_name)
        if entry.absolute:
            raise DeltaDQError(f"delta {path} adds tensor {hf_name}, which the base lacks; "
                               "deltas can only change existing tensors when served",
                               "merge it into a full checkpoint instead (`deltadq merge`)")
        hits = targets.by_hf_name.get(key)
        if not hits:
            raise DeltaDQError(
                f"delta {path} changes {hf_name}, which this model's delta layers cannot "
                f"apply (served targets: {targets.describe()})",
                "serve the merged checkpoint (`deltadq merge`) or report the architecture")
        for kind, tname, i in hits:
            _place(out, art, hf_name, key, kind, tname, i, targets)
    return out


def _place(out: LoadedDelta, art: DeltaArtifact, hf_name: str, key: str, kind: str,
           tname: str, i: int, targets: ModelTargets) -> None:
    """Put this rank's part of one stored tensor where target `tname` (slice i) reads it."""
    if kind == "linear":
        t = targets.linears[tname]
        s = t.slices[i]
        enc = _slice_matrix(hf_name, art.encoded(hf_name), s.rows, t.cols)
        out.linears.setdefault(tname, [None] * len(t.slices))[i] = enc
    elif kind == "bias":
        t = targets.linears[tname]
        s = t.slices[i]
        out.biases.setdefault(tname, [None] * len(t.slices))[i] = \
            _vector(art, hf_name)[s.bias_rows[0]:s.bias_rows[1]].contiguous()
    elif kind == "norm":
        out.norms[tname] = _vector(art, hf_name)
    elif kind in ("embedding", "lm_head"):
        enc = art.encoded(hf_name)
        extra = art.extra_rows(hf_name)
        emb = targets.embedding
        head = targets.lm_head
        if emb is not None and emb.hf_name == key:
            out.embedding, out.embedding_extra = enc, extra
        if head is not None and head.hf_name == key:
            r0, r1 = head.rows
            base_rows = enc.shape[0]
            rows = (min(r0, base_rows), min(r1, base_rows))
            out.lm_head = _slice_matrix(hf_name, enc, rows, None) if rows[1] > rows[0] else None
            out.lm_head_extra = extra


def bytes_on_disk(path: str) -> int:
    return DeltaArtifact(path, verify_files=False).file_bytes()
