"""Where the whole-model check refuses the width rule's artifact: keep the rule's widths on
the kinds of matrix where they cost general text least, as far as the calibration text
allows (compress() then lets the check judge the mix on its own, held-out text).

Why: the width rule (method_base.WIDTH_MIN_GAIN) trades general text for the task at
extreme ratios, all matrices at once. Measured on reverse-light at 1024x (transformers,
float32, 200 held-out problems; benchmarks/README.md "Bits against density"): with the rule
everywhere the task kept 98% but the check refused it (KL 0.0556 vs the base's 0.0446);
with widths by the error alone 59%. The MLP's rule widths alone kept 96% at the base's KL;
gate and up alone 89%, clearly closer than the base; attention's alone 84%. So the mix is
chosen per kind of matrix (a tensor name with its layer index removed): each kind's rule
widths are measured alone on top of the error-alone artifact, then kinds are added in order
of the KL they cost while the whole model stays measurably closer to the fine-tune than the
base on the calibration text. Both artifacts fit the same per-matrix byte shares, so any
mix keeps the true ratio (within the per-matrix rounding of each configuration).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.format.artifact import DeltaArtifact

from .calibration import WeightSource, checkpoint_source
from .check_publish import rewrite_artifact
from .compress_summary import by_class
from .model_check import Closeness, DeltaWeights, FineTuneLogp, ModelCheck, closeness


def kind_of(name: str) -> str:
    """The kind of matrix a tensor is: its name with layer indices replaced by '#'."""
    return re.sub(r"\.\d+\.", ".#.", name)


def select_mix(base_dir, ft_dir, rule_dir, plain_dir, moved: list[str], text: str,
               measure=None) -> tuple[list[set[str]], list[dict]]:
    """Which tensors of `moved` (those the width rule moved in the artifact at `rule_dir`)
    to take from it instead of from the error-alone artifact at `plain_dir`: the growing
    sets the calibration text accepted, one per kind added (the last is its choice; the
    check walks back through the others where it refuses that one), and the trace of what
    was measured. `measure(names) -> Closeness` and the base's Closeness come from
    whole-model runs on `text` unless `measure` is given as (measure, base_closeness)."""
    if measure is None:
        measure, base_c = _measurer(base_dir, ft_dir, rule_dir, plain_dir, text)
    else:
        measure, base_c = measure
    groups: dict[str, set[str]] = {}
    for n in moved:
        groups.setdefault(kind_of(n), set()).add(n)
    alone = {k: measure(names) for k, names in groups.items()}
    trace = [{"kind": k, "tensors": len(groups[k]), "alone": alone[k].as_dict()}
             for k in groups]
    chosen: set[str] = set()
    accepted: list[set[str]] = []
    for k in sorted(groups, key=lambda k: (alone[k].kl, k)):
        if not alone[k].closer_than(base_c):
            continue   # alone it is already no closer than the base: with others, neither
        trial = chosen | groups[k]
        got = alone[k] if not chosen else measure(trial)
        ok = got.closer_than(base_c)
        trace.append({"kinds_added": k, "mix": got.as_dict(), "kept": ok})
        if ok:
            chosen = trial
            accepted.append(chosen)
    trace.append({"base": base_c.as_dict()})
    return accepted, trace


def _measurer(base_dir, ft_dir, rule_dir, plain_dir, text):
    base, ft = Checkpoint(base_dir, "base"), Checkpoint(ft_dir, "fine-tune")
    check = ModelCheck(base, ft, text)
    ref = FineTuneLogp(torch.log_softmax(check.logits(checkpoint_source(ft)), -1))
    base_c = closeness(ref, check.base_logits())
    rule = DeltaWeights(base, DeltaArtifact(rule_dir))
    plain = DeltaWeights(base, DeltaArtifact(plain_dir))

    def measure(names: set[str]) -> Closeness:
        r_get, p_get = rule.source(), plain.source()

        def pick(n: str) -> WeightSource:
            return r_get if n in names else p_get

        def forget():
            rule.forget()
            plain.forget()
        mix = WeightSource(lambda n: pick(n)(n), lambda n, ids: pick(n).rows(n, ids))
        return closeness(ref, check.logits(mix, forget))
    return measure, base_c


def write_mix(rule_dir, plain_dir, chosen: set[str], out_dir) -> Path:
    """The error-alone artifact with the `chosen` tensors' encodings (and manifest entries)
    taken from the rule's artifact, written atomically at `out_dir`."""
    rule, plain = DeltaArtifact(rule_dir), DeltaArtifact(plain_dir)
    return rewrite_artifact(plain, out_dir, {}, False,
                            source=lambda name: rule if name in chosen else plain)


def mixed_summary(rule_summary: dict, plain_summary: dict, chosen: set[str]) -> dict:
    """The error-alone pass's summary with the chosen tensors' rows (and the class totals)
    from the rule's pass."""
    rule_rows = {t["name"]: t for t in rule_summary.get("tensors", [])}
    rows = [rule_rows[t["name"]] if t.get("name") in chosen else t
            for t in plain_summary.get("tensors", [])]
    return {**plain_summary, "tensors": rows, "by_class": by_class(rows)}
