"""compress(): where the whole-model check refuses an artifact whose bit widths the width rule
chose (WIDTH_MIN_GAIN: a trade of general text for the task at extreme ratios), the widths
are chosen again by the output error alone and the check judges that artifact; where the
rule moved no matrix, the refusal stands without a second pass. The check's verdict is
simulated (a real refusal depends on the fine-tune: reverse-light at 1024x, measured in
benchmarks/README.md); the passes and the published artifact are real."""

from __future__ import annotations

import pytest

from deltadq_vllm.tools import compress as C
from deltadq_vllm.tools.check_publish import CheckRefused


def _compress(tmp_path, monkeypatch, ratio, refuse_first, checks=None):
    from deltadq_vllm.testing.fixtures import build_fixture
    from deltadq_vllm.testing.tasks import generic_corpus

    base, ft = build_fixture("llama-gqa"), build_fixture("llama-gqa--math")
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = tmp_path / "check.txt"
    text.write_text("\n".join(generic_corpus(200, 5)))
    passes, checks = [], checks if checks is not None else []
    real_fit, real_check = C._fit_ratio, C.check_and_publish

    def fit(base_dir, ft_dir, out_dir, opt):
        summary = real_fit(base_dir, ft_dir, out_dir, opt)
        passes.append((opt.width_rule, sum(bool(t.get("width_rule"))
                                           for t in summary["tensors"])))
        return summary

    def check(*a, **k):
        checks.append(a[4])   # the mode it ran in
        if refuse_first and len(checks) == 1:
            raise CheckRefused("the compressed fine-tune is further from the fine-tune "
                               "than the base model is (simulated)", "lower --ratio")
        return real_check(*a, **k)

    monkeypatch.setattr(C, "_fit_ratio", fit)
    monkeypatch.setattr(C, "check_and_publish", check)
    opt = C.CompressOptions(ratio=ratio, progress=False, check_text=str(text), check="warn")
    return C.compress(base, ft, tmp_path / "delta", opt), passes, checks


def test_a_refused_width_rule_is_compressed_again_without_it(tmp_path, monkeypatch):
    # at 256x the tiny fixture's matrices rarely need the rule at its floor: a higher one
    # makes it move some (the first floor that does; fixtures differ a little by CPU)
    for floor in (0.95, 0.99, 0.9, 0.8):
        monkeypatch.setattr("deltadq_vllm.tools.compress_pass.WIDTH_MIN_GAIN", floor)
        try:
            summary, passes, checks = _compress(tmp_path / str(floor), monkeypatch, 256, True)
            break
        except CheckRefused:
            continue
    assert passes[0][0] and passes[0][1] > 0, passes     # the rule moved some matrices
    assert passes[-1] == (False, 0), passes                # then: widths by the error alone
    assert checks == ["fail", "warn"]    # the first judged strictly, the retry as asked
    assert summary["model_check"].get("width_rule_refused")
    assert not any(t.get("width_rule") for t in summary["tensors"])
    assert (tmp_path / str(floor) / "delta").is_dir()
    from deltadq_vllm.tools.compress_summary import check_lines
    assert any("compressed again" in line for line in check_lines(summary["model_check"]))


def test_a_refusal_the_rule_did_not_cause_stands(tmp_path, monkeypatch):
    """Where the rule moved no matrix the check runs once, in the mode asked for (--check
    warn writes a refused artifact with a warning; it is not judged strictly first)."""
    checks = []
    with pytest.raises(CheckRefused):
        _compress(tmp_path, monkeypatch, 8, True, checks)
    assert checks == ["warn"]
    assert not (tmp_path / "delta").exists()
