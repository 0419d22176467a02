"""`deltadq` command line: compress, inspect, merge (serve comes with the vLLM plugin)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import DeltaDQError


def _group_size(v: str):
    if v == "auto":
        return None
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("group size must be >= 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltadq", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress fine-tune minus base into a delta artifact")
    c.add_argument("--base", required=True, help="HF directory of the base model")
    c.add_argument("--finetune", required=True, help="HF directory of the fine-tuned model")
    c.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    c.add_argument("--method", default="deltadq",
                   help="deltadq (default), dare, bitdelta, magnitude, lowrank, or dense "
                        "(exact, uncompressed reference)")
    c.add_argument("--ratio", type=float, default=None,
                   help="target TRUE compression ratio: dense bf16 bytes of everything the "
                        "fine-tune changes / bytes of all artifact files (default 16)")
    c.add_argument("--keep", type=float, default=None,
                   help="explicit kept fraction instead of --ratio")
    c.add_argument("--calibration", default=None,
                   help="UTF-8 text file for calibration (default: a small built-in text)")
    c.add_argument("--group-size", type=_group_size, default=None,
                   help="'auto' (default: per matrix, by calibrated output error) or an integer")
    c.add_argument("--bits", type=int, default=None,
                   help="bits per kept value (default: searched over 2, 3, 4)")
    c.add_argument("--decompose-bits", type=int, default=0,
                   help="Separate Quantization: top M bits name a part, stored implicitly "
                        "(stores positions; default 0)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dense-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of densely stored deltas (norms, biases)")
    c.add_argument("--force", action="store_true", help="replace --out if it exists")
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    c.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("inspect", help="describe a delta artifact")
    i.add_argument("delta")
    i.add_argument("--base", help="with --finetune: also per-layer errors and BIR statistics")
    i.add_argument("--finetune")
    i.add_argument("--calibration", default=None)
    i.add_argument("--json", action="store_true")

    m = sub.add_parser("merge", help="write base + delta as a complete HF checkpoint")
    m.add_argument("--base", required=True)
    m.add_argument("--delta", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--force", action="store_true")
    m.add_argument("--no-progress", action="store_true")
    return p


def cmd_compress(a) -> int:
    from .tools.compress import CompressOptions, compress, format_summary

    opt = CompressOptions(method=a.method, ratio=a.ratio, group_size=a.group_size, bits=a.bits,
                          decompose_bits=a.decompose_bits, keep=a.keep, seed=a.seed,
                          calibration=a.calibration, dense_dtype=a.dense_dtype, force=a.force,
                          progress=not (a.no_progress or a.json))
    s = compress(a.base, a.finetune, a.out, opt)
    if a.json:
        print(json.dumps(s, indent=1))
    else:
        print(format_summary(s))
    return 0


def cmd_inspect(a) -> int:
    from .tools.inspect_delta import describe, format_description, format_quality, quality

    if bool(a.base) != bool(a.finetune):
        raise DeltaDQError("inspect needs both --base and --finetune for quality statistics",
                           "pass both, or neither")
    d = describe(a.delta)
    if a.base:
        d["quality"] = quality(a.delta, a.base, a.finetune, a.calibration)
    if a.json:
        print(json.dumps(d, indent=1))
    else:
        print(format_description(d))
        if a.base:
            print(format_quality(d["quality"]))
    return 0


def cmd_merge(a) -> int:
    from .tools.merge import merge

    s = merge(a.base, a.delta, a.out, force=a.force, progress=not a.no_progress)
    print(f"wrote {s['out']}: {s['tensors']} tensors, {s['bytes']:,} bytes, {s['shards']} shard(s)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"compress": cmd_compress, "inspect": cmd_inspect, "merge": cmd_merge}[args.command]
    try:
        return handler(args)
    except DeltaDQError as e:
        print(f"deltadq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
