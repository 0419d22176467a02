"""Launcher of the Triton delta kernels: y[t] += x[t] @ dequant(delta[slot(t)])^T.

One launch covers every distinct delta of the batch (SGMV-style): the grid is
(row tiles, output slices, slot entries of the per-step metadata), and each
program reads only the packed codes, bf16 scales and the small units table of
its (slot, slice); kept positions are regenerated in registers from the hash of
(seed, global row, global group) with native uint32 arithmetic (positions.py).

Two paths, one kernel module each (several variants each, see their docstrings):

* decode (triton_decode.py; few tokens per delta, memory bound): work ~ kept elements.
* prefill (triton_prefill.py; many tokens per delta): dense tiles rebuilt in registers
  and fed to tl.dot.

No autotuning while serving: block sizes, num_warps, num_stages and the variant come
from the config table (tuning.py, written offline by `python -m deltadq_vllm.kernels.tune`)
with a built-in heuristic fallback; under TRITON_INTERPRET=1 (tests on a CPU) small
fixed configs. `warmup()` compiles every kernel a server can launch, before serving.
Importing this module without Triton works; calling it raises.
"""

from __future__ import annotations

import os
import weakref

import torch

from . import tuning
from .slots import (META_BITS, META_FIELDS, META_G, META_GROUP_OFF, META_K, META_NGROUPS,
                    META_NGT, META_NROWS, META_NUNITS, META_OUT_OFF, META_ROW_OFF, META_RPS,
                    META_SEED, META_SRO, META_VALID, DeltaSlots)

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

if HAS_TRITON:
    from .triton_common import fastmod as _fastmod, group_hash as _group_hash
    from .triton_decode import DECODE_KERNELS
    from .triton_decode_split import decode_v4
    from .triton_prefill import PREFILL_KERNELS
    DECODE_KERNELS = {**DECODE_KERNELS, "v4": decode_v4}
else:  # pragma: no cover
    DECODE_KERNELS = PREFILL_KERNELS = {}

DECODE_MAX_TOKENS = 32   # T at or below this takes the decode path (tune on the GPU)
# prefill with 16-bit activations: the rebuilt delta tile enters tl.dot as two 16-bit tiles
# (hi + the rounding error), not one (benchmarks/gpu/prefill_precision.py; module-level so
# that script can measure both)
PREFILL_SPLIT_W = True
KP_MAX = tuning.KP_CHOICES[-1]

# under TRITON_INTERPRET=1: small fixed configs (the interpreter runs a program per grid
# point in Python; block sizes only change how many)
INTERPRET_CONFIG = {
    "decode": {"BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_G": 2},
    "prefill": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32},
}
DEFAULT_DECODE_CONFIG = INTERPRET_CONFIG["decode"]      # names kept for older callers
DEFAULT_PREFILL_CONFIG = INTERPRET_CONFIG["prefill"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(n: int) -> int:
    return tuning.next_pow2(n)


# (kp, straddle) of a DeltaSlots, recomputed only when its `version` changes: the
# properties walk every (slot, slice) and this runs per layer per step
_SUMMARY: "weakref.WeakKeyDictionary[DeltaSlots, tuple]" = weakref.WeakKeyDictionary()


def slots_kernel_keys(slots: DeltaSlots) -> tuple[int, bool]:
    """(KP, STRADDLE) the launcher compiles for these slots as they are loaded now."""
    return _summary(slots)[:2]


def split_units(slots: DeltaSlots) -> int:
    """Largest number of KP_MAX-element units in a row of any loaded (slot, slice): what
    decode v4 splits (in_features // KP_MAX + 1 when nothing is loaded)."""
    return _summary(slots)[2]


def _summary(slots: DeltaSlots) -> tuple[int, bool, int]:
    hit = _SUMMARY.get(slots)
    if hit is not None and hit[0] == slots.version:
        return hit[1:]
    kp, straddle = tuning.kp_for(slots.max_keep), bool(slots.straddle)
    units = [slots.in_features // p["group_size"] * -(-p["keep"] // KP_MAX)
             for row in slots.params for p in row
             if p is not None and "keep" in p and "group_size" in p]
    n_units = max(units) if units else slots.in_features // KP_MAX + 1
    _SUMMARY[slots] = (slots.version, kp, straddle, n_units)
    return kp, straddle, n_units


def _fixed_configs(x: torch.Tensor) -> bool:
    """The interpreter (or a CPU tensor) runs the small fixed configs, not the table's."""
    return interpreting() or x.device.type != "cuda"


def resolve_config(path: str, x: torch.Tensor, slots: DeltaSlots, tokens_per_delta: int,
                   kp: int, straddle: bool, config=None, variant: str | None = None
                   ) -> "tuning.KernelConfig":
    """The launch config: `config` (dict or KernelConfig) if given, the fixed interpreter
    config under TRITON_INTERPRET=1, else the table lookup; `variant` overrides its variant."""
    if config is not None:
        cfg = config if isinstance(config, tuning.KernelConfig) else \
            tuning.KernelConfig.from_dict(path, {**({"variant": variant} if variant else {}),
                                                 **dict(config)})
    elif _fixed_configs(x):
        cfg = tuning.KernelConfig.from_dict(path, INTERPRET_CONFIG[path], "interpreter")
    else:
        cfg = tuning.config_for(x.device, path, slots.in_features, max(slots.slice_sizes),
                                tokens_per_delta, kp, straddle, x.dtype)
    if variant is not None and variant != cfg.variant:
        cfg = tuning.KernelConfig(cfg.path, variant, cfg.blocks, cfg.num_warps, cfg.num_stages,
                                  cfg.source + "+variant")
    return cfg


def triton_apply_deltas(y: torch.Tensor, x: torch.Tensor, token_order: torch.Tensor,
                        seg_slot: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                        slots: DeltaSlots, *, num_entries: int | None = None,
                        max_seg_len: int | None = None, path: str | None = None,
                        config: dict | None = None, kp: int | None = None,
                        variant: str | None = None, straddle: bool | None = None) -> None:
    """Launch the delta kernel in place on y [T, out_total] (row stride free, unit column stride).

    num_entries: entries of the metadata that may be active (default: all S; pass the host
    count to shrink the grid outside CUDA graphs). max_seg_len: host bound on tokens per
    entry (default T). path: "decode" | "prefill" (default by T). config: fixed block sizes
    (dict with BLOCK_* and optionally variant / num_warps / num_stages, or a
    tuning.KernelConfig) instead of the table; fixed under TRITON_INTERPRET=1. kp: decode
    chunk (default from the loaded keep counts). variant: kernel variant (tuning.VARIANTS).
    straddle: compile for codes straddling 32-bit words (default: the slots' own need;
    True is always correct).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    T, IN = x.shape
    if T == 0:
        return
    if IN != slots.in_features or y.shape != (T, slots.out_total):
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not match the slots "
                         f"(in {slots.in_features}, out {slots.out_total})")
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y need unit column stride")
    n_ent = slots.n_slots if num_entries is None else min(num_entries, slots.n_slots)
    if n_ent == 0:
        return
    path = path or ("decode" if T <= DECODE_MAX_TOKENS else "prefill")
    if path not in tuning.PATHS:
        raise ValueError(f"unknown path {path!r}")
    if slots.arena is None:
        raise ValueError("these slots serve the CPU path only (cpu_strategy set on a CPU "
                         "device); build them with cpu_strategy=None for the kernels")
    maxseg = T if max_seg_len is None else max(1, max_seg_len)
    kp_s, straddle_s = slots_kernel_keys(slots)
    kp = kp or kp_s
    straddle = straddle_s if straddle is None else (bool(straddle) or straddle_s)
    cfg = resolve_config(path, x, slots, maxseg, kp, straddle, config, variant)
    _launch(cfg, y, x, token_order, seg_slot, seg_start, seg_len, slots, n_ent, maxseg, kp,
            straddle)


def effective_kp(cfg, kp: int) -> int:
    """KP a decode variant runs with: v3/v4 need KP * bits to be a multiple of 32 for every
    bits, so always 32 (any KP is correct for any keep count; it only sets the chunk)."""
    return KP_MAX if cfg.variant in ("v3", "v4") else kp


def _launch(cfg, y, x, token_order, seg_slot, seg_start, seg_len, slots, n_ent, maxseg, kp,
            straddle) -> None:
    max_rows = max(slots.slice_sizes)
    args = (y, x, slots.arena.words, slots.arena.halves, slots.meta,
            token_order, seg_slot, seg_start, seg_len,
            y.stride(0), x.stride(0), x.shape[1], slots.n_slices, max_rows, META_FIELDS)
    kw = cfg.kwargs
    if cfg.path == "decode" and cfg.variant == "v4":
        # split-K: partial sums into an fp32 workspace (atomics), then one add into y
        split = triton.cdiv(split_units(slots), kw["BLOCK_G"])
        ws = torch.zeros(y.shape, device=y.device, dtype=torch.float32)
        grid = (triton.cdiv(max_rows, kw["BLOCK_N"]) * split, slots.n_slices, n_ent)
        decode_v4[grid](ws, *args[1:9], ws.stride(0), *args[10:14], split, META_FIELDS,
                        KP=KP_MAX, STRADDLE=straddle, **kw)
        y.add_(ws)
    elif cfg.path == "decode":
        kp = effective_kp(cfg, kp)
        grid = (triton.cdiv(max_rows, kw["BLOCK_N"]), slots.n_slices, n_ent)
        DECODE_KERNELS[cfg.variant][grid](*args, KP=kp, STRADDLE=straddle, **kw)
    else:
        prec = "ieee" if x.dtype == torch.float32 else "tf32"
        dot_f32 = interpreting() and x.dtype == torch.bfloat16
        grid = (triton.cdiv(maxseg, kw["BLOCK_M"]) * triton.cdiv(max_rows, kw["BLOCK_N"]),
                slots.n_slices, n_ent)
        PREFILL_KERNELS[cfg.variant][grid](*args, STRADDLE=straddle, DOT_PREC=prec,
                                           DOT_F32=dot_f32,
                                           SPLIT_W=PREFILL_SPLIT_W and x.dtype != torch.float32,
                                           **kw)


def warmup_plan(slots_list, max_tokens: int, device=None, dtype: torch.dtype = torch.bfloat16,
                kps=None, straddles=None, decode_max_tokens: int | None = None) -> list[tuple]:
    """The distinct launches warmup() compiles: (slots, path, KernelConfig, kp, straddle,
    tokens). One per layer shape x token bucket x KP x STRADDLE, deduplicated by what
    Triton compiles (the kernel, its constexprs, num_warps / num_stages and dtype)."""
    dev = torch.device(device) if device is not None else slots_list[0].device
    dmax = DECODE_MAX_TOKENS if decode_max_tokens is None else decode_max_tokens
    kps = tuple(kps) if kps is not None else tuning.KP_CHOICES
    straddles = tuple(straddles) if straddles is not None else (False, True)
    probe = torch.empty(1, 1, device=dev, dtype=dtype)
    buckets, tb = [], 1
    while tb < max(1, max_tokens):
        buckets.append(tb)
        tb *= 2
    buckets.append(tuning.t_bucket(max(1, max_tokens)))
    plan, seen, shapes = [], set(), set()
    for slots in slots_list:
        shape = (slots.in_features, tuple(slots.slice_sizes))
        if shape in shapes:
            continue
        shapes.add(shape)
        for tb in sorted(set(buckets)):
            path = "decode" if tb <= dmax else "prefill"
            for straddle in straddles:
                for kp in (kps if path == "decode" else (0,)):
                    cfg = resolve_config(path, probe, slots, tb, kp or KP_MAX, straddle)
                    kp_run = effective_kp(cfg, kp) if path == "decode" else 0
                    sig = (path, cfg.variant, cfg.blocks, cfg.num_warps, cfg.num_stages, kp_run,
                           straddle, dtype)
                    if sig not in seen:
                        seen.add(sig)
                        plan.append((slots, path, cfg, kp or KP_MAX, straddle, tb))
    return plan


def empty_batch(slots, T: int, dtype: torch.dtype):
    """(y, x, token order, entry slots, zeros) of a T-token step with every entry -1, in
    the slots' device: what a warmup launch runs on (its programs exit at once)."""
    dev, S = slots.meta.device, slots.n_slots
    return (torch.zeros(T, slots.out_total, device=dev, dtype=dtype),
            torch.zeros(T, slots.in_features, device=dev, dtype=dtype),
            torch.arange(T, device=dev, dtype=torch.int32),
            torch.full((S,), -1, device=dev, dtype=torch.int32),
            torch.zeros(S, device=dev, dtype=torch.int32))


def warmup(slots_list, max_tokens: int, device=None, dtype: torch.dtype = torch.bfloat16,
           kps=None, straddles=None, decode_max_tokens: int | None = None) -> list[dict]:
    """Compile every kernel the server can launch for these layers, before serving.

    slots_list: the DeltaSlots of the served layers (one per distinct layer shape is
    enough). max_tokens: the largest batch (tokens per step) the server will run.
    For every layer shape and power-of-two token bucket up to max_tokens it resolves the
    launch config exactly as triton_apply_deltas does (table or heuristic) and launches
    that kernel once on an all-empty batch (every entry -1: the programs return at once,
    nothing is read or written), for every KP in `kps` (default 8, 16, 32: a delta loaded
    later may change the slots' KP) and STRADDLE in `straddles` (default both: a 3-bit
    delta loaded later switches to STRADDLE=True), in activation dtype `dtype`.
    Call it with the model's real layer shapes and dtype (Triton specialises on
    16-divisibility of strides and sizes). Returns one dict per compiled kernel.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    done = []
    for slots, path, cfg, kp, straddle, tb in warmup_plan(slots_list, max_tokens, device,
                                                          dtype, kps, straddles,
                                                          decode_max_tokens):
        y, x, order, seg_slot, zeros = empty_batch(slots, tb, dtype)
        _launch(cfg, y, x, order, seg_slot, zeros, zeros, slots, slots.n_slots, tb, kp,
                straddle)
        done.append({"path": path, "variant": cfg.variant, **cfg.to_json(), "KP": kp,
                     "STRADDLE": straddle, "dtype": tuning.dtype_name(dtype), "tokens": tb,
                     "in_features": slots.in_features, "max_rows": max(slots.slice_sizes),
                     "source": cfg.source})
    return done


# ---------------------------------------------------------------- position check helper

if HAS_TRITON:

    @triton.jit(do_not_specialize=["n_rows", "n_groups", "g", "k", "seed", "row_off",
                                   "group_off", "ngt", "n_units"])
    def _positions_kernel(out_ptr, n_rows, n_groups, g, k, seed, row_off, group_off, ngt,
                          units_ptr, n_units, BLOCK_R: tl.constexpr, KP: tl.constexpr):
        """Kept columns [n_rows, n_groups*k] exactly as the decode kernel computes them."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        gi = tl.program_id(1)
        rmask = r < n_rows
        h1, h2 = _group_hash((row_off + r).to(tl.uint32, bitcast=True),
                             (group_off + gi).to(tl.uint32, bitcast=True),
                             ngt.to(tl.uint32, bitcast=True), seed.to(tl.uint32, bitcast=True))
        off = (h1 % g.to(tl.uint32)).to(tl.int32)
        uv = tl.load(units_ptr + (h2 % n_units.to(tl.uint32)).to(tl.int32), mask=rmask, other=1)
        stride = uv & 0xFFFF
        inv_g = 1.0 / g.to(tl.float32)
        for j0 in range(0, k, KP):
            j = j0 + tl.arange(0, KP)
            pos = _fastmod(off[:, None] + j[None, :] * stride[:, None], g, inv_g)
            m = rmask[:, None] & (j < k)[None, :]
            tl.store(out_ptr + r[:, None] * (n_groups * k) + gi * k + j[None, :],
                     gi * g + pos, mask=m)


def triton_kept_columns(seed: int, n_rows: int, in_features: int, group_size: int, keep: int,
                        row_offset: int = 0, group_offset: int = 0,
                        n_groups_total: int | None = None, device="cpu") -> torch.Tensor:
    """positions.kept_columns recomputed by the kernels' Triton code (for tests)."""
    from .slots import _i32, units_packed
    n_groups = in_features // group_size
    ngt = n_groups_total if n_groups_total is not None else n_groups + group_offset
    out = torch.full((n_rows, n_groups * keep), -1, dtype=torch.int32, device=device)
    table = torch.tensor(units_packed(group_size), dtype=torch.int32, device=device)
    BLOCK_R = 16
    grid = (triton.cdiv(n_rows, BLOCK_R), n_groups)
    _positions_kernel[grid](out, n_rows, n_groups, group_size, keep, _i32(seed), row_offset,
                            group_offset, _i32(ngt), table, table.numel(), BLOCK_R=BLOCK_R,
                            KP=min(_next_pow2(keep), 16))
    return out.to(torch.int64)


__all__ = ["HAS_TRITON", "DECODE_MAX_TOKENS", "triton_apply_deltas", "triton_kept_columns",
           "interpreting", "warmup", "META_FIELDS", "META_VALID", "META_G", "META_K", "META_BITS",
           "META_SEED", "META_RPS", "META_ROW_OFF", "META_GROUP_OFF", "META_NGT", "META_SRO",
           "META_NGROUPS", "META_NUNITS", "META_NROWS", "META_OUT_OFF"]
