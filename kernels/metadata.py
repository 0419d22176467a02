"""Per-step token grouping, computed once per forward step and shared by every layer.

Like vLLM's LoRAKernelMeta (SGMV): tokens are sorted by slot, and every slot that
has tokens becomes one *entry* (slot id, first sorted token, token count). The
kernels launch one program group per entry, so one launch covers every distinct
delta of the batch. Shapes are static (T tokens, S entries) and nothing here
needs a device->host sync, so the buffers can live inside CUDA graphs:

    token_order [T]  int32  token indices sorted by slot (stable); base-only tokens last
    seg_slot    [S]  int32  slot of entry e, active entries first, -1 for unused entries
    seg_start   [S]  int32  first position of entry e in token_order
    seg_len     [S]  int32  tokens of entry e (0 for unused entries)

Host-side `num_active` / `max_seg_len` are filled when slot ids come from the CPU
(vLLM builds the token->adapter mapping on the host), and let launchers shrink
the grid; kernels never need them.

`StepSlots` is the serving form (the pattern of vLLM's LoRAKernelMeta): the same four
tensors plus the per-token slot ids, living in one *persistent* device buffer sized for
the largest batch and refilled in place every step (grouping on the host with numpy,
one pinned host->device copy), so captured CUDA graphs and compiled graphs read the
current step's mapping at fixed addresses. Rows past the step's tokens (the padding
of a CUDA-graph capture size) map to slot -1; a step without fine-tunes fills every
row with -1 and runs the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class DeltaBatchMeta:
    token_order: torch.Tensor
    seg_slot: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    num_tokens: int
    n_slots: int
    num_active: int | None = None
    max_seg_len: int | None = None
    # CPU path: [(slot, LongTensor of token indices)], when built from host slot ids
    groups: list | None = field(default=None, repr=False)
    # CPU path: the same grouping as one permutation (CpuPlan), shared by every layer
    cpu_plan: "CpuPlan | None" = field(default=None, repr=False)

    def tensors(self):
        return self.token_order, self.seg_slot, self.seg_start, self.seg_len


def build_meta(slot_ids: torch.Tensor, n_slots: int, device: torch.device | str | None = None,
               host_info: bool | None = None, out: DeltaBatchMeta | None = None) -> DeltaBatchMeta:
    """Group tokens by slot. slot_ids: int [T], -1 = base only; ids must be < n_slots.

    device: where the kernels run (default: slot_ids' device). When slot_ids are on the
    CPU the grouping is done there and the four tensors copied once to `device`.
    out: a DeltaBatchMeta of the same T and S to update *in place* (its four tensors keep
    their addresses), e.g. the static metadata a captured CUDA graph reads: pad the
    batch to the graph's T with -1 tokens and rebuild into it before each replay.
    """
    if slot_ids.dim() != 1:
        raise ValueError("slot_ids must be 1-D [T]")
    dev = torch.device(device) if device is not None else slot_ids.device
    src = slot_ids.device
    if host_info is None:
        host_info = src.type == "cpu"
    T, S = slot_ids.numel(), n_slots
    ids = slot_ids.to(torch.int64)
    key = torch.where(ids < 0, torch.full_like(ids, S), ids)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(S + 1, dtype=torch.int64, device=src)
    counts.index_add_(0, key, torch.ones_like(key))
    starts = torch.cumsum(counts, 0) - counts
    active = counts[:S] > 0
    ent = torch.argsort((~active).to(torch.int8), stable=True)  # active slots first
    seg_len = counts[:S][ent]
    seg_slot = torch.where(seg_len > 0, ent, torch.full_like(ent, -1))
    seg_start = starts[:S][ent]
    meta = DeltaBatchMeta(order.to(torch.int32), seg_slot.to(torch.int32), seg_start.to(torch.int32),
                          seg_len.to(torch.int32), T, S)
    if host_info:
        lens = counts[:S].tolist()
        meta.num_active = sum(1 for c in lens if c > 0)
        meta.max_seg_len = max(lens) if lens else 0
        meta.groups = _groups_from(order, counts[:S], starts[:S])
        meta.cpu_plan = CpuPlan.from_groups(meta.groups, T)
    if out is not None:
        if out.num_tokens != T or out.n_slots != S:
            raise ValueError(f"out holds T={out.num_tokens}, S={out.n_slots}; got T={T}, S={S}")
        for dst, src_t in zip(out.tensors(), meta.tensors()):
            dst.copy_(src_t, non_blocking=True)
        out.num_active, out.max_seg_len = meta.num_active, meta.max_seg_len
        out.groups, out.cpu_plan = meta.groups, meta.cpu_plan
        return out
    if dev != src:
        meta.token_order, meta.seg_slot, meta.seg_start, meta.seg_len = (
            t.to(dev, non_blocking=True) for t in meta.tensors())
    return meta


def _groups_from(order: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor) -> list:
    order = order.to("cpu", torch.int64)
    out = []
    for s, (c, a) in enumerate(zip(counts.tolist(), starts.tolist())):
        if c:
            out.append((s, order[a:a + c]))
    return out


def groups_from_tensors(token_order, seg_slot, seg_start, seg_len) -> list:
    """[(slot, token indices)] from the four meta tensors (CPU path inside the custom op)."""
    order = token_order.to("cpu", torch.int64)
    out = []
    for s, a, c in zip(seg_slot.tolist(), seg_start.tolist(), seg_len.tolist()):
        if s >= 0 and c > 0:
            out.append((s, order[a:a + c]))
    return out


@dataclass
class CpuPlan:
    """The step's grouping as one permutation, for the CPU path (built once per step).

    order [n_active] int64: tokens that have a slot, sorted by slot (stable)
    segs  [(slot, start, count)]: slot s owns order[start : start + count]
    rest  [T - n_active] int64: base-only tokens
    full  [T] = order ++ rest;  inv [T]: inverse permutation (full[inv[t]] = t)

    With it a layer gathers x once (x[order]), runs one GEMM per segment on contiguous
    rows, and scatters once, instead of one gather and one scatter per slot.
    """

    order: torch.Tensor
    segs: list
    rest: torch.Tensor
    full: torch.Tensor
    inv: torch.Tensor
    num_tokens: int

    @property
    def num_active(self) -> int:
        return self.order.numel()

    @classmethod
    def from_groups(cls, groups: list, num_tokens: int) -> "CpuPlan":
        idx = [i.to("cpu", torch.int64) for _, i in groups]
        order = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
        segs, a = [], 0
        for (s, _), i in zip(groups, idx):
            segs.append((int(s), a, i.numel()))
            a += i.numel()
        mask = torch.ones(num_tokens, dtype=torch.bool)
        mask[order] = False
        rest = mask.nonzero().squeeze(1)
        full = torch.cat([order, rest])
        inv = torch.empty_like(full)
        inv[full] = torch.arange(num_tokens)
        return cls(order, segs, rest, full, inv, num_tokens)


# ---------------------------------------------------------------- persistent per-step buffers


@dataclass
class Routing:
    """What a delta layer reads of a step: the grouped metadata, the slot id of every row,
    and `info` ([fill counter, rows]; keys the CPU path's per-step grouping cache, -1 = none)."""

    meta: DeltaBatchMeta
    slot_ids: torch.Tensor
    info: torch.Tensor


INFO_VERSION = 0   # StepSlots.info[0]: fill counter (CPU-path plan cache key)
INFO_TOKENS = 1    # StepSlots.info[1]: mapped tokens of the step (rows past it are -1)
INFO_FIELDS = 2


class StepSlots:
    """Per-step routing of up to `max_tokens` rows over `n_slots` slots, in persistent buffers.

    One int32 device buffer holds, at fixed offsets (views never move):

        slot_ids    [max_tokens]  slot of every row, -1 = base only (also padded rows)
        token_order [max_tokens]  rows sorted by slot (stable), base-only rows last
        seg_slot, seg_start, seg_len [n_slots]   the entries of `build_meta`
        info        [2]           fill counter, mapped rows of the step

    `fill(ids)` groups the step's slot ids on the host (numpy, no torch dispatch), writes
    the whole layout into a pinned staging buffer and issues one non-blocking copy on the
    current stream (on a CPU device: one memcpy). Staging buffers alternate and each is
    reused only after its previous copy has completed (an event per buffer), so the host
    never overwrites bytes a pending copy still reads. Nothing here reads device memory.
    `meta` is a DeltaBatchMeta over all `max_tokens` rows (host counts unset, as under graph
    capture): a layer with T <= max_tokens rows uses it as is, since entries only name
    mapped rows.
    """

    N_STAGING = 2

    def __init__(self, max_tokens: int, n_slots: int, device: torch.device | str = "cpu"):
        if max_tokens < 1 or n_slots < 1:
            raise ValueError("max_tokens and n_slots must be >= 1")
        self.max_tokens, self.n_slots = int(max_tokens), int(n_slots)
        self.device = torch.device(device)
        M, S = self.max_tokens, self.n_slots
        self._offs = (0, M, 2 * M, 2 * M + S, 2 * M + 2 * S, 2 * M + 3 * S)
        n = 2 * M + 3 * S + INFO_FIELDS
        self.buf = torch.empty(n, dtype=torch.int32, device=self.device)
        o = self._offs
        self.slot_ids = self.buf[o[0]:o[1]]
        self.meta = DeltaBatchMeta(self.buf[o[1]:o[2]], self.buf[o[2]:o[3]], self.buf[o[3]:o[4]],
                                   self.buf[o[4]:o[5]], M, S)
        self.info = self.buf[o[5]:]
        self.routing = Routing(self.meta, self.slot_ids, self.info)
        pinned = self.device.type == "cuda"
        self._staging = [torch.empty(n, dtype=torch.int32, pin_memory=pinned)
                         for _ in range(self.N_STAGING if pinned else 1)]
        self._events: list = [None] * len(self._staging)
        self._next = 0
        self.version = 0
        # host copies of what the buffers hold (never read from the device)
        self.num_tokens = 0
        self.host_ids = np.full(M, -1, dtype=np.int32)
        self.active: set[int] = set()       # distinct slots with rows this step
        self.fill(np.zeros(0, dtype=np.int32))

    def fill(self, slot_ids) -> None:
        """Route the step: slot_ids (sequence / numpy / CPU tensor of ints, -1 = base) for its
        first len(slot_ids) rows; every later row gets -1."""
        ids = np.asarray(slot_ids.numpy() if isinstance(slot_ids, torch.Tensor) else slot_ids,
                         dtype=np.int64).reshape(-1)
        T, M, S = ids.size, self.max_tokens, self.n_slots
        if T > M:
            raise ValueError(f"{T} rows in one step but the delta metadata holds {M} "
                             "(max_num_batched_tokens); this is a bug in the caller")
        if T and (ids.max() >= S or ids.min() < -1):
            raise ValueError(f"slot ids must lie in [-1, {S}); got {ids.min()}..{ids.max()}")
        i = self._next
        self._next = (i + 1) % len(self._staging)
        ev = self._events[i]
        if ev is not None:
            ev.synchronize()   # that copy was issued N_STAGING fills ago: long complete
        host = self._staging[i].numpy()
        o = self._offs
        key = np.where(ids < 0, S, ids)
        order = np.argsort(key, kind="stable")
        counts = np.bincount(key, minlength=S + 1)
        starts = np.cumsum(counts) - counts
        active = counts[:S] > 0
        ent = np.argsort(~active, kind="stable")            # active slots first
        host[o[0]:o[0] + T] = ids
        host[o[0] + T:o[1]] = -1
        host[o[1]:o[1] + T] = order
        host[o[1] + T:o[2]] = np.arange(T, M)
        seg_len = counts[:S][ent]
        host[o[2]:o[3]] = np.where(seg_len > 0, ent, -1)
        host[o[3]:o[4]] = starts[:S][ent]
        host[o[4]:o[5]] = seg_len
        self.version = (self.version + 1) % (1 << 31)
        host[o[5] + INFO_VERSION] = self.version
        host[o[5] + INFO_TOKENS] = T
        self.buf.copy_(self._staging[i], non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            ev = self._events[i] or torch.cuda.Event()
            ev.record()
            self._events[i] = ev
        self.num_tokens = T
        self.host_ids = host[o[0]:o[1]].copy()
        self.active = {int(s) for s in np.nonzero(active)[0]}

    def rows(self, start: int, count: int) -> Routing:
        """The routing of rows [start, start + count) (an LM-head call on a contiguous range
        of the step's token rows, e.g. prompt logprobs): fresh tensors grouped from the host
        copy, the slot ids a view of the persistent buffer. No device read."""
        ids = torch.from_numpy(self.host_ids[start:start + count].astype(np.int64))
        meta = build_meta(ids, self.n_slots, host_info=False)
        if self.device.type == "cuda":
            ts = [t.pin_memory().to(self.device, non_blocking=True) for t in meta.tensors()]
            meta.token_order, meta.seg_slot, meta.seg_start, meta.seg_len = ts
        info = torch.tensor([-1, count], dtype=torch.int32)
        if self.device.type == "cuda":
            info = info.pin_memory().to(self.device, non_blocking=True)
        return Routing(meta, self.slot_ids[start:start + count], info)
