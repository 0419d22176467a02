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
    s.deltas = {0: s.load_random(0, rng), 1: s.load_random(1, rng),
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
