"""Delta kernels (issue #3): Triton kernel (interpreter), CPU path and reference agree.

The Triton tests run the real kernels on this CPU through the Triton interpreter:
TRITON_INTERPRET=1 is set below, before anything imports triton.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from deltadq_vllm.format.bitpack import packed_row_bytes  # noqa: E402
from deltadq_vllm.format.layouts import decode, encode_dense, to_row_packed  # noqa: E402
from deltadq_vllm.format.positions import kept_columns, tensor_seed  # noqa: E402
from deltadq_vllm.kernels import (DeltaSlots, apply_deltas, build_meta,  # noqa: E402
                                  linear_with_deltas, reference_apply_deltas)
from deltadq_vllm.kernels import triton_delta  # noqa: E402
from deltadq_vllm.kernels.arena import ArenaFull, DeltaArena  # noqa: E402
from deltadq_vllm.kernels.slots import units_packed  # noqa: E402
from deltadq_vllm.kernels.metadata import groups_from_tensors  # noqa: E402

triton = pytest.importorskip("triton")
assert triton_delta.interpreting(), "triton was imported before TRITON_INTERPRET was set"

# Random deltas, the derived error bounds (the derivation is in kernel_checks' docstring)
# and the checks: shared with benchmarks/gpu/kernel_sweep.py, which runs them on a GPU.
from kernel_checks import (C_W, FP32_U, UNIT, abs_products, magnitudes, make_slots,  # noqa: E402
                           poisoned_y, random_enc, untouched_mask, verify)


def run_case(seed, *, inp, sizes, n_slots, T, dtype, backends, empty=(), partial=(), ids=None,
             tp=False, triton_cfg=None, kp=None, variant=None, **enc_kw):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    slots, encs = make_slots(rng, n_slots, inp, sizes, empty=empty, partial=partial, tp=tp,
                             cpu_dtype=dtype, **enc_kw)
    if ids is None:
        ids = torch.tensor([rng.randint(-1, n_slots - 1) for _ in range(T)], dtype=torch.int32)
    x = torch.randn(T, inp, generator=gen).to(dtype)
    out_total = sum(sizes)
    for backend in backends:
        big, y = poisoned_y(T, out_total, dtype, gen)  # fresh base outputs for every run
        y0 = y.clone()
        meta = build_meta(ids, n_slots)
        if backend == "cpu":
            apply_deltas(y, x, meta, slots, backend="cpu")
        else:
            triton_delta.triton_apply_deltas(y, x, *meta.tensors(), slots, path=backend,
                                             num_entries=meta.num_active,
                                             max_seg_len=meta.max_seg_len,
                                             config=triton_cfg, kp=kp,
                                             variant=variant if backend == "decode" else None)
        verify(backend, y, y0, x, ids, encs, sizes, dtype, big,
               what=f"{backend} {variant or ''} seed={seed}")


# ---------------------------------------------------------------- positions


@pytest.mark.parametrize("seed,n_rows,inp,g,k,row_off,group_off,ngt", [
    (123, 37, 96, 8, 3, 0, 0, None),
    (0xDEADBEEF, 20, 60, 12, 5, 7, 3, 11),
    (5, 9, 64, 64, 64, 0, 0, None),
    (2**32 - 1, 33, 30, 1, 1, 100000, 5, 70000),
    (77, 5, 70, 35, 20, 3, 0, None),
    (9, 4, 8, 2, 1, 0, 0, None),
    (31337, 3, 4096, 4096, 700, 123456, 0, None),      # large g: fastmod near g*g
    (tensor_seed(0, "model.layers.0.mlp.down_proj.weight"), 2, 46340, 46340, 9, 5, 0, None),
])
def test_triton_positions_equal_kept_columns(seed, n_rows, inp, g, k, row_off, group_off, ngt):
    kw = dict(row_offset=row_off, group_offset=group_off)
    if ngt is not None:
        kw["n_groups_total"] = ngt
    want = kept_columns(seed, n_rows, inp, g, k, **kw)
    got = triton_delta.triton_kept_columns(seed, n_rows, inp, g, k, row_offset=row_off,
                                           group_offset=group_off, n_groups_total=ngt)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- the op: Triton vs CPU vs reference

PATHS = ("decode", "prefill", "cpu")


DECODE_VARIANTS = triton_delta.tuning.VARIANTS["decode"]
PREFILL_VARIANTS = triton_delta.tuning.VARIANTS["prefill"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_batch(dtype):
    """3 slices (q/k/v-like, odd sizes), 4 slots with different g/k/bits, one empty slot,
    one slot without a delta for its first slice, base-only tokens."""
    run_case(1, inp=48, sizes=[20, 12, 9], n_slots=5, T=13, dtype=dtype, backends=PATHS,
             empty=(3,), partial=(1,))


@pytest.mark.parametrize("variant", DECODE_VARIANTS)
def test_decode_variants_mixed_batch(variant):
    """Every decode variant on the mixed batch (bf16: the serving dtype), with keep counts
    above and below KP, straddling codes, and a token tile that needs several passes."""
    cfg = {"BLOCK_M": 2, "BLOCK_N": 16, "BLOCK_G": 2}
    run_case(2, inp=96, sizes=[20, 12, 9], n_slots=5, T=15, dtype=torch.bfloat16,
             backends=("decode",), empty=(3,), partial=(1,), variant=variant, triton_cfg=cfg)
    run_case(3, inp=96, sizes=[21], n_slots=3, T=11, dtype=torch.float32, backends=("decode",),
             g=48, k=37, bits=3, variant=variant, triton_cfg=cfg,
             ids=torch.tensor([0, 1, 2, 0, 0, 0, -1, 0, 1, 0, 0], dtype=torch.int32))


@pytest.mark.parametrize("units,bits", [(1, 2), (1, 3), (2, 5), (4, 16)])
def test_decode_split_k_ranges(units, bits):
    """decode v4 splits each row into runs of `units` chunks of 32 kept elements: programs
    that start inside a group (positions from the chunk's own offset), that hold only the
    tail chunk of a group, or that span a group boundary; fp32 atomics into a workspace."""
    cfg = {"variant": "v4", "BLOCK_M": 2, "BLOCK_N": 16, "BLOCK_G": units}
    run_case(60 + units, inp=96, sizes=[19, 7], n_slots=3, T=5, dtype=torch.bfloat16,
             backends=("decode",), g=96, k=90, bits=bits, triton_cfg=cfg)
    run_case(70 + units, inp=96, sizes=[23], n_slots=2, T=3, dtype=torch.float32,
             backends=("decode",), g=48, k=41, bits=bits, triton_cfg=cfg,
             ids=torch.tensor([1, -1, 1], dtype=torch.int32))


@pytest.mark.parametrize("variant", PREFILL_VARIANTS)
def test_prefill_variants(variant):
    run_case(4, inp=72, sizes=[20, 12, 9], n_slots=4, T=21, dtype=torch.bfloat16,
             backends=("prefill",), empty=(2,), partial=(1,),
             triton_cfg={"variant": variant, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32})


@pytest.mark.parametrize("seed", range(4))
def test_random_configs(seed):
    rng = random.Random(100 + seed)
    inp = rng.choice([24, 40, 60, 72])
    sizes = [rng.randint(1, 35) for _ in range(rng.randint(1, 3))]
    run_case(100 + seed, inp=inp, sizes=sizes, n_slots=rng.randint(1, 4), T=rng.randint(1, 19),
             dtype=torch.float32, backends=PATHS,
             variant=DECODE_VARIANTS[seed % len(DECODE_VARIANTS)])


def test_one_token():
    run_case(7, inp=32, sizes=[17], n_slots=3, T=1, dtype=torch.float32, backends=PATHS,
             ids=torch.tensor([2], dtype=torch.int32))


def test_all_tokens_one_delta_multi_tile():
    """37 tokens on one slot: several M tiles (prefill) / token chunks (decode)."""
    run_case(8, inp=64, sizes=[24, 8], n_slots=4, T=37, dtype=torch.float32, backends=PATHS,
             ids=torch.full((37,), 1, dtype=torch.int32))


@pytest.mark.parametrize("path", PATHS + tuple(f"decode:{v}" for v in ("v0", "v3", "v4")))
def test_every_output_written(path):
    """Positive activations and deltas on y0 = 0: every element that has a delta must come
    out > 0, every other one stays exactly 0 (an element a tile misses cannot hide behind
    a small contribution). Odd sizes (not multiples of any block), several row, token and
    K tiles, a partial slot, an empty slot and base-only tokens."""
    seed = 90
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    inp, sizes, S, T = 72, [35, 3, 17], 4, 41
    slots, encs = make_slots(rng, S, inp, sizes, empty=(3,), partial=(1,), positive=True)
    ids = torch.tensor([rng.randint(-1, S - 1) for _ in range(T)], dtype=torch.int32)
    ids[:2] = torch.tensor([0, 2])
    x = torch.rand(T, inp, generator=gen) + 0.1
    big, y = poisoned_y(T, sum(sizes), torch.float32, gen, zero=True)
    y0 = y.clone()
    meta = build_meta(ids, S)
    path, _, variant = path.partition(":")
    if path == "cpu":
        apply_deltas(y, x, meta, slots, backend="cpu")
    else:
        triton_delta.triton_apply_deltas(y, x, *meta.tensors(), slots, path=path,
                                         num_entries=meta.num_active, max_seg_len=meta.max_seg_len,
                                         variant=variant or None)
    untouched = untouched_mask(ids, magnitudes(encs, sizes, inp))
    assert (~untouched).sum() > T and untouched.sum() > T  # both kinds present
    assert (y[~untouched] > 0).all(), f"{path}: {int((y[~untouched] <= 0).sum())} elements unwritten"
    assert (y[untouched] == 0).all()
    verify(path, y, y0, x, ids, encs, sizes, torch.float32, big)


def test_all_base_and_empty_slot_tokens():
    """Tokens on -1 or on an unloaded slot: y untouched."""
    rng = random.Random(9)
    slots, encs = make_slots(rng, 3, 32, [16], empty=(1,))
    ids = torch.tensor([-1, 1, 1, -1], dtype=torch.int32)
    x = torch.randn(4, 32)
    for path in PATHS:
        y = torch.randn(4, 16)
        y0 = y.clone()
        meta = build_meta(ids, 3)
        if path == "cpu":
            apply_deltas(y, x, meta, slots, backend="cpu")
        else:
            triton_delta.triton_apply_deltas(y, x, *meta.tensors(), slots, path=path)
        assert torch.equal(y, y0), path


def test_straddling_and_wide_codes():
    """3/5/7-bit codes straddle 32-bit words; 16-bit codes fill half words."""
    for i, bits in enumerate((3, 5, 7, 16)):
        run_case(20 + bits, inp=56, sizes=[19], n_slots=2, T=6, dtype=torch.float32,
                 backends=("decode", "prefill"), bits=bits,
                 variant=DECODE_VARIANTS[i % len(DECODE_VARIANTS)])
    for variant in DECODE_VARIANTS:  # 3-bit, k > 32: full chunks straddle words too
        run_case(29, inp=80, sizes=[11], n_slots=2, T=3, dtype=torch.float32,
                 backends=("decode",), g=80, k=70, bits=3, variant=variant)


def test_tensor_parallel_shards():
    """Row/column shards keep global positions and scale offsets."""
    for seed in (30, 31, 32, 33):
        run_case(seed, inp=48, sizes=[13, 10], n_slots=3, T=9, dtype=torch.float32,
                 backends=PATHS, tp=True, variant=DECODE_VARIANTS[seed % len(DECODE_VARIANTS)])


def test_decode_chunks_over_keep_and_groups():
    """k larger than the KP chunk and groups larger than BLOCK_G: the inner loops iterate."""
    run_case(40, inp=64, sizes=[21], n_slots=2, T=7, dtype=torch.float32, backends=("decode",),
             g=32, k=13, kp=4, triton_cfg={"BLOCK_M": 2, "BLOCK_N": 16, "BLOCK_G": 1})
    run_case(41, inp=60, sizes=[18], n_slots=2, T=20, dtype=torch.float32,
             backends=("prefill",), g=6, k=2,
             triton_cfg={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64})


def test_launch_never_autotunes(monkeypatch):
    """The GPU launch path (interpreting() patched off, CPU tensors): configs come from the
    table / heuristic, no autotuner and no benchmarking can run, and y holds exactly one
    application of the deltas."""
    def boom(*a, **kw):
        raise AssertionError("tuning at run time")

    monkeypatch.setattr(triton, "autotune", boom)
    monkeypatch.setattr(triton.testing, "do_bench", boom)
    import deltadq_vllm.kernels.tune as tune_mod
    monkeypatch.setattr(tune_mod, "main", boom)
    monkeypatch.setattr(triton_delta, "interpreting", lambda: False)
    for mod in ("triton_decode", "triton_prefill"):
        src = open(os.path.join(os.path.dirname(triton_delta.__file__), mod + ".py")).read()
        assert "autotune" not in src and "do_bench" not in src, mod
    rng = random.Random(55)
    gen = torch.Generator().manual_seed(55)
    slots, encs = make_slots(rng, 2, 24, [9, 5], g=8, k=3, bits=4)
    for T, path in ((2, "decode"), (35, "prefill")):
        ids = torch.tensor([t % 3 - 1 for t in range(T)], dtype=torch.int32)
        meta = build_meta(ids, 2)
        x = torch.randn(T, 24, generator=gen)
        big, y = poisoned_y(T, 14, torch.float32, gen)
        y0 = y.clone()
        triton_delta.triton_apply_deltas(y, x, *meta.tensors(), slots, path=path,
                                         num_entries=meta.num_active, max_seg_len=meta.max_seg_len)
        verify(path, y, y0, x, ids, encs, [9, 5], torch.float32, big)


def test_config_table_fallbacks(tmp_path, monkeypatch):
    """exact GPU name -> same compute capability -> heuristic; a broken table is skipped."""
    tuning = triton_delta.tuning
    key = tuning.bucket_key("decode", 4096, 4096, 1, 32, False, "bfloat16")
    pkey = tuning.bucket_key("prefill", 4096, 4096, 128, 32, False, "bfloat16")
    h200 = {"variant": "v3", "BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_G": 1, "num_warps": 8,
            "num_stages": 1}
    h100 = {"variant": "v0", "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_G": 2, "num_warps": 4,
            "num_stages": 1}
    pre = {"variant": "v0", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4,
           "num_stages": 3}
    for name, gpu, cfgs in (("h200.json", "NVIDIA H200", {key: h200, pkey: pre}),
                            ("h100.json", "NVIDIA H100 80GB HBM3", {key: h100})):
        (tmp_path / name).write_text(json.dumps({
            "version": tuning.TABLE_VERSION, "gpu": gpu, "capability": [9, 0],
            "entries": {k: {"config": c} for k, c in cfgs.items()}}))
    (tmp_path / "broken.json").write_text("{not json")
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path))
    # only these tables: the shipped ones (kernels/configs, measured on real GPUs) would
    # answer some of the buckets this test expects to fall through to the heuristic
    empty = tmp_path / "shipped"
    empty.mkdir()
    monkeypatch.setattr(tuning, "CONFIG_DIR", empty)
    tuning.reload_tables()
    try:
        with pytest.warns(UserWarning, match="broken.json"):
            tuning.tables()
        c = tuning.lookup("NVIDIA H200", (9, 0), "decode", 4096, 4096, 1, 32, False, "bfloat16")
        assert c.to_json() == h200 and c.source == "table:NVIDIA H200"
        c = tuning.lookup("NVIDIA H100 80GB HBM3", (9, 0), "decode", 4096, 4096, 1, 32, False,
                          "bfloat16")
        assert c.to_json() == h100 and c.source.startswith("table:")
        # unknown sm_90 part: a table of the same capability (the exact-name one is not there)
        c = tuning.lookup("NVIDIA H20", (9, 0), "decode", 4096, 4096, 1, 32, False, "bfloat16")
        assert c.source.startswith("capability:") and c.to_json() in (h200, h100)
        # other capability, other bucket: the built-in heuristic
        # the same bucket compiled with STRADDLE (any_bits) / another KP: the tuned shape
        for s_, kp_ in ((True, 32), (False, 8), (True, 16)):
            c = tuning.lookup("NVIDIA H200", (9, 0), "decode", 4096, 4096, 1, kp_, s_, "bfloat16")
            assert c.to_json() == h200 and c.source == "table:NVIDIA H200 (other kp/straddle)"
        for args in (("NVIDIA A100-SXM4-80GB", (8, 0), "decode", 4096, 4096, 1, 32, False,
                      "bfloat16"),
                     ("NVIDIA H200", (9, 0), "decode", 4096, 4096, 2, 32, False, "bfloat16"),
                     ("NVIDIA H200", (9, 0), "decode", 4096, 4096, 1, 32, False, "float16")):
            c = tuning.lookup(*args)
            assert c.source == "heuristic" and c == tuning.heuristic("decode", args[5], 32)
        # prefill: the nearest tuned token bucket of the same shape
        c = tuning.lookup("NVIDIA H200", (9, 0), "prefill", 4096, 4096, 2048, 32, False,
                          "bfloat16")
        assert c.to_json() == pre and c.source == "nearest-t:NVIDIA H200"
        # the launcher's lookup is cached: the same object comes back
        assert tuning.lookup("NVIDIA H200", (9, 0), "decode", 4096, 4096, 1, 32, False,
                             "bfloat16") is tuning.lookup("NVIDIA H200", (9, 0), "decode", 4096,
                                                          4096, 1, 32, False, "bfloat16")
    finally:
        monkeypatch.delenv(tuning.ENV_VAR)
        tuning.reload_tables()
    with pytest.raises(ValueError, match="variant"):
        tuning.KernelConfig.from_dict("decode", {**h200, "variant": "v9"})
    with pytest.raises(ValueError, match="power-of-two"):
        tuning.KernelConfig.from_dict("decode", {**h200, "BLOCK_N": 48})


@pytest.mark.slow
def test_every_tuner_candidate_is_correct():
    """Every distinct block shape the tuner can time and the heuristics can return (all
    variants; KP only matters for v0/v1) computes the right result: keep counts above and
    below KP, two groups, tokens past one tile, straddling codes."""
    tuning = triton_delta.tuning
    seen = {}
    for path in ("decode", "prefill"):
        for tb in (1, 2, 4, 8, 16, 32, 64, 128, 512):
            if (path == "decode" and tb > 32) or (path == "prefill" and tb < 16):
                continue
            for kp in (8, 32):
                for c in tuning.candidates(path, tb, kp, 4, tuning.VARIANTS[path]) + [
                        tuning.heuristic(path, tb, kp, v) for v in tuning.VARIANTS[path]]:
                    # num_warps / num_stages do not change results (and mean nothing here)
                    kp_run = kp if path == "decode" and c.variant == "v0" else 0
                    seen.setdefault((path, c.variant, c.blocks, kp_run), c)
    rng = random.Random(77)
    slots, encs = make_slots(rng, 3, 32, [13, 6], g=16, k=11, bits=3)
    gen = torch.Generator().manual_seed(77)
    ids = torch.tensor([0, 1, 1, -1, 2, 1, 1], dtype=torch.int32)
    T = ids.numel()
    meta = build_meta(ids, 3)
    x = torch.randn(T, 32, generator=gen)
    for (path, variant, blocks, kp), c in sorted(seen.items(), key=str):
        big, y = poisoned_y(T, 19, torch.float32, gen)
        y0 = y.clone()
        triton_delta.triton_apply_deltas(y, x, *meta.tensors(), slots, path=path, config=c,
                                         kp=kp or None, num_entries=meta.num_active,
                                         max_seg_len=meta.max_seg_len)
        verify(path, y, y0, x, ids, encs, [13, 6], torch.float32, big,
               what=f"{path} {variant} {dict(blocks)} kp={kp}")
    assert len({v for (_, v, _, _) in seen}) == len(set(tuning.VARIANTS["decode"])
                                                   | set(tuning.VARIANTS["prefill"]))


def test_warmup_compiles_without_touching_y(monkeypatch):
    """warmup() launches each (path, config, KP, STRADDLE) once on an empty batch."""
    rng = random.Random(66)
    slots, encs = make_slots(rng, 2, 24, [9, 5], g=8, k=3, bits=4)
    plan = triton_delta.warmup_plan([slots, slots], 48, dtype=torch.float32)
    paths = {p for _, p, _, _, _, _ in plan}
    assert paths == {"decode", "prefill"}
    assert {s for *_, s, _ in plan} == {False, True}
    done = triton_delta.warmup([slots], 48, dtype=torch.float32)
    assert len(done) == len(plan) and {d["path"] for d in done} == paths
    assert max(d["tokens"] for d in done) == 64


def test_backend_warmup_covers_every_launch_of_a_step(monkeypatch):
    """The serving backend compiles, before serving, exactly the launches its op makes: for
    any batch size up to max_tokens, the config the launcher resolves (path, variant,
    blocks, KP, STRADDLE as the backend fixes them) is one warmup() compiled."""
    from deltadq_vllm.kernels.backends import TritonBackend

    # table configs that differ by token bucket (the heuristic's), as on a GPU
    tuning = triton_delta.tuning
    monkeypatch.setattr(triton_delta, "_fixed_configs", lambda x: False)
    monkeypatch.setattr(tuning, "config_for", lambda dev, path, i, r, t, kp, s, dt:
                        tuning.heuristic(path, tuning.t_bucket(t), kp))
    rng = random.Random(67)
    backend = TritonBackend(kp=8, straddle=True)
    slots, _ = make_slots(rng, 2, 24, [9, 5], g=8, k=3, bits=4)
    done = backend.warmup([slots], 40, torch.float32)
    assert done and all(d["STRADDLE"] is True for d in done)
    compiled = {(d["path"], d["variant"], tuple(sorted((k, d[k]) for k in d if k.startswith("BLOCK"))))
                for d in done}
    probe = torch.empty(1, 1, dtype=torch.float32)
    for T in (1, 2, 3, 16, 17, 33, 40):
        path = "decode" if T <= triton_delta.DECODE_MAX_TOKENS else "prefill"
        cfg = triton_delta.resolve_config(path, probe, slots, T, backend.kp, backend.straddle)
        assert (path, cfg.variant, tuple(sorted(dict(cfg.blocks).items()))) in compiled, T
    assert len(compiled) >= 4   # the buckets really resolved to different configs


def test_custom_op_and_compile():
    """torch.ops.deltadq.apply_deltas (meta tensors only) matches, also under torch.compile."""
    rng = random.Random(50)
    slots, encs = make_slots(rng, 3, 40, [12, 12])
    ids = torch.tensor([0, 2, -1, 1, 0], dtype=torch.int32)
    x = torch.randn(5, 40)
    y0 = torch.randn(5, 24)
    meta = build_meta(ids, 3)
    meta.groups = None  # force the dispatcher path
    for backend in ("cpu", "triton"):
        y = y0.clone()
        apply_deltas(y, x, meta, slots, backend=backend)
        verify("cpu" if backend == "cpu" else "prefill", y, y0, x, ids, encs, [12, 12],
               torch.float32, what=f"op {backend}")

    def layer(x, y):
        y = y * 1.0
        apply_deltas(y, x, meta, slots, backend="cpu", graph_safe=True)
        return y + 0.0

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    verify("cpu", compiled(x, y0.clone()), y0, x, ids, encs, [12, 12], torch.float32,
           what="compiled")


# ---------------------------------------------------------------- CPU strategies


@pytest.mark.parametrize("strategy", ["dense", "merged", "dequant", "csr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_strategies(strategy, dtype):
    rng = random.Random(60)
    gen = torch.Generator().manual_seed(61)
    inp, sizes, S, T = 48, [16, 16], 4, 21
    base = (torch.randn(sum(sizes), inp, generator=gen) * 0.1).to(dtype)
    slots, encs = make_slots(rng, S, inp, sizes, empty=(2,), cpu_strategy=strategy,
                             cpu_dtype=dtype, base_weight=base)
    ids = torch.tensor([rng.randint(-1, S - 1) for _ in range(T)], dtype=torch.int32)
    x = torch.randn(T, inp, generator=gen).to(dtype)
    meta = build_meta(ids, S)
    # y += delta (strategy "merged" computes it as fl(x (W_base + D)) - fl(x W_base))
    big, y = poisoned_y(T, sum(sizes), dtype, gen)
    y0 = y.clone()
    apply_deltas(y, x, meta, slots)
    verify(strategy, y, y0, x, ids, encs, sizes, dtype, big, base=base, what=strategy)
    # the whole layer: ref = fl(fl(x W_base) + x D). A path's base part differs from
    # fl(x W_base) by at most u * A_base and its delta part by C_W * u * A_delta (the
    # merged GEMM: u * A for W_base + D rounded, u * A for its output), so with
    # A = A_base + A_delta the bound is max(1, C_W) * u * A plus the two final roundings.
    yb = (x.double() @ base.double().T).to(dtype)
    ref_full = reference_apply_deltas(yb.clone(), x, ids, encs, sizes)
    mags = magnitudes(encs, sizes, inp)
    A = abs_products(x, ids, mags, base)
    u = UNIT[dtype] / (1 - UNIT[dtype])
    # eager CPU path, the generic base GEMM + custom op, and a caller's own base GEMM
    for groups, base_fn in ((True, None), (False, None), (True, "fn"), (False, "fn")):
        m = build_meta(ids, S)
        if not groups:
            m.groups = None
        fn = (lambda xs: torch.nn.functional.linear(xs, base)) if base_fn else None
        out = linear_with_deltas(x, m, slots, base_fn=fn)
        bound = (u * (out.double().abs() + ref_full.double().abs())
                 + (max(1, C_W[strategy]) * u + 2 * (inp + 2) * FP32_U) * A)
        err = (out.double() - ref_full.double()).abs()
        assert out.dtype == dtype and (err <= bound).all(), \
            f"{strategy} groups={groups} base_fn={base_fn}: max err/bound {(err / bound).max().item():.3g}"


# ---------------------------------------------------------------- metadata / slots


def test_build_meta():
    ids = torch.tensor([2, -1, 0, 2, 2, -1, 0], dtype=torch.int32)
    m = build_meta(ids, 4)
    assert m.num_active == 2 and m.max_seg_len == 3
    order = m.token_order.tolist()
    assert m.seg_slot.tolist() == [0, 2, -1, -1]
    assert m.seg_len.tolist() == [2, 3, 0, 0]
    s0, s2 = m.seg_start.tolist()[:2]
    assert order[s0:s0 + 2] == [2, 6] and order[s2:s2 + 3] == [0, 3, 4]
    assert sorted(order) == list(range(7)) and set(order[5:]) == {1, 5}
    groups = groups_from_tensors(*m.tensors())
    assert [(s, i.tolist()) for s, i in groups] == [(0, [2, 6]), (2, [0, 3, 4])]
    empty = build_meta(torch.full((3,), -1, dtype=torch.int32), 2)
    assert empty.num_active == 0 and empty.seg_slot.tolist() == [-1, -1]


def test_meta_rebuilt_in_place_for_graphs():
    """build_meta(out=...) keeps the four tensors' addresses (what a captured CUDA graph
    reads) and the kernel then serves the new batch; graph_safe ignores host counts."""
    rng = random.Random(80)
    slots, encs = make_slots(rng, 3, 40, [12, 9])
    static = build_meta(torch.full((6,), -1, dtype=torch.int32), 3)
    ptrs = [t.data_ptr() for t in static.tensors()]
    gen = torch.Generator().manual_seed(80)
    for ids in ([0, 2, -1, 1, 0, 2], [1, 1, 1, -1, -1, 1]):
        ids = torch.tensor(ids, dtype=torch.int32)
        build_meta(ids, 3, out=static)
        assert [t.data_ptr() for t in static.tensors()] == ptrs
        x = torch.randn(6, 40, generator=gen)
        for path in ("decode", "prefill"):
            big, y = poisoned_y(6, 21, torch.float32, gen)
            y0 = y.clone()
            triton_delta.triton_apply_deltas(y, x, *static.tensors(), slots, path=path)
            verify(path, y, y0, x, ids, encs, [12, 9], torch.float32, big)
    with pytest.raises(ValueError, match="T=6"):
        build_meta(torch.zeros(5, dtype=torch.int32), 3, out=static)


def test_slots_roundtrip_clear_and_errors():
    rng = random.Random(70)
    slots, encs = make_slots(rng, 2, 32, [8, 4])
    for i in range(2):
        e = slots.encoded(0, i)
        for name in ("codes", "step", "minv"):
            assert torch.equal(e.tensors[name], encs[0][i].tensors[name])
        assert e.params == encs[0][i].params
    assert slots.loaded_bytes[0] == sum(e.nbytes() for e in encs[0])
    slots.clear(0)
    assert not slots.is_loaded(0) and int(slots.meta[0, :, 0].sum()) == 0
    # other layouts are converted for the kernels (g = k = 1, 16-bit codes, per-row scales)
    dense = torch.randn(8, 32) * 0.01
    slots.load(0, [encode_dense(dense), None])
    back = slots.encoded(0, 0)
    assert back.params["bits"] == 16 and back.params["group_size"] == back.params["keep"] == 1
    half_step = back.tensors["step"].float()[:, None] / 2   # + float32 rounding of the decode
    fp32 = 2.0 ** -22 * (dense.abs() + back.tensors["minv"].float().abs()[:, None])
    assert ((decode(back) - dense).abs() <= half_step + fp32).all()
    small = DeltaSlots(1, 32, [8], row_bytes=4, cpu_strategy=None)  # kernel buffers
    with pytest.raises(ArenaFull, match="does not fit"):
        small.load(0, [random_enc(rng, 8, 32, g=4, k=4, bits=8)])
    assert not small.is_loaded(0) and small.arena.used_bytes == 0
    host = DeltaSlots(1, 32, [8], row_bytes=4, cpu_strategy="dense")  # CPU path: no capacity
    host.load(0, [random_enc(rng, 8, 32, g=4, k=4, bits=8)])
    assert host.is_loaded(0) and host.arena is None
    with pytest.raises(ValueError, match="shape"):
        slots.load(1, [random_enc(rng, 9, 32), None])
    # device bytes stay ~ the compressed size (no dense expansion)
    big = DeltaSlots(2, 4096, [4096], min_ratio=16)
    dense_bf16 = 2 * 4096 * 4096
    assert big.nbytes() / 2 < dense_bf16 / 16 * 1.03


def test_row_capacity_for_ratio():
    """A 16x DeltaDQ delta (4-bit, 1/4 kept, per-row scales) fits a min_ratio=16 slot."""
    inp = 4096
    g, bits = 64, 4
    k = 15  # largest k whose codes + 4-byte row scales fit 2*4096/16 bytes per row
    assert packed_row_bytes(inp // g * k, bits) + 4 <= 2 * inp / 16
    DeltaSlots(1, inp, [8], min_ratio=16, cpu_strategy=None).load(
        0, [random_enc(random.Random(0), 8, inp, g=g, k=k, bits=bits, rps=1)])
    assert math.isclose(2 * inp / (packed_row_bytes(inp // g * k, bits) + 4), 16.93, rel_tol=1e-3)


def _arena_bytes_of(enc):
    """What one (slot, slice) may occupy: its bytes on disk (flat codes) + 16-byte alignment."""
    p = enc.params
    n_kept = enc.shape[1] // p["group_size"] * p["keep"]
    return packed_row_bytes(enc.shape[0] * n_kept, p["bits"]) + 4 * enc.tensors["step"].numel()


def _run_layer(rng, slots, encs_by_slot, T=9, path="decode"):
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    ids = torch.tensor([rng.randint(-1, slots.n_slots - 1) for _ in range(T)], dtype=torch.int32)
    x = torch.randn(T, slots.in_features, generator=gen)
    big, y = poisoned_y(T, slots.out_total, torch.float32, gen)
    y0 = y.clone()
    meta = build_meta(ids, slots.n_slots)
    triton_delta.triton_apply_deltas(y, x, *meta.tensors(), slots, path=path)
    verify(path, y, y0, x, ids, encs_by_slot, slots.slice_sizes, torch.float32, big)


def test_shared_arena_bytes_compaction_and_flat_codes():
    """Two layers share one arena. A loaded (slot, slice) occupies its bytes on disk (codes as
    one bit stream, bf16 scales) rounded up to 16, whatever its packing on disk; units tables
    are shared per group size. Clearing, compacting (segments and units tables move) and
    reloading keep both layers' kernels exact; clearing everything frees every byte."""
    rng = random.Random(81)
    arena = DeltaArena(256 * 1024)
    inp = 48
    layers = [DeltaSlots(3, inp, [16, 8], cpu_strategy=None, arena=arena),
              DeltaSlots(3, inp, [12], cpu_strategy=None, arena=arena)]
    encs = [[None] * 3 for _ in layers]

    def load(li, s):
        L = layers[li]
        row = [random_enc(rng, size, inp, bits=rng.choice([1, 2, 3, 4, 5]), flat=rng.random() < 0.5)
               for size in L.slice_sizes]
        L.load(s, row)
        encs[li][s] = row
        got = L.slot_bytes(s)
        assert got == sum((_arena_bytes_of(e) + 15) // 16 * 16 for e in row)
        assert got <= sum(e.nbytes() for e in row) + 15 * len(row)

    for s in range(3):
        for li in range(2):
            load(li, s)
    for li, L in enumerate(layers):  # zero-copy views (a tied embedding reads the LM head's)
        for i, e in enumerate(encs[li][1]):
            v = L.arena_view(1, i)
            assert v.tensors["codes"].data_ptr() >= arena.words.data_ptr()
            assert torch.equal(decode(v), decode(e))
    gs = {p["group_size"] for L in layers for row in L.params for p in row if p}
    assert arena.units_bytes() <= sum((len(units_packed(g)) + 3) // 4 * 16 for g in gs)
    for li, L in enumerate(layers):
        _run_layer(rng, L, encs[li])
    for L in layers:  # holes at the start of the arena
        L.clear(0)
    used = arena.used_bytes
    assert arena.compact() > 0 and arena.used_bytes == used
    assert arena.largest_free_bytes == arena.free_bytes  # one free run after compaction
    for li, L in enumerate(layers):
        encs[li][0] = None
        for s in (1, 2):  # what the kernel reads back is what was loaded
            for i, e in enumerate(encs[li][s]):
                back = L.encoded(s, i)
                assert torch.equal(back.tensors["codes"], to_row_packed(e).tensors["codes"])
        _run_layer(rng, L, encs[li], path="prefill")
        load(li, 0)
        _run_layer(rng, L, encs[li])
    for L in layers:
        for s in range(3):
            L.clear(s)
    assert arena.used_bytes == 0 and arena.free_bytes == arena.capacity_bytes


def test_arena_full_leaves_other_deltas_intact():
    rng = random.Random(82)
    inp = 32
    one = random_enc(rng, 8, inp, g=4, k=2, bits=4)
    need = (_arena_bytes_of(one) + 15) // 16 * 16 + 16 * ((len(units_packed(4)) + 3) // 4)
    slots = DeltaSlots(2, inp, [8], cpu_strategy=None, arena=DeltaArena(need + 8))
    slots.load(0, [one])
    with pytest.raises(ArenaFull, match="slot 1 does not fit"):
        slots.load(1, [random_enc(rng, 8, inp, g=4, k=2, bits=4)])
    assert slots.is_loaded(0) and not slots.is_loaded(1)
    _run_layer(rng, slots, [[one], None])
