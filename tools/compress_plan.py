"""What `deltadq compress` stores: the fine-tune's tensors paired with the base's by name
(`plan_tensors`, which refuses another architecture), classified (linear, embedding, LM
head, norm, bias), the changed ones found (`find_changed`) and put in compression order
(`order_plans`). Split from compress.py (one concept per module)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from tqdm import tqdm

from deltadq_vllm.format.artifact import dtype_name
from deltadq_vllm.checkpoint import Checkpoint, TensorInfo
from deltadq_vllm.errors import DeltaDQError

from .calibration import layer_index


@dataclass
class TensorPlan:
    name: str
    cls: str
    base: TensorInfo | None
    ft: TensorInfo
    extra_rows: int = 0

    @property
    def compressible(self) -> bool:
        return self.cls in ("linear", "embedding", "lm_head") and self.base is not None

    @property
    def base_rows(self) -> tuple[int, ...]:
        return self.base.shape if self.base is not None else self.ft.shape


def classify(name: str, shape: tuple[int, ...], embed_name: str | None) -> str:
    if len(shape) == 1:
        return "norm" if "norm" in name else "bias" if name.endswith(".bias") else "other"
    if len(shape) != 2:
        return "other"
    if name == embed_name or "embed_tokens" in name or name.endswith("wte.weight"):
        return "embedding"
    if name.startswith("lm_head") or name.endswith("output.weight"):
        return "lm_head"
    return "linear"


def plan_tensors(base: Checkpoint, ft: Checkpoint) -> list[TensorPlan]:
    """Pair tensors by name and refuse fine-tunes of a different architecture."""
    ab, af = base.architecture(), ft.architecture()
    for key in set(ab) | set(af):
        if key == "vocab_size":
            continue
        if ab.get(key) != af.get(key):
            raise DeltaDQError(
                f"architecture mismatch: base {base.path} has {key}={ab.get(key)!r}, fine-tune "
                f"{ft.path} has {key}={af.get(key)!r}",
                "compress a fine-tune against the base model it was trained from")
    missing = [n for n in base.names() if n not in ft.tensors]
    if missing:
        raise DeltaDQError(f"fine-tune {ft.path} lacks {len(missing)} tensors of the base, "
                           f"e.g. {missing[0]}",
                           "compress a fine-tune against the base model it was trained from")
    embed = next((n for n in ft.names() if "embed_tokens" in n), None)
    plans = []
    for name, fi in ft.tensors.items():
        bi = base.tensors.get(name)
        cls = classify(name, fi.shape, embed)
        extra = 0
        if bi is not None and bi.shape != fi.shape:
            grows_rows = (cls in ("embedding", "lm_head") and len(fi.shape) == 2
                          and fi.shape[1] == bi.shape[1] and fi.shape[0] > bi.shape[0])
            if not grows_rows:
                raise DeltaDQError(
                    f"shape mismatch for {name}: base {list(bi.shape)}, fine-tune {list(fi.shape)}",
                    "compress a fine-tune against the base model it was trained from")
            extra = fi.shape[0] - bi.shape[0]
        if not fi.dtype.is_floating_point:
            cls = "other"
        plans.append(TensorPlan(name, cls, bi, fi, extra))
    return plans


def order_plans(plans: list[TensorPlan]) -> list[TensorPlan]:
    """Embeddings, then layers in order, then the rest (an untied LM head is calibrated
    on the final hidden states, known once the layers ran). A tied embedding is also the
    LM head, calibrated as it, and still goes first: it is the largest matrix of the small
    models that tie (a fifth to a quarter of their bytes), and its few discrete
    configurations leave bytes unspent that only matrices after it can use (compressed
    last, spell-heavy at 2048x with int8 norms landed 4.5% above the target). Its final
    inputs are a look-ahead of the calibrator (tools/calibration.py)."""
    def key(p):
        li = layer_index(p.name)
        if p.cls == "embedding":
            return (0, 0, p.name)
        if li is not None:
            return (1, li, p.name)
        return (2, 0, p.name)
    return sorted(plans, key=key)


def bf16_bytes(shape) -> int:
    return 2 * math.prod(shape)


def find_changed(base: Checkpoint, ft: Checkpoint, plans, progress: bool):
    """Plans of the tensors the fine-tune changes. Differing sampled fingerprints prove a
    change; equal ones are confirmed by a full byte comparison (a fine-tune may change only
    a few rows, e.g. the embeddings of the tokens it saw)."""
    changed = []
    for p in tqdm(plans, desc="scan", unit="tensor", disable=not progress, file=sys.stderr):
        if (p.base is None or p.extra_rows
                or base.tensor_fingerprint(p.name) != ft.tensor_fingerprint(p.name)
                or not base.same_tensor(ft, p.name)):
            changed.append(p)
    return changed


def common_dtype(plans) -> str:
    """The most frequent dtype among the fine-tune's changed tensors (the manifest default)."""
    counts: dict[str, int] = {}
    for p in plans:
        counts[dtype_name(p.ft.dtype)] = counts.get(dtype_name(p.ft.dtype), 0) + 1
    return max(counts, key=counts.get)
