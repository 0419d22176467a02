"""`deltadq compress`: stream base and fine-tune, compress every changed tensor, write atomically.

Order of work (one decoder layer resident at a time):
  embeddings -> layer 0 .. layer L-1 (calibrate on the base layer, then compress its
  tensors) -> final norm, LM head and anything else.
The byte budget is spent as we go: each matrix gets the remaining budget times its
share of the remaining elements, so a tensor that turns out unchanged (or a cheap
one) leaves its bytes to the rest and the true ratio lands on target.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

from deltadq_vllm.format.artifact import DeltaArtifact
from deltadq_vllm.atomic import AtomicDir

from .calibration import CalibrationUnavailable, read_calibration_text
from .check_publish import CheckRefused, check_and_publish, check_maker, read_check_text
from .width_mix import mixed_summary, select_mix, write_mix
# the options live in compress_options.py, one pass in compress_pass.py; callers import
# CompressOptions, DENSE_DTYPES and compress from here
from .compress_options import (DEFAULT_RATIO, DENSE_DTYPES, CompressOptions, checks_model,
                               validate_options)
from .compress_pass import compress_pass
from .ratio_fit import fit_ratio
from .rss import peak_rss_bytes

__all__ = ["CompressOptions", "DENSE_DTYPES", "compress"]

# what the error-alone fit takes from the width rule's (ratio_fit's probes)
FIT_CARRIES = ("memo", "final_inputs")
# mixes of the width rule's widths the check judges before the error-alone artifact (each a
# whole-model check; tools/width_mix.py)
MIX_CHECKS = 3


def compress(base_dir, ft_dir, out_dir, opt: CompressOptions) -> dict:
    """Compress ft_dir - base_dir into an artifact at out_dir; returns the summary.

    With the whole-model check (opt.check, tools/model_check.py) the artifact is written
    to a staging directory beside out_dir, checked (and scaled per layer where that brings
    it closer to the fine-tune), and only then published at out_dir; with --check fail
    nothing is published when it is further from the fine-tune than the base."""
    t_start = time.time()
    if not checks_model(opt):
        summary = _fit_ratio(base_dir, ft_dir, out_dir, opt)
        summary["seconds"] = round(time.time() - t_start, 2)   # every pass, not the last
        return summary
    validate_options(opt)
    AtomicDir.check_target(out_dir, opt.force)   # before the work, not after it
    text, text_source = read_check_text(opt.check_text)
    # every check below judges an artifact of the same pair on the same text: one
    # ModelCheck runs the fine-tune's and the base's streams once for all of them
    make_check = check_maker(base_dir, ft_dir, text)
    out = Path(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.unchecked-", dir=out.parent))
    try:
        probes: dict = {}
        summary = _fit_ratio(base_dir, ft_dir, staging / "a", replace(opt, force=False),
                             probes)
        # the width rule (CompressOptions.width_rule) trades general text for the task at
        # extreme ratios; where it moved a matrix and the check refuses that trade, the
        # widths are chosen by the error alone and the check judges again (reverse-light
        # at 1024x: refused with the rule)
        retry = any(t.get("width_rule") for t in summary.get("tensors", []))
        # what that second fit can take from this one: the per-matrix scores and encodings
        # (the rule only chooses among them) and the LM head's calibration inputs; not the
        # budget's curves or the matrices found unsafe (chosen under the rule)
        carried = {k: probes[k] for k in FIT_CARRIES if k in probes} if retry else {}
        del probes
        t0 = time.time()
        try:
            record = check_and_publish(base_dir, ft_dir, staging / "a", out_dir,
                                       "fail" if retry else opt.check, text, text_source,
                                       opt.force, consume=True, make_check=make_check)
        except CheckRefused as refused:
            if not retry:
                raise
            rule_summary = summary
            plain = replace(opt, force=False, width_rule=False)
            summary = _fit_ratio(base_dir, ft_dir, staging / "b", plain, carried)
            t0 = time.time()
            record, summary = _publish_mix(base_dir, ft_dir, staging, out_dir, opt, text,
                                           text_source, rule_summary, summary, make_check)
            record["width_rule_refused"] = str(refused).split(":")[0]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record["seconds"] = round(time.time() - t0, 2)
    true_bytes = DeltaArtifact(out).file_bytes()
    summary.update(out=str(out), artifact_bytes=true_bytes,
                   true_ratio=summary["dense_bf16_bytes"] / true_bytes, model_check=record,
                   peak_rss_mb=round(peak_rss_bytes() / 2**20, 1),
                   seconds=round(time.time() - t_start, 2))
    if record.get("ran") and not record["passed"]:
        warnings.warn("--check warn: the compressed fine-tune is further from the fine-tune "
                      f"than the base on held-out text (KL {record['final']['kl']} vs "
                      f"{record['base']['kl']}, top-1 {record['final']['top1']} vs "
                      f"{record['base']['top1']}); written anyway")
    return summary

def _publish_mix(base_dir, ft_dir, staging: Path, out_dir, opt: CompressOptions, text: str,
                 text_source: str, rule_summary: dict, plain_summary: dict, make_check):
    """After the check refused the width rule's artifact (staging/a): the error-alone one
    (staging/b) with the rule's widths kept on the kinds of matrix the calibration text says
    cost general text least (tools/width_mix.py), judged strictly by the check, walking back
    to fewer kinds (at most MIX_CHECKS mixes) where it refuses; where none passes, the
    error-alone artifact is judged as asked. Returns (check record, summary)."""
    moved = [t["name"] for t in rule_summary.get("tensors", []) if t.get("width_rule")]
    cal_text, _ = read_calibration_text(opt.calibration)
    t0 = time.time()
    try:
        accepted, trace = select_mix(base_dir, ft_dir, staging / "a", staging / "b", moved,
                                     cal_text)
    except CalibrationUnavailable as e:   # e.g. the text needs tokens only the fine-tune has
        accepted, trace = [], [{"skipped": str(e)}]
    trace.append({"seconds": round(time.time() - t0, 2)})
    # every moved matrix is the refused artifact itself (the calibration text and the
    # check's text can disagree: dare at 1024x on reverse-light)
    tries = [c for c in reversed(accepted) if c != set(moved)][:MIX_CHECKS]
    for chosen in tries:
        shutil.rmtree(staging / "c", ignore_errors=True)
        write_mix(staging / "a", staging / "b", chosen, staging / "c")
        try:
            record = check_and_publish(base_dir, ft_dir, staging / "c", out_dir, "fail", text,
                                       text_source, opt.force, consume=True,
                                       make_check=make_check)
        except CheckRefused as refused:
            trace.append({"mix_refused": len(chosen), "why": str(refused).split(":")[0]})
            continue
        record["width_rule_mix"] = {"kept": len(chosen), "of": len(moved), "trace": trace}
        return record, mixed_summary(rule_summary, plain_summary, chosen)
    record = check_and_publish(base_dir, ft_dir, staging / "b", out_dir, opt.check, text,
                               text_source, opt.force, consume=True, make_check=make_check)
    record["width_rule_mix"] = {"kept": 0, "of": len(moved), "trace": trace}
    return record, plain_summary


def _fit_ratio(base_dir, ft_dir, out_dir, opt: CompressOptions,
               probes: dict | None = None) -> dict:
    """compress() without the whole-model check: passes until the true ratio is on target
    (tools/ratio_fit.py; `probes`: what its passes share)."""
    return fit_ratio(lambda o, **how: compress_pass(base_dir, ft_dir, out_dir, o, **how), opt,
                     DEFAULT_RATIO, probes)
