"""`deltadq kv-compress --apply-to-delta`: a fine-tune's delta follows its KV-compressed base.

Every map of the conversion is linear in the weights and fixed once calibrated on the base,
so for W_ft = W_base + delta: T(W_ft) = T(W_base) + T(delta). The converted base carries its
maps (kv_compress/maps.safetensors) and the source's per-tensor fingerprints; a delta
compressed against that source is decoded tensor by tensor, mapped, and stored densely or
re-compressed with its own method (docs/kv-heads.md, "Deltas follow the base").
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from deltadq_vllm.format.artifact import TOKENIZER_DIR, DeltaArtifact
from deltadq_vllm.format.artifact_writer import ArtifactWriter
from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.content_hash import ALGORITHM as CONTENT_ALGORITHM
from deltadq_vllm.content_hash import content_fingerprint
from deltadq_vllm.errors import DeltaDQError
from deltadq_vllm.format.layouts import decode, encode_dense
from deltadq_vllm.tokenizer_diff import tokenizer_files

from .calibration import LayerwiseCalibrator, read_calibration_text
from .kv_calibration import AttnLayout, attention_layout
from .kv_compress import _check_choice, _mean, _new_config, _role_of, load_maps
from .kv_maps import apply_maps

DELTA_STORAGE = ("dense", "recompress")


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
        from deltadq_vllm.format.positions import tensor_seed

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
