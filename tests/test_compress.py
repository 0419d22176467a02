"""`deltadq compress / inspect / merge` on the generated fixtures: sizes, fidelity, exactness."""

import json
import math
from pathlib import Path

import pytest
import torch

from deltadq_vllm.format.artifact import DeltaArtifact
from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.cli import main as cli
from deltadq_vllm.format.layouts import decode
from deltadq_vllm.format.positions import tensor_seed
from deltadq_vllm.tools.calibration import LayerwiseCalibrator, default_text
from deltadq_vllm.tools.compress import CompressOptions, compress
from deltadq_vllm.testing.fixtures import build_fixture
from deltadq_vllm.tools.methods import (Calibration, MethodOptions, compress_deltadq,
                                        deltadq_encode)


def run(args, capsys):
    rc = cli([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def independent_true_ratio(base_dir, ft_dir, art_dir):
    """bf16 bytes of every fine-tune tensor that differs from the base / bytes of all files."""
    base, ft = Checkpoint(base_dir), Checkpoint(ft_dir)
    dense = 0
    for name in ft.names():
        w = ft.get(name)
        if name not in base.tensors or base.info(name).shape != w.shape \
                or not torch.equal(base.get(name), w):
            dense += 2 * w.numel()
    on_disk = sum(p.stat().st_size for p in Path(art_dir).rglob("*") if p.is_file())
    return dense / on_disk


@pytest.fixture(scope="module")
def gqa():
    return build_fixture("llama-gqa"), build_fixture("llama-gqa--math")


@pytest.fixture(scope="module")
def deltadq16(gqa, tmp_path_factory):
    base, ft = gqa
    out = tmp_path_factory.mktemp("d") / "math16"
    s = compress(base, ft, out, CompressOptions(ratio=16, progress=False))
    return out, s


def test_true_ratio_is_counted_from_disk(gqa, deltadq16, capsys):
    base, ft = gqa
    out, s = deltadq16
    indep = independent_true_ratio(base, ft, out)
    assert s["true_ratio"] >= 16
    assert s["true_ratio"] == pytest.approx(indep, rel=1e-9)
    rc, stdout, _ = run(["inspect", out, "--json"], capsys)
    assert rc == 0
    d = json.loads(stdout)
    assert d["true_ratio"] == pytest.approx(indep, rel=1e-9)
    assert d["method"] == "deltadq" and d["nominal_ratio"] > d["true_ratio"]
    assert sum(d["bytes_by_kind"].values()) == d["artifact_bytes"]
    assert d["bytes_by_kind"]["positions"] if "positions" in d["bytes_by_kind"] else True


def test_every_changed_tensor_is_covered(gqa, deltadq16):
    base, ft = Checkpoint(gqa[0]), Checkpoint(gqa[1])
    art = DeltaArtifact(deltadq16[0])
    for name in ft.names():
        if torch.equal(base.get(name), ft.get(name)):
            assert name not in art.entries
        else:
            assert name in art.entries, name
    classes = {e.cls for e in art.entries.values()}
    assert {"linear", "embedding", "norm"} <= classes
    assert all(e.layout == "hash_groupwise" for e in art.entries.values() if e.cls == "linear")
    # the embedding: DeltaDQ's layout, or low-rank where that is better at the same bytes
    # (a per-matrix choice the manifest entry names)
    entries = art.manifest["tensors"]
    for name, e in art.entries.items():
        if e.cls == "embedding":
            assert e.layout == "hash_groupwise" or (
                e.layout == "lowrank" and entries[name].get("method") == "lowrank")


def test_keep_count_exact_in_artifact(deltadq16):
    art = DeltaArtifact(deltadq16[0])
    name = next(n for n, e in art.entries.items() if e.cls == "linear")
    enc = art.encoded(name)
    g, k = enc.params["group_size"], enc.params["keep"]
    assert enc.params["seed"] == tensor_seed(0, name)
    dense = decode(enc)
    # kept values may quantize to zero, so count the regenerated positions instead
    from deltadq_vllm.format.layouts import hash_groupwise_columns
    cols = hash_groupwise_columns(enc)
    per_group = torch.zeros(enc.shape[0], enc.shape[1] // g, dtype=torch.int64)
    per_group.scatter_add_(1, cols // g, torch.ones_like(cols))
    assert torch.all(per_group == k)
    assert torch.count_nonzero(dense) <= cols.numel()


def test_dropout_rescale_is_unbiased():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    delta = torch.randn(16, 48, generator=gen)
    g, k, trials = 12, 3, 600
    acc = torch.zeros_like(delta)
    sq = torch.zeros_like(delta)
    for s in range(trials):
        est = decode(deltadq_encode(delta, g, k, 8, seed=1000 + s, rows_per_scale=1))
        acc += est
        sq += est * est
    mean = acc / trials
    var = (sq / trials - mean**2).clamp_min(1e-12)
    z = (mean - delta) / (var / trials).sqrt()
    # unbiased: z ~ N(0, 1) per element (8-bit quantization adds < 1% of a step of bias)
    assert abs(float(z.mean())) < 0.15
    assert 0.75 < float((z**2).mean()) < 1.35
    # and the estimator really is random (dropout happened)
    assert float(var.mean()) > 0.5 * float((delta**2).mean())


def test_auto_group_size_never_worse_than_fixed(gqa):
    base_dir, ft_dir = gqa
    base, ft = Checkpoint(base_dir), Checkpoint(ft_dir)
    cal = LayerwiseCalibrator(base, default_text())
    inputs = cal.inputs_for_layer(0)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        delta = ft.get(name).float() - base.get(name).float()
        calib = Calibration(x=inputs[name])
        budget = delta.numel() * 2 / 16
        seed = tensor_seed(0, name)
        # the search's own criterion: plain values (refinement is tested in test_calibrated)
        auto = compress_deltadq(name, delta, calib, budget, MethodOptions(bits=3, refine=False),
                                seed)
        inp = delta.shape[1]
        for g in [d for d in range(1, inp + 1) if inp % d == 0 and d >= 8]:
            try:
                fixed = compress_deltadq(name, delta, calib, budget,
                                         MethodOptions(bits=3, group_size=g, refine=False),
                                         seed)
            except Exception:
                continue  # this g cannot keep even one element per group at this budget
            assert auto.error <= fixed.error + 1e-12, (name, g)
            assert fixed.enc.nbytes() <= budget


def test_final_inputs_asked_first_are_the_in_order_walks(gqa):
    """A tied embedding is compressed first, calibrated on the LM head's inputs: asking
    for them before the layers' (a look-ahead) gives the rows an in-order walk gives, and
    leaves every layer's inputs as they were."""
    base = Checkpoint(gqa[0])
    in_order = LayerwiseCalibrator(base, default_text(), n_seqs=2, max_rows=100, seed=3)
    ahead = LayerwiseCalibrator(base, default_text(), n_seqs=2, max_rows=100, seed=3)
    final_ahead = ahead.final_inputs()
    n = len(in_order.layers)
    for i in range(n):
        a, b = in_order.inputs_for_layer(i), ahead.inputs_for_layer(i)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (i, k)
    assert torch.equal(in_order.final_inputs(), final_ahead)
    assert torch.equal(ahead.final_inputs(), final_ahead)


def test_a_later_pass_reuses_the_final_inputs_without_walking(gqa, tmp_path, monkeypatch):
    """A ratio-fit pass after the first hands its calibrator the LM head's inputs the first
    computed (tools/calibration.preset_final): no look-ahead walk, the same artifact."""
    from deltadq_vllm.tools import calibration as CAL
    from deltadq_vllm.tools.compress_pass import compress_pass

    base, ft = gqa
    walks = []
    real = CAL.LayerwiseCalibrator.final_inputs

    def counted(self):
        if self._final is None:
            walks.append(self.next_index)
        return real(self)

    monkeypatch.setattr(CAL.LayerwiseCalibrator, "final_inputs", counted)
    import copy

    probes = {}
    opt = CompressOptions(ratio=64, progress=False, check="off")
    compress_pass(base, ft, tmp_path / "first", opt, probes=probes)
    assert walks and "final_inputs" in probes
    # the second pass with and without the first's final inputs (the rest of probes, the
    # first pass's memo and drops, the same in both)
    cold = copy.deepcopy(probes)
    del cold["final_inputs"]
    walks.clear()
    compress_pass(base, ft, tmp_path / "a", opt, probes=cold)
    assert walks == [0]                       # the look-ahead walk, from layer 0
    walks.clear()
    compress_pass(base, ft, tmp_path / "b", opt, probes=probes)
    assert walks == []
    a, b = DeltaArtifact(tmp_path / "a"), DeltaArtifact(tmp_path / "b")
    for name in a.entries:
        for k, t in a.encoded(name).tensors.items():
            assert torch.equal(t, b.encoded(name).tensors[k]), (name, k)


def test_tied_embedding_is_compressed_first():
    from deltadq_vllm.tools.compress_plan import TensorPlan, order_plans

    names = [("lm_head.weight", "lm_head"), ("model.layers.1.mlp.up_proj.weight", "linear"),
             ("model.embed_tokens.weight", "embedding"),
             ("model.layers.0.mlp.up_proj.weight", "linear")]
    plans = [TensorPlan(n, c, None, None) for n, c in names]
    order = [p.name for p in order_plans(plans)]
    assert order == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                     "model.layers.1.mlp.up_proj.weight", "lm_head.weight"]


@pytest.mark.parametrize("method", ["deltadq", "dare", "bitdelta", "magnitude", "lowrank"])
@pytest.mark.parametrize("ratio", [8, 32])
def test_every_method_meets_true_ratio(gqa, tmp_path, method, ratio):
    base, ft = gqa
    if method == "bitdelta" and ratio < 16:
        ratio = 16
    s = compress(base, ft, tmp_path / "o", CompressOptions(method=method, ratio=ratio,
                                                             progress=False))
    assert s["true_ratio"] >= ratio
    assert s["true_ratio"] == pytest.approx(independent_true_ratio(base, ft, tmp_path / "o"),
                                            rel=1e-9)
    art = DeltaArtifact(tmp_path / "o")
    assert art.method == method
    for name in art.entries:
        decode(art.encoded(name))  # every tensor decodes


def test_merge_of_exact_delta_reproduces_finetune(tmp_path, capsys):
    base, ft = build_fixture("llama-mha"), build_fixture("llama-mha--math")  # sharded ft
    assert len(list(Path(ft).glob("model-*.safetensors"))) > 1
    rc, _, err = run(["compress", "--base", base, "--finetune", ft, "--out", tmp_path / "d",
                      "--method", "dense", "--no-progress"], capsys)
    assert rc == 0, err
    rc, _, err = run(["merge", "--base", base, "--delta", tmp_path / "d", "--out",
                      tmp_path / "m", "--no-progress"], capsys)
    assert rc == 0, err
    a, b = Checkpoint(ft), Checkpoint(tmp_path / "m")
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert a.get(n).dtype == b.get(n).dtype
        assert torch.equal(a.get(n), b.get(n)), n
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == a.config


def test_extended_vocab_rows_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltadq_vllm.tools.merge import merge

    base, ft = build_fixture("llama-mha"), build_fixture("llama-mha--ext")
    compress(base, ft, tmp_path / "d", CompressOptions(ratio=8, progress=False))
    art = DeltaArtifact(tmp_path / "d")
    emb = art.entries["model.embed_tokens.weight"]
    assert emb.extra_rows == 2 and emb.shape[0] == emb.base_shape[0] + 2
    assert art.manifest["finetune"]["tokenizer"]["scheme"] == "deltadq-tokenizer-diff-v1"
    merge(base, tmp_path / "d", tmp_path / "m", progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert len(tok.encode("<calc>", add_special_tokens=False)) == 1
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    f = Checkpoint(ft)
    new = f.get("model.embed_tokens.weight")[-2:]
    assert torch.equal(m.get_input_embeddings().weight[-2:].detach().to(new.dtype), new)
    assert m.config.vocab_size == f.config["vocab_size"]


def test_qwen2_biases_are_covered(tmp_path):
    base, ft = build_fixture("qwen2"), build_fixture("qwen2--math")
    s = compress(base, ft, tmp_path / "d", CompressOptions(ratio=16, progress=False))
    art = DeltaArtifact(tmp_path / "d")
    biases = [n for n, e in art.entries.items() if e.cls == "bias"]
    assert any("q_proj.bias" in n for n in biases)
    assert s["true_ratio"] >= 16


def _layer_output_error(base_dir, ft_dir, art_dir):
    """Mean relative output error over the linear layers on calibration inputs."""
    base, ft = Checkpoint(base_dir), Checkpoint(ft_dir)
    art = DeltaArtifact(art_dir)
    cal = LayerwiseCalibrator(base, default_text())
    errs = []
    for li in range(base.config["num_hidden_layers"]):
        inputs = cal.inputs_for_layer(li)
        for name, x in inputs.items():
            delta = ft.get(name).float() - base.get(name).float()
            errs.append(Calibration(x=x).relative_error(delta, decode(art.encoded(name))))
    return sum(errs) / len(errs)


@pytest.mark.parametrize("ratio", [16, 32])
def test_deltadq_vs_dare_and_magnitude_at_equal_true_bytes(tmp_path, ratio):
    """In the regime of real SFT deltas (llama-gqa--light: relative norm ~0.005, where the
    intermediate results are balanced) group-wise dropout must beat magnitude pruning at
    equal true bytes and stay within 3% of Bernoulli dropout (DARE); the per-block range
    search must cut DeltaDQ's error vs min-max ranges. Measured (relative layer-output
    error; fixtures trained on one thread): 16x deltadq search 0.285 / minmax 0.405,
    dare 0.290, magnitude 0.897; 32x deltadq 0.536 / 0.767, dare 0.549, magnitude 0.974. (On the heavily trained task fixtures, relative
    norm ~0.7, no sparsifier is in its regime; docs/compression.md has both tables.)"""
    base, ft = build_fixture("llama-gqa"), build_fixture("llama-gqa--light")
    errs = {}
    for method, qr, cal in (("deltadq", "search", True), ("dare", "search", True),
                            ("magnitude", "search", True), ("deltadq", "search", False)):
        key = f"{method}-{qr}" + ("" if cal else "-plain")
        out = tmp_path / key
        compress(base, ft, out, CompressOptions(method=method, ratio=ratio, progress=False,
                                                quant_range=qr, calibrated=cal))
        errs[key] = _layer_output_error(base, ft, out)
    print(f"relative layer-output error at {ratio}x true:", errs)
    assert errs["deltadq-search"] < errs["magnitude-search"]
    assert errs["deltadq-search"] < 1.03 * errs["dare-search"]
    # calibrated values at the same positions and bytes: under the gain rule (--min-gain
    # 0.9) they are taken only where they keep the delta, so the two land close; measured
    # here (fixtures of the arch merge): 16x 0.207 vs 0.268, 32x 0.533 vs 0.520. Per
    # matrix, on held-out calibration rows, they never lose (tests/test_calibrated.py); on
    # these test inputs and with bytes flowing on, within 3%. (Before the rule,
    # error-only: 16x 0.218 vs 0.266, 32x 0.496 vs 0.514.)
    assert errs["deltadq-search"] < 1.03 * errs["deltadq-search-plain"]


def test_inspect_quality_reports_bir(gqa, deltadq16, capsys):
    base, ft = gqa
    rc, stdout, err = run(["inspect", deltadq16[0], "--base", base, "--finetune", ft, "--json"],
                          capsys)
    assert rc == 0, err
    q = json.loads(stdout)["quality"]
    lin = [r for r in q if r["class"] == "linear"]
    assert lin and all("bir_delta_var" in r and "output_rel_error" in r for r in lin)
    assert all(0 <= r["output_rel_error"] < 5 and math.isfinite(r["bir_delta_range"])
               for r in lin)
    rc, stdout, _ = run(["inspect", deltadq16[0], "--base", base, "--finetune", ft], capsys)
    assert "BIR" in stdout


@pytest.mark.parametrize("method", ["dare", "deltadq"])
def test_manifest_underestimate_is_corrected_by_one_retry(tmp_path, monkeypatch, method):
    """If the manifest's size was underestimated (here: estimated as 0 bytes), the first
    artifact misses --ratio; compress rewrites it once with the budget shrunk by the
    measured shortfall, and the result meets the target in true bytes."""
    import deltadq_vllm.tools.compress_pass as C

    monkeypatch.setattr(C, "metadata_bytes_estimate", lambda *a, **k: 0)
    base, ft = build_fixture("llama-gqa"), build_fixture("llama-gqa--light")
    out = tmp_path / "d"
    s = compress(base, ft, out, CompressOptions(method=method, ratio=64, progress=False))
    assert s["ratio_target"] == 64
    assert s["true_ratio"] >= 64 * 0.999
    assert s["true_ratio"] == pytest.approx(independent_true_ratio(base, ft, out), rel=1e-9)
    assert s["budget_retry"]["first_true_ratio"] < 64 * 0.999


@pytest.mark.parametrize("ratio,expect", [(16, "minmax"), (256, "search")])
def test_high_ratio_in_true_bytes_and_auto_quant_range(tmp_path, monkeypatch, ratio, expect):
    """--ratio is met in true bytes at high ratios (independent count; 256x is about the
    most this tiny fixture's dense parts allow), and the default --quant-range auto
    switches to the range search from AUTO_SEARCH_RATIO up (512 by default, where min-max
    ranges collapse on real fine-tunes: benchmarks/README.md; lowered here to reach it)."""
    import deltadq_vllm.tools.compress_options as C

    monkeypatch.setattr(C, "AUTO_SEARCH_RATIO", 200.0)
    assert C.resolve_quant_range("auto", 16) == "minmax"
    assert C.resolve_quant_range("minmax", 1e4) == "minmax"
    base, ft = build_fixture("llama-gqa"), build_fixture("llama-gqa--light")
    out = tmp_path / "d"
    s = compress(base, ft, out, CompressOptions(ratio=ratio, progress=False))
    assert s["true_ratio"] >= ratio * 0.999
    assert s["true_ratio"] == pytest.approx(independent_true_ratio(base, ft, out), rel=1e-9)
    art = DeltaArtifact(out)
    assert art.manifest["method_params"]["quant_range"] == expect
    for name in art.entries:
        decode(art.encoded(name))


def test_freed_memory_is_trimmed_once_the_resident_size_has_grown(monkeypatch):
    """release_freed_memory (called per tensor and layer) runs glibc's heap trim only
    once the resident size is _TRIM_GROWTH above the lowest seen since the last trim:
    small growth is left alone, a drop lowers the floor, a 7B-sized temporary trims."""
    from deltadq_vllm import checkpoint as ck

    trims, rss = [], [1000 << 20]
    monkeypatch.setattr(ck, "_MALLOC_TRIM", lambda pad: trims.append(pad) or rss.__setitem__(0, 900 << 20))
    monkeypatch.setattr(ck, "resident_bytes", lambda: rss[0])
    monkeypatch.setattr(ck, "_rss_floor", 0)
    grow = ck._TRIM_GROWTH
    ck.release_freed_memory()                 # first call: sets the floor
    rss[0] += grow - (1 << 20)
    ck.release_freed_memory()
    assert trims == []                        # below the growth: no trim
    rss[0] += 2 << 20
    ck.release_freed_memory()
    assert trims == [0] and ck._rss_floor == 900 << 20   # trimmed; floor = after the trim
    rss[0] = 500 << 20                        # a large tensor freed (unmapped)
    ck.release_freed_memory()
    rss[0] = (500 << 20) + grow
    ck.release_freed_memory()                 # growth counted from the new low
    assert trims == [0, 0]
    monkeypatch.setattr(ck, "resident_bytes", lambda: None)
    ck.release_freed_memory()                 # no /proc: trim every call, as before
    assert len(trims) == 3
