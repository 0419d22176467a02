"""What `deltadq serve` checks before vLLM is imported or an engine starts.

A mistake in the command line should cost a second, not a 60-second engine start
followed by a long traceback. Two stages, both without vLLM:

1. plain Python (no torch): typos in the delta flags' names, the fine-tune names
   (delta_modules.validate_delta_name, the rule every load uses: valid, unique, not a
   name the base is served under) and the delta flags among themselves, the base path
   (a model folder, or a Hugging Face repo id) and, with deltas, its architecture
   (architectures.py: only those the matrix verified), every `--delta-modules` /
   `--standalone-delta` directory (exists, has a readable manifest made for a base of
   this architecture);
2. with torch, cheapest first: the flags turned into engine settings on a copy
   (engine_flags.translate, which checks the rest), every delta's files read the way
   the server reads them and checksummed (DeltaArtifact / artifact_files), and only
   then each delta against the base: architecture, tensors and the content hash of
   every base tensor (the first hash of a 7B base reads all of it, tens of seconds on a
   small machine; cached per base file afterwards).

Only the command line is read here (not a `--config` YAML file; vLLM's parser reads
that later, and the same checks run again before the engine starts).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import gzip
import json
import logging
import os
import re

from . import engine_flags
from .architectures import check_architecture
from .format.artifact_files import MANIFEST   # the artifact format's reader, torch-free
from .delta_modules import base_served_names, parse_delta_modules
from .errors import DeltaDQError

# a Hugging Face repo id: name or namespace/name (what vLLM would try to download)
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
# vLLM flags with more than one value (so their values are not mistaken for the base)
_MULTI_VALUE = ("--served-model-name", "--lora-modules")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        problem, _, fix = message.partition("\n  fix: ")
        # "argument --delta-modules: --delta-modules: ..." -> "--delta-modules: ..."
        head, sep, rest = problem.partition(": ")
        if sep and head.startswith("argument ") and rest.startswith(head[len("argument "):]):
            problem = rest
        raise DeltaDQError(problem, fix or "see `deltadq serve --help`")


def add_serve_args(parser) -> None:
    """Flags only `deltadq serve` has (beside engine_flags' delta flags)."""
    parser.add_argument("--standalone-delta", default=None, metavar="DIR",
                        help="serve one fine-tune alone: the base merged with this delta at "
                             "load time (load format `deltadq`; no per-token cost)")


def light_parser() -> argparse.ArgumentParser:
    """The delta flags plus the vLLM flags these checks (and engine_flags.translate) read;
    everything else is left for vLLM's parser (parse_known_args)."""
    p = _Parser(prog="deltadq serve", add_help=False, allow_abbrev=False)
    engine_flags.add_delta_args(p)
    add_serve_args(p)
    p.add_argument("--model", default=None)
    for flag in _MULTI_VALUE:
        p.add_argument(flag, nargs="+", default=None)
    p.add_argument("--tokenizer", default=None)
    for flag in ("--additional-config", "--hf-overrides", "--model-loader-extra-config"):
        p.add_argument(flag, default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--worker-extension-cls", default="")
    p.add_argument("--enforce-eager", action="store_true")
    return p


def _normalize(argv: list[str]) -> list[str]:
    """vLLM accepts --flag_name for --flag-name; so do these checks."""
    out = []
    for a in argv:
        if a.startswith("--"):
            key, sep, value = a.partition("=")
            a = key.replace("_", "-") + sep + value
        out.append(a)
    return out


def _check_typos(argv: list[str], parser) -> None:
    ours = [s for act in parser._actions for s in act.option_strings
            if s.startswith(("--delta", "--max-deltas", "--max-cpu-deltas", "--enable-runtime",
                             "--standalone"))]
    for a in argv:
        flag = a.partition("=")[0]
        if flag.startswith("--") and "delta" in flag and flag not in ours:
            near = difflib.get_close_matches(flag, ours, n=1)
            raise DeltaDQError(f"unknown flag {flag}",
                               f"did you mean {near[0]}?" if near
                               else "see `deltadq serve --help` for the delta flags")


def parse(argv: list[str]) -> argparse.Namespace:
    """The light namespace: the base (`model`), the delta flags, a few vLLM flags."""
    argv = _normalize(argv)
    parser = light_parser()
    _check_typos(argv, parser)
    base = None
    if argv and not argv[0].startswith("-"):  # `deltadq serve BASE ...` (vLLM's positional)
        base, argv = argv[0], argv[1:]
    args, _ = parser.parse_known_args(argv)
    if base is not None:
        if args.model is not None and args.model != base:
            raise DeltaDQError(f"two base models: {base} and --model {args.model}",
                               "name the base once")
        args.model = base
    return args


# ------------------------------------------------------------------ stage 1


def check_base(base: str | None, wants_deltas: bool) -> str | None:
    """The base's local folder (None: a Hugging Face repo id vLLM will fetch)."""
    if base is None:
        if wants_deltas:
            raise DeltaDQError("no base model given",
                               "deltadq serve BASE --delta-modules name=path ...")
        return None
    path = os.path.expanduser(base)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise DeltaDQError(f"base {base} is a folder but not a model folder (no config.json)",
                               "pass the folder that holds config.json and the *.safetensors "
                               "weights")
        return path
    if os.path.exists(path):
        raise DeltaDQError(f"base {base} is a file, not a model folder",
                           "pass the folder that holds config.json and the weights")
    first = base.split("/", 1)[0]
    looks_local = (base.startswith((".", "/", "~")) or not HF_REPO_ID.match(base)
                   or ("/" in base and os.path.isdir(first)))
    if looks_local:
        raise DeltaDQError(f"base model folder {base} does not exist",
                           "check the path (or give a Hugging Face repo id like org/name)")
    return None


def _read_config(base_dir: str) -> dict:
    try:
        with open(os.path.join(base_dir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DeltaDQError(f"cannot read {base_dir}/config.json: {e}",
                           "restore the base model's config.json") from None


def check_delta_dir(label: str, path: str, base_config: dict | None) -> None:
    """Exists, has a readable manifest, made for a base with this architecture."""
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise DeltaDQError(f"{label}: delta directory {path} {what}",
                           "pass a directory written by `deltadq compress`")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        old = os.path.exists(os.path.join(path, "deltadq.json"))   # pre-release format 1
        raise DeltaDQError(f"{label}: {path} is not a deltadq artifact (no {MANIFEST})"
                           + (" but has deltadq.json, the manifest of the pre-release format 1"
                              if old else ""),
                           "re-run `deltadq compress` with this deltadq-vllm" if old
                           else "pass a directory written by `deltadq compress`")
    try:
        with gzip.open(manifest_path, "rt", encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError, EOFError) as e:
        raise DeltaDQError(f"{label}: corrupt manifest {manifest_path}: {e}",
                           "re-run `deltadq compress` to rewrite the artifact") from None
    arch = (manifest.get("base") or {}).get("architecture") if isinstance(manifest, dict) else None
    if base_config is None or not isinstance(arch, dict):
        return  # stage 2 (DeltaArtifact) reports a malformed manifest
    for k, v in arch.items():
        if base_config.get(k) != v:
            raise DeltaDQError(f"{label}: delta {path} was made for a base with {k}={v!r}, but "
                               f"the served base has {k}={base_config.get(k)!r}",
                               "pass the base model the delta was compressed from")


def stage1(argv: list[str]) -> argparse.Namespace:
    args = parse(argv)
    # the command line itself first (names, flags), then the file system
    modules = parse_delta_modules(args.delta_modules or [], base_names=base_served_names(args))
    if args.standalone_delta and modules:
        raise DeltaDQError("--standalone-delta serves one fine-tune alone and cannot be "
                           "combined with --delta-modules", "pass only one of the two")
    if engine_flags.wants_deltas(args):
        engine_flags.check_flags(args)
    wants = engine_flags.wants_deltas(args) or bool(args.standalone_delta)
    base_dir = check_base(args.model, wants)
    if args.enable_runtime_deltas and args.delta_root and not os.path.isdir(args.delta_root):
        raise DeltaDQError(f"--delta-root {args.delta_root} is not a directory",
                           "create it, or pass the directory runtime loads may read from")
    config = _read_config(base_dir) if base_dir else None
    if config is not None and engine_flags.wants_deltas(args):
        # deltas are added inside vLLM's layers: only on the architectures the matrix
        # verified (--standalone-delta merges at load and works on any)
        check_architecture(config.get("architectures"), f"the base model {args.model}")
    config = config.get("text_config", config) if config else None
    for m in modules:
        check_delta_dir(f"fine-tune {m.name!r}", m.path, config)
    if args.standalone_delta:
        check_delta_dir("--standalone-delta", args.standalone_delta, config)
    return args


# ------------------------------------------------------------------ stage 2


def _trial_translate(args: argparse.Namespace) -> None:
    """engine_flags.translate on a copy: the remaining flag checks (JSON values, load
    format with extended vocabularies, ...), which only read manifests."""
    trial = copy.deepcopy(args)
    quiet = logging.getLogger("deltadq")
    was, quiet.disabled = quiet.disabled, True   # the real translate logs its notes later
    try:
        engine_flags.translate(trial)
    except ValueError as e:  # e.g. a JSON flag that is not JSON
        raise DeltaDQError(f"invalid flag value: {e}", "see `deltadq serve --help`") from None
    finally:
        quiet.disabled = was


def stage2(args: argparse.Namespace) -> set[str]:
    """Flags, checksums, then the base check (torch); returns the delta paths validated."""
    from .format.artifact import DeltaArtifact
    from .serving.loaded import check_against_base

    _trial_translate(args)
    deltas = [(f"fine-tune {m.name!r}", m.path) for m in args.delta_modules or []]
    if args.standalone_delta:
        deltas.append(("--standalone-delta", args.standalone_delta))
    opened = []
    for label, path in deltas:   # every delta's files before the (slow) base hash
        try:
            opened.append((label, path, DeltaArtifact(path)))
        except DeltaDQError as e:
            raise DeltaDQError(f"{label}: {e.problem}", e.fix) from None
    base = os.path.expanduser(args.model) if args.model else None
    if base is not None and os.path.isdir(base):
        for label, _, art in opened:
            try:
                check_against_base(art, base)
            except DeltaDQError as e:
                raise DeltaDQError(f"{label}: {e.problem}", e.fix) from None
    return {path for _, path, _ in opened}


def preflight(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """Both stages; raises DeltaDQError on the first problem."""
    args = stage1(argv)
    return args, stage2(args)


def one_line(e: DeltaDQError) -> str:
    """`deltadq serve: error: <problem> (fix: <fix>)` on one line."""
    problem = " ".join(str(e.problem).split())
    return f"deltadq serve: error: {problem}" + (f" (fix: {e.fix})" if e.fix else "")
