"""`deltadq kv-compress`: MHA/GQA -> fewer KV heads, as a checkpoint vLLM and HF load natively.

    kv_compress(model, out, KVCompressOptions(kv_heads=N, method="svd"|"meanpool",
                grouping="adjacent"|"similarity", recover_steps=K))
    apply_to_delta(converted_model, delta, out)   # a fine-tune's delta follows its base

Conversion: calibrate (pre-RoPE keys and values per layer, layer by layer), build each
layer's fixed linear maps (tools/kv_maps.py), then stream the checkpoint tensor by tensor,
mapping q/k/v/o_proj (and q/k/v biases) and copying everything else, into an HF directory
with `num_key_value_heads = N`. The maps are saved in `<out>/kv_compress/maps.safetensors`
(a subdirectory, so no loader mistakes them for weights) together with per-tensor
fingerprints of the source model, so a fine-tune's delta can be mapped later without
recalibration: T(base + delta) = T(base) + T(delta).

An optional recovery fine-tune (tools/kv_recover.py) distils the original into the
converted model's attention projections. Output directories are published atomically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from deltadq_vllm.artifact import TOKENIZER_DIR, DeltaArtifact
from deltadq_vllm.artifact_writer import ArtifactWriter
from deltadq_vllm.atomic import AtomicDir
from deltadq_vllm.checkpoint import FINGERPRINT_ALGORITHM, Checkpoint
from deltadq_vllm.errors import DeltaDQError
from deltadq_vllm.layouts import decode, encode_dense

from .calibration import LayerwiseCalibrator, read_calibration_text
from .kv_calibration import AttnLayout, attention_layout, collect_stats, weight_only_stats
from .kv_maps import GROUPINGS, METHODS, WEIGHTINGS, LayerMaps, apply_maps, build_layer_maps
from .kv_recover import PARAM_SETS
from deltadq_vllm.content_hash import ALGORITHM as CONTENT_ALGORITHM
from deltadq_vllm.content_hash import content_fingerprint, tensor_digests
from deltadq_vllm.tokenizer_diff import tokenizer_files

MAPS_DIR = "kv_compress"
MAPS_FILE = "maps.safetensors"
INFO_FILE = "info.json"
MAPS_VERSION = 1
SHARD_BYTES = 2 * 1024**3
DELTA_STORAGE = ("dense", "recompress")


@dataclass
class KVCompressOptions:
    kv_heads: int | None = None
    method: str = "svd"
    grouping: str = "adjacent"
    weighting: str = "attention"   # query-/o_proj-aware PCA; "none": plain PCA (docs/kv-heads.md)
    calibration: str | None = None
    calib_seqs: int = 32
    calib_seq_len: int = 128
    recover_steps: int = 0
    recover_lr: float = 1e-4
    recover_batch: int = 8
    recover_seq_len: int = 128
    recover_params: str = "attention"
    recover_bf16: bool = False
    maps: str | None = None        # reuse the maps of an earlier conversion (no calibration)
    seed: int = 0
    force: bool = False
    progress: bool = True


# ------------------------------------------------------------------------- validation


def _check_choice(value, allowed, flag):
    if value not in allowed:
        raise DeltaDQError(f"unknown {flag} {value!r}", f"choose one of: {', '.join(allowed)}")


def validate(opt: KVCompressOptions, lay: AttnLayout, model_path) -> None:
    _check_choice(opt.method, METHODS, "--method")
    _check_choice(opt.grouping, GROUPINGS, "--grouping")
    _check_choice(opt.weighting, WEIGHTINGS, "weighting")
    _check_choice(opt.recover_params, PARAM_SETS, "recovery parameter set")
    if opt.recover_steps < 0:
        raise DeltaDQError(f"--recover-steps must be >= 0, got {opt.recover_steps}",
                           "pass 0 (no recovery) or a small positive number of steps")
    if opt.maps is not None:
        return
    n, h, k0 = opt.kv_heads, lay.heads, lay.kv_heads
    if n is None:
        raise DeltaDQError("--kv-heads is required", f"pass the target number of KV heads, a "
                           f"divisor of the current {k0} (e.g. --kv-heads {max(1, k0 // 2)})")
    divisors = [d for d in range(1, k0) if k0 % d == 0 and h % d == 0]
    hint = (f"choose one of {divisors}" if divisors else
            "this model cannot lose KV heads (it has a single KV head)")
    if n < 1:
        raise DeltaDQError(f"--kv-heads must be >= 1, got {n}", hint)
    if n >= k0:
        raise DeltaDQError(f"--kv-heads {n} does not reduce {model_path}'s {k0} KV heads", hint)
    if h % n:
        raise DeltaDQError(f"--kv-heads {n} does not divide the {h} query heads of {model_path}",
                           hint)
    if k0 % n:
        raise DeltaDQError(f"{model_path} has {k0} KV heads, which is not a multiple of "
                           f"--kv-heads {n} (KV heads are merged in equal groups)", hint)


# --------------------------------------------------------------------------- maps I/O


def save_maps(path: Path, maps: list[LayerMaps], meta: dict) -> None:
    tensors = {}
    for i, m in enumerate(maps):
        tensors.update(m.tensors(f"layer.{i}"))
    save_file(tensors, str(path), metadata={"kv_compress": json.dumps(meta)})


def maps_location(model_dir) -> Path:
    p = Path(model_dir)
    return p if p.is_file() else p / MAPS_DIR / MAPS_FILE


def load_maps(model_dir) -> tuple[dict, list[LayerMaps]]:
    path = maps_location(model_dir)
    if not path.is_file():
        raise DeltaDQError(
            f"{model_dir} holds no KV-compression maps ({MAPS_DIR}/{MAPS_FILE})",
            "pass the output directory of `deltadq kv-compress` (the converted base), not the "
            "original model")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["kv_compress"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        raise DeltaDQError(f"cannot read KV-compression maps {path}: {e}",
                           "re-run `deltadq kv-compress` to rewrite them") from None
    if meta.get("version") != MAPS_VERSION:
        raise DeltaDQError(f"{path} has maps version {meta.get('version')}, this deltadq-vllm "
                           f"reads version {MAPS_VERSION}", "re-run `deltadq kv-compress`")
    return meta, [LayerMaps.from_tensors(tensors, f"layer.{i}") for i in range(meta["layers"])]


# ------------------------------------------------------------------------- conversion


def _role_of(name: str, lay: AttnLayout) -> tuple[int, str] | None:
    """(layer, role) when `name` is one of the mapped attention tensors, else None."""
    head = f"{lay.prefix}."
    if not name.startswith(head) or ".self_attn." not in name:
        return None
    layer, _, rest = name[len(head):].partition(".self_attn.")
    if not layer.isdigit() or rest not in ("q_proj.weight", "q_proj.bias", "k_proj.weight",
                                           "k_proj.bias", "v_proj.weight", "v_proj.bias",
                                           "o_proj.weight"):
        return None
    return int(layer), rest


def _new_config(config: dict, n: int) -> dict:
    return {**config, "num_key_value_heads": n}


def write_checkpoint(src: Checkpoint, lay: AttnLayout, maps: list[LayerMaps], dst: Path,
                     overrides: dict[str, torch.Tensor] | None = None,
                     progress: bool = True) -> dict:
    """Stream `src` into HF safetensors shards under `dst`, mapping attention tensors."""
    overrides = overrides or {}
    shards, pending, pending_bytes, weight_map, total = [], {}, 0, {}, 0
    for old in dst.glob("model*.safetensors*"):  # a rewrite after recovery replaces all
        old.unlink()

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            fname = f"model-part-{len(shards) + 1:05d}.safetensors"
            save_file(pending, str(dst / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in pending})
            shards.append(fname)
            pending, pending_bytes = {}, 0

    for name in tqdm(src.names(), desc="write", unit="tensor", disable=not progress,
                     file=sys.stderr):
        w = src.get(name)
        role = _role_of(name, lay)
        if name in overrides:
            w = overrides[name].to(w.dtype)
        elif role is not None:
            w = apply_maps(role[1], w, maps[role[0]]).to(w.dtype)
        pending[name] = w.contiguous()
        pending_bytes += w.numel() * w.element_size()
        total += w.numel() * w.element_size()
        if pending_bytes >= SHARD_BYTES:
            flush()
    flush()
    if len(shards) == 1:
        (dst / shards[0]).rename(dst / "model.safetensors")
    else:
        n = len(shards)
        renamed = {s: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(shards)}
        for a, b in renamed.items():
            (dst / a).rename(dst / b)
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"bytes": total, "shards": len(shards)}


def _copy_side_files(src: Path, dst: Path, config: dict) -> None:
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", dst)
    for f in tokenizer_files(src):
        shutil.copy(f, dst / f.name)


def _maps_meta(src: Checkpoint, lay: AttnLayout, n: int, opt: KVCompressOptions,
               calib: dict, layer_info: list[dict]) -> dict:
    return {
        "version": MAPS_VERSION, "method": opt.method, "grouping": opt.grouping,
        "weighting": opt.weighting, "layers": lay.layers, "heads": lay.heads,
        "kv_heads_from": lay.kv_heads, "kv_heads_to": n, "head_dim": lay.head_dim,
        "prefix": lay.prefix, "rope": lay.rope, "calibration": calib,
        "source": {"path_hint": src.path.name, "architecture": src.architecture(),
                   "fingerprint_algorithm": FINGERPRINT_ALGORITHM,
                   "tensor_fingerprints": {k: src.tensor_fingerprint(k) for k in src.names()},
                   # full content digests: what format-3 deltas check their base against
                   "content_algorithm": CONTENT_ALGORITHM,
                   "tensor_digests": tensor_digests(src)},
        "per_layer": layer_info,
    }


def kv_compress(model_dir, out_dir, opt: KVCompressOptions, stats=None) -> dict:
    """Convert `model_dir` to opt.kv_heads KV heads; returns a summary dict.

    `stats` (from kv_calibration.collect_stats on the same model and text) skips the
    calibration pass, for benchmarks that build several conversions of one model."""
    t0 = time.time()
    src = Checkpoint(model_dir, "model")
    lay = attention_layout(src)
    validate(opt, lay, src.path)
    reused = None
    if opt.maps is not None:
        reused_meta, reused_maps = load_maps(opt.maps)
        _check_maps_fit(reused_meta, lay, opt)
        reused = (reused_meta, reused_maps)
    n = reused[0]["kv_heads_to"] if reused else opt.kv_heads
    needs_text = reused is None and (opt.method == "svd" or opt.grouping == "similarity")
    text, source = (read_calibration_text(opt.calibration)
                    if (needs_text or opt.recover_steps) else (None, None))
    with AtomicDir(out_dir, opt.force) as out:
        calib = {"source": None, "tokens": 0}
        if reused is not None:
            maps = reused[1]
            calib = dict(reused[0]["calibration"], reused_from=reused[0]["source"]["path_hint"])
            method_meta = {k: reused[0][k] for k in ("method", "grouping", "weighting")}
        else:
            if needs_text:
                if stats is None:
                    stats, tokens = collect_stats(src, lay, text, opt.calib_seqs,
                                                  opt.calib_seq_len, opt.seed, opt.progress)
                else:
                    stats, tokens = stats
                calib = {"source": source, "tokens": tokens}
            else:  # meanpool, adjacent: nothing to calibrate (residuals are unknown)
                stats = [weight_only_stats(src, lay, i) for i in range(lay.layers)]
            maps = [build_layer_maps(s, lay.heads, n, opt.method, opt.grouping, opt.weighting,
                                     lay.rope)
                    for s in tqdm(stats, desc=f"maps ({opt.method})", unit="layer",
                                  disable=not opt.progress, file=sys.stderr)]
            method_meta = {"method": opt.method, "grouping": opt.grouping,
                           "weighting": opt.weighting}
        measured = reused is None and needs_text
        layer_info = [{"groups": m.groups,
                       "k_residual": _num(m.k_residual) if measured else None,
                       "v_residual": _num(m.v_residual) if measured else None} for m in maps]
        config = _new_config(src.config, n)
        _copy_side_files(src.path, out.path, config)
        written = write_checkpoint(src, lay, maps, out.path, progress=opt.progress)
        recovery = None
        if opt.recover_steps:
            recovery, overrides = _run_recovery(src, out.path, text, opt)
            written = write_checkpoint(src, lay, maps, out.path, overrides, opt.progress)
        meta_opt = KVCompressOptions(**{**asdict(opt), **method_meta})
        meta = _maps_meta(src, lay, n, meta_opt, calib, layer_info)
        meta["recovery"] = recovery
        (out.path / MAPS_DIR).mkdir()
        save_maps(out.path / MAPS_DIR / MAPS_FILE, maps, meta)
        info = {k: v for k, v in meta.items() if k != "source"}
        info["source"] = {"path_hint": src.path.name}
        (out.path / MAPS_DIR / INFO_FILE).write_text(json.dumps(info, indent=1))
        path = out.commit()
    bpv = {torch.float32: 4, torch.float64: 8}.get(src.info(lay.name(0, "k_proj.weight")).dtype, 2)
    return {
        "out": str(path), **method_meta, "kv_heads_from": lay.kv_heads, "kv_heads_to": n,
        "layers": lay.layers, "heads": lay.heads, "head_dim": lay.head_dim,
        "kv_bytes_per_token_before": lay.kv_bytes_per_token(None, bpv),
        "kv_bytes_per_token_after": lay.kv_bytes_per_token(n, bpv),
        "calibration": calib, "recovery": recovery,
        "k_residual_mean": _mean([i["k_residual"] for i in layer_info]),
        "v_residual_mean": _mean([i["v_residual"] for i in layer_info]),
        "per_layer": layer_info, "bytes": written["bytes"], "shards": written["shards"],
        "reused_maps": reused is not None, "seconds": round(time.time() - t0, 2),
    }


def _num(x):
    return None if x != x else round(float(x), 6)  # NaN -> None (JSON)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _check_maps_fit(meta: dict, lay: AttnLayout, opt: KVCompressOptions) -> None:
    got = {"layers": lay.layers, "heads": lay.heads, "kv_heads_from": lay.kv_heads,
           "head_dim": lay.head_dim}
    for k, v in got.items():
        if meta.get(k) != v:
            raise DeltaDQError(f"the maps in {opt.maps} were made for a model with {k}="
                               f"{meta.get(k)}, but this model has {k}={v}",
                               "pass the maps of a conversion of this model's base")
    if opt.kv_heads is not None and opt.kv_heads != meta["kv_heads_to"]:
        raise DeltaDQError(f"--kv-heads {opt.kv_heads} conflicts with the maps in {opt.maps}, "
                           f"which produce {meta['kv_heads_to']} KV heads",
                           "drop --kv-heads when passing --maps")


def _run_recovery(src: Checkpoint, converted: Path, text: str, opt: KVCompressOptions):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .kv_recover import recover

    try:
        tok = AutoTokenizer.from_pretrained(str(src.path))
    except Exception as e:  # noqa: BLE001
        raise DeltaDQError(f"recovery needs the tokenizer of {src.path} ({e})",
                           "copy the tokenizer files into the model directory, or pass "
                           "--recover-steps 0") from None
    ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
    if len(ids) < 8:
        raise DeltaDQError("the calibration text is too short for recovery",
                           "pass a longer --calibration file")
    teacher = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    report = recover(student, teacher, ids, opt.recover_steps, opt.recover_lr, opt.recover_batch,
                     opt.recover_seq_len, opt.recover_params, opt.seed, opt.recover_bf16,
                     opt.progress)
    del teacher
    from .kv_recover import trainable
    overrides = {n: p.detach().clone() for n, p in student.named_parameters()
                 if trainable(n, opt.recover_params) and n in src.tensors}
    return report, overrides


# ------------------------------------------------------------------ deltas follow the base


@dataclass
class DeltaMapOptions:
    storage: str = "recompress"     # the delta's own method and bytes; "dense": exact
    calibration: str | None = None  # recompress: text for the compressor's calibrated error
    force: bool = False
    progress: bool = True


class _StoredFingerprints:
    """Stands in for the source checkpoint in Checkpoint.fingerprint (same digest rule)."""

    def __init__(self, per: dict[str, str]):
        self.per = per

    def names(self):
        return list(self.per)

    def tensor_fingerprint(self, name):
        return self.per[name]


def _check_delta_source(art: DeltaArtifact, meta: dict, model_dir) -> None:
    src = meta["source"]
    fix = ("map a delta compressed against the model that was converted (its original base); "
           "convert that base with `deltadq kv-compress` if needed")
    arch = art.manifest["base"].get("architecture", {})
    for k, v in arch.items():
        if src["architecture"].get(k) != v:
            raise DeltaDQError(
                f"delta {art.path} was made for a base with {k}={v!r}, but {model_dir} was "
                f"converted from a model with {k}={src['architecture'].get(k)!r}", fix)
    names = sorted(n for n, e in art.entries.items() if not e.absolute)
    missing = [n for n in names if n not in src["tensor_fingerprints"]]
    if missing:
        raise DeltaDQError(f"delta {art.path} changes {missing[0]}, which the model converted "
                           f"into {model_dir} does not have", fix)
    fp = art.base_fingerprint
    if fp.get("algorithm") == CONTENT_ALGORITHM:
        per = src.get("tensor_digests")
        if src.get("content_algorithm") != CONTENT_ALGORITHM or not isinstance(per, dict):
            raise DeltaDQError(f"delta {art.path} checks its base by content hash, which the "
                               f"maps of {model_dir} do not record",
                               "re-run `deltadq kv-compress` with this deltadq-vllm")
        overall = hashlib.sha256("".join(f"{n}:{per[n]};" for n in sorted(per)).encode())
        if overall.hexdigest() != fp["digest"]:
            raise DeltaDQError(
                f"delta {art.path} does not belong to the base that {model_dir} was converted "
                "from (its content hash differs)", fix)
        return
    if fp.get("algorithm") != src["fingerprint_algorithm"]:
        raise DeltaDQError(f"delta {art.path} fingerprints its base with {fp.get('algorithm')}, "
                           f"the maps recorded {src['fingerprint_algorithm']}",
                           "re-run `deltadq kv-compress` with this deltadq-vllm")
    got = Checkpoint.fingerprint(_StoredFingerprints(src["tensor_fingerprints"]), names)
    if got["digest"] != fp["digest"]:
        raise DeltaDQError(
            f"delta {art.path} does not belong to the base that {model_dir} was converted from "
            f"(base fingerprint {fp['digest']}, converted model's source {got['digest']})", fix)


def apply_to_delta(model_dir, delta_dir, out_dir, opt: DeltaMapOptions | None = None) -> dict:
    """Map a fine-tune's delta (against the original base) into the converted base's space."""
    opt = opt or DeltaMapOptions()
    t0 = time.time()
    _check_choice(opt.storage, DELTA_STORAGE, "--delta-storage")
    conv = Checkpoint(model_dir, "model")
    meta, maps = load_maps(model_dir)
    art = DeltaArtifact(delta_dir)
    _check_delta_source(art, meta, model_dir)
    lay = attention_layout(conv)
    lay = AttnLayout(**{**asdict(lay), "kv_heads": meta["kv_heads_from"]})  # roles of the source
    m = art.manifest
    recompress = _Recompressor(conv, m, opt) if opt.storage == "recompress" else None
    rows, mapped = [], 0
    with ArtifactWriter(out_dir, force=opt.force,
                        default_dtype=m["finetune"].get("dtype", "F32")) as w:
        names = list(art.entries)
        for name in tqdm(names, desc=f"map delta ({opt.storage})", unit="tensor",
                         disable=not opt.progress, file=sys.stderr):
            e = art.entries[name]
            enc = art.encoded(name)
            role = _role_of(name, lay)
            entry = {"class": e.cls, "dtype": e.dtype}
            if role is None:  # unchanged by the conversion: copy the stored encoding
                entry.update(shape=list(e.shape), layout=e.layout, params=dict(enc.params))
                tensors = dict(enc.tensors)
                if e.absolute or e.extra_rows:
                    entry["base_shape"] = list(e.base_shape) if e.base_shape is not None else None
                if e.extra_rows:
                    entry["extra_rows"] = e.extra_rows
                    tensors["extra_rows"] = art.extra_rows(name)
                w.add(name, entry, tensors)
                rows.append({"name": name, "mapped": False, "stored_bytes": enc.nbytes()})
                continue
            if e.absolute or e.extra_rows:
                raise DeltaDQError(f"delta {art.path} stores {name} absolutely",
                                   "this delta does not fit the converted base's architecture")
            layer, r = role
            delta = decode(enc).double().reshape(e.shape)
            new = apply_maps(r, delta, maps[layer])
            err = 0.0
            if recompress is not None and new.dim() == 2 and enc.layout != "dense":
                new_enc, err = recompress(name, new, enc, delta.numel(), layer)
            else:
                dt = torch.float64 if enc.layout == "dense" and \
                    enc.tensors["values"].dtype == torch.float64 else torch.float32
                new_enc = encode_dense(new, dt)
            entry.update(shape=list(new.shape), layout=new_enc.layout, params=dict(new_enc.params))
            w.add(name, entry, dict(new_enc.tensors))
            mapped += 1
            rows.append({"name": name, "mapped": True, "layout": new_enc.layout,
                         "orig_layout": enc.layout, "orig_bytes": enc.nbytes(),
                         "stored_bytes": new_enc.nbytes(), "error": err})
        if isinstance(m["finetune"].get("tokenizer"), str):   # format 2: whole files
            dst = w.staging_dir / TOKENIZER_DIR
            dst.mkdir()
            for f in tokenizer_files(art.path / TOKENIZER_DIR):
                shutil.copy(f, dst / f.name)
        manifest = {k: v for k, v in m.items()
                    if k not in ("format", "format_version", "created_by", "tensors", "files")}
        manifest["base"] = {"architecture": conv.architecture(),
                            "fingerprint": content_fingerprint(conv),
                            "path_hint": conv.path.name}
        ft = dict(m["finetune"])
        ft["config"] = _new_config(ft["config"], meta["kv_heads_to"])
        manifest["finetune"] = ft
        sizes = dict(m.get("sizes", {}))
        sizes["dense_bf16_bytes"] = _dense_bf16_bytes(art, maps, lay)
        if opt.storage == "dense":
            sizes["nominal_ratio"] = None
        manifest["sizes"] = sizes
        manifest["kv_compress"] = {"maps_of": conv.path.name, "storage": opt.storage,
                                   "source_delta": art.path.name,
                                   "source_base_fingerprint": art.base_fingerprint,
                                   "kv_heads": [meta["kv_heads_from"], meta["kv_heads_to"]],
                                   "base_recovered": bool(meta.get("recovery"))}
        out = w.finish(manifest)
    new_art = DeltaArtifact(out)
    before, after = art.file_bytes(), new_art.file_bytes()
    return {"out": str(out), "storage": opt.storage, "tensors": len(rows),
            "tensors_mapped": mapped, "source_bytes": before, "bytes": after,
            "dense_bf16_bytes": sizes["dense_bf16_bytes"],
            "true_ratio": sizes["dense_bf16_bytes"] / after if after else None,
            "source_true_ratio": (m.get("sizes", {}).get("dense_bf16_bytes") or 0) / before
            if before else None,
            "mapped_bytes": sum(r["stored_bytes"] for r in rows if r["mapped"]),
            "mapped_source_bytes": sum(r["orig_bytes"] for r in rows if r["mapped"]),
            "recompress_error_mean": _mean([r["error"] for r in rows if r["mapped"]
                                            and r.get("layout") != "dense"]),
            "base_recovered": bool(meta.get("recovery")),
            "seconds": round(time.time() - t0, 2)}


def _dense_bf16_bytes(art: DeltaArtifact, maps, lay: AttnLayout) -> int:
    total = 0
    for name, e in art.entries.items():
        role = _role_of(name, lay)
        numel = 1
        for s in e.shape:
            numel *= s
        if role is not None and role[1].split(".")[0] in ("k_proj", "v_proj"):
            numel = numel * maps[role[0]].kv_heads // lay.kv_heads
        total += 2 * numel
    return total


class _Recompressor:
    """Re-encode a mapped matrix delta with the source delta's method, at the source's bytes
    per element, with the compressor's calibrated error on the converted base's inputs."""

    def __init__(self, conv: Checkpoint, manifest: dict, opt: DeltaMapOptions):
        from deltadq_vllm.positions import tensor_seed

        from .methods import COMPRESSORS, MethodOptions

        self.method = manifest["method"]
        if self.method not in COMPRESSORS:
            raise DeltaDQError(f"cannot re-compress with method {self.method!r}",
                               "use --delta-storage dense")
        p = manifest.get("method_params", {}) or {}
        gs = p.get("group_size")
        self.opts = MethodOptions(bits=p.get("bits"), group_size=gs if isinstance(gs, int) else None,
                                  decompose_bits=p.get("decompose_bits") or 0, keep=p.get("keep"),
                                  seed=manifest.get("seed", 0))
        self.fn = COMPRESSORS[self.method]
        self.seed = manifest.get("seed", 0)
        self.tensor_seed = tensor_seed
        text, _ = read_calibration_text(opt.calibration)
        try:
            self.cal = LayerwiseCalibrator(conv, text)
        except Exception:  # noqa: BLE001 - weight-space error instead
            self.cal = None

    def __call__(self, name, new, enc, old_numel, layer):
        from .methods import Calibration

        budget = enc.nbytes() * new.numel() / old_numel
        calib = Calibration()
        if self.cal is not None:
            try:
                x = self.cal.inputs_for_layer(layer).get(name)
            except ValueError:  # entries not in layer order: weight-space error instead
                x = None
            if x is not None:
                calib = Calibration(x=x)
        budget = None if self.opts.keep is not None else budget
        choice = self.fn(name, new.float(), calib, budget, self.opts,
                         self.tensor_seed(self.seed, name))
        return choice.enc, float(choice.error)


# ---------------------------------------------------------------------------- summaries


def format_summary(s: dict) -> str:
    lines = [f"wrote {s['out']}: {s['kv_heads_from']} -> {s['kv_heads_to']} KV heads "
             f"({s['method']}, {s['grouping']} grouping), {s['layers']} layers"]
    lines.append(f"KV cache per token: {s['kv_bytes_per_token_before']:,} -> "
                 f"{s['kv_bytes_per_token_after']:,} bytes")
    if s["k_residual_mean"] is not None and s["calibration"].get("tokens"):
        lines.append(f"calibration: {s['calibration']['tokens']} tokens; energy not kept "
                     f"(mean over layers): keys {s['k_residual_mean']:.4f}, values "
                     f"{s['v_residual_mean']:.4f}")
    if s["recovery"]:
        r = s["recovery"]
        lines.append(f"recovery: {r['steps']} steps x {r['batch']} x {r['seq_len']} tokens, "
                     f"KL {r['kl_first']:.4f} -> {r['kl_last']:.4f} ({r['seconds']} s)")
    lines.append(f"{s['bytes']:,} bytes in {s['shards']} shard(s), {s['seconds']} s")
    return "\n".join(lines)


def format_delta_summary(s: dict) -> str:
    lines = [f"wrote {s['out']}: {s['tensors_mapped']} of {s['tensors']} tensors mapped "
             f"({s['storage']})",
             f"artifact {s['bytes']:,} bytes (source delta {s['source_bytes']:,}); true ratio "
             f"{s['true_ratio']:.2f}x (source {s['source_true_ratio']:.2f}x)"]
    if s["base_recovered"]:
        lines.append("note: the converted base was recovery-trained; the mapped delta "
                     "reproduces T(fine-tune) + the base's recovery update")
    lines.append(f"{s['seconds']} s")
    return "\n".join(lines)
