"""`deltadq inspect`: what an artifact holds, what it costs, and (given the models) how good it is."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from deltadq_vllm.format.artifact import MANIFEST, TOKENIZER_DIR, DeltaArtifact
from deltadq_vllm.tokenizer_diff import describe as describe_tokenizer
from deltadq_vllm.tokenizer_diff import stored_bytes as tokenizer_stored_bytes
from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.format.layouts import decode

from .calibration import layer_index, make_calibrator, read_calibration_text
from .choose import UNSAFE_RULE_TEXT, is_unsafe, output_error
from .methods import Calibration

# Which stored roles are values, positions or scales (for the byte breakdown).
ROLE_KIND = {"codes": "values", "values": "values", "u": "values", "v": "values",
             "cols": "positions", "part_counts": "positions", "step": "scales", "minv": "scales",
             "extra_rows": "dense_extras"}


def describe(delta_dir) -> dict:
    art = DeltaArtifact(delta_dir)
    m = art.manifest
    by_class: dict[str, dict] = {}
    by_kind: dict[str, int] = {}
    for name, e in art.entries.items():
        c = by_class.setdefault(e.cls, {"tensors": 0, "stored_bytes": 0, "dense_bf16_bytes": 0})
        c["tensors"] += 1
        c["dense_bf16_bytes"] += 2 * math.prod(e.shape)
        for role in e.stored:
            info = art.role_info(name, role)
            c["stored_bytes"] += info.nbytes
            small = e.layout == "dense" or e.cls in ("norm", "bias", "other")
            kind = "dense_extras" if small else ROLE_KIND.get(role, "other")
            by_kind[kind] = by_kind.get(kind, 0) + info.nbytes
    files = {p: p.stat().st_size for p in Path(delta_dir).rglob("*") if p.is_file()}
    total = sum(files.values())
    manifest_bytes = (Path(delta_dir) / MANIFEST).stat().st_size
    tok = m["finetune"].get("tokenizer")
    if isinstance(tok, dict):   # format 3: inside the manifest, as changes to the base's
        tok_bytes = min(tokenizer_stored_bytes(tok), manifest_bytes)
        manifest_bytes -= tok_bytes
    else:                       # format 2: whole files in tokenizer/
        tok_bytes = sum(s for p, s in files.items()
                        if TOKENIZER_DIR in p.relative_to(delta_dir).parts)
    tensor_bytes = sum(by_kind.values())
    by_kind["manifest"] = manifest_bytes
    by_kind["tokenizer"] = tok_bytes
    by_kind["file_headers"] = total - tensor_bytes - manifest_bytes - tok_bytes
    dense = m["sizes"]["dense_bf16_bytes"]
    return {
        "path": str(delta_dir), "format_version": m["format_version"], "method": m["method"],
        "method_params": m["method_params"], "seed": m["seed"], "calibration": m.get("calibration"),
        "nominal_ratio": m["sizes"].get("nominal_ratio"),
        "true_ratio": dense / total if total else None,
        "dense_bf16_bytes": dense, "artifact_bytes": total, "bytes_by_kind": by_kind,
        "bytes_by_class": by_class, "base_fingerprint": art.base_fingerprint["digest"],
        "base_architecture": m["base"]["architecture"],
        "finetune_tokenizer": describe_tokenizer(tok),
        "tensors": len(art.entries),
        "dropped": list(m.get("dropped", [])),
        "unsafe_dropped": sorted((m.get("choices") or {}).get("unsafe_dropped", [])),
        "unsafe_rule": (m.get("choices") or {}).get("unsafe_rule"),
        "methods_by_tensor": {n: e["method"] for n, e in m["tensors"].items() if e.get("method")},
    }


def quality(delta_dir, base_dir, ft_dir, calibration: str | None = None,
            bir_rows: int = 64, bir_tokens: int = 32) -> list[dict]:
    """Per tensor: weight-space and calibrated output error, and the Balanced Intermediate
    Results statistics of the true delta: variance and min-max range over j of the products
    delta[i, j] * x[j], averaged over sampled rows i and tokens (and the same for the base
    weight, for scale)."""
    art = DeltaArtifact(delta_dir)
    base, ft = Checkpoint(base_dir, "base"), Checkpoint(ft_dir, "fine-tune")
    art.check_base(base)
    text, _ = read_calibration_text(calibration)
    # the activations compress judged the matrices on (the fine-tune's by default)
    on = (art.manifest.get("calibration") or {}).get("activations_of", "base")
    calibrator = make_calibrator(ft if on == "finetune" else base, text)
    rule = (art.manifest.get("choices") or {}).get("unsafe_rule", "delta")
    order = sorted(art.entries, key=lambda n: (layer_index(n) is None, layer_index(n) or 0, n))
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name in order:
        e = art.entries[name]
        if e.absolute or e.base_shape is None:
            continue
        w_base = base.get(name).float()
        true = ft.get(name)[: e.base_shape[0]].float() - w_base
        approx = decode(art.encoded(name)).reshape(true.shape)
        row = {"name": name, "class": e.cls, "layout": e.layout,
               "weight_rel_error": float((true - approx).norm() / true.norm().clamp_min(1e-30))}
        x = None
        li = layer_index(name)
        tied = e.cls == "embedding" and (art.manifest["finetune"].get("config") or {}).get(
            "tie_word_embeddings") and not any(v.cls == "lm_head" for v in art.entries.values())
        if calibrator is not None and e.cls == "linear" and li is not None:
            x = calibrator.inputs_for_layer(li).get(name)
        elif calibrator is not None and (e.cls == "lm_head" or tied):
            x = calibrator.final_inputs()
        if x is not None:
            # the same held-out rows compress judged the matrix on (>= 1: worse than nothing
            # for this matrix alone); output_error: against the fine-tuned layer's output
            held = Calibration.split(x, hold_block=calibrator.hold_block)
            row["output_rel_error"] = held.relative_error(true, approx)
            row["output_error"] = output_error(held, true, true + w_base,
                                               row["output_rel_error"])
            row["unsafe"] = is_unsafe(rule, row["output_rel_error"], row["output_error"])
            ri = torch.randperm(true.shape[0], generator=gen)[:bir_rows]
            ti = torch.randperm(x.shape[0], generator=gen)[:bir_tokens]
            for label, w in (("delta", true), ("base", w_base)):
                prod = w[ri].unsqueeze(1) * x[ti].unsqueeze(0)  # [rows, tokens, in]
                row[f"bir_{label}_var"] = float(prod.var(-1).mean())
                row[f"bir_{label}_range"] = float((prod.amax(-1) - prod.amin(-1)).mean())
        rows.append(row)
    return rows


def format_description(d: dict) -> str:
    nominal = f"{d['nominal_ratio']:.1f}x" if d["nominal_ratio"] else "-"
    lines = [f"delta {d['path']} (format v{d['format_version']})",
             f"  method: {d['method']}  params: {d['method_params']}  seed: {d['seed']}",
             f"  ratio: true {d['true_ratio']:.2f}x ({d['dense_bf16_bytes']:,} dense bf16 bytes / "
             f"{d['artifact_bytes']:,} bytes on disk), nominal {nominal}",
             f"  base fingerprint: {d['base_fingerprint']}  architecture: {d['base_architecture']}",
             f"  fine-tune tokenizer: {d['finetune_tokenizer'] or 'same as the base'}",
             "  bytes by kind: " + ", ".join(f"{k} {v:,}" for k, v in d["bytes_by_kind"].items()),
             *([f"  stored with another method than {d['method']}: "
                + ", ".join(f"{n} ({mm})" for n, mm in d["methods_by_tensor"].items())]
               if d.get("methods_by_tensor") else []),
             *([f"  WARNING: {len(d['unsafe_dropped'])} matrices were dropped as unsafe ("
                + UNSAFE_RULE_TEXT.get(d.get("unsafe_rule") or "delta", "")
                + "; the model keeps the base's weights there): "
                + ", ".join(d["unsafe_dropped"])]
               if d.get("unsafe_dropped") else []),
             f"  {'class':<10} {'tensors':>7} {'dense bf16':>12} {'stored':>12} {'ratio':>8}"]
    for cls, c in sorted(d["bytes_by_class"].items()):
        r = c["dense_bf16_bytes"] / c["stored_bytes"] if c["stored_bytes"] else float("inf")
        lines.append(f"  {cls:<10} {c['tensors']:>7} {c['dense_bf16_bytes']:>12,} "
                     f"{c['stored_bytes']:>12,} {r:>7.1f}x")
    lines.append("  (dense bf16: the class's delta as bf16 bytes; stored: its bytes in the "
                 "artifact; ratio: dense / stored)")
    return "\n".join(lines)


QUALITY_LEGEND = """\
  columns (per tensor, computed against the real fine-tune):
    w err    ||D - D'|| / ||D||: relative error of the stored delta D' against the true
             delta D = fine-tune - base, over the weights
    out err  ||X (D - D')^T|| / ||X D^T||: the same for the layer's output on calibration
             inputs X (linear layers and the LM head); what the model feels.
             Near 0 is exact; >= 1 means the error is as large as the whole change the
             fine-tune makes to that output (no better than the base for this layer
             alone; at high ratios dropout noise averages out over the network)
    full err ||X (D - D')^T|| / ||X W_ft^T||: the error against the fine-tuned layer's
             whole output; >= 1: the output is swamped by compression noise
             (UNSAFE under the default --unsafe output rule; under --unsafe delta,
             out err >= 1 is): compress again at a lower --ratio
    BIR var / range d/base  Balanced Intermediate Results: variance and range over j of the
             products D[i,j] * x[j] (delta) vs W_base[i,j] * x[j] (base); a small delta
             variance is why dropping and quantizing delta entries is cheap (DeltaDQ)
    -        not measured (embeddings, norms, biases: no calibrated output)"""


def format_quality(rows: list[dict]) -> str:
    width = max([len("tensor")] + [len(r["name"]) for r in rows])
    lines = [f"  {'tensor':<{width}} {'w err':>7} {'out err':>8} {'full err':>8} "
             f"{'BIR var d/base':>15} {'BIR range d/base':>17}"]
    for r in rows:
        out = f"{r['output_rel_error']:.4f}" if "output_rel_error" in r else "-"
        full = f"{r['output_error']:.4f}" if "output_error" in r else "-"
        if "bir_delta_var" in r:
            v = f"{r['bir_delta_var']:.1e}/{r['bir_base_var']:.1e}"
            g = f"{r['bir_delta_range']:.1e}/{r['bir_base_range']:.1e}"
        else:
            v = g = "-"
        lines.append(f"  {r['name']:<{width}} {r['weight_rel_error']:>7.4f} {out:>8} {full:>8} "
                     f"{v:>15} {g:>17}" + ("  UNSAFE" if r.get("unsafe") else ""))
    return "\n".join(lines + [QUALITY_LEGEND])
