"""compress(): where the whole-model check refuses an artifact whose bit widths the width rule
chose (WIDTH_MIN_GAIN: a trade of general text for the task at extreme ratios), the widths
are chosen again by the output error alone, the rule's widths are kept on the matrices the
calibration text allows (tools/width_mix.py: its choice is simulated here, tested in
test_width_mix.py) and the check judges that mix strictly, else the error-alone artifact;
where the rule moved no matrix, the refusal stands without a second pass. The check's verdict is
simulated (a real refusal depends on the fine-tune: reverse-light at 1024x, measured in
benchmarks/README.md); the passes and the published artifact are real."""

from __future__ import annotations

import pytest
import torch

from deltadq_vllm.format.artifact import DeltaArtifact

from deltadq_vllm.tools import compress as C
from deltadq_vllm.tools.check_publish import CheckRefused

# the unpatched functions: _rule_moves_some calls _compress several times in one test, and
# each call patches them again (wrapping the last call's wrappers would judge twice)
REAL_FIT, REAL_CHECK = C._fit_ratio, C.check_and_publish


def _compress(tmp_path, monkeypatch, ratio, refuse_first, checks=None, mix=None,
              refuse_mix=0):
    """`mix(moved) -> [sets]` replaces the calibration text's choice of the rule's matrices
    to keep (tools/width_mix.py; tested there: growing sets, the last its choice); None:
    none kept. The check refuses the first `refuse_mix` mixes it judges."""
    from deltadq_vllm.testing.fixtures import build_fixture
    from deltadq_vllm.testing.tasks import generic_corpus

    base, ft = build_fixture("llama-gqa"), build_fixture("llama-gqa--math")
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = tmp_path / "check.txt"
    text.write_text("\n".join(generic_corpus(200, 5)))
    passes, checks = [], checks if checks is not None else []
    real_fit, real_check = REAL_FIT, REAL_CHECK

    def fit(base_dir, ft_dir, out_dir, opt, probes=None):
        carried = probes.get("memo") if probes else None
        held = len(carried.items) if carried is not None else None
        summary = real_fit(base_dir, ft_dir, out_dir, opt, probes)
        # results this fit computed beside those an earlier fit handed it (None: none)
        _compress.computed = None if carried is None else len(carried.items) - held
        passes.append((opt.width_rule, sum(bool(t.get("width_rule"))
                                           for t in summary["tensors"])))
        return summary

    def check(*a, **k):
        checks.append(a[4])   # the mode it ran in
        staged = a[2]
        mixes = sum(1 for m in checks[1:] if m == "fail")
        if (refuse_first and len(checks) == 1
                or staged.name == "c" and mixes <= refuse_mix):
            raise CheckRefused("the compressed fine-tune is further from the fine-tune "
                               "than the base model is (simulated)", "lower --ratio")
        if staged.name == "c":   # judged strictly; the tiny fixture's verdict is not the point
            a = (*a[:4], "warn", *a[5:])
        return real_check(*a, **k)

    seen = {}

    def select(base_dir, ft_dir, rule_dir, plain_dir, moved, text):
        if mix == "unavailable":   # the calibration text cannot run on the base
            from deltadq_vllm.tools.calibration import CalibrationUnavailable
            raise CalibrationUnavailable("simulated")
        accepted = [set(c) for c in mix(moved)] if mix else []
        seen.update(moved=moved, rule=_encodings(rule_dir), plain=_encodings(plain_dir),
                    accepted=accepted)
        return accepted, []

    monkeypatch.setattr(C, "_fit_ratio", fit)
    monkeypatch.setattr(C, "check_and_publish", check)
    monkeypatch.setattr(C, "select_mix", select)
    _compress.seen, _compress.ratio = seen, ratio
    opt = C.CompressOptions(ratio=ratio, progress=False, check_text=str(text), check="warn")
    return C.compress(base, ft, tmp_path / "delta", opt), passes, checks


def test_a_refused_width_rule_is_compressed_again_without_it(tmp_path, monkeypatch):
    (summary, passes, checks), out = _rule_moves_some(tmp_path, monkeypatch,
                                                      mix="unavailable")
    assert passes[0][0] and passes[0][1] > 0, passes     # the rule moved some matrices
    assert passes[-1] == (False, 0), passes                # then: widths by the error alone
    assert checks == ["fail", "warn"]    # the first judged strictly, the retry as asked
    assert summary["model_check"].get("width_rule_refused")
    assert summary["model_check"]["width_rule_mix"]["kept"] == 0   # no mix could be chosen
    assert not any(t.get("width_rule") for t in summary["tensors"])
    assert out.is_dir()
    from deltadq_vllm.tools.compress_summary import check_lines
    assert any("compressed again" in line for line in check_lines(summary["model_check"]))


def test_the_error_alone_fit_reuses_the_rules_results_and_equals_a_fresh_one(tmp_path,
                                                                             monkeypatch):
    """The error-alone fit after a refused rule takes the rule's fit's per-matrix scores and
    encodings (the rule only chooses among them) and writes, bit for bit, the artifact a
    fresh compress without the rule writes."""
    (summary, passes, checks), out = _rule_moves_some(tmp_path, monkeypatch,
                                                      mix=lambda moved: [])
    assert passes[-1] == (False, 0)
    from deltadq_vllm.testing.fixtures import build_fixture

    fresh, probes = tmp_path / "fresh", {}
    REAL_FIT(build_fixture("llama-gqa"), build_fixture("llama-gqa--math"), fresh,
             C.CompressOptions(ratio=_compress.ratio, progress=False, width_rule=False,
                               check="off"), probes)
    # most of the fresh fit's results were the rule's fit's already
    assert _compress.computed is not None
    assert _compress.computed < 0.5 * len(probes["memo"].items), \
        (_compress.computed, len(probes["memo"].items))
    got, plain = _encodings(fresh), _compress.seen["plain"]
    assert got.keys() == plain.keys() and all(_same(got[n], plain[n]) for n in got)


def test_a_refusal_the_rule_did_not_cause_stands(tmp_path, monkeypatch):
    """Where the rule moved no matrix the check runs once, in the mode asked for (--check
    warn writes a refused artifact with a warning; it is not judged strictly first)."""
    checks = []
    with pytest.raises(CheckRefused):
        _compress(tmp_path, monkeypatch, 8, True, checks)
    assert checks == ["warn"]
    assert not (tmp_path / "delta").exists()


def _encodings(path) -> dict:
    art = DeltaArtifact(path)
    return {n: {k: v.clone() for k, v in art.encoded(n).tensors.items()}
            for n in art.manifest["tensors"]}


def _rule_moves_some(tmp_path, monkeypatch, **kw):
    """_compress where the tiny fixture's matrices rarely need the rule at its floor: a
    higher one makes it move some (the first ratio and floor the simulated check lets
    through, i.e. where the rule moved a matrix; fixtures differ a little by CPU, and with
    whole passages held out the rule moved none at 256x and one at 64x from floor 0.99)."""
    for ratio, floor in [(256, f) for f in (0.95, 0.99, 0.9, 0.8)] + [(64, 0.99), (64, 0.999)]:
        monkeypatch.setattr("deltadq_vllm.tools.compress_pass.WIDTH_MIN_GAIN", floor)
        try:
            got = _compress(tmp_path / f"{ratio}-{floor}", monkeypatch, ratio, True, **kw)
        except CheckRefused:
            continue
        return got, tmp_path / f"{ratio}-{floor}" / "delta"
    pytest.fail("the check refused at every ratio and floor")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_refused_rule_keeps_its_widths_where_the_mix_passes(tmp_path, monkeypatch):
    """The published artifact holds the rule's encodings of the chosen matrices and the
    error-alone pass's elsewhere, bit for bit; the mix is judged strictly."""
    (summary, passes, checks), out = _rule_moves_some(
        tmp_path, monkeypatch,
        mix=lambda moved: [sorted(moved)[: (len(moved) + 1) // 2] + ["y"]])
    seen = _compress.seen
    chosen = seen["accepted"][-1] - {"y"}   # "y": so that not every moved matrix is chosen
    assert 0 < len(chosen) <= len(seen["moved"])
    assert checks == ["fail", "fail"]
    got = _encodings(out)
    assert got.keys() == seen["plain"].keys()
    for name, enc in got.items():
        src = seen["rule"] if name in chosen else seen["plain"]
        assert _same(enc, src[name]), name
    assert any(not _same(seen["rule"][n], seen["plain"][n]) for n in chosen)
    rows = {t["name"]: t for t in summary["tensors"] if "name" in t}
    assert {n for n, t in rows.items() if t.get("width_rule")} == chosen
    assert summary["model_check"]["width_rule_mix"]["kept"] == len(chosen) + 1
    from deltadq_vllm.tools.compress_summary import check_lines
    assert any(f"on {len(chosen) + 1} of its" in line
               for line in check_lines(summary["model_check"]))
    assert abs(summary["true_ratio"] / _compress.ratio - 1) < 0.03


def test_a_refused_mix_falls_back_to_the_error_alone_artifact(tmp_path, monkeypatch):
    """The check walks back through the calibration text's smaller sets (never judging
    every moved matrix again: that is the refused artifact), then the error-alone one."""
    (summary, passes, checks), out = _rule_moves_some(
        tmp_path, monkeypatch, refuse_mix=9,
        mix=lambda moved: [sorted(moved)[:1] + ["y"], sorted(moved)[:1] + ["y", "x"], moved])
    assert checks == ["fail", "fail", "fail", "warn"]   # rule, 2 mixes: strictly; then as asked
    got, plain = _encodings(out), _compress.seen["plain"]
    assert all(_same(got[n], plain[n]) for n in plain)
    assert summary["model_check"]["width_rule_mix"]["kept"] == 0
    assert not any(t.get("width_rule") for t in summary["tensors"])


def test_a_refused_mix_walks_back_to_fewer_kinds(tmp_path, monkeypatch):
    # "x", "y": names no artifact holds, so that no set is every moved matrix
    (summary, passes, checks), out = _rule_moves_some(
        tmp_path, monkeypatch, refuse_mix=1,
        mix=lambda moved: [sorted(moved)[:1] + ["y"], sorted(moved)[:1] + ["y", "x"]])
    assert checks == ["fail", "fail", "fail"]   # rule, the larger mix refused, the smaller
    seen = _compress.seen
    first = set(sorted(seen["moved"])[:1])
    got = _encodings(out)
    assert all(_same(got[n], (seen["rule"] if n in first else seen["plain"])[n]) for n in got)
    assert summary["model_check"]["width_rule_mix"]["kept"] == 2   # its name and "y"
