"""Graph safety of the delta layers (issue 12, item 2), on the CPU, without vLLM.

A two-layer decoder stack made of the serving delta layers (fused qkv with bias deltas,
o_proj, fused gate_up, down, norms, embedding with an extended vocabulary, LM head with
extra logits; tests/graph_stack.py) is run

* under torch.compile(fullgraph=True): one graph, compiled once, then replayed while the
  slot map changes between calls (mixed slots, every row on -1, one slot, a batch padded
  to the compiled size) and must equal eager and the float64 reference of each row's own
  fine-tune (merged weights);
* eagerly inside hostsync.forbid(): any Tensor.item / bool(t) / tolist / cpu / numpy or
  pageable host->device copy in the traced Python fails the test.

For each backend: the CPU path (strategies dense and merged: host work inside the
opaque ops) and the Triton kernels through the interpreter (the GPU path's code).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from deltadq_vllm.kernels import hostsync  # noqa: E402

from graph_stack import Stack  # noqa: E402

BACKENDS = ["cpu-dense", "cpu-merged", "triton"]
T_PAD = 8   # the compiled batch size (a CUDA-graph capture size on a GPU)


def _steps(rng):
    """(slot ids of the real rows, number of real rows); rows past them are padding (-1)."""
    return [([0, 1, -1, 2, 0, -1, 1, 2], 8),
            ([-1] * 8, 8),                       # a step without fine-tunes: same graph
            ([2, 2, 2, 2, 2], 5),                # one fine-tune, 3 padded rows
            ([rng.choice([-1, 0, 1, 2]) for _ in range(6)], 6),
            ([1, 0], 2)]


def _expected(stack, ids, slots, deltas):
    out = torch.empty(len(slots), stack.BASE_VOCAB + stack.EXTRA, dtype=torch.float64)
    for s in set(slots):
        rows = [i for i, x in enumerate(slots) if x == s]
        out[rows] = stack.reference(ids[rows], s, deltas.get(s))[: len(rows)].cpu()
    return out


def _close(got, want, what):
    got = got.double().cpu()
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)), f"{what}: -inf pattern differs"
    err = (got[fin] - want[fin]).abs().max().item()
    assert err < 2e-4, f"{what}: max error {err:.3g} vs the float64 reference"


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request):
    if request.param == "triton":
        pytest.importorskip("triton")
        from deltadq_vllm.kernels import triton_delta
        assert triton_delta.interpreting(), "triton was imported before TRITON_INTERPRET was set"
    # the interpreter is slow: one decoder layer for the Triton path (its ops are the same
    # in every layer), two for the CPU path
    s = Stack(request.param, n_layers=1 if request.param == "triton" else 2, max_tokens=T_PAD,
              seed=1)
    rng = random.Random(7)
    # slot 1: LM head and embedding as low-rank factors (what the compressor stores where
    # its codes would be worse than no delta): their own kernels on the Triton path
    s.deltas = {0: s.load_random(0, rng), 1: s.load_random(1, rng, lowrank=True),
                2: s.load_random(2, rng, partial=True)}
    return s


def _ids(rng, n, stack):
    # every kind of token: base vocabulary and the extended rows of the server's vocabulary
    return torch.tensor([rng.randrange(stack.BASE_VOCAB + stack.EXTRA) for _ in range(n)])


def test_compiled_stack_replays_with_changing_slot_maps(stack):
    rng = random.Random(11)
    compiled = torch.compile(stack.forward, backend="aot_eager", fullgraph=True, dynamic=False)
    first = True
    for slots, n in _steps(rng):
        ids = _ids(rng, T_PAD, stack)
        stack.route(slots[:n], T_PAD)            # rows n..T_PAD-1: padding, slot -1
        with torch.no_grad():
            eager = stack.forward(ids)
            if first:
                got = compiled(ids)
                first = False
            else:
                with torch._dynamo.config.patch(error_on_recompile=True):
                    got = compiled(ids)
        full = slots[:n] + [-1] * (T_PAD - n)
        want = _expected(stack, ids, full, stack.deltas)
        _close(eager, want, f"eager {full}")
        _close(got, want, f"compiled {full}")
        torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


def test_forward_makes_no_host_sync(stack):
    rng = random.Random(12)
    for slots, n in _steps(rng)[:3]:
        ids = _ids(rng, T_PAD, stack)
        stack.route(slots[:n], T_PAD)
        with torch.no_grad(), hostsync.forbid():
            out = stack.forward(ids)
        _close(out, _expected(stack, ids, slots[:n] + [-1] * (T_PAD - n), stack.deltas),
               f"guarded {slots}")


def test_guard_catches_host_syncs():
    """The guard itself: each forbidden call fails inside, works outside."""
    t = torch.ones(3)
    bad = [lambda: t.sum().item(), lambda: bool(t.any()), lambda: t.tolist(), lambda: t.cpu(),
           lambda: t.numpy(), lambda: int(t[0])]
    for f in bad:
        with hostsync.forbid(), pytest.raises(hostsync.HostSyncError):
            f()
        f()
    with hostsync.forbid(), hostsync.exempt():
        t.tolist()


# ------------------------------------------------------------------ norm layouts, soft-capping


class _HeadNorm(torch.nn.Module):
    """A norm over the last dim, x_hat * w or (gemma) x_hat * (1 + w)."""

    def __init__(self, width, gemma, gen):
        super().__init__()
        self.weight = torch.nn.Parameter(0.1 * torch.randn(width, generator=gen),
                                         requires_grad=False)
        self.gemma = gemma
        self.variance_epsilon = 1e-6

    def forward(self, x):
        xf = x.float()
        x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x_hat * ((1 + self.weight) if self.gemma else self.weight)


@pytest.mark.parametrize("layout", ["per_head", "batch_leading", "gemma"])
def test_norm_delta_goes_to_every_row_of_its_token(layout):
    """Per-head norms (Qwen3's q/k norm: [tokens, heads, head_dim]) give every head of a
    token that token's delta; vLLM's Transformers backend ([1, tokens, width]) gives each
    token its own; GemmaRMSNorm's 1 + w takes the same dw. Compiled (one graph, replayed
    with other slot maps) and eager without host syncs, against the merged norm."""
    from deltadq_vllm.kernels.staging import DeviceStager
    from deltadq_vllm.serving.context import DeltaContext
    from deltadq_vllm.serving.layers import DeltaRMSNorm, VectorSlots

    gen = torch.Generator().manual_seed(3)
    T, H, D, S = 6, 4, 8, 3
    width = D if layout == "per_head" else H * D
    base = _HeadNorm(width, layout == "gemma", gen)
    ctx = DeltaContext(S, "cpu", T, T)
    stager = DeviceStager("cpu")
    vs = VectorSlots(S, width, "cpu")
    dws = {s: 0.2 * torch.randn(width, generator=gen) for s in range(S)}
    for s, v in dws.items():
        vs.load(s, v, stager)
    stager.synchronize()
    norm = DeltaRMSNorm(base, vs, ctx, batch_leading=layout == "batch_leading")
    compiled = torch.compile(norm, fullgraph=True, dynamic=False)
    shape = {"per_head": (T, H, D), "batch_leading": (1, T, width), "gemma": (T, width)}[layout]
    for slots in ([0, 1, -1, 2, 0, 1], [-1] * T, [2] * T):
        stager.wait()
        ctx.set(slots, slots)
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad(), hostsync.forbid():
            eager = norm(x.clone())
        got = compiled(x.clone())
        rows = x.reshape(T, -1, D if layout == "per_head" else width)   # [T, rows/token, w]
        x_hat = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6)
        for t, s in enumerate(slots):
            w = base.weight + (dws[s] if s >= 0 else 0)
            want = x_hat[t] * ((1 + w) if base.gemma else w)
            for out in (eager, got):
                torch.testing.assert_close(out.reshape(T, -1, rows.shape[-1])[t], want,
                                           rtol=1e-5, atol=1e-5)


def test_added_tokens_stay_impossible_after_soft_capping():
    """Gemma-2 soft-caps the final logits (tanh(x / c) * c), which turns the -inf of an
    added token into -c for every request whose fine-tune lacks it: remask (the logits
    processor's hook) puts -inf back, with tensor ops on the call's rows."""
    from deltadq_vllm.kernels.staging import DeviceStager
    from deltadq_vllm.serving.layers import HeadExtras

    V, EXTRA, DIM, S = 10, 3, 8, 3
    stager = DeviceStager("cpu")
    ex = HeadExtras(S, V, (0, V + EXTRA), DIM, "cpu", torch.float32)
    ex.load(0, torch.randn(EXTRA, DIM), stager)       # slot 0 adds all three tokens
    ex.load(1, torch.randn(1, DIM), stager)           # slot 1 adds one
    stager.synchronize()                               # slot 2 adds none
    slots = torch.tensor([0, 1, 2, -1, 0], dtype=torch.int32)
    h = torch.randn(len(slots), DIM)
    logits = torch.randn(len(slots), V + EXTRA)
    with hostsync.forbid():
        ex.apply(logits, h, slots)
    capped = torch.tanh(logits / 30.0) * 30.0          # the processor's soft-capping
    assert torch.isfinite(capped).all()                # the bug remask fixes
    with hostsync.forbid():
        ex.remask(capped)
    allowed = {0: EXTRA, 1: 1, 2: 0, -1: 0}
    for r, s in enumerate(slots.tolist()):
        n = allowed[s]
        assert torch.isfinite(capped[r, :V + n]).all(), (r, s)
        assert torch.isneginf(capped[r, V + n:]).all(), (r, s)


def test_remask_refuses_rows_it_cannot_map():
    """A soft-capped logits call whose rows differ from the LM head's call fails loudly
    (the added tokens' mask cannot be placed), never returns them unmasked."""
    from deltadq_vllm.kernels.staging import DeviceStager
    from deltadq_vllm.serving.layers import DeltaRoutingError, HeadExtras

    ex = HeadExtras(2, 10, (0, 12), 8, "cpu", torch.float32)
    ex.load(0, torch.randn(2, 8), DeviceStager("cpu"))
    logits = torch.randn(3, 12)
    ex.apply(logits, torch.randn(3, 8), torch.tensor([0, -1, 1], dtype=torch.int32))
    with pytest.raises(DeltaRoutingError):
        ex.remask(torch.randn(4, 12))
    with pytest.raises(DeltaRoutingError):   # no LM-head call recorded at all
        ex.remask(torch.randn(3, 12))
