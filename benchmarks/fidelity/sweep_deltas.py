"""The sweep's compressed deltas: one artifact per (fine-tune, method, ratio) and
settings, made once (atomically) and cached with its summary beside it."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

from sweep_common import (CALIB, CHECK, CHECK_TAG, FT, PREVIOUS_CHECK_TAGS, QUANT, VALUES,
                          _qsuffix, _retryable, _write_json)


def delta_dir(ft: str, method: str, ratio, checked: bool | None = None) -> Path:
    return FT.cache_root() / "deltas" / ft / f"{method}-{ratio}{_qsuffix(method, checked)}"


def _checked_from_unchecked(ft: str, method: str, ratio, out: Path) -> dict | None:
    """The checked artifact from the cached unchecked one of the same settings: compress()
    is the fit, then the check (tools/check_publish.check_and_publish), so checking the
    cached fit gives the artifact compress() would write, without refitting."""
    from deltadq_vllm.format.artifact import DeltaArtifact
    from deltadq_vllm.tools.check_publish import check_and_publish, read_check_text

    fit = _cached_fit(ft, method, ratio)
    if fit is None:
        return None
    src, s = fit
    t0 = time.time()
    text, source = read_check_text(None)
    rec = check_and_publish(FT.base_dir(), FT.finetune_dir(ft), src, out, CHECK["mode"], text,
                            source, force=True)
    rec["seconds"] = round(time.time() - t0, 2)
    art = DeltaArtifact(out)
    s = dict(s, artifact_bytes=art.file_bytes(),
             true_ratio=s["dense_bf16_bytes"] / art.file_bytes(), model_check=rec,
             compress_seconds=(s.get("compress_seconds") or 0) + rec["seconds"],
             checked_from=src.name)
    s.pop("same_bytes_as", None)
    for prev in _earlier_artifacts(ft, method, ratio):
        if same_tensor_bytes(prev, out):
            s["same_bytes_as"] = prev.name   # its measured row stands for this artifact
            break
    _write_json(out.parent / f"{out.name}.json", s)
    return s


def _earlier_artifacts(ft: str, method: str, ratio) -> list[Path]:
    """The artifacts of these settings made before this check generation: the unchecked
    fit, then those earlier generations of the check published."""
    out = delta_dir(ft, method, ratio)
    stem = out.name.removesuffix(CHECK_TAG)
    return ([delta_dir(ft, method, ratio, checked=False)]
            + [out.with_name(stem + tag) for tag in PREVIOUS_CHECK_TAGS])


def _cached_fit(ft: str, method: str, ratio) -> tuple[Path, dict] | None:
    """(directory, summary) of the compressor's fit of these settings before any check:
    the unchecked artifact, or one an earlier check generation published unscaled (then it
    is the fit, byte for byte)."""
    unchecked, *checked = _earlier_artifacts(ft, method, ratio)
    for c in [unchecked, *checked]:
        info = c.parent / f"{c.name}.json"
        if not c.exists() or not info.exists():
            continue
        s = json.loads(info.read_text())
        if "error" in s:
            continue
        if c == unchecked or (s.get("model_check") or {}).get("scaled_tensors") == 0:
            return c, s
    return None


def same_tensor_bytes(a: Path, b: Path) -> bool:
    import filecmp

    files = sorted(p.name for p in a.glob("*.safetensors"))
    return (a.exists() and bool(files)
            and files == sorted(p.name for p in b.glob("*.safetensors"))
            and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files))


def _from_disk(out: Path, ratio) -> dict | None:
    """Summary of an artifact that `compress` wrote and then refused (its final size check
    raises after the artifact is complete): accepted if its true ratio reaches `ratio`."""
    from deltadq_vllm.format.artifact import DeltaArtifact

    if not (out / "deltadq.json.gz").exists():
        return None
    art = DeltaArtifact(out)
    man = art.manifest
    dense = man["sizes"]["dense_bf16_bytes"]
    true = dense / art.file_bytes()
    if true < float(ratio):
        return None
    return {"method": man["method"], "ratio_target": ratio, "true_ratio": true,
            "nominal_ratio": man["sizes"].get("nominal_ratio"),
            "artifact_bytes": art.file_bytes(), "dense_bf16_bytes": dense,
            "dense_dtype": man["method_params"].get("dense_dtype"),
            "tensors_stored": len(man.get("tensors", {})) - len(man.get("dropped", [])),
            "dropped": len(man.get("dropped", [])), "dropped_tensors": list(man.get("dropped", [])),
            "ratio_passed": man["method_params"].get("ratio_target")}


def make_delta(ft: str, method: str, ratio) -> dict:
    """Compress once (atomic artifact dir); the summary is kept beside it as <dir>.json.
    A compression that fails is recorded as {"error": ...} (and cached too)."""
    from deltadq_vllm.tools.compress import CompressOptions, compress
    from deltadq_vllm.tools.rss import reset_peak_rss

    out = delta_dir(ft, method, ratio)
    info = out.parent / f"{out.name}.json"
    if info.exists():
        s = json.loads(info.read_text())
        if out.exists() and "error" not in s or "error" in s and not _retryable(s):
            return s
        if _retryable(s) and out.exists():
            disk = _from_disk(out, ratio)
            if disk is not None:
                disk["compressor_errors"] = s.get("compressor_errors") or [s["error"]]
                disk["compress_seconds"] = s.get("compress_seconds")
                _write_json(info, disk)
                return disk
    out.parent.mkdir(parents=True, exist_ok=True)
    if CHECK["mode"] != "off" and method != "dense":
        derived = _checked_from_unchecked(ft, method, ratio, out)
        if derived is not None:
            return derived
    t0, c0 = time.time(), time.process_time()
    sens = method.endswith("-sens")
    variant = method.removesuffix("-sens")
    base_method = variant.removesuffix("-calibrated")
    opt = (CompressOptions(method="dense", progress=False, force=True) if method == "dense"
           else CompressOptions(method=base_method, ratio=float(ratio), progress=False,
                                force=True, quant_range=QUANT["range"],
                                calibrated=variant.endswith("-calibrated"),
                                budget="sensitivity" if sens else "share",
                                calibration=CALIB["path"], reuse_calibration=True,
                                min_gain=VALUES["min_gain"], unsafe=VALUES["unsafe"],
                                plain_gain=VALUES["plain_gain"], check=CHECK["mode"]))
    compressor_errors = []
    # this row's own peak (else the benchmark process's high-water mark of every row so far)
    rss_scope = "row" if reset_peak_rss() else "process"
    for _ in range(3):
        try:
            s = compress(FT.base_dir(), FT.finetune_dir(ft), out, opt)
            break
        except Exception as e:  # a ratio the method cannot reach at all: reported, not skipped
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            compressor_errors.append(f"--ratio {opt.ratio:g}: {msg}")
            m = re.search(r"internal: reached only ([0-9.]+)x of ([0-9.]+)x", msg)
            if m is None:
                summary = {"method": method, "ratio_target": ratio, "error": msg,
                           "compressor_errors": compressor_errors,
                           "compress_seconds": round(time.time() - t0, 1)}
                _write_json(info, summary)
                return summary
            # the compressor's own size estimate was off: it wrote the artifact, then refused
            # it; keep it if it reaches the target, else (its hint) pass a higher --ratio
            disk = _from_disk(out, ratio)
            if disk is not None:
                s = None
                break
            opt = replace(opt, ratio=opt.ratio * float(m.group(2)) / float(m.group(1)) * 1.003)
    else:
        summary = {"method": method, "ratio_target": ratio,
                   "error": "; ".join(compressor_errors),
                   "compressor_errors": compressor_errors,
                   "compress_seconds": round(time.time() - t0, 1)}
        _write_json(info, summary)
        return summary
    if s is None:
        summary = disk
    else:
        summary = {k: s[k] for k in ("method", "ratio_target", "true_ratio", "nominal_ratio",
                                     "artifact_bytes", "dense_bf16_bytes", "dense_dtype",
                                     "tensors_stored")}
        summary["method"] = method
        # the benchmark process's peak during this compression ("row"; it also holds the
        # server client and the recorded calibration) or, where it cannot be reset,
        # its high-water mark of every row so far ("process": not a per-row number)
        summary["peak_rss_mb"] = s.get("peak_rss_mb")
        summary["peak_rss_scope"] = rss_scope
        summary["unsafe_dropped"] = [u["name"] for u in s.get("unsafe", [])]
        if "model_check" in s:
            summary["model_check"] = s["model_check"]
        summary["dropped"] = len(s.get("tensors_dropped", []))
        summary["dropped_tensors"] = list(s.get("tensors_dropped", []))
    summary["ratio_passed"] = opt.ratio
    summary["compressor_errors"] = compressor_errors
    summary["compress_seconds"] = round(time.time() - t0, 1)
    summary["compress_cpu_seconds"] = round(time.process_time() - c0, 1)
    _write_json(info, summary)
    return summary
