"""`deltadq` command line: compress, inspect, merge, serve, kv-compress, tune-kernels."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap
import threading

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


# kept equal to tools.compress.DENSE_DTYPES (test_cli_help.py); not imported from there
# because that module imports torch and `deltadq --help` should answer at once
DENSE_DTYPES = ("auto", "float32", "bfloat16", "int8", "int4", "int2")
TOP_EXAMPLES = """examples:
  deltadq compress --base ./base --finetune ./math-ft --out ./math-delta --ratio 16
  deltadq inspect ./math-delta --base ./base --finetune ./math-ft
  deltadq merge --base ./base --delta ./math-delta --out ./math-merged
  deltadq serve ./base --delta-modules math=./math-delta,code=./code-delta
  deltadq kv-compress --model ./base --out ./base-kv2 --kv-heads 2
  deltadq tune-kernels --out h100.json --preset 7b,8b     (on a GPU)

Each command's --help lists its options and ends with an example."""


def _sub(sub, name: str, help: str, description: str, example: str):
    return sub.add_parser(name, help=help, description=textwrap.fill(description, 88),
                          epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _no_progress(p) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars on stderr (for logs and scripts)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltadq", description=__doc__, epilog=TOP_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", add_help=False,
                   help="serve the base and many fine-tunes with vLLM (deltadq serve --help)")
    sub.add_parser("tune-kernels", add_help=False,
                   help="time the Triton delta kernels on this GPU and write their config table "
                        "(deltadq tune-kernels --help)")

    c = _sub(sub, "compress", "compress fine-tune minus base into a delta artifact",
             "Compress what a fine-tune changes (fine-tune minus base) into a delta artifact "
             "of a given TRUE compression ratio (docs/compression.md, docs/format.md).",
             "deltadq compress --base ./base --finetune ./math-ft --out ./math-delta "
             "--ratio 16")
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
                   help="bits per kept value (default: searched over 1, 2, 3, 4 per matrix)")
    c.add_argument("--decompose-bits", type=int, default=0,
                   help="Separate Quantization: top M bits name a part, stored implicitly "
                        "(stores positions; default 0)")
    c.add_argument("--quant-range", choices=["auto", "search", "minmax"], default="auto",
                   help="scale range of each block: 'search' tries the min-max range shrunk "
                        "toward the mean and keeps the smallest squared error (<= 4 bits); "
                        "'minmax' never clips; 'auto' (default): search from --ratio 512 up, "
                        "where min-max ranges collapse (docs/compression.md)")
    c.add_argument("--seed", type=int, default=0,
                   help="seed of the kept-position hash and of calibration sampling (default 0)")
    c.add_argument("--dense-dtype", default="auto", choices=DENSE_DTYPES,
                   help="how 1-D deltas (norms, biases) are stored; auto (default): float32, "
                        "else bfloat16, else int8, int4 or int2 codes, whichever first fits "
                        "2%% of the byte budget")
    c.add_argument("--tp-align", type=int, default=8,
                   help="prefer group sizes that split evenly across this many tensor-parallel "
                        "shards, so a server can shard the delta without re-compressing "
                        "(default 8; 1 = no preference)")
    c.add_argument("--values", choices=["plain", "calibrated"], default="plain",
                   help="plain (default): rescaled dropout values, as the papers describe, "
                        "each scale block shrunk or refit where that lowers the held-out "
                        "calibration error; calibrated: kept values solved to minimise each "
                        "layer's output error on the calibration text (same positions, same "
                        "bytes; slower). Calibrated values lower each layer's error on that "
                        "text but kept no more of the real fine-tunes' tasks and were further "
                        "from them on held-out text in most runs (benchmarks/README.md)")
    c.add_argument("--calibrate-on", choices=["finetune", "base"], default="finetune",
                   help="whose layer inputs the errors and calibrated values use: the "
                        "fine-tune's own activations on the calibration text (default) or the "
                        "base's")
    c.add_argument("--budget", choices=["sensitivity", "share"], default="share",
                   help="how the byte budget is split across matrices: share (default): by "
                        "element count; sensitivity (deltadq and dare): a quick probe pass "
                        "estimates each matrix's output error at several byte budgets and "
                        "bytes go where the relative error falls fastest (lower error on the "
                        "calibration text, but it lost a narrow task's accuracy and text "
                        "agreement on a real fine-tune: docs/compression.md)")
    # default None: the compressor's own default (tools/methods.MIN_GAIN, 0.9) applies; a
    # literal here once said 0.5 and silently overrode it for every CLI user
    c.add_argument("--min-gain", type=float, default=None,
                   help="refined values (shrunk, refit, calibrated) are stored only if they "
                        "keep at least this fraction of the delta's output along the true "
                        "delta (held-out calibration rows; default 0.9); 0: the values with "
                        "the smallest calibration error whatever they remove (shrinks deltas "
                        "toward zero at high ratios: a narrow task can be lost)")
    c.add_argument("--plain-gain", type=float, default=None,
                   help="plain values on the range search's clipped grid (used from 512x) "
                        "that keep less than this fraction of the delta's output get their "
                        "scales raised to it (at most 4x); default 0: off. 0.9 kept more of "
                        "a narrow task at 1024x (69%% -> 86%% of the fine-tune's) but moved "
                        "general text further from the fine-tune than the base "
                        "(docs/compression.md)")
    c.add_argument("--unsafe", choices=["output", "delta", "keep"], default="output",
                   help="which matrices are dropped as unsafe (bytes to the rest, always "
                        "reported): output (default): error >= the fine-tuned layer's own "
                        "output on held-out calibration rows; delta: error >= the delta's "
                        "output (stricter: drops matrices whose noise averages out over the "
                        "network); keep: never drop")
    c.add_argument("--check", choices=["fail", "warn", "off"], default="fail",
                   help="whole-model check after compressing: the fine-tune, the base and "
                        "base + delta run on 1024 held-out tokens (layer by layer); when "
                        "base + delta is further from the fine-tune than the base, each "
                        "layer's delta is scaled where that repairs it (to at most half the "
                        "base's KL). fail (default): nothing is written when the result is "
                        "further from the fine-tune than the base is (higher KL, or top-1 "
                        "agreement lower beyond noise); warn: written anyway, with a "
                        "warning; off: no check")
    c.add_argument("--check-text", default=None, metavar="FILE",
                   help="held-out UTF-8 text for --check (default: a builtin text, different "
                        "from the calibration text); your own domain's text judges what your "
                        "users will send")
    c.add_argument("--no-method-choice", action="store_true",
                   help="store the embedding / LM head with --method even where low-rank is "
                        "better at the same bytes")
    c.add_argument("--force", action="store_true", help="replace --out if it exists")
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    _no_progress(c)

    i = _sub(sub, "inspect", "describe a delta artifact (sizes; with the models: errors)",
             "What a delta artifact holds and what it costs; with --base and --finetune also "
             "how good it is, per tensor (the legend under the table says what each column "
             "means and which values are bad).",
             "deltadq inspect ./math-delta --base ./base --finetune ./math-ft")
    i.add_argument("delta", help="delta directory written by `deltadq compress`")
    i.add_argument("--base", help="with --finetune: also per-tensor errors and BIR statistics "
                                  "(the base the delta was compressed from)")
    i.add_argument("--finetune", help="with --base: the fine-tune the delta was made from")
    i.add_argument("--calibration", default=None,
                   help="UTF-8 text for the output errors (default: the built-in text)")
    i.add_argument("--json", action="store_true", help="print JSON on stdout")
    _no_progress(i)

    m = _sub(sub, "merge", "write base + delta as a complete HF checkpoint",
             "Rebuild the fine-tune the server serves: base + delta written as a complete "
             "Hugging Face checkpoint (safetensors shards, config, tokenizer), loadable by "
             "transformers or vLLM as usual; the ground truth for the served outputs.",
             "deltadq merge --base ./base --delta ./math-delta --out ./math-merged")
    m.add_argument("--base", required=True,
                   help="HF directory of the base the delta was compressed from")
    m.add_argument("--delta", required=True, help="delta directory written by `deltadq compress`")
    m.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    m.add_argument("--force", action="store_true", help="replace --out if it exists")
    _no_progress(m)

    k = _sub(sub, "kv-compress",
             "convert MHA/GQA attention to fewer KV heads (a plain HF checkpoint), or map a "
             "fine-tune's delta onto such a converted base",
             "Convert a model's attention to fewer key/value heads (a plain HF checkpoint any "
             "server loads), or, with --apply-to-delta, map a delta compressed against the "
             "original base onto the converted one (docs/kv-heads.md).",
             "deltadq kv-compress --model ./base --out ./base-kv2 --kv-heads 2")
    k.add_argument("--model", required=True,
                   help="HF directory of the model to convert (with --apply-to-delta: the "
                        "converted base written by kv-compress)")
    k.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    k.add_argument("--kv-heads", type=int, default=None,
                   help="target number of KV heads (divides the query heads; the current KV "
                        "head count must be a multiple of it)")
    k.add_argument("--method", default="auto",
                   help="auto (default: per layer, the best on held-out calibration tokens of "
                        "SVD maps and mean-pooling, for keys and values independently), svd "
                        "(calibrated SVD for values, RoPE-commuting per-frequency complex PCA "
                        "of the keys as the softmax sees them), svd-uncentred (the seed "
                        "paper's SVD-a: PCA of the uncentred keys; for comparison) or meanpool "
                        "(GQA uptraining initialisation)")
    k.add_argument("--grouping", default="auto",
                   help="auto (default: adjacent and similarity grouping are both candidates), "
                        "adjacent, or similarity (groups KV heads by calibration similarity and "
                        "permutes q/o heads to match)")
    k.add_argument("--weighting", default="attention",
                   help="attention (default: weight key errors by query energy and value "
                        "errors by o_proj) or none (plain PCA of keys and values)")
    k.add_argument("--calibration", default=None,
                   help="UTF-8 text file for calibration and recovery (default: a small "
                        "built-in text)")
    k.add_argument("--calib-seqs", type=int, default=32,
                   help="calibration sequences (default 32)")
    k.add_argument("--calib-seq-len", type=int, default=128,
                   help="tokens per calibration sequence (default 128)")
    k.add_argument("--recover-steps", type=int, default=0,
                   help="steps of recovery distillation into the attention projections "
                        "(default 0: none)")
    k.add_argument("--recover-lr", type=float, default=1e-4,
                   help="learning rate of the recovery distillation (default 1e-4)")
    k.add_argument("--maps", default=None,
                   help="reuse the maps of an earlier conversion (its --out directory), e.g. "
                        "to convert a merged fine-tune with its base's maps")
    k.add_argument("--apply-to-delta", default=None, metavar="DELTA_DIR",
                   help="map this delta (compressed against the original base) into the "
                        "converted --model's space; --out is the new delta")
    k.add_argument("--delta-storage", default="recompress",
                   help="with --apply-to-delta: recompress (default: re-encode the mapped "
                        "attention deltas with the delta's own method and bytes per element) "
                        "or dense (exact mapped deltas in float32; large)")
    k.add_argument("--seed", type=int, default=0,
                   help="seed of calibration sampling and recovery (default 0)")
    k.add_argument("--force", action="store_true", help="replace --out if it exists")
    k.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    _no_progress(k)
    return p


def cmd_compress(a) -> int:
    from .tools.compress import CompressOptions, compress
    from .tools.compress_summary import format_summary

    opt = CompressOptions(method=a.method, ratio=a.ratio, group_size=a.group_size, bits=a.bits,
                          decompose_bits=a.decompose_bits, keep=a.keep, seed=a.seed,
                          calibration=a.calibration, dense_dtype=a.dense_dtype, force=a.force,
                          tp_align=a.tp_align, quant_range=a.quant_range,
                          calibrated=a.values == "calibrated", calibrate_on=a.calibrate_on,
                          choose_method=not a.no_method_choice, budget=a.budget,
                          unsafe=a.unsafe, check=a.check, check_text=a.check_text,
                          **({} if a.min_gain is None else {"min_gain": a.min_gain}),
                          **({} if a.plain_gain is None else {"plain_gain": a.plain_gain}),
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


def cmd_kv_compress(a) -> int:
    from .tools.kv_compress import (DeltaMapOptions, KVCompressOptions, apply_to_delta,
                                    format_delta_summary, format_summary, kv_compress)

    progress = not (a.no_progress or a.json)
    if a.apply_to_delta:
        if a.kv_heads is not None or a.maps is not None or a.recover_steps:
            raise DeltaDQError("--apply-to-delta takes its maps from --model (the converted "
                               "base); --kv-heads, --maps and --recover-steps do not apply",
                               "drop those options")
        s = apply_to_delta(a.model, a.apply_to_delta, a.out,
                           DeltaMapOptions(storage=a.delta_storage, calibration=a.calibration,
                                           force=a.force, progress=progress))
        print(json.dumps(s, indent=1) if a.json else format_delta_summary(s))
        return 0
    opt = KVCompressOptions(kv_heads=a.kv_heads, method=a.method, grouping=a.grouping,
                            weighting=a.weighting, calibration=a.calibration,
                            calib_seqs=a.calib_seqs, calib_seq_len=a.calib_seq_len,
                            recover_steps=a.recover_steps, recover_lr=a.recover_lr, maps=a.maps,
                            seed=a.seed, force=a.force, progress=progress)
    s = kv_compress(a.model, a.out, opt)
    print(json.dumps(s, indent=1) if a.json else format_summary(s))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # every `vllm serve` flag: vLLM's own parser handles them
        from .serve import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["tune-kernels"]:  # = python -m deltadq_vllm.kernels.tune (same flags)
        from deltadq_vllm.kernels.tune import main as tune_main

        return tune_main(argv[1:])
    args = build_parser().parse_args(argv)
    handler = {"compress": cmd_compress, "inspect": cmd_inspect, "merge": cmd_merge,
               "kv-compress": cmd_kv_compress}[args.command]
    previous = _terminate_like_interrupt()
    try:
        return handler(args)
    except DeltaDQError as e:
        print(f"deltadq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated; nothing was written", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM (a job scheduler's timeout, `kill`) during an offline command."""


def _terminate_like_interrupt():
    """SIGTERM unwinds like Ctrl-C, so the staging directories beside --out are removed
    (Python's default for SIGTERM is to die at once, leaving them behind). Returns the
    previous handler (None when not on the main thread: nothing installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated()
    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
