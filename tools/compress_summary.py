"""The compressor's summary as people read it: per-class bytes and errors, dropped and
unsafe matrices with the highest safe ratio, the true ratio (`deltadq compress` prints it,
`deltadq inspect` and the tests reuse it)."""

from __future__ import annotations


def by_class(rows) -> dict:
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



def format_summary(s: dict) -> str:
    lines = [f"{'class':<10} {'tensors':>7} {'dense bf16':>12} {'stored':>12} {'ratio':>8} "
             f"{'mean rel. err':>13}"]
    for cls, c in sorted(s["by_class"].items()):
        ratio = c["dense_bf16_bytes"] / c["stored_bytes"] if c["stored_bytes"] else float("inf")
        err = f"{c['mean_error']:.4f}" if c["mean_error"] is not None else "-"
        lines.append(f"{cls:<10} {c['tensors']:>7} {c['dense_bf16_bytes']:>12,} "
                     f"{c['stored_bytes']:>12,} {ratio:>7.1f}x {err:>13}")
    lines.append("(mean rel. err: ||X (delta - stored)|| / ||X delta|| on held-out calibration "
                 "inputs; 0 is exact, >= 1: noise above the delta itself, which unbiased "
                 "values average out over the network; --unsafe decides what is dropped)")
    lines.append(f"unchanged tensors skipped: {s['tensors_unchanged']}")
    unsafe = {u["name"] for u in s.get("unsafe", [])}
    other = [n for n in s.get("tensors_dropped", []) if n not in unsafe]
    if other:
        lines.append(f"DROPPED (the method cannot fit them at this ratio; served as the base): "
                     f"{len(other)} tensors, e.g. {other[0]}")
    lines += unsafe_warning(s)
    noisy = [r for r in s["tensors"] if r["status"] == "stored" and (r.get("error") or 0) >= 1
             and r.get("output_error") is not None]
    if noisy:
        lines.append(f"note: {len(noisy)} stored matrices have an output error >= their delta's "
                     "own output (unbiased dropout noise at this ratio, e.g. "
                     f"{noisy[0]['name']}: {noisy[0]['error']:.2f}); kept because it averages "
                     "out over the network (see docs/compression.md; --unsafe delta drops them)")
    lines += check_lines(s.get("model_check"))
    nominal = f"{s['nominal_ratio']:.1f}x" if s["nominal_ratio"] else "-"
    lines.append(f"artifact {s['out']}: {s['artifact_bytes']:,} bytes on disk; true ratio "
                 f"{s['true_ratio']:.2f}x (target {s['ratio_target'] or '-'}), nominal {nominal}; "
                 f"{s['seconds']} s, peak RSS {s['peak_rss_mb']} MB")
    return "\n".join(lines)


def check_lines(rec: dict | None) -> list[str]:
    """The whole-model check's verdict (tools/model_check.py), for the summary."""
    if not rec:
        return []
    if not rec.get("ran"):
        return [f"whole-model check: not run ({rec.get('reason')})"]
    f, b, u = rec["final"], rec["base"], rec.get("unscaled")
    scaled = (f"; {rec['scaled_tensors']} deltas scaled per layer" if rec.get("scaled_tensors")
              else "")
    if scaled and u:
        scaled += f" (without: KL {u['kl']:.4f}, top-1 {u['top1']:.3f})"
    verdict = ("closer to the fine-tune than the base" if rec["passed"] else
               "FURTHER FROM THE FINE-TUNE THAN THE BASE (written because of --check warn)")
    mix = rec.get("width_rule_mix") or {}
    kept = (f"; kept the rule's widths on {mix['kept']} of its {mix['of']} matrices, the "
            "kinds that cost general text least on the calibration text"
            if mix.get("kept") else "")
    retried = (["note: the check refused the bit widths chosen to keep the delta (at this "
                "ratio they cost this fine-tune general text): compressed again with the "
                f"widths chosen by the output error alone{kept}"]
               if rec.get("width_rule_refused") else [])
    return retried + [
        f"whole-model check on {rec['tokens']} held-out tokens ({rec['text']}): KL to the "
        f"fine-tune {f['kl']:.4f} vs the base's {b['kl']:.4f}, top-1 agreement "
        f"{f['top1']:.3f} vs {b['top1']:.3f}: {verdict}{scaled}"] + (
        [f"  not shrunk: {rec['shrink_rejected']}"] if rec.get("shrink_rejected") else [])


def unsafe_warning(s: dict) -> list[str]:
    """Lines warning about matrices dropped because storing them was worse than nothing."""
    unsafe = s.get("unsafe") or []
    if not unsafe:
        return []
    by_cls: dict[str, int] = {}
    for u in unsafe:
        by_cls[u["class"]] = by_cls.get(u["class"], 0) + 1
    rule = s.get("unsafe_rule") or "delta"
    key = "output_error" if rule == "output" else "error"
    worst = max(unsafe, key=lambda u: u.get(key) or 0.0)
    what = (f"error {worst[key]:.2f} of the fine-tuned layer's output >= 1" if rule == "output"
            else f"relative output error {worst['error']:.2f} >= 1")
    lines = [f"WARNING: {len(unsafe)} matrices ({', '.join(f'{n} {c}' for c, n in by_cls.items())}"
             f") could not be stored safely at this ratio (--unsafe {rule}; e.g. "
             f"{worst['name']}: {what}) and were DROPPED: the model keeps the base's weights "
             "there and loses what the fine-tune changed in them."]
    safe = s.get("safe_ratio_estimate")
    if safe:
        lines.append(f"  highest ratio estimated to keep every matrix: --ratio {safe:g} "
                     "(each dropped matrix re-tried with more bytes)")
    else:
        lines.append("  no ratio up to 64x lower keeps them all: this fine-tune's delta is too "
                     "large for this method; try --method lowrank or a much lower --ratio")
    return lines
