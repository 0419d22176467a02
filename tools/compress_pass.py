"""One pass of `deltadq compress`: stream base and fine-tune, spend the byte budget on every
changed tensor in order, and write the artifact (tools/compress.py repeats passes until the
true ratio is on target, then runs the whole-model check)."""

from __future__ import annotations

import gzip
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from deltadq_vllm.format.artifact import DeltaArtifact, dtype_name
from deltadq_vllm.format.artifact_writer import ArtifactWriter
from deltadq_vllm.checkpoint import Checkpoint, release_freed_memory
from deltadq_vllm.content_hash import content_fingerprint
from deltadq_vllm.errors import DeltaDQError
from deltadq_vllm.format.layouts import encode_dense, encode_hash_groupwise
from deltadq_vllm.format.positions import tensor_seed
from deltadq_vllm.format.quant import quantize
from deltadq_vllm.tokenizer_diff import diff_tokenizer
from deltadq_vllm.tokenizer_diff import stored_bytes as tokenizer_stored_bytes

from .budget import sensitivity_plan, uses_sensitivity
from .calibration import (known_final, layer_index, make_calibrator, preset_final,
                          read_calibration_text)
from .choose import (bytes_multiplier, calibration_for, choice_summary, choose, is_unsafe,
                     output_error, safe_ratio, tied_embedding, unsafe_reason)
from .compress_options import DEFAULT_RATIO, CompressOptions, resolve_quant_range, validate_options
from .compress_plan import (bf16_bytes, common_dtype, find_changed, order_plans,
                            plan_tensors)
from .compress_summary import by_class
from .methods import WIDTH_MIN_GAIN, MethodOptions, ResultMemo, UnfitError, check_group_size
from .ratio_fit import judge_pass
from .rss import RssTrace, peak_rss_bytes

SMALL_BITS = {"int8": 8, "int4": 4, "int2": 2}
# freed heap memory is handed back to the OS (release_freed_memory, ~10 ms a call on SmolLM2)
# once the tensors worked on since the last time hold this many elements: after every
# matrix of a 7B model, once per layer or so of a small one (it was before every tensor,
# norms included: 361 calls, 3-4.5 s of a SmolLM2 compress)
TRIM_EVERY_ELEMENTS = 1 << 22
# bytes per element of each way to store a 1-D delta, widest first
SMALL_SIZES = (("float32", 4.0), ("bfloat16", 2.0), ("int8", 1.0), ("int4", 0.5), ("int2", 0.25))
# "auto" stores 1-D deltas (norms, biases) in float32, else bfloat16, else 8-bit codes:
# the first whose bytes stay under this share of the artifact's byte budget
DENSE_SHARE = 0.02
# the lowest spent/given share of the layers' shares the streaming budget anticipates
FILL_FLOOR = 0.5


def metadata_bytes_estimate(changed, ft_config, seed: int) -> int:
    """Bytes the gzip manifest and the data-file header will take. Known exactly only at
    the end, so the budget reserves an estimate: a manifest of the same tensors with
    long-form params, gzipped, plus 25%."""
    entries = {}
    for p in changed:
        e = {"class": p.cls, "shape": list(p.ft.shape), "layout": "hash_groupwise",
             "params": {"group_size": 12345, "keep": 1234, "bits": 4, "rows_per_scale": 12345},
             "stored": [["codes", "U8", [p.ft.shape[0], 123456]], ["step", "BF16", [12345]],
                        ["minv", "BF16", [12345]]]}
        if p.base is None or p.extra_rows:
            e["base_shape"] = list(p.base_rows) if p.base is not None else None
            e["extra_rows"] = p.extra_rows
            e["stored"].append(["extra_rows", "BF16", [p.extra_rows, p.ft.shape[-1]]])
        entries[p.name] = e
    doc = {"format": "deltadq-delta", "format_version": 3, "created_by": "deltadq-vllm 0.0.0",
           "method": "deltadq", "seed": seed, "tensors": entries, "finetune": {"config": ft_config},
           "method_params": {"ratio_target": 1e6, "bits": None, "group_size": "auto",
                             "decompose_bits": 0, "keep": None, "dense_dtype": "bfloat16"},
           "calibration": {"source": "x" * 200, "tokens": 123456, "used": True},
           "base": {"architecture": {"k" * 20: "v" * 20 for _ in range(12)},
                    "fingerprint": {"algorithm": "sha256-content-v1", "digest": "f" * 64,
                                    "tensors": 123456},
                    "path_hint": "x" * 100},
           "sizes": {"dense_bf16_bytes": 10**12, "nominal_ratio": 123.456789012345},
           "files": {"delta.safetensors": {"bytes": 10**12, "sha256": "f" * 64}}}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    data_header = 8 + 8 * 80
    return int(1.25 * len(gzip.compress(raw, compresslevel=9, mtime=0))) + data_header + 512



def _dense_dtype_for(opt: CompressOptions, changed, ratio, dense_total) -> str:
    """How 1-D deltas (norms, biases) are stored: float64 for the exact `dense` method,
    the user's choice, or (auto) the widest way that costs <= DENSE_SHARE of the budget
    (at 1000x+ even 8-bit norms would be a large share of the artifact)."""
    if opt.method == "dense":
        return "float64"
    if opt.dense_dtype != "auto":
        return opt.dense_dtype
    if ratio is None:
        return "float32"
    n = sum(math.prod(p.ft.shape) for p in changed if not p.compressible and p.base is not None)
    for name, size in SMALL_SIZES:
        if n * size <= DENSE_SHARE * dense_total / ratio:
            return name
    return SMALL_SIZES[-1][0]


def _encode_small(delta: torch.Tensor, how: str, seed: int, clip: bool = True):
    """A 1-D (or other non-matrix) delta: dense, or b-bit codes with one scale per tensor
    (the hash_groupwise layout with group size = keep = 1 over a [1, n] view)."""
    if how not in SMALL_BITS:
        return encode_dense(delta, getattr(torch, how))
    bits = SMALL_BITS[how]
    flat = delta.reshape(1, -1).float()
    codes, step, minv = quantize(flat, bits, 1, clip)
    return encode_hash_groupwise(tuple(flat.shape), codes, step, minv, group_size=1, keep=1,
                                 bits=bits, seed=seed, rows_per_scale=1)



def compress_pass(base_dir, ft_dir, out_dir, opt: CompressOptions,
                  final_target: float | None = None, last: bool = True,
                  accept: bool = False,
                  probes: dict | None = None) -> dict:
    """One pass (tools/ratio_fit.py passes final_target / last / accept / probes
    and retries on OffTarget); returns the summary."""
    t0 = time.time()
    trace = RssTrace()
    trace.mark("start")
    validate_options(opt)
    base = Checkpoint(base_dir, "base")
    ft = Checkpoint(ft_dir, "fine-tune")
    plans = plan_tensors(base, ft)
    tied = tied_embedding(ft, plans)
    plans = order_plans(plans)
    trace.mark("plan")
    ratio = opt.ratio if opt.ratio is not None else DEFAULT_RATIO
    if opt.keep is not None or opt.method == "dense":
        ratio = None
    text, text_source = read_calibration_text(opt.calibration)
    qrange = resolve_quant_range(opt.quant_range, final_target or ratio)
    opts = MethodOptions(bits=opt.bits, group_size=opt.group_size,
                         decompose_bits=opt.decompose_bits, keep=opt.keep, seed=opt.seed,
                         quant_range=qrange, calibrated=opt.calibrated, min_gain=opt.min_gain,
                         plain_gain=opt.plain_gain,
                         # --budget sensitivity minimises the error: widths by it too
                         width_gain=WIDTH_MIN_GAIN if opt.width_rule
                         and opt.budget != "sensitivity" else None,
                         memo=probes.setdefault("memo", ResultMemo()) if probes is not None
                         else None)
    factors_cache: dict = {}  # inverse-Hessian factors of the input being compressed
    changed = find_changed(base, ft, plans, opt.progress)
    trace.mark("find_changed")
    if not changed:
        raise DeltaDQError(f"fine-tune {ft.path} is identical to base {base.path}",
                           "pass the fine-tuned model as --finetune")
    # the tokenizer is stored as what differs from the base's (in the manifest)
    tok = diff_tokenizer(base.path, ft.path)
    tok_bytes = tokenizer_stored_bytes(tok)
    dense_total = sum(bf16_bytes(p.ft.shape) for p in changed)
    small_how = _dense_dtype_for(opt, changed, ratio, dense_total)
    # the exact `dense` method computes deltas in float64, where ft - base is exact
    calc_dtype = torch.float64 if opt.method == "dense" else torch.float32
    ft_dtype = common_dtype(changed)

    with ArtifactWriter(out_dir, force=opt.force, default_dtype=ft_dtype) as writer:
        budget = None
        if ratio is not None:
            fixed = metadata_bytes_estimate(changed, ft.config, opt.seed) + tok_bytes
            small_bytes = dict(SMALL_SIZES).get(small_how, 8.0)
            dense_extras = 0
            for p in changed:
                if p.base is None:
                    dense_extras += p.ft.nbytes
                elif not p.compressible:
                    dense_extras += math.ceil(math.prod(p.ft.shape) * small_bytes) + 8
                elif p.extra_rows:
                    dense_extras += p.extra_rows * p.ft.shape[1] * p.ft.dtype.itemsize
            budget = dense_total / ratio - fixed - dense_extras
            if budget <= 0:
                reachable = dense_total / (fixed + dense_extras)
                raise DeltaDQError(
                    f"--ratio {ratio:g} cannot be met: the parts stored densely (norms, biases, "
                    f"new vocabulary rows, tokenizer, manifest) alone take "
                    f"{fixed + dense_extras} bytes, i.e. at most {reachable:.1f}x",
                    f"choose --ratio below {reachable:.1f}")
        matrices = [p for p in changed if p.compressible]

        # whose activations the layers are judged on: the fine-tune's own (default: what
        # its layers actually see) or the base's. Equal for light deltas; for a large one
        # (qwen2--math fixture, 16x) the fine-tune's gave top-1 agreement 0.551 / KL 2.26
        # vs 0.486 / 2.84 with the base's (base alone: 0.185 / 6.17)
        calib_model = ft if opt.calibrate_on == "finetune" else base
        calibrator = make_calibrator(calib_model, text, reuse=opt.reuse_calibration,
                                     n_seqs=opt.calib_seqs, seq_len=opt.calib_seq_len,
                                     seed=opt.seed)
        if calibrator is not None and probes is not None and "final_inputs" in probes:
            preset_final(calibrator, probes["final_inputs"])   # an earlier pass's: no walk
        trace.mark("calibrator")
        # bytes per matrix: planned by the probe pass (sensitivity) or by element count;
        # each matrix gets the remaining budget times its share of the remaining plan
        plan_bytes = {p.name: float(math.prod(p.base_rows)) for p in matrices}
        budget_info = {"mode": "share"}
        if opt.method == "deltadq":  # before any pass encodes them, the budget probe included
            for p in matrices:
                check_group_size(opts, p.name, p.ft.shape[1])
        if uses_sensitivity(opt.budget, opt.method, budget) and matrices:
            budget_info = sensitivity_plan(opt, base, ft, matrices, budget, tied, calibrator,
                                            calib_model, text, opts, probes)
            plan_bytes = budget_info.pop("plan")
            trace.mark("probe")
        # matrices an earlier pass of this compress() dropped as unsafe: dropped again up
        # front, so their bytes are planned for the rest from the first matrix on (found
        # late in a pass, e.g. the LM head, which goes last, the bytes had nowhere left to
        # go: 270x written for --ratio 256 when a tied embedding still went last)
        # (a copy: this pass's own drops are added to probes["unsafe"] for the next pass;
        # "pass_unsafe" lets compress() rewrite a pass that met the target exactly)
        known_unsafe = dict(probes.setdefault("unsafe", {})) if probes is not None else {}
        if probes is not None:
            probes["pass_unsafe"] = known_unsafe   # never modified: drops go to probes["unsafe"]
        remaining_plan = sum(v for k, v in plan_bytes.items() if k not in known_unsafe)
        layer_inputs: dict[str, torch.Tensor] = {}
        current_layer = None
        rows_out, dropped, unsafe = [], [], []
        value_bits_total = 0.0
        fill = [0.0, 0.0]
        bar = tqdm(changed, desc=f"compress ({opt.method})", unit="tensor",
                   disable=not opt.progress, file=sys.stderr)
        since_trim = 0
        for p in bar:
            bar.set_postfix_str(p.name[-40:])
            if since_trim >= TRIM_EVERY_ELEMENTS:
                release_freed_memory()
                since_trim = 0
            since_trim += math.prod(p.ft.shape)
            li = layer_index(p.name)
            if calibrator is not None and li is not None and li != current_layer:
                layer_inputs = calibrator.inputs_for_layer(li)
                current_layer = li
                trace.mark(f"calibrated layer {li}")
            if p.compressible and budget is not None and p.name in known_unsafe:
                # dropped by an earlier pass: same record, and neither tensor is read
                record, row = known_unsafe[p.name]
                dropped.append(p.name)
                unsafe.append(record)
                rows_out.append(row)
                continue
            w_ft = ft.get(p.name)
            w_base = base.get(p.name) if p.base is not None else None
            entry = {"class": p.cls, "shape": list(p.ft.shape)}
            if p.base is None or p.extra_rows:
                entry["base_shape"] = list(p.base.shape) if p.base is not None else None
            if dtype_name(p.ft.dtype) != ft_dtype:
                entry["dtype"] = dtype_name(p.ft.dtype)
            if p.extra_rows:
                entry["extra_rows"] = p.extra_rows
            tensors = {}
            err = share = out_err = None
            if p.base is None:  # a tensor the base lacks: its own values, exactly
                enc = encode_dense(w_ft, w_ft.dtype)
            else:
                rows = p.base.shape[0]
                # in place: one full-size float copy instead of three (ft, base, result);
                # bf16/fp16 -> fp32 is exact, so this equals ft.float() - base.float()
                delta = w_ft[:rows].to(calc_dtype, copy=True).sub_(w_base)
                del w_base
                if p.compressible:
                    planned = plan_bytes[p.name]
                    share = None if budget is None else budget * planned / remaining_plan
                    if share is not None and p.cls == "linear" and fill[1] > 0:
                        # a matrix spends a little less than its share (its configurations
                        # are discrete); what it leaves flows on, and compounded over ~200
                        # matrices piled up on the last layers (SmolLM2 at 256x: 37 KB for
                        # each of layers 27-29, 27 KB for the rest; spell-heavy's check KL
                        # 0.220, 0.205 with this): each share is divided by the share of
                        # the shares spent so far, so the leftover is spread as it goes
                        share = min(budget, share / max(FILL_FLOOR, fill[0] / fill[1]))
                    calib = calibration_for(p, calibrator, layer_inputs, tied, factors_cache)
                    seed = tensor_seed(opt.seed, p.name)
                    topts = replace(opts, tp_align=opt.tp_align if p.cls == "linear" else 1)
                    try:
                        choice = choose(opt, p, delta, calib, share, topts, seed, room=budget)
                    except UnfitError as e:
                        # the method's smallest encoding exceeds what the ratio leaves for
                        # this matrix: it is dropped (served as the base) and its bytes
                        # flow to the rest; reported, never silent
                        remaining_plan -= planned
                        dropped.append(p.name)
                        rows_out.append({"name": p.name, "class": p.cls, "status": "dropped",
                                         "reason": e.problem, "budget_bytes": _int(share)})
                        continue
                    out_err = output_error(calib, delta, w_ft[:rows], choice.error,
                                           choice.enc)
                    if budget is not None and is_unsafe(opt.unsafe, choice.error, out_err):
                        # choose.is_unsafe: storing this delta does more harm than storing
                        # nothing (by the --unsafe rule): drop it, its bytes flow on
                        remaining_plan -= planned
                        dropped.append(p.name)
                        unsafe.append({"name": p.name, "class": p.cls, "error": choice.error,
                                       "output_error": out_err, "rule": opt.unsafe,
                                       "bytes": int(share), "bytes_multiplier": bytes_multiplier(
                                           opt, p.name, delta, calib, share, topts, seed,
                                           w_ft[:rows])})
                        rows_out.append({"name": p.name, "class": p.cls, "status": "dropped",
                                         "reason": unsafe_reason(opt.unsafe, choice.error,
                                                                 out_err),
                                         "error": choice.error, "output_error": out_err,
                                         "budget_bytes": _int(share)})
                        if probes is not None:
                            probes["unsafe"][p.name] = (unsafe[-1], rows_out[-1])
                        continue
                    enc, err = choice.enc, choice.error
                    if choice.method:
                        entry["method"] = choice.method
                    if budget is not None:
                        budget -= enc.nbytes()
                        if p.cls == "linear":   # (bytes spent, bytes given) so far
                            fill[0] += enc.nbytes()
                            fill[1] += share
                        remaining_plan -= planned
                    value_bits_total += choice.value_bits * choice.n_values
                else:
                    enc = _encode_small(delta, small_how, tensor_seed(opt.seed, p.name),
                                        qrange == "search")
                if p.extra_rows:
                    tensors["extra_rows"] = w_ft[rows:].contiguous()
            del w_ft
            entry["layout"] = enc.layout
            entry["params"] = _explicit_params(enc, opt.seed, p.name)
            tensors = {**enc.tensors, **tensors}
            writer.add(p.name, entry, tensors)
            rows_out.append({"name": p.name, "class": p.cls, "status": "stored",
                             "layout": enc.layout, "dense_bf16_bytes": bf16_bytes(p.ft.shape),
                             "stored_bytes": sum(t.numel() * t.element_size()
                                                 for t in tensors.values()),
                             "error": err, **({"output_error": out_err} if out_err is not None
                                              else {}), **_param_summary(enc.params),
                             **({"budget_bytes": int(share), "planned_bytes": int(
                                 plan_bytes[p.name])} if share is not None else {}),
                             **choice_summary(choice if p.compressible and p.base is not None
                                               else None)})
            trace.mark(f"tensor {p.name}")
        bar.close()
        if calibrator is not None and probes is not None and known_final(calibrator) is not None:
            probes["final_inputs"] = known_final(calibrator)   # for the next pass, if any
        stored_names = {p.name for p in changed}
        for p in plans:
            if p.name not in stored_names:
                rows_out.append({"name": p.name, "class": p.cls, "status": "unchanged"})

        compressed_dense = sum(r["dense_bf16_bytes"] for r in rows_out
                               if r["status"] == "stored"
                               and r["class"] in ("linear", "embedding", "lm_head"))
        nominal = compressed_dense * 8 / value_bits_total if value_bits_total else None
        manifest = {
            "method": opt.method,
            "method_params": {"ratio_target": ratio, "bits": opt.bits,
                              "group_size": opt.group_size or "auto",
                              "decompose_bits": opt.decompose_bits, "keep": opt.keep,
                              "dense_dtype": small_how, "tp_align": opt.tp_align,
                              "quant_range": qrange},
            "seed": opt.seed,
            "calibration": {"source": text_source, "tokens": getattr(calibrator, "n_tokens", 0),
                            "activations_of": opt.calibrate_on,
                            "used": calibrator is not None},
            "base": {"architecture": base.architecture(), "fingerprint": content_fingerprint(base),
                     "path_hint": str(Path(base_dir).name)},
            "finetune": {"config": ft.config, "dtype": ft_dtype,
                         "tokenizer": tok,
                         "generation_config": _read_json(ft.path / "generation_config.json")},
            "sizes": {"dense_bf16_bytes": dense_total, "nominal_ratio": nominal},
            "dropped": dropped,
            "choices": {"values": "calibrated" if opt.calibrated and calibrator is not None
                        else "plain", "unsafe_dropped": [u["name"] for u in unsafe],
                        "budget": budget_info["mode"], "unsafe_rule": opt.unsafe,
                        "min_gain": opt.min_gain, "plain_gain": opt.plain_gain},
        }
        trace.mark("before finish")
        out = writer.finish(manifest)
    trace.mark("finish")

    true_bytes = DeltaArtifact(out).file_bytes()
    summary = {
        "out": str(out), "method": opt.method, "ratio_target": ratio,
        "true_ratio": dense_total / true_bytes if true_bytes else None,
        "nominal_ratio": nominal, "dense_dtype": small_how,
        "dense_bf16_bytes": dense_total, "artifact_bytes": true_bytes,
        "tensors_stored": len(changed) - len(dropped), "tensors_dropped": dropped,
        "unsafe": unsafe, "unsafe_rule": opt.unsafe, "min_gain": opt.min_gain,
        "plain_gain": opt.plain_gain,
        "safe_ratio_estimate": safe_ratio(final_target or ratio, unsafe),
        "tensors_unchanged": len(plans) - len(changed),
        "budget": budget_info,
        "by_class": by_class(rows_out),
        "seconds": round(time.time() - t0, 2),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        "tensors": rows_out,
    }
    if trace.rows is not None:
        summary["rss_phases"] = trace.rows
    if ratio is not None:
        judge_pass(summary["true_ratio"], ratio, final_target, last=last, accept=accept,
                   fixed_keep=opt.keep is not None)
    return summary


def _int(x):
    return None if x is None else int(x)


def _explicit_params(enc, global_seed: int, name: str) -> dict:
    """Layout params minus those the reader derives (docs/format.md, "Implicit params")."""
    p = dict(enc.params)
    implicit = {"seed": tensor_seed(global_seed, name), "row_offset": 0, "group_offset": 0}
    if enc.layout == "hash_groupwise":
        implicit["n_groups_total"] = enc.shape[1] // p["group_size"]
        implicit["n_rows_total"] = enc.shape[0]
    for k, v in implicit.items():
        if p.get(k) == v:
            del p[k]
    return p


def _param_summary(params: dict) -> dict:
    keys = ("group_size", "keep", "bits", "rows_per_scale", "keep_prob", "per_row", "rank",
            "decompose_bits")
    return {k: params[k] for k in keys if k in params}

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
