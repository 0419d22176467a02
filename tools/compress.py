"""`deltadq compress`: stream base and fine-tune, compress every changed tensor, write atomically.

Order of work (one decoder layer resident at a time):
  embeddings -> layer 0 .. layer L-1 (calibrate on the base layer, then compress its
  tensors) -> final norm, LM head and anything else.
The byte budget is spent as we go: each matrix gets the remaining budget times its
share of the remaining elements, so a tensor that turns out unchanged (or a cheap
one) leaves its bytes to the rest and the true ratio lands on target.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from deltadq_vllm.artifact import TOKENIZER_DIR, ArtifactWriter, DeltaArtifact, dtype_name
from deltadq_vllm.checkpoint import Checkpoint, TensorInfo
from deltadq_vllm.errors import DeltaDQError
from deltadq_vllm.layouts import encode_dense
from deltadq_vllm.positions import tensor_seed

from .calibration import layer_index, make_calibrator, read_calibration_text
from .methods import COMPRESSORS, METHODS, Calibration, MethodOptions
from .tokenizer_files import tokenizer_differs, tokenizer_files

# Manifest size is not known until the end; reserve this much for it in the budget.
MANIFEST_BYTES_PER_ENTRY = 420
MANIFEST_BYTES_PER_BASE_TENSOR = 60
MANIFEST_BYTES_FIXED = 6000
SAFETENSORS_BYTES_PER_STORED = 110
DEFAULT_RATIO = 16.0


@dataclass
class CompressOptions:
    method: str = "deltadq"
    ratio: float | None = None
    group_size: int | None = None
    bits: int | None = None
    decompose_bits: int = 0
    keep: float | None = None
    seed: int = 0
    calibration: str | None = None
    calib_seqs: int = 8
    calib_seq_len: int = 128
    dense_dtype: str = "float32"
    force: bool = False
    progress: bool = True


@dataclass
class TensorPlan:
    name: str
    cls: str
    base: TensorInfo | None
    ft: TensorInfo
    extra_rows: int = 0

    @property
    def compressible(self) -> bool:
        return self.cls in ("linear", "embedding", "lm_head") and self.base is not None

    @property
    def base_rows(self) -> tuple[int, ...]:
        return self.base.shape if self.base is not None else self.ft.shape


@dataclass
class Stats:
    rows: list[dict] = field(default_factory=list)


def classify(name: str, shape: tuple[int, ...], embed_name: str | None) -> str:
    if len(shape) == 1:
        return "norm" if "norm" in name else "bias" if name.endswith(".bias") else "other"
    if len(shape) != 2:
        return "other"
    if name == embed_name or "embed_tokens" in name or name.endswith("wte.weight"):
        return "embedding"
    if name.startswith("lm_head") or name.endswith("output.weight"):
        return "lm_head"
    return "linear"


def validate_options(opt: CompressOptions) -> None:
    if opt.method not in METHODS:
        raise DeltaDQError(f"unknown method {opt.method!r}",
                           f"choose one of: {', '.join(METHODS)}")
    if opt.ratio is not None and not (opt.ratio > 1 and math.isfinite(opt.ratio)):
        raise DeltaDQError(f"--ratio must be a number > 1, got {opt.ratio}",
                           "pass e.g. --ratio 16")
    if opt.bits is not None and not 1 <= opt.bits <= 8:
        raise DeltaDQError(f"--bits must be in [1, 8], got {opt.bits}", "pass e.g. --bits 4")
    if opt.decompose_bits and opt.method != "deltadq":
        raise DeltaDQError("--decompose-bits applies to --method deltadq only",
                           "drop --decompose-bits or use --method deltadq")
    if opt.decompose_bits < 0 or (opt.bits is not None and opt.decompose_bits > opt.bits):
        raise DeltaDQError(f"--decompose-bits {opt.decompose_bits} must be in [0, --bits]",
                           "pass a value between 0 and the number of bits")
    if opt.group_size is not None and opt.group_size < 1:
        raise DeltaDQError("--group-size must be 'auto' or a positive integer",
                           "pass --group-size auto")
    if opt.keep is not None and not 0 < opt.keep <= 1:
        raise DeltaDQError(f"--keep must be in (0, 1], got {opt.keep}", "pass e.g. --keep 0.125")
    if opt.method == "dense" and opt.ratio is not None:
        raise DeltaDQError("--method dense stores the exact delta and cannot meet a --ratio",
                           "drop --ratio, or choose a compressing --method")
    if opt.keep is not None and opt.ratio is not None:
        raise DeltaDQError("--keep and --ratio both set the sparsity",
                           "pass only one of --keep and --ratio")
    if opt.dense_dtype not in ("float32", "bfloat16"):
        raise DeltaDQError("--dense-dtype must be float32 or bfloat16", "pass --dense-dtype float32")


def plan_tensors(base: Checkpoint, ft: Checkpoint) -> list[TensorPlan]:
    """Pair tensors by name and refuse fine-tunes of a different architecture."""
    ab, af = base.architecture(), ft.architecture()
    for key in set(ab) | set(af):
        if key == "vocab_size":
            continue
        if ab.get(key) != af.get(key):
            raise DeltaDQError(
                f"architecture mismatch: base {base.path} has {key}={ab.get(key)!r}, fine-tune "
                f"{ft.path} has {key}={af.get(key)!r}",
                "compress a fine-tune against the base model it was trained from")
    missing = [n for n in base.names() if n not in ft.tensors]
    if missing:
        raise DeltaDQError(f"fine-tune {ft.path} lacks {len(missing)} tensors of the base, "
                           f"e.g. {missing[0]}",
                           "compress a fine-tune against the base model it was trained from")
    embed = next((n for n in ft.names() if "embed_tokens" in n), None)
    plans = []
    for name, fi in ft.tensors.items():
        bi = base.tensors.get(name)
        cls = classify(name, fi.shape, embed)
        extra = 0
        if bi is not None and bi.shape != fi.shape:
            grows_rows = (cls in ("embedding", "lm_head") and len(fi.shape) == 2
                          and fi.shape[1] == bi.shape[1] and fi.shape[0] > bi.shape[0])
            if not grows_rows:
                raise DeltaDQError(
                    f"shape mismatch for {name}: base {list(bi.shape)}, fine-tune {list(fi.shape)}",
                    "compress a fine-tune against the base model it was trained from")
            extra = fi.shape[0] - bi.shape[0]
        if not fi.dtype.is_floating_point:
            cls = "other"
        plans.append(TensorPlan(name, cls, bi, fi, extra))
    return plans


def _order(plans: list[TensorPlan]) -> list[TensorPlan]:
    """Embeddings, then layers in order, then the rest (LM head needs the final hidden)."""
    def key(p):
        li = layer_index(p.name)
        if p.cls == "embedding":
            return (0, 0, p.name)
        if li is not None:
            return (1, li, p.name)
        return (2, 0, p.name)
    return sorted(plans, key=key)


def _bf16_bytes(shape) -> int:
    return 2 * math.prod(shape)


def compress(base_dir, ft_dir, out_dir, opt: CompressOptions) -> dict:
    t0 = time.time()
    validate_options(opt)
    base = Checkpoint(base_dir, "base")
    ft = Checkpoint(ft_dir, "fine-tune")
    plans = _order(plan_tensors(base, ft))
    ratio = opt.ratio if opt.ratio is not None else DEFAULT_RATIO
    if opt.keep is not None or opt.method == "dense":
        ratio = None
    text, text_source = read_calibration_text(opt.calibration)
    opts = MethodOptions(bits=opt.bits, group_size=opt.group_size,
                         decompose_bits=opt.decompose_bits, keep=opt.keep, seed=opt.seed)
    # the exact `dense` method keeps norms and biases exact too
    dense_dtype = torch.float64 if opt.method == "dense" else getattr(torch, opt.dense_dtype)

    # Which tensors changed: compare sampled fingerprints now (cheap); a full
    # comparison happens when each tensor is read.
    changed = [p for p in plans
               if p.base is None or p.extra_rows
               or base.tensor_fingerprint(p.name) != ft.tensor_fingerprint(p.name)]
    tok_changed = tokenizer_differs(base.path, ft.path)
    tok_bytes = sum(f.stat().st_size for f in tokenizer_files(ft.path)) if tok_changed else 0

    with ArtifactWriter(out_dir, force=opt.force) as writer:
        budget = None
        if ratio is not None:
            dense_total = sum(_bf16_bytes(p.ft.shape) for p in changed)
            fixed = (MANIFEST_BYTES_FIXED + MANIFEST_BYTES_PER_ENTRY * len(changed)
                     + MANIFEST_BYTES_PER_BASE_TENSOR * len(changed) + tok_bytes
                     + SAFETENSORS_BYTES_PER_STORED * 4 * len(changed))
            dense_extras = 0
            for p in changed:
                if not p.compressible:
                    dense_extras += math.prod(p.ft.shape) * dense_dtype.itemsize
                elif p.extra_rows:
                    dense_extras += p.extra_rows * p.ft.shape[1] * p.ft.dtype.itemsize
            budget = dense_total / ratio - fixed - dense_extras
            if budget <= 0:
                reachable = dense_total / (fixed + dense_extras)
                raise DeltaDQError(
                    f"--ratio {ratio:g} cannot be met: the parts stored densely (norms, biases, "
                    f"new vocabulary rows, tokenizer, manifest) alone take "
                    f"{fixed + dense_extras} bytes, i.e. at most {reachable:.1f}x",
                    f"choose --ratio below {reachable:.1f}"
                    + (" or --dense-dtype bfloat16" if opt.dense_dtype == "float32" else ""))
        remaining_numel = sum(math.prod(p.base_rows) for p in changed if p.compressible)

        calibrator = make_calibrator(base, text, n_seqs=opt.calib_seqs,
                                     seq_len=opt.calib_seq_len, seed=opt.seed)
        layer_inputs: dict[str, torch.Tensor] = {}
        current_layer = None
        rows_out, fp_names = [], []
        bar = tqdm(changed, desc=f"compress ({opt.method})", unit="tensor",
                   disable=not opt.progress, file=sys.stderr)
        for p in bar:
            bar.set_postfix_str(p.name[-40:])
            li = layer_index(p.name)
            if calibrator is not None and li is not None and li != current_layer:
                layer_inputs = calibrator.inputs_for_layer(li)
                current_layer = li
            w_ft = ft.get(p.name)
            w_base = base.get(p.name) if p.base is not None else None
            if w_base is not None and not p.extra_rows and torch.equal(w_ft, w_base):
                if p.compressible:
                    remaining_numel -= math.prod(p.base_rows)
                rows_out.append({"name": p.name, "class": p.cls, "status": "unchanged"})
                continue
            entry = {"class": p.cls, "shape": list(p.ft.shape),
                     "base_shape": list(p.base.shape) if p.base is not None else None,
                     "dtype": dtype_name(p.ft.dtype), "extra_rows": p.extra_rows}
            tensors = {}
            if p.base is None:
                enc, err = encode_dense(w_ft.float(), dense_dtype), None
                entry["absolute"] = True
            else:
                rows = p.base.shape[0]
                delta = w_ft[:rows].float() - w_base.float()
                if p.extra_rows:
                    tensors["extra_rows"] = w_ft[rows:].contiguous()
                if p.compressible:
                    numel = delta.numel()
                    share = None if budget is None else budget * numel / remaining_numel
                    calib = _calibration_for(p, calibrator, layer_inputs)
                    seed = tensor_seed(opt.seed, p.name)
                    choice = COMPRESSORS[opt.method](p.name, delta, calib, share, opts, seed)
                    enc, err = choice.enc, choice.error
                    if budget is not None:
                        budget -= enc.nbytes()
                        remaining_numel -= numel
                    entry["value_bits"] = choice.value_bits
                    entry["n_values"] = choice.n_values
                else:
                    enc, err = encode_dense(delta, dense_dtype), 0.0
                fp_names.append(p.name)
            entry["layout"] = enc.layout
            entry["params"] = enc.params
            if err is not None:
                entry["calibrated_error"] = round(err, 6)
            tensors.update(enc.tensors)
            writer.add(p.name, entry, tensors)
            rows_out.append({"name": p.name, "class": p.cls, "status": "stored",
                             "layout": enc.layout, "dense_bf16_bytes": _bf16_bytes(p.ft.shape),
                             "stored_bytes": sum(t.numel() * t.element_size()
                                                 for t in tensors.values()),
                             "error": err, **_param_summary(enc.params)})
        bar.close()

        if tok_changed:
            dst = writer.staging_dir / TOKENIZER_DIR
            dst.mkdir()
            for f in tokenizer_files(ft.path):
                (dst / f.name).write_bytes(f.read_bytes())
        stored = [r for r in rows_out if r["status"] == "stored"]
        dense_total = sum(r["dense_bf16_bytes"] for r in stored)
        value_bytes = sum(e.get("n_values", 0) * e.get("value_bits", 0) / 8
                          for e in writer.entries.values())
        compressed_dense = sum(r["dense_bf16_bytes"] for r in stored
                               if r["class"] in ("linear", "embedding", "lm_head"))
        manifest = {
            "method": opt.method,
            "method_params": {"ratio_target": ratio, "bits": opt.bits,
                              "group_size": opt.group_size or "auto",
                              "decompose_bits": opt.decompose_bits, "keep": opt.keep,
                              "dense_dtype": opt.dense_dtype},
            "seed": opt.seed,
            "calibration": {"source": text_source, "tokens": getattr(calibrator, "n_tokens", 0),
                            "used": calibrator is not None},
            "base": {"architecture": base.architecture(), "fingerprint": base.fingerprint(fp_names),
                     "path_hint": str(Path(base_dir).name)},
            "finetune": {"config": ft.config, "tokenizer": TOKENIZER_DIR if tok_changed else None,
                         "generation_config": _read_json(ft.path / "generation_config.json")},
            "sizes": {"dense_bf16_bytes": dense_total,
                      "nominal_ratio": (compressed_dense / value_bytes) if value_bytes else None},
        }
        out = writer.finish(manifest)

    art = DeltaArtifact(out)
    true_bytes = art.file_bytes()
    summary = {
        "out": str(out), "method": opt.method, "ratio_target": ratio,
        "true_ratio": dense_total / true_bytes if true_bytes else None,
        "nominal_ratio": manifest["sizes"]["nominal_ratio"],
        "dense_bf16_bytes": dense_total, "artifact_bytes": true_bytes,
        "tensors_stored": len(stored),
        "tensors_unchanged": sum(r["status"] == "unchanged" for r in rows_out),
        "by_class": _by_class(rows_out),
        "seconds": round(time.time() - t0, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tensors": rows_out,
    }
    if ratio is not None and summary["true_ratio"] < ratio * 0.999:
        # the budget reserves room for the manifest; missing means an estimate is wrong
        raise DeltaDQError(f"internal: reached only {summary['true_ratio']:.2f}x of {ratio}x",
                           "please report this; pass a slightly higher --ratio meanwhile")
    return summary


def _calibration_for(p: TensorPlan, calibrator, layer_inputs) -> Calibration:
    if calibrator is None:
        return Calibration()
    if p.cls == "embedding":
        rows = calibrator.token_rows()
        return Calibration(rows=rows[rows < p.base.shape[0]])
    if p.cls == "lm_head":
        return Calibration(x=calibrator.final_inputs())
    x = layer_inputs.get(p.name)
    return Calibration(x=x) if x is not None else Calibration()


def _param_summary(params: dict) -> dict:
    keys = ("group_size", "keep", "bits", "rows_per_scale", "keep_prob", "per_row", "rank",
            "decompose_bits")
    return {k: params[k] for k in keys if k in params}


def _by_class(rows) -> dict:
    out = {}
    for r in rows:
        if r["status"] != "stored":
            continue
        c = out.setdefault(r["class"], {"tensors": 0, "dense_bf16_bytes": 0, "stored_bytes": 0,
                                        "errors": []})
        c["tensors"] += 1
        c["dense_bf16_bytes"] += r["dense_bf16_bytes"]
        c["stored_bytes"] += r["stored_bytes"]
        if r.get("error") is not None:
            c["errors"].append(r["error"])
    for c in out.values():
        errs = c.pop("errors")
        c["mean_error"] = sum(errs) / len(errs) if errs else None
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def format_summary(s: dict) -> str:
    lines = [f"{'class':<10} {'tensors':>7} {'dense bf16':>12} {'stored':>12} {'ratio':>8} "
             f"{'mean rel. err':>13}"]
    for cls, c in sorted(s["by_class"].items()):
        ratio = c["dense_bf16_bytes"] / c["stored_bytes"] if c["stored_bytes"] else float("inf")
        err = f"{c['mean_error']:.4f}" if c["mean_error"] is not None else "-"
        lines.append(f"{cls:<10} {c['tensors']:>7} {c['dense_bf16_bytes']:>12,} "
                     f"{c['stored_bytes']:>12,} {ratio:>7.1f}x {err:>13}")
    lines.append(f"unchanged tensors skipped: {s['tensors_unchanged']}")
    nominal = f"{s['nominal_ratio']:.1f}x" if s["nominal_ratio"] else "-"
    lines.append(f"artifact {s['out']}: {s['artifact_bytes']:,} bytes on disk; true ratio "
                 f"{s['true_ratio']:.2f}x (target {s['ratio_target'] or '-'}), nominal {nominal}; "
                 f"{s['seconds']} s, peak RSS {s['peak_rss_mb']} MB")
    return "\n".join(lines)
