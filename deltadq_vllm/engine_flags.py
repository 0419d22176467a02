"""Command-line flags for serving deltas, and how they become vLLM engine settings.

The flags are added to every vLLM serve parser by the plugin (so `vllm serve` gets
them where its console script works) and used unchanged by `deltadq serve`:

    --delta-modules SPEC [SPEC ...]   fine-tunes to serve (delta_modules.py for syntax)
    --max-deltas N                    slots: distinct fine-tunes per batch (vLLM --max-loras)
    --max-cpu-deltas N                deltas kept in host memory (vLLM --max-cpu-loras)
    --delta-cpu-strategy S            CPU path: how an active delta is held (kernels/cpu.py)
    --delta-min-ratio R               GPU: default arena room, N deltas compressed >= R x
    --delta-arena-mb MB               GPU: device memory for all resident deltas (one arena)
    --delta-arena-reserve-mb MB       GPU: room beyond the deltas given (runtime loads)
    --delta-vocab-size N              logits width when fine-tunes add tokens (default: the
                                      largest vocabulary of --delta-modules)
    --enable-runtime-deltas           POST /v1/load_delta and /v1/unload_delta
    --delta-root DIR                  the only directory runtime loads may read from

Deltas ride on vLLM's LoRA plumbing, so `translate` turns them into `enable_lora`,
`max_loras`, `max_cpu_loras` and an `additional_config["deltadq"]` entry that the
engine and every worker see. Nothing else is forced: the user's compilation flags
(`-O`, `--compilation-config`, `--enforce-eager`) stand, and the delta layers are CUDA-graph
and torch.compile safe (docs/serving.md, "Graph safety").
"""

from __future__ import annotations

import argparse
import json

from .delta_modules import base_served_names, parse_delta_modules, validate_delta_name
from .errors import DeltaDQError

CPU_STRATEGIES = ("dense", "merged", "dequant", "csr")
DEFAULT_MAX_DELTAS_CAP = 8
PLUGIN_NAMES = ("deltadq", "deltadq_api")
WORKER_EXTENSION = "deltadq_vllm.serving.residency.DeltaStatsExtension"


class DeltaModulesAction(argparse.Action):
    """Parses and validates --delta-modules items at parse time (clear usage errors)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            parsed = parse_delta_modules(values)
        except DeltaDQError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        current = list(getattr(namespace, self.dest, None) or [])
        names = {m.name for m in current}
        for m in parsed:
            if m.name in names:
                raise argparse.ArgumentError(self, f"the name {m.name!r} is used twice\n"
                                                   "  fix: give every fine-tune its own name")
            names.add(m.name)
        setattr(namespace, self.dest, current + parsed)


def add_delta_args(parser) -> None:
    """Add the delta flags to a vLLM serve parser (idempotent)."""
    if any("--delta-modules" in a.option_strings for a in parser._actions):
        return
    g = parser.add_argument_group("deltadq", "Serve compressed fine-tune deltas on this base "
                                             "(deltadq-vllm)")
    g.add_argument("--delta-modules", nargs="+", action=DeltaModulesAction, default=None,
                   metavar="SPEC",
                   help="fine-tunes to serve: name=path pairs (comma- or space-separated) or "
                        "JSON objects {\"name\": ..., \"path\": ...}; clients select one with "
                        "the OpenAI `model` field")
    g.add_argument("--max-deltas", type=int, default=None,
                   help="distinct fine-tunes in one batch (slots); default: number of "
                        f"--delta-modules, at most {DEFAULT_MAX_DELTAS_CAP}")
    g.add_argument("--max-cpu-deltas", type=int, default=None,
                   help="deltas kept in host memory (LRU); default: all --delta-modules")
    g.add_argument("--delta-cpu-strategy", choices=CPU_STRATEGIES, default="merged",
                   help="CPU path: how an active delta is held (docs/kernels.md); merged "
                        "(default): W_base + D per slot, replacing the base GEMM for its tokens")
    g.add_argument("--delta-min-ratio", type=float, default=8.0,
                   help="GPU: sizes the delta arena when --delta-arena-mb is not given: room "
                        "for --max-deltas deltas compressed at least this much (default 8)")
    g.add_argument("--delta-arena-mb", type=float, default=None,
                   help="GPU: device memory (MiB) for the compressed deltas of all resident "
                        "fine-tunes, one arena shared by every layer; a fine-tune takes its "
                        "bytes on disk, least recently used ones are evicted for room "
                        "(default: room for the --max-deltas largest --delta-modules, plus "
                        "--delta-arena-reserve-mb)")
    g.add_argument("--delta-arena-reserve-mb", type=float, default=0.0,
                   help="GPU: arena room (MiB) beyond the --delta-modules given, for fine-tunes "
                        "loaded at runtime (ignored with --delta-arena-mb)")
    g.add_argument("--delta-vocab-size", type=int, default=None,
                   help="vocabulary the server can emit when fine-tunes add tokens (default: "
                        "the largest of --delta-modules); rows the base lacks are zero for it")
    g.add_argument("--enable-runtime-deltas", action="store_true",
                   help="allow POST /v1/load_delta and /v1/unload_delta")
    g.add_argument("--delta-root", default=None,
                   help="runtime loads may only read deltas under this directory")


def wants_deltas(args) -> bool:
    return bool(getattr(args, "delta_modules", None)) or bool(
        getattr(args, "enable_runtime_deltas", False))


def _check(cond: bool, problem: str, fix: str) -> None:
    if not cond:
        raise DeltaDQError(problem, fix)


def _read_vocab(path: str) -> int | None:
    import os

    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    return cfg.get("vocab_size")


def _extend_vocab(args, modules, settings: dict) -> None:
    """Fine-tunes that add tokens need logits (and embeddings) for them: the server's
    vocabulary becomes the largest one, the base's missing rows are zero-padded while
    loading (load format `deltadq`), and the delta layers mask the extra logits of every
    request whose fine-tune lacks those tokens."""
    from .format.artifact import read_manifest

    base_vocab = _read_vocab(args.model) if args.model else None
    if base_vocab is None:
        return
    vocabs = []
    for m in modules:
        try:
            vocabs.append(read_manifest(m.path)["finetune"]["config"].get("vocab_size") or 0)
        except (OSError, ValueError, KeyError, EOFError):
            continue  # reported with a clear message when the delta is loaded
    need = max([base_vocab, args.delta_vocab_size or 0, *vocabs])
    settings["base_vocab"] = base_vocab
    if need <= base_vocab:
        return
    _check(getattr(args, "load_format", "auto") in ("auto", "safetensors", "deltadq"),
           f"fine-tunes add tokens (vocabulary {need} > base {base_vocab}), which needs the "
           f"`deltadq` load format, but --load-format is {args.load_format}",
           "drop --load-format")
    overrides = args.hf_overrides
    if isinstance(overrides, str):
        overrides = json.loads(overrides)
    overrides = dict(overrides or {})
    overrides["vocab_size"] = need
    args.hf_overrides = overrides
    args.load_format = "deltadq"
    loader_extra = dict(args.model_loader_extra_config or {})
    loader_extra["pad_vocab"] = need
    args.model_loader_extra_config = loader_extra
    settings["vocab_size"] = need


def check_flags(args) -> tuple[int, int]:
    """Check the delta flags among themselves (plain Python: `deltadq serve` runs this
    before vLLM is imported). Returns (max_deltas, max_cpu_deltas)."""
    modules = list(getattr(args, "delta_modules", None) or [])
    # the base's served names are known only now (the name rule itself ran at parse time)
    for m in modules:
        validate_delta_name(m.name, base_served_names(args))
    _check(not getattr(args, "lora_modules", None),
           "--lora-modules cannot be combined with --delta-modules",
           "serve LoRA adapters and deltas from separate servers")
    if getattr(args, "enable_runtime_deltas", False):
        _check(bool(getattr(args, "delta_root", None)),
               "--enable-runtime-deltas needs --delta-root",
               "pass --delta-root DIR: runtime loads may only read deltas under it")
    n = len(modules)
    max_deltas = args.max_deltas or max(1, min(n, DEFAULT_MAX_DELTAS_CAP))
    _check(max_deltas >= 1, f"--max-deltas must be >= 1, got {max_deltas}", "pass --max-deltas 4")
    max_cpu = args.max_cpu_deltas or max(n, max_deltas)
    _check(max_cpu >= max_deltas, f"--max-cpu-deltas ({max_cpu}) must be >= --max-deltas "
           f"({max_deltas})", "raise --max-cpu-deltas")
    _check(args.delta_arena_mb is None or args.delta_arena_mb > 0,
           f"--delta-arena-mb {args.delta_arena_mb} is not a positive size",
           "give the MiB of GPU memory for resident deltas, e.g. --delta-arena-mb 2048")
    reserve = getattr(args, "delta_arena_reserve_mb", 0.0) or 0.0
    _check(reserve >= 0, f"--delta-arena-reserve-mb {reserve} is negative",
           "give the extra MiB to reserve, e.g. --delta-arena-reserve-mb 512")
    _check(not (getattr(args, "speculative_config", None) or getattr(args, "spec_method", None)
                or getattr(args, "spec_model", None)),
           "speculative decoding cannot be combined with deltas: the LM head must know which "
           "request each logits row belongs to, and vLLM's V2 runner passes one adapter id per "
           "request, not per draft row",
           "drop --speculative-config / --spec-*, or serve the merged fine-tune "
           "(`deltadq merge`) from its own server")
    _check(not getattr(args, "enable_batch_sharded_sampling", None),
           "--enable-batch-sharded-sampling cannot be combined with deltas: it computes the "
           "sampler's logits in an order the LM head's delta rows cannot follow",
           "drop --enable-batch-sharded-sampling")
    return max_deltas, max_cpu


def translate(args) -> None:
    """Turn the delta flags of a parsed namespace into vLLM engine settings (in place)."""
    if not wants_deltas(args) or getattr(args, "_deltadq_translated", False):
        return
    modules = list(getattr(args, "delta_modules", None) or [])
    max_deltas, max_cpu = check_flags(args)
    args.enable_lora = True
    args.max_loras = max_deltas
    args.max_cpu_loras = max_cpu
    extra = args.additional_config
    if isinstance(extra, str):
        extra = json.loads(extra)
    extra = dict(extra or {})
    reserve = getattr(args, "delta_arena_reserve_mb", 0.0) or 0.0
    settings = {"cpu_strategy": args.delta_cpu_strategy, "min_ratio": args.delta_min_ratio,
                "arena_mb": args.delta_arena_mb, "arena_reserve_mb": reserve,
                "delta_paths": [str(m.path) for m in modules]}
    _extend_vocab(args, modules, settings)
    extra["deltadq"] = settings
    args.additional_config = extra
    if not getattr(args, "worker_extension_cls", ""):
        # lets /metrics read every worker's delta residency (serving/residency.py)
        args.worker_extension_cls = WORKER_EXTENSION
    args._deltadq_translated = True
    from . import vllm_compat

    vllm_compat.allow_plugins(*PLUGIN_NAMES)
