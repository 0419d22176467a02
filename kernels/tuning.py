"""Launch-config table of the Triton delta kernels: no autotuning while serving.

The launcher asks `lookup()` for the block sizes, num_warps, num_stages and kernel
variant of one launch. A table is keyed by GPU name, then by shape bucket:

    "<path>|in=<in_features>|rows=<max slice rows>|t=<pow2 tokens per delta>|kp=<KP>|s=<STRADDLE 0/1>|<dtype>"

Tables are JSON files written by `python -m deltadq_vllm.kernels.tune` (one GPU per
file): the shipped ones in kernels/configs/*.json, plus the files or folders listed in
$DELTADQ_KERNEL_CONFIGS (os.pathsep-separated; they take precedence). Fallbacks, in order:

1. a table of this exact GPU name, exact bucket;
2. a table of another GPU with the same compute capability (H100 and H200 are both sm_90),
   exact bucket; at both levels, the same bucket tuned for the other STRADDLE value or
   KP = 32 counts as a hit (valid for both, only the work per element differs);
3. the same two levels, prefill path only, the tuned token bucket nearest to this one
   for the same shape (a prefill config is valid at any token count);
4. `heuristic()`: a built-in config that is valid for every shape.

`lookup` is an lru_cache over plain ints/strings: one dict probe per call after the first,
and nothing here touches the device (the GPU name is read once per device index).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

TABLE_VERSION = 1
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ENV_VAR = "DELTADQ_KERNEL_CONFIGS"
PATHS = ("decode", "prefill")
VARIANTS = {"decode": ("v0", "v3", "v4"), "prefill": ("v0",)}
DEFAULT_VARIANT = {"decode": "v3", "prefill": "v0"}
# what the tuner times unless told otherwise (--variants): the default decode kernel and the
# first one side by side (v0 beat v3 on some small-group 128x buckets on an H200); decode v4
# (split-K) lost every bucket it was timed on and is opt-in (benchmarks/kernels/NOTES.md)
TUNE_VARIANTS = {"decode": ("v3", "v0"), "prefill": ("v0",)}
KP_CHOICES = (8, 16, 32)   # decode chunk of kept elements per group (any KP is correct for any k)
T_BUCKET_MAX = 4096


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def t_bucket(tokens_per_delta: int) -> int:
    """Power-of-two bucket of the largest number of tokens one delta gets in a launch."""
    return min(next_pow2(max(1, tokens_per_delta)), T_BUCKET_MAX)


def kp_for(max_keep: int) -> int:
    """KP for slots whose largest keep count is max_keep (8, 16 or 32)."""
    for kp in KP_CHOICES:
        if max_keep <= kp:
            return kp
    return KP_CHOICES[-1]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def bucket_key(path: str, in_features: int, max_rows: int, tb: int, kp: int, straddle: bool,
               dtype: str) -> str:
    kp = kp if path == "decode" else 0  # the prefill kernel has no KP
    return f"{path}|in={in_features}|rows={max_rows}|t={tb}|kp={kp}|s={int(bool(straddle))}|{dtype}"


def parse_key(key: str) -> dict:
    path, *fields, dt = key.split("|")
    out = {"path": path, "dtype": dt}
    for f in fields:
        name, v = f.split("=")
        out[name] = int(v)
    return out


BLOCK_NAMES = {"decode": ("BLOCK_M", "BLOCK_N", "BLOCK_G"),
               "prefill": ("BLOCK_M", "BLOCK_N", "BLOCK_K")}


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration; `source` says where it came from (for logs and tests)."""
    path: str
    variant: str
    blocks: tuple            # ((name, value), ...) in BLOCK_NAMES order
    num_warps: int = 4
    num_stages: int = 2
    source: str = "heuristic"
    kwargs: dict = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"unknown path {self.path!r}")
        if self.variant not in VARIANTS[self.path]:
            raise ValueError(f"unknown {self.path} variant {self.variant!r}; "
                             f"choose from {VARIANTS[self.path]}")
        b = dict(self.blocks)
        if set(b) != set(BLOCK_NAMES[self.path]) or any(v < 1 or v & (v - 1) for v in b.values()):
            raise ValueError(f"{self.path} config needs power-of-two {BLOCK_NAMES[self.path]}, "
                             f"got {b}")
        if self.path == "decode" and self.variant in ("v3", "v4") and b["BLOCK_M"] > 4:
            raise ValueError(f"decode {self.variant} takes BLOCK_M <= 4 (one accumulator per token)")
        object.__setattr__(self, "kwargs", {**b, "num_warps": self.num_warps,
                                            "num_stages": self.num_stages})

    def block(self, name: str) -> int:
        return dict(self.blocks)[name]

    def to_json(self) -> dict:
        return {"variant": self.variant, **dict(self.blocks), "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    @classmethod
    def from_dict(cls, path: str, d: dict, source: str = "given") -> "KernelConfig":
        names = BLOCK_NAMES[path]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"{path} config {d} lacks {missing}")
        extra = set(d) - set(names) - {"variant", "num_warps", "num_stages"}
        if extra:
            raise ValueError(f"{path} config {d}: unknown fields {sorted(extra)}")
        return cls(path, d.get("variant", DEFAULT_VARIANT[path]),
                   tuple((n, int(d[n])) for n in names), int(d.get("num_warps", 4)),
                   int(d.get("num_stages", 2)), source)


# ---------------------------------------------------------------- heuristic defaults


def heuristic(path: str, tb: int, kp: int = 32, variant: str | None = None) -> KernelConfig:
    """A config valid for every shape (registers checked offline for sm_90, NOTES.md)."""
    variant = variant or DEFAULT_VARIANT[path]
    if path == "decode":
        bm = min(tb, 4 if variant in ("v3", "v4") else 8)
        bn = 16 if variant in ("v3", "v4") or bm > 2 else 32
        bg = 4 if variant == "v4" else 1 if variant != "v0" else max(1, 32 // kp)
        return KernelConfig("decode", variant, (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_G", bg)),
                            4, 1, "heuristic")
    bm = 16 if tb <= 16 else 32 if tb <= 32 else 64
    return KernelConfig("prefill", variant, (("BLOCK_M", bm), ("BLOCK_N", 32), ("BLOCK_K", 64)),
                        4, 3, "heuristic")


# ---------------------------------------------------------------- tables


def _table_files() -> list[Path]:
    files: list[Path] = []
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry:
            p = Path(entry)
            files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    files += sorted(CONFIG_DIR.glob("*.json"))
    return files


def read_table(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("version") != TABLE_VERSION or "gpu" not in data or "entries" not in data:
        raise ValueError(f"{path}: not a version-{TABLE_VERSION} kernel config table")
    return data


@functools.lru_cache(maxsize=1)
def tables() -> tuple:
    """(gpu name, capability tuple, {key: config dict}) of every readable table, env first."""
    out = []
    for f in _table_files():
        try:
            data = read_table(f)
        except (OSError, ValueError) as e:  # a bad file must not stop serving: skip it, loudly
            import warnings
            warnings.warn(f"kernel config table {f} ignored: {e}")
            continue
        ents = {k: v["config"] for k, v in data["entries"].items() if "config" in v}
        out.append((data["gpu"], tuple(data.get("capability", ())), ents))
    return tuple(out)


def reload_tables() -> None:
    """Forget loaded tables and cached lookups (after writing a table, in tests)."""
    tables.cache_clear()
    lookup.cache_clear()


@functools.lru_cache(maxsize=16)
def device_identity(index: int) -> tuple[str, tuple[int, int]]:
    """(name, (major, minor)) of CUDA device `index` (read once; no sync)."""
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def _nearest_t(ents: dict, key: str) -> str | None:
    want = parse_key(key)
    best, best_d = None, None
    for k in ents:
        if not k.startswith(want["path"] + "|"):
            continue
        p = parse_key(k)
        if all(p[f] == want[f] for f in ("in", "rows", "kp", "s", "dtype")):
            d = abs(p["t"].bit_length() - want["t"].bit_length())
            if best_d is None or d < best_d:
                best, best_d = k, d
    return best


@functools.lru_cache(maxsize=8192)
def lookup(gpu: str, capability: tuple, path: str, in_features: int, max_rows: int, tb: int,
           kp: int, straddle: bool, dtype: str) -> KernelConfig:
    """The launch config of one bucket (see the module docstring for the fallbacks)."""
    key = bucket_key(path, in_features, max_rows, tb, kp, straddle, dtype)
    # a config is valid for both STRADDLE values and any KP (they only change the work per
    # element): a server that compiles STRADDLE=True for every delta (DeltaSlots.any_bits,
    # for CUDA graphs) or loads unusual keep counts still gets the tuned block shape
    near_keys = [key] + [bucket_key(path, in_features, max_rows, tb, kp2, s2, dtype)
                         for kp2, s2 in ((kp, not straddle), (KP_CHOICES[-1], straddle),
                                         (KP_CHOICES[-1], not straddle))]
    levels = [(n, c, e) for n, c, e in tables() if n == gpu]
    levels += [(n, c, e) for n, c, e in tables() if n != gpu and capability and c == tuple(capability)]
    for name, _, ents in levels:
        for i, k in enumerate(near_keys):
            if k in ents:
                src = f"table:{name}" if name == gpu else f"capability:{name}"
                return _from_table(path, ents[k], src + ("" if i == 0 else " (other kp/straddle)"))
    if path == "prefill":
        for name, _, ents in levels:
            near = _nearest_t(ents, key)
            if near is not None:
                return _from_table(path, ents[near], f"nearest-t:{name}")
    return heuristic(path, tb, kp)


def _from_table(path: str, d: dict, source: str) -> KernelConfig:
    return KernelConfig.from_dict(path, d, source)


def config_for(device: torch.device, path: str, in_features: int, max_rows: int,
               tokens_per_delta: int, kp: int, straddle: bool, dtype: torch.dtype) -> KernelConfig:
    """lookup() for a CUDA device (index None = the current device)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    name, cap = device_identity(idx)
    return lookup(name, cap, path, in_features, max_rows, t_bucket(tokens_per_delta), kp,
                  bool(straddle), dtype_name(dtype))


# ---------------------------------------------------------------- candidate sets (tuner)


def candidates(path: str, tb: int, kp: int, n_groups_max: int = 1,
               variants: tuple | None = None) -> list[KernelConfig]:
    """The pruned configs the tuner times for one bucket. Few on purpose: every distinct
    config is one compilation (~1 s), and the same few are shared by every shape."""
    variants = variants or TUNE_VARIANTS[path]
    variants = [v for v in variants if v in VARIANTS[path]]
    out = []
    if path == "decode":
        bm = min(tb, 16)
        for v in variants:
            if v == "v4":  # split-K: BLOCK_G = units (KP-element chunks) per program
                vm = min(bm, 4)
                # measured on an H200: larger BLOCK_G (fewer, longer programs) was faster
                # at every size tried (2..8), all slower than v3 (benchmarks/kernels/NOTES.md)
                for bn, bg, nw in ((16, 8, 4), (16, 16, 4), (16, 32, 4), (8, 16, 4),
                                   (32, 16, 8)):
                    if vm * bn * 32 // (32 * nw) > 32:
                        continue
                    out.append(KernelConfig("decode", v, (("BLOCK_M", vm), ("BLOCK_N", bn),
                                                          ("BLOCK_G", bg)), nw, 1, "candidate"))
            elif v == "v3":
                vm = min(bm, 4) if v == "v3" else bm
                vkp = 32
                for bn, nw in ((16, 4), (32, 4), (64, 4), (32, 8), (64, 8)):
                    if vm * bn * vkp // (32 * nw) > 32:   # accumulator registers per thread
                        continue
                    out.append(KernelConfig("decode", v, (("BLOCK_M", vm), ("BLOCK_N", bn),
                                                          ("BLOCK_G", 1)), nw, 1, "candidate"))
            else:
                for bn, bg, nw in ((16, 1, 4), (32, 1, 4), (16, 4, 4), (32, 2, 8)):
                    if bm * bn * bg * kp > 16384 or (bg > 1 and n_groups_max == 1):
                        continue
                    out.append(KernelConfig("decode", v, (("BLOCK_M", bm), ("BLOCK_N", bn),
                                                          ("BLOCK_G", bg)), nw, 1, "candidate"))
        if not out:
            out.append(heuristic(path, tb, kp))
        return out
    bms = (16,) if tb <= 16 else (32,) if tb <= 32 else (64,) if tb <= 64 else (64, 128)
    for v in variants:
        for bm in bms:
            # (64, 64) tiles spill 76-828 B for every BLOCK_M (sm_90, Triton 3.6): not tried
            for bn, bk, nw, ns in ((64, 32, 4, 2), (128, 32, 8, 2), (32, 64, 4, 3)):
                out.append(KernelConfig("prefill", v, (("BLOCK_M", bm), ("BLOCK_N", bn),
                                                       ("BLOCK_K", bk)), nw, ns, "candidate"))
    return out
