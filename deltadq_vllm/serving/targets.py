"""Which modules of a loaded vLLM model receive deltas, and which part of each checkpoint
tensor this tensor-parallel rank holds.

A *target* names a vLLM module, the checkpoint (HF) tensors that feed it, and the
slice of each tensor this rank serves, computed the way vLLM's own weight loaders
shard the base (linear.py):

| layer                        | per slice: rows of the checkpoint tensor          | columns        |
|------------------------------|---------------------------------------------------|----------------|
| QKVParallelLinear            | q: rank * q_local; k, v: (rank // kv_replicas) * kv_local | all    |
| MergedColumnParallelLinear   | slice i: rank * output_sizes[i] / tp              | all            |
| ColumnParallelLinear         | rank * out_local                                  | all            |
| RowParallelLinear            | all                                               | rank * in_local|
| ReplicatedLinear             | all                                               | all            |
| ParallelLMHead (logits)      | the vocab shard [org_vocab_start, org_vocab_end)  | all            |
| VocabParallelEmbedding       | all rows (added after the all-reduce)             | all            |
| RMSNorm, GemmaRMSNorm        | the whole weight                                  |                |

A checkpoint that stores a packed layer as one tensor (Phi-3's `qkv_proj`, `gate_up_proj`:
the model's packed_modules_mapping maps the layer to a single name) gives every slice the
same tensor name with its rows offset by the blocks before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .. import vllm_compat
from ..errors import DeltaDQError


@dataclass
class Slice:
    """One output slice of a target: a checkpoint tensor and the part this rank holds."""

    hf_name: str                     # checkpoint name of the weight
    size: int                        # local output rows (this rank)
    rows: tuple[int, int]            # rows of the checkpoint tensor
    bias_name: str | None = None     # checkpoint name of the bias, if the layer has one
    bias_rows: tuple[int, int] | None = None


@dataclass
class LinearTarget:
    name: str                        # vLLM module path
    module: nn.Module
    in_features: int                 # local input width
    cols: tuple[int, int] | None     # checkpoint columns held by this rank (row-parallel)
    slices: list[Slice] = field(default_factory=list)

    @property
    def slice_sizes(self) -> list[int]:
        return [s.size for s in self.slices]


@dataclass
class EmbeddingTarget:
    name: str
    module: nn.Module
    hf_name: str
    vocab: int                       # rows of the base checkpoint tensor
    dim: int


@dataclass
class LMHeadTarget:
    name: str
    module: nn.Module                # ParallelLMHead, or the embedding when tied
    hf_name: str
    rows: tuple[int, int]            # vocab rows of this shard
    local_width: int                 # logits columns the layer produces on this rank
    dim: int


@dataclass
class NormTarget:
    name: str
    module: nn.Module
    hf_name: str
    size: int


@dataclass
class ModelTargets:
    linears: dict[str, LinearTarget]
    embedding: EmbeddingTarget | None
    lm_head: LMHeadTarget | None
    norms: dict[str, NormTarget]
    # hf name -> [(kind, target name, slice)]: several slices for a fused checkpoint tensor
    by_hf_name: dict[str, list[tuple[str, str, int]]]
    rename: object = None        # checkpoint name -> the model's name for it (hf_to_vllm_mapper)
    logits_processor: nn.Module | None = None

    def describe(self) -> str:
        return (f"{len(self.linears)} linear, {len(self.norms)} norm, "
                f"embedding {'yes' if self.embedding else 'no'}, "
                f"lm head {'yes' if self.lm_head else 'no'}")


def _split(total: int, tp: int, rank: int) -> tuple[int, int]:
    local = total // tp
    return rank * local, (rank + 1) * local


def _linear_target(name: str, m, cls: dict, packed: dict) -> LinearTarget | None:
    prefix, _, last = name.rpartition(".")
    prefix = prefix + "." if prefix else ""
    subs = packed.get(last)
    tp, rank = getattr(m, "tp_size", 1), getattr(m, "tp_rank", 0)
    has_bias = getattr(m, "bias", None) is not None

    def hf(sub):
        return prefix + sub + ".weight", (prefix + sub + ".bias") if has_bias else None

    if isinstance(m, cls["QKVParallelLinear"]):
        q_local = m.num_heads * m.head_size
        kv_local = m.num_kv_heads * m.head_size
        v_local = m.num_kv_heads * getattr(m, "v_head_size", m.head_size)
        kv_rank = rank // m.num_kv_head_replicas
        geo = [(q_local, rank * q_local), (kv_local, kv_rank * kv_local),
               (v_local, kv_rank * v_local)]
        if subs is not None and len(subs) == 1:
            # one fused checkpoint tensor (Phi-3's qkv_proj): q, k, v are row blocks of it
            q_total = m.total_num_heads * m.head_size
            kv_total = m.total_num_kv_heads * m.head_size
            starts = (0, q_total, q_total + kv_total)
            geo = [(size, base + start) for (size, start), base in zip(geo, starts)]
            subs = subs * 3
        subs = subs or ["q_proj", "k_proj", "v_proj"]
        slices = []
        for sub, (size, start) in zip(subs, geo):
            w, b = hf(sub)
            slices.append(Slice(w, size, (start, start + size), b, (start, start + size)))
        return LinearTarget(name, m, m.input_size_per_partition, None, slices)
    if isinstance(m, cls["MergedColumnParallelLinear"]):
        fused = subs is not None and len(subs) == 1 and len(m.output_sizes) > 1
        if fused:  # one checkpoint tensor (Phi-3's gate_up_proj): slices are row blocks
            subs = subs * len(m.output_sizes)
        subs = subs or [f"{last}.{i}" for i in range(len(m.output_sizes))]
        slices, offset = [], 0
        for sub, total in zip(subs, m.output_sizes):
            w, b = hf(sub)
            r = _split(total, tp, rank)
            r = (offset + r[0], offset + r[1]) if fused else r
            slices.append(Slice(w, r[1] - r[0], r, b, r))
            offset += total
        return LinearTarget(name, m, m.input_size_per_partition, None, slices)
    if isinstance(m, cls["RowParallelLinear"]):
        w, b = hf(last)
        cols = _split(m.input_size, tp, rank)
        out = m.output_size
        return LinearTarget(name, m, m.input_size_per_partition, cols,
                            [Slice(w, out, (0, out), b, (0, out))])
    if isinstance(m, cls["ColumnParallelLinear"]):
        w, b = hf(last)
        r = _split(m.output_size, tp, rank)
        return LinearTarget(name, m, m.input_size_per_partition, None,
                            [Slice(w, r[1] - r[0], r, b, r)])
    if isinstance(m, cls["ReplicatedLinear"]):
        w, b = hf(last)
        return LinearTarget(name, m, m.input_size, None,
                            [Slice(w, m.output_size, (0, m.output_size), b, (0, m.output_size))])
    return None


def _same_weight(a: nn.Module, b: nn.Module) -> bool:
    """Tied embeddings: vLLM's LM head is its own module sharing the embedding's weight."""
    if a is b:
        return True
    wa, wb = getattr(a, "weight", None), getattr(b, "weight", None)
    return wa is not None and wb is not None and wa.data_ptr() == wb.data_ptr()


def find_targets(model: nn.Module) -> ModelTargets:
    """Walk a loaded vLLM model and list every module a delta can change."""
    cls = vllm_compat.layer_classes()
    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    linears, norms = {}, {}
    embedding = lm_head = None
    logits = None
    for name, m in model.named_modules():
        if isinstance(m, cls["LinearBase"]):
            t = _linear_target(name, m, cls, packed)
            if t is not None:
                linears[name] = t
        elif isinstance(m, cls["ParallelLMHead"]):
            lm_head = (name, m)
        elif isinstance(m, cls["VocabParallelEmbedding"]):
            if embedding is None:
                embedding = EmbeddingTarget(name, m, name + ".weight", m.org_vocab_size,
                                            m.embedding_dim)
        elif isinstance(m, cls["RMSNorm"]) and isinstance(getattr(m, "weight", None), nn.Parameter):
            # RMSNorm and GemmaRMSNorm (x_hat * (1 + w)): w + dw adds x_hat * dw to both
            norms[name] = NormTarget(name, m, name + ".weight", m.weight.shape[0])
        elif isinstance(m, cls["LogitsProcessor"]):
            logits = m
    head = None
    head_module = getattr(model, "lm_head", None)
    if head_module is None and logits is not None and embedding is not None:
        # no lm_head module: the logits come from the input embedding (Gemma, Gemma-2 call
        # logits_processor(model.embed_tokens, ...)); the delta's tied embedding rows are
        # then the head's too
        head_module = embedding.module
    if logits is not None and head_module is None:
        raise DeltaDQError(f"{type(model).__name__}: cannot find the module its logits come "
                           "from, so an LM-head delta could not be applied",
                           "serve the merged checkpoint (`deltadq merge`) or report the "
                           "architecture")
    if logits is not None and head_module is not None:
        tied = embedding is not None and _same_weight(head_module, embedding.module)
        hname = embedding.name if tied else (lm_head[0] if lm_head else "lm_head")
        si = head_module.shard_indices
        head = LMHeadTarget(hname, head_module, hname + ".weight",
                            (si.org_vocab_start_index, si.org_vocab_end_index),
                            head_module.num_embeddings_per_partition, head_module.embedding_dim)
    by_hf: dict[str, list[tuple[str, str, int]]] = {}
    for t in linears.values():
        for i, s in enumerate(t.slices):
            by_hf.setdefault(s.hf_name, []).append(("linear", t.name, i))
            if s.bias_name:
                by_hf.setdefault(s.bias_name, []).append(("bias", t.name, i))
    for t in norms.values():
        by_hf[t.hf_name] = [("norm", t.name, 0)]
    if embedding is not None:
        by_hf[embedding.hf_name] = [("embedding", embedding.name, 0)]
    if head is not None and head.hf_name not in by_hf:
        by_hf[head.hf_name] = [("lm_head", head.name, 0)]
    return ModelTargets(linears, embedding, head, norms, by_hf,
                        rename=lambda n: vllm_compat.hf_rename(model, n),
                        logits_processor=logits)
