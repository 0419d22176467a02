"""tools/width_mix.py: which of the width rule's matrices a refused artifact keeps. The
whole-model measurements are simulated here (a KL per kind of matrix, added up; the real
runs are in test_width_rule_retry.py and benchmarks/README.md); the choice is real."""

from __future__ import annotations

import random

from deltadq_vllm.tools.model_check import Closeness
from deltadq_vllm.tools.width_mix import kind_of, select_mix

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _names(layers: int) -> list[str]:
    return [f"model.layers.{i}.{k}.weight" for i in range(layers) for k in KINDS]


def _run(cost: dict, base_kl: float, base_top1: float = 0.9, top1_cost: dict | None = None,
         floor: float = 0.02):
    """select_mix with the model's KL = floor + the summed cost of the kinds taken whole."""
    calls = []
    moved = _names(3)

    def measure(names):
        kinds = {kind_of(n) for n in names}
        assert all(set(n for n in moved if kind_of(n) == k) <= names for k in kinds)
        calls.append(frozenset(kinds))
        kl = floor + sum(cost[k] for k in kinds)
        top1 = base_top1 + 0.01 - sum((top1_cost or {}).get(k, 0.0) for k in kinds)
        return Closeness(kl, top1)

    accepted, trace = select_mix(None, None, None, None, moved, "",
                                 measure=(measure, Closeness(base_kl, base_top1)))
    # one growing set per kind kept, each holding whole kinds
    for a, b in zip(accepted, accepted[1:]):
        assert a < b and len({kind_of(n) for n in b - a}) == 1
    chosen = accepted[-1] if accepted else set()
    return {kind_of(n) for n in chosen}, calls, trace, moved


def test_kind_of_drops_layer_indices():
    assert kind_of("model.layers.12.mlp.up_proj.weight") == "model.layers.#.mlp.up_proj.weight"
    assert kind_of("lm_head.weight") == "lm_head.weight"


def test_kinds_are_added_cheapest_first_while_the_model_stays_closer():
    rng = random.Random()
    for _ in range(20):
        kinds = [kind_of(f"model.layers.0.{k}.weight") for k in KINDS]
        cost = {k: rng.uniform(0.001, 0.02) for k in kinds}
        base_kl = 0.02 + rng.uniform(0.0, 0.08)
        chosen, calls, trace, moved = _run(cost, base_kl)
        # what the greedy order must reach: cheapest first, each kept while below the base
        want, total = set(), 0.02
        for k in sorted(kinds, key=lambda k: cost[k]):
            if total + cost[k] < base_kl:
                want.add(k)
                total += cost[k]
        assert chosen == want
        assert 0.02 + sum(cost[k] for k in chosen) < base_kl
        # every kind measured alone once; a kind no closer alone is never tried in a mix
        alone = [c for c in calls if len(c) == 1]
        assert len(alone) == len(kinds)
        hopeless = {k for k in kinds if 0.02 + cost[k] >= base_kl}
        assert not any(c & hopeless for c in calls if len(c) > 1)


def test_a_kind_that_loses_top1_agreement_is_not_kept():
    kinds = [kind_of(f"model.layers.0.{k}.weight") for k in KINDS]
    cost = {k: 0.001 for k in kinds}
    down = kind_of("model.layers.0.mlp.down_proj.weight")
    chosen, _, _, _ = _run(cost, 0.05, top1_cost={down: 0.05})
    assert chosen == set(kinds) - {down}


def test_nothing_is_kept_where_no_kind_alone_is_closer():
    kinds = [kind_of(f"model.layers.0.{k}.weight") for k in KINDS]
    chosen, calls, trace, _ = _run({k: 0.05 for k in kinds}, 0.03)
    assert chosen == set()
    assert len(calls) == len(kinds)
    assert trace[-1]["base"]["kl"] == 0.03


def test_the_measurer_runs_each_tensor_from_the_artifact_it_names(tmp_path):
    """The whole-model runs select_mix uses on real artifacts: every tensor from an exact
    (dense) artifact is the fine-tune itself; none of them is the other artifact alone,
    as the check measures it; the base as the check's own run finds it."""
    import torch

    from deltadq_vllm.checkpoint import Checkpoint
    from deltadq_vllm.format.artifact import DeltaArtifact
    from deltadq_vllm.testing.fixtures import build_fixture
    from deltadq_vllm.testing.tasks import generic_corpus
    from deltadq_vllm.tools.compress import CompressOptions, compress
    from deltadq_vllm.tools.model_check import ModelCheck
    from deltadq_vllm.tools.width_mix import _measurer

    base, ft = build_fixture("llama-gqa"), build_fixture("llama-gqa--math")
    exact, lossy = tmp_path / "exact", tmp_path / "lossy"
    compress(base, ft, exact, CompressOptions(method="dense", progress=False, check="off"))
    compress(base, ft, lossy, CompressOptions(ratio=64, progress=False, check="off"))
    text = "\n".join(generic_corpus(200, 11))
    measure, base_c = _measurer(base, ft, exact, lossy, text)
    every = set(DeltaArtifact(exact).manifest["tensors"])
    same = measure(every)
    assert same.kl < 1e-4 and same.top1 == 1.0
    check = ModelCheck(Checkpoint(base, "base"), Checkpoint(ft, "fine-tune"), text)
    run = check.run(DeltaArtifact(lossy), shrink="never")
    alone = measure(set())
    assert abs(alone.kl - run.unscaled.kl) < 1e-5 and alone.top1 == run.unscaled.top1
    assert abs(base_c.kl - run.base.kl) < 1e-5 and base_c.top1 == run.base.top1
    assert base_c.kl > 10 * same.kl and torch.equal(base_c.agree, run.base.agree)
