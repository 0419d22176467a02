"""`deltadq kv-compress`: MHA/GQA -> fewer KV heads, as a checkpoint vLLM and HF load natively.

    kv_compress(model, out, KVCompressOptions(kv_heads=N, method="auto"|"svd"|"meanpool",
                grouping="auto"|"adjacent"|"similarity", recover_steps=K))
    apply_to_delta(converted_model, delta, out)   # tools/kv_delta.py: deltas follow the base

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

from deltadq_vllm.atomic import AtomicDir
from deltadq_vllm.checkpoint import FINGERPRINT_ALGORITHM, Checkpoint
from deltadq_vllm.errors import DeltaDQError

from .calibration import read_calibration_text
from .kv_calibration import (AttnLayout, Calibration, attention_layout, collect_stats,
                             layer_weights, weight_only_stats)
from .kv_maps import WEIGHTINGS, LayerMaps, apply_maps, build_layer_maps
from .kv_select import (GROUPINGS, MEANPOOL, METHODS, SEED_SVD, Candidate, candidates,
                        choose_layer_maps, output_error)
from .kv_recover import PARAM_SETS

from deltadq_vllm.content_hash import ALGORITHM as CONTENT_ALGORITHM
from deltadq_vllm.content_hash import tensor_digests
from deltadq_vllm.tokenizer_diff import tokenizer_files

MAPS_DIR = "kv_compress"
MAPS_FILE = "maps.safetensors"
INFO_FILE = "info.json"
MAPS_VERSION = 1
SHARD_BYTES = 2 * 1024**3


@dataclass
class KVCompressOptions:
    kv_heads: int | None = None
    method: str = "auto"           # per layer, the best of SVD/mean-pool on held-out tokens
    grouping: str = "auto"
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


def kv_compress(model_dir, out_dir, opt: KVCompressOptions,
                stats: Calibration | None = None) -> dict:
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
    # plain adjacent mean-pooling needs no calibration; everything else is fitted and judged
    needs_text = reused is None and (opt.method, opt.grouping) != ("meanpool", "adjacent")
    text, source = (read_calibration_text(opt.calibration)
                    if (needs_text or opt.recover_steps) else (None, None))
    with AtomicDir(out_dir, opt.force) as out:
        calib = {"source": None, "tokens": 0}
        if reused is not None:
            maps = reused[1]
            calib = dict(reused[0]["calibration"], reused_from=reused[0]["source"]["path_hint"])
            method_meta = {k: reused[0][k] for k in ("method", "grouping", "weighting")}
            layer_info = reused[0]["per_layer"]
        else:
            if needs_text:
                if stats is None:
                    stats = collect_stats(src, lay, text, opt.calib_seqs, opt.calib_seq_len,
                                          opt.seed, opt.progress)
                calib = {"source": source, "tokens": stats.tokens,
                         "heldout_tokens": stats.heldout_tokens,
                         "heldout_separate": stats.heldout_separate}
                maps, layer_info = _choose_maps(src, lay, n, stats, opt)
            else:
                maps = [build_layer_maps(weight_only_stats(src, lay, i), lay.heads, n,
                                         "meanpool", "meanpool", "adjacent", opt.weighting,
                                         lay.rope) for i in range(lay.layers)]
                layer_info = [{"groups": m.groups, "chosen": MEANPOOL.name,
                               "keys": "meanpool", "values": "meanpool",
                               "grouping": "adjacent", "k_residual": None,
                               "v_residual": None, "attn_error": None} for m in maps]
            method_meta = {"method": opt.method, "grouping": opt.grouping,
                           "weighting": opt.weighting}
        config = _new_config(src.config, n)
        _copy_side_files(src.path, out.path, config)
        written = write_checkpoint(src, lay, maps, out.path, progress=opt.progress)
        recovery = None
        if opt.recover_steps:
            recovery, overrides = _run_recovery(src, out.path, text, opt)
            written = write_checkpoint(src, lay, maps, out.path, overrides, opt.progress)
            if stats is not None and reused is None:
                recovery["attn_error_per_layer"] = _errors_after_recovery(
                    src, lay, stats, overrides)
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
        "attn_error_mean": _mean([i.get("attn_error") for i in layer_info]),
        "per_layer": layer_info, "bytes": written["bytes"], "shards": written["shards"],
        "reused_maps": reused is not None, "seconds": round(time.time() - t0, 2),
    }


# reported for every layer whatever the method, so a summary always shows what the
# seed's SVD and plain mean-pooling would have cost
REFERENCE = [Candidate("svd", "svd", "adjacent"), MEANPOOL, SEED_SVD]


def _choose_maps(src: Checkpoint, lay: AttnLayout, n: int, calib: Calibration,
                 opt: KVCompressOptions) -> tuple[list[LayerMaps], list[dict]]:
    """Per layer: every allowed candidate, judged on the held-out calibration tokens."""
    allowed = candidates(opt.method, opt.grouping, n)
    maps, info = [], []
    for i, lc in enumerate(tqdm(calib.layers, desc="maps", unit="layer",
                                disable=not opt.progress, file=sys.stderr)):
        best, judged = choose_layer_maps(lc.stats, layer_weights(src, lay, i), lc.heldout,
                                         lay.heads, n, allowed, REFERENCE, opt.weighting,
                                         lay.rope)
        maps.append(best.maps)
        row = best.info()
        info.append({"groups": row["groups"], "chosen": row["name"], "keys": row["keys"],
                     "values": row["values"], "grouping": row["grouping"],
                     "k_residual": _num(best.maps.k_residual),
                     "v_residual": _num(best.maps.v_residual),
                     "k_energy_kept": row["k_energy_kept"],
                     "v_energy_kept": row["v_energy_kept"], "attn_error": row["attn_error"],
                     "candidates": [j.info() for j in judged]})
    return maps, info


def _errors_after_recovery(src: Checkpoint, lay: AttnLayout, calib: Calibration,
                           overrides: dict[str, torch.Tensor]) -> list[float | None]:
    """Held-out attention-output error of each recovered layer (original layer inputs)."""
    from .kv_select import AttnWeights, attention_output

    out = []
    for i, lc in enumerate(calib.layers):
        orig = layer_weights(src, lay, i)
        names = {r: lay.name(i, r) for r in ("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                             "o_proj.weight", "q_proj.bias", "k_proj.bias",
                                             "v_proj.bias")}
        if not all(names[r] in overrides for r in ("q_proj.weight", "k_proj.weight",
                                                   "v_proj.weight", "o_proj.weight")):
            out.append(None)
            continue
        get = lambda r: overrides[names[r]].double() if names[r] in overrides else None  # noqa
        rec = AttnWeights(get("q_proj.weight"), get("k_proj.weight"), get("v_proj.weight"),
                          get("o_proj.weight"), get("q_proj.bias"), get("k_proj.bias"),
                          get("v_proj.bias"))
        ref = attention_output(orig, lc.heldout, lay.heads, lay.head_dim)
        out.append(_num(output_error(ref, rec, lc.heldout, lay.heads, lay.head_dim)))
    return out


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


# ---------------------------------------------------------------------------- summaries


def format_summary(s: dict) -> str:
    lines = [f"wrote {s['out']}: {s['kv_heads_from']} -> {s['kv_heads_to']} KV heads "
             f"(method {s['method']}, grouping {s['grouping']}), {s['layers']} layers"]
    lines.append(f"KV cache per token: {s['kv_bytes_per_token_before']:,} -> "
                 f"{s['kv_bytes_per_token_after']:,} bytes")
    c = s["calibration"]
    if c.get("tokens"):
        held = (f"{c['heldout_tokens']} held-out" if c.get("heldout_separate") else
                "no held-out tokens (text too short: judged on the fitting tokens)")
        lines.append(f"calibration: {c['tokens']} fitting tokens, {held}")
    rows = [r for r in s["per_layer"] if r.get("candidates")]
    if rows:
        names = list(dict.fromkeys(j["name"] for r in rows for j in r["candidates"]))
        lines.append("per layer: energy kept (keys, values) of the chosen maps, and the "
                     "relative attention-output error on held-out tokens of each candidate")
        head = f"{'layer':>5}  {'chosen':<20} {'K kept':>7} {'V kept':>7}  " + "  ".join(
            f"{n:>{max(10, len(n))}}" for n in names)
        lines.append(head)
        for i, r in enumerate(s["per_layer"]):
            err = {j["name"]: j["attn_error"] for j in r.get("candidates", [])}
            cells = "  ".join(f"{_fmt(err.get(n)):>{max(10, len(n))}}" for n in names)
            lines.append(f"{i:>5}  {r['chosen']:<20} {_fmt(r['k_energy_kept']):>7} "
                         f"{_fmt(r['v_energy_kept']):>7}  {cells}")
    if s["recovery"]:
        r = s["recovery"]
        lines.append(f"recovery: {r['steps']} steps x {r['batch']} x {r['seq_len']} tokens, "
                     f"KL {r['kl_first']:.4f} -> {r['kl_last']:.4f} ({r['seconds']} s)")
        if r.get("attn_error_per_layer"):
            lines.append("attention-output error after recovery, per layer: " + ", ".join(
                _fmt(e) for e in r["attn_error_per_layer"]))
    lines.append(f"{s['bytes']:,} bytes in {s['shards']} shard(s), {s['seconds']} s")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


# the delta half of `deltadq kv-compress` (its own module; re-exported for callers). Looked
# up on first use (PEP 562): kv_delta imports this module, so an import at module level
# failed whenever kv_delta was the first of the two to be imported.
_FROM_KV_DELTA = ("DeltaMapOptions", "apply_to_delta", "format_delta_summary")


def __getattr__(name):
    if name in _FROM_KV_DELTA:
        from . import kv_delta
        return getattr(kv_delta, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
