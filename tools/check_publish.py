"""`deltadq compress --check`: the check's text, its verdict, and publishing the checked
artifact (tools/model_check.py runs the models; this decides what is written).

The artifact compress() staged is checked; the unscaled fit or, where the per-layer shrink
is a repair, the scaled one is published atomically at --out; `--check fail` publishes
nothing when the result is further from the fine-tune than the base.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import warnings
from pathlib import Path

from deltadq_vllm.atomic import AtomicDir, move_into_place
from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.errors import DeltaDQError
from deltadq_vllm.format.artifact import DeltaArtifact
from deltadq_vllm.format.artifact_writer import ArtifactWriter
from deltadq_vllm.format.layouts import scale_encoded

from .calibration import CalibrationUnavailable, read_calibration_text
from .model_check import ModelCheck

CHECK_MODES = ("fail", "warn", "off")
# A shrunk artifact is a repair only when it ends at most this share of the base's KL from
# the fine-tune. Shrinking toward the base always ends a little closer than the base; when
# that is all it reaches, it has removed most of the delta, and the fine-tune's own skill
# with it. Measured on the real SmolLM2 fine-tunes (transformers, merged, 100 problems):
# mix-heavy at 2048x shrunk to KL 0.195 vs the base's 0.253 on the check text (77%):
# arithmetic 0.36 -> 0.17, word reversal 0.95 -> 0.27; spell-heavy at 1024x, 0.574 vs 0.936
# (61%): its task 0.09 -> 0.02. A delta stored 3x too large is repaired to KL 0.0001.
REPAIR_KL_SHARE = 0.5
# The shrunk artifact as written differs from the check's float measurement of it only by
# its scales' bf16 rounding: KL within 0.17% in the 21 pairs recorded (benchmarks/results,
# fidelity sweeps). One measured above the repair bound by more than this share is rejected
# without writing and re-measuring it (a forward pass of the model: ~2.7 s of each ~11 s
# check of a width mix on SmolLM2 at 2048x, where the check refuses them all).
WRITTEN_KL_SLACK = 0.05


def read_check_text(path: str | None) -> tuple[str, str]:
    """(text, source description) of the check's held-out text: a file of the user's, or
    the builtin check.txt (different text from the builtin calibration text)."""
    if path is None:
        from importlib import resources

        return (resources.files("deltadq_vllm.tools").joinpath("data/check.txt").read_text(),
                "builtin:check.txt")
    return read_calibration_text(path)


def check_maker(base_dir, ft_dir, text: str):
    """make_check for check_and_publish: one ModelCheck, made at the first call and
    returned by every later one (a CalibrationUnavailable is not kept: raised each time)."""
    return functools.cache(lambda: ModelCheck(Checkpoint(base_dir, "base"),
                                              Checkpoint(ft_dir, "fine-tune"), text))


class CheckRefused(DeltaDQError):
    """The whole-model check refused the artifact (--check fail): nothing was published."""


def check_and_publish(base_dir, ft_dir, staged_dir, out_dir, mode: str, text: str,
                      text_source: str, force: bool, shrink: str = "if_needed",
                      consume: bool = False, make_check=None) -> dict:
    """Check the artifact compress() staged at `staged_dir`, publish it (scaled where that
    is closer to the fine-tune) atomically at `out_dir`, and return the check's record.
    mode "fail": nothing is published when the result is further from the fine-tune than
    the base (DeltaDQError with the numbers). consume=True: the staged directory is
    scratch (compress()'s own), published by renaming it, not by copying it.
    make_check(): the ModelCheck of base_dir, ft_dir and `text` to run (compress() hands
    every check of one fine-tune the same one: it keeps its reference streams, see
    tools/model_check.py); default, a new one."""
    AtomicDir.check_target(out_dir, force)
    art = DeltaArtifact(staged_dir)
    if make_check is None:
        make_check = check_maker(base_dir, ft_dir, text)

    def publish_unscaled():
        if consume:
            move_into_place(staged_dir, out_dir)
        else:
            rewrite_artifact(art, out_dir, {}, force)

    try:
        check = make_check()
    except CalibrationUnavailable as e:
        warnings.warn(f"--check skipped: {e}")
        record = {"ran": False, "reason": str(e)}
        publish_unscaled()
        return record
    result = check.run(art, shrink=shrink)
    final, factors = result.unscaled, {}
    if result.scaled is not None and result.scaled.kl < result.unscaled.kl:
        factors = result.factors
    record = {"ran": True, "text": text_source, "tokens": result.tokens,
              "phase_seconds": result.seconds,
              "base": result.base.as_dict(), "unscaled": result.unscaled.as_dict(),
              "layer_scale": [round(a, 3) for a in result.layer_factors] if factors else None,
              "scaled_tensors": len(factors),
              **({"scaled_float": result.scaled.as_dict()} if result.scaled is not None else {})}
    # the scaled artifact is written once, beside the output, measured as written (its bf16
    # scales were rounded once more) and, unless refused, moved into place; where the
    # measurement before writing is already far from a repair, it is not written
    scratch = Path(tempfile.mkdtemp(prefix=".check-", dir=Path(out_dir).parent))
    try:
        if factors:
            shrunk, measured = result.scaled, "before writing"
            if shrunk.kl <= REPAIR_KL_SHARE * result.base.kl * (1 + WRITTEN_KL_SLACK):
                scaled = rewrite_artifact(art, scratch / "scaled", factors, False)
                check.trace.mark("check scaled written")
                shrunk = check.measure(DeltaArtifact(scaled), result.ref_logp)
                check.trace.mark("check scaled measured")
                record["scaled_written"] = shrunk.as_dict()
                measured = "as written"
            if shrunk.kl <= REPAIR_KL_SHARE * result.base.kl:
                final = shrunk
            else:   # a retreat toward the base, not a repair: the fit stands (or falls)
                factors = {}
                record["layer_scale"], record["scaled_tensors"] = None, 0
                record["shrink_rejected"] = (
                    f"the per-layer shrink reached KL {shrunk.kl:.4f} ({measured}), more "
                    f"than {REPAIR_KL_SHARE:g} x the base's {result.base.kl:.4f}: it removes "
                    "most of the delta, and the fine-tune's skill with it")
        if check.trace.rows is not None:   # (every phase of this ModelCheck's checks so far)
            record["rss_phases"] = check.trace.rows
        record["final"] = final.as_dict()
        record["top1_noise"] = round(final.top1_noise(result.base), 4)
        record["kl_noise"] = round(final.kl_noise(result.base), 5)
        record["passed"] = final.closer_than(result.base)
        if record["passed"] or mode != "fail":
            if factors:
                move_into_place(scaled, out_dir)
            else:
                publish_unscaled()
            return record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # refused: nothing was published
    raise CheckRefused(
        f"the compressed fine-tune is further from the fine-tune than the base model is "
        f"or not measurably closer, on held-out text ({result.tokens} tokens of "
        f"{text_source}): KL {final.kl:.4f} vs the base's {result.base.kl:.4f} nats/token "
        f"(closer means lower by more than the text's noise, {record['kl_noise']:.4f}), "
        f"top-1 agreement {final.top1:.3f} vs {result.base.top1:.3f} (a tie within "
        f"{record['top1_noise']:.3f} counts as not lower; without the per-layer shrink: KL "
        f"{result.unscaled.kl:.4f}, top-1 {result.unscaled.top1:.3f}"
        + (f"; {record['shrink_rejected']}" if "shrink_rejected" in record else "")
        + "); serving it would answer worse than serving the base. Nothing was written",
        "pass a lower --ratio (the delta keeps more of the fine-tune), or --check warn to "
        "write it anyway")


def rewrite_artifact(art: DeltaArtifact, out_dir, factors: dict[str, float],
                     force: bool, source=None) -> Path:
    """Copy an artifact atomically with some tensors' deltas scaled
    (deltadq_vllm.format.layouts.scale_encoded): same layouts, same tensor bytes, same manifest
    but for the data file's checksum (its gzip may differ by a byte or two), so the true
    ratio compress() fitted is kept. (The check's record stays in compress()'s summary: at
    256x a tiny model's budget has no room for it in the manifest.) `source(name)`: the
    artifact a tensor's encoding and manifest entry are taken from instead of `art` (one of
    the same fine-tune and tensors: tools/width_mix.py)."""
    man = art.manifest
    with ArtifactWriter(out_dir, force=force, default_dtype=man["finetune"]["dtype"]) as w:
        for name in man["tensors"]:
            src = source(name) if source is not None else art
            enc = src.encoded(name)
            if name in factors:
                enc = scale_encoded(enc, factors[name])
            tensors = dict(enc.tensors)
            extra = src.extra_rows(name)
            if extra is not None:
                tensors["extra_rows"] = extra
            w.add(name, {k: v for k, v in src.manifest["tensors"][name].items()
                         if k != "stored"}, tensors)
        return w.finish({k: v for k, v in man.items()
                         if k not in ("format", "format_version", "created_by", "tensors",
                                      "files")})
