"""A small decoder stack built from the serving delta layers, without vLLM (graph-safety
tests; benchmarks/gpu/graph_check.py builds the same at 7B-like shapes on a GPU).

Per layer: input norm -> fused qkv (3 slices, biases) -> o_proj -> post norm (residual) ->
fused gate_up (2 slices) -> SiLU * up -> down; then the final norm and an LM head whose
server vocabulary is 2 tokens larger than the base's (extended-vocabulary logits), and an
embedding with extra rows. Every delta a fine-tune can have is present: linear, bias,
norm, embedding (compressed), LM head, extra vocabulary rows. `reference()` computes the
same stack for one slot with the merged weights (W + decode(D)), densely, in float64.
"""

from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltadq_vllm.kernels.backends import select_backend
from deltadq_vllm.kernels.staging import DeviceStager
from deltadq_vllm.format.layouts import decode, encode_hash_groupwise, encode_lowrank
from deltadq_vllm.serving.context import DeltaContext
from deltadq_vllm.serving.embedding import DeltaEmbedding, ExtraRows, HostEmbeddingDeltas
from deltadq_vllm.serving.layers import (DeltaLinearMethod, DeltaLMHeadMethod, DeltaRMSNorm,
                                         HeadExtras, VectorSlots)


class PlainLinear:
    """A base quant method: F.linear with the module's weight and the given bias."""

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)


class Linear(nn.Module):
    def __init__(self, inp, sizes, bias, gen, device, dtype):
        super().__init__()
        self.sizes = list(sizes)
        self.weight = nn.Parameter(torch.randn(sum(sizes), inp, generator=gen).to(device, dtype) / inp ** 0.5,
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.randn(sum(sizes), generator=gen).to(device, dtype) * 0.1,
                                  requires_grad=False) if bias else None)
        self.skip_bias_add = False
        self.quant_method = PlainLinear()

    def forward(self, x):
        return self.quant_method.apply(self, x, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size, gen, device, dtype):
        super().__init__()
        self.weight = nn.Parameter((1 + 0.1 * torch.randn(size, generator=gen)).to(device, dtype),
                                   requires_grad=False)
        self.variance_epsilon = 1e-6

    def forward(self, x, residual=None):
        if residual is not None:
            x = x + residual
            residual = x
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight
        return out if residual is None else (out, residual)


def random_enc(rng: random.Random, out: int, inp: int, bits=None, fixed=None,
               scale: float = 1.0) -> object:
    """A random hash_groupwise delta; fixed=(g, k, bits) for a set ratio (16x vs bf16 at
    (16, 4, 4)), else random g / k / bits (3-bit codes straddle words). Values up to ~0.04
    x scale: at scale 1 as large as the base weights (~0.044 at 512 inputs)."""
    if fixed:
        g, k, bits = fixed
    else:
        g = rng.choice([d for d in (4, 8, 16) if inp % d == 0])
        k = rng.randint(1, g)
        bits = bits or rng.choice([2, 3, 4, 8])
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    codes = torch.randint(0, 1 << bits, (out, inp // g * k), generator=gen)
    step = ((torch.rand(out, generator=gen) + 0.5) * 2.0 ** -bits * 0.08 * scale).to(torch.bfloat16)
    minv = (-torch.rand(out, generator=gen) * 0.04 * scale).to(torch.bfloat16)
    return encode_hash_groupwise((out, inp), codes, step, minv, group_size=g, keep=k, bits=bits,
                                 seed=rng.getrandbits(32), rows_per_scale=1,
                                 flat=rng.random() < 0.5)


def random_lowrank(rng: random.Random, out: int, inp: int, scale: float = 1.0,
                   rank: int | None = None) -> object:
    """A random low-rank delta (rank `rank`, else 1-11: one and several BLOCK_R steps of the
    kernel), as the compressor stores an LM head or embedding whose codes would be worse
    than nothing."""
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    r = rank if rank is not None else rng.choice([1, 2, 5, 11])
    u = torch.randn(out, r, generator=gen) * 0.1 * scale
    v = torch.randn(r, inp, generator=gen) * 0.1 / r ** 0.5
    return encode_lowrank(u, v)


class Stack(nn.Module):
    H, Q, KV, F_, BASE_VOCAB, EXTRA = 32, 32, 16, 48, 50, 2

    def __init__(self, backend: str, n_slots=3, n_layers=2, max_tokens=16, seed=0,
                 device="cpu", dtype=torch.float32, dims=None, wrap=True, arena_mb=4):
        super().__init__()
        if dims:
            self.H, self.Q, self.KV, self.F_, self.BASE_VOCAB, self.EXTRA = dims
        kind, _, strategy = backend.partition("-")
        self.backend = select_backend(kind, device, strategy or None, kp=8)
        gen = torch.Generator().manual_seed(seed)
        H, Q, KV, FF, V = self.H, self.Q, self.KV, self.F_, self.BASE_VOCAB
        self.n_slots, self.device, self.dtype = n_slots, torch.device(device), dtype
        self.ctx = DeltaContext(n_slots, device, max_tokens, max_tokens)
        self.stager = DeviceStager(device)
        from deltadq_vllm.kernels.arena import DeltaArena
        self.arena = (DeltaArena(int(arena_mb * 2 ** 20), device)
                      if wrap and self.backend.kernel_layout else None)
        self.base_embed = nn.Embedding(V + self.EXTRA, H).to(device, dtype)
        self.base_embed.weight.data.normal_(generator=gen) if False else None
        with torch.no_grad():
            self.base_embed.weight.copy_(torch.randn(V + self.EXTRA, H, generator=gen))
            self.base_embed.weight[V:] = 0          # the base lacks the extended rows
        self.layers = nn.ModuleList()
        self.slots, self.vectors = {}, {}
        for i in range(n_layers):
            blk = nn.Module()
            blk.norm1 = RMSNorm(H, gen, device, dtype)
            blk.qkv = Linear(H, [Q, KV, KV], True, gen, device, dtype)
            blk.o = Linear(Q, [H], False, gen, device, dtype)
            blk.norm2 = RMSNorm(H, gen, device, dtype)
            blk.gate_up = Linear(H, [FF, FF], False, gen, device, dtype)
            blk.down = Linear(FF, [H], False, gen, device, dtype)
            self.layers.append(blk)
        self.final_norm = RMSNorm(H, gen, device, dtype)
        self.head = Linear(H, [V + self.EXTRA], False, gen, device, dtype)
        with torch.no_grad():
            self.head.weight[V:] = 0
        self.embed = self.base_embed
        self.wrapped = wrap
        if wrap:   # wrap=False: the plain base stack (the baseline of timings)
            self._wrap()

    # -------------------------------------------------------------- wrapping (what the manager does)

    def _make_slots(self, inp, sizes, base_weight=None, lowrank=False):
        return self.backend.make_slots(self.n_slots, inp, sizes, device=self.device,
                                       arena=self.arena, base_weight=base_weight,
                                       dtype=self.dtype, lowrank=lowrank)

    def _wrap(self):
        ctx, be = self.ctx, self.backend
        for i, blk in enumerate(self.layers):
            for name in ("qkv", "o", "gate_up", "down"):
                lin = getattr(blk, name)
                w = lin.weight.detach()
                sl = self._make_slots(lin.weight.shape[1], lin.sizes, base_weight=w.clone())
                bias = (VectorSlots(self.n_slots, sum(lin.sizes), self.device, torch.float32)
                        if lin.bias is not None else None)
                lin.quant_method = DeltaLinearMethod(lin.quant_method, sl, ctx, be, bias, True,
                                                     layer=lin)
                self.slots[f"{i}.{name}"] = sl
                if bias is not None:
                    self.vectors[f"{i}.{name}.bias"] = bias
            for name in ("norm1", "norm2"):
                vs = VectorSlots(self.n_slots, self.H, self.device, torch.float32)
                setattr(blk, name, DeltaRMSNorm(getattr(blk, name), vs, ctx))
                self.vectors[f"{i}.{name}"] = vs
        vs = VectorSlots(self.n_slots, self.H, self.device, torch.float32)
        self.final_norm = DeltaRMSNorm(self.final_norm, vs, ctx)
        self.vectors["final_norm"] = vs
        V = self.BASE_VOCAB
        self.head_slots = self._make_slots(self.H, [V, self.EXTRA], lowrank=True)
        self.head_extras = HeadExtras(self.n_slots, V, (0, V + self.EXTRA), self.H, self.device,
                                      self.dtype)
        self.head.quant_method = DeltaLMHeadMethod(self.head.quant_method, self.head_slots, ctx,
                                                   be, self.head_extras)
        self.emb_store = (self._make_slots(self.H, [V], lowrank=True) if be.kernel_layout
                          else HostEmbeddingDeltas(self.n_slots, V, self.H, self.dtype))
        self.emb_extras = ExtraRows(self.n_slots, V, self.EXTRA, self.H, self.device, self.dtype)
        self.embed = DeltaEmbedding(self.base_embed, self.emb_store, ctx, be, V, self.emb_extras)

    # -------------------------------------------------------------- deltas

    def load_random(self, slot: int, rng: random.Random, partial=False, fixed=None,
                    dense=True, scale: float = 1.0, lowrank: bool = False) -> dict:
        """A random fine-tune into `slot` (partial: some layers unchanged; fixed: (g, k, bits)
        of every matrix; lowrank: LM head and embedding as low-rank factors); returns its
        deltas by name for the reference (dense=False: none, for timings at large shapes)."""
        st, d = self.stager, {}
        dec = (lambda e: decode(e).double()) if dense else (lambda e: None)  # noqa: E731
        for name, sl in self.slots.items():
            if partial and rng.random() < 0.4:
                sl.clear(slot, st)
                continue
            encs = [random_enc(rng, n, sl.in_features, fixed=fixed, scale=scale)
                    for n in sl.slice_sizes]
            sl.load(slot, encs, st)
            d[name] = torch.cat([dec(e) for e in encs]) if dense else None
        for name, vs in self.vectors.items():
            v = torch.randn(vs.buf.shape[1], generator=torch.Generator().manual_seed(
                rng.getrandbits(31))) * 0.05
            vs.load(slot, v, st)
            d[name] = v.double()
        V = self.BASE_VOCAB
        matrix = ((lambda out, inp: random_lowrank(rng, out, inp, scale)) if lowrank  # noqa: E731
                  else (lambda out, inp: random_enc(rng, out, inp, fixed=fixed, scale=scale)))
        head = matrix(V, self.H)
        self.head_slots.load(slot, [head, None], st)
        d["head"] = dec(head)
        extra = torch.randn(self.EXTRA if slot % 2 == 0 else 1, self.H) * 0.3
        self.head_extras.load(slot, extra, st)
        d["head_extra"] = extra.double()
        emb = matrix(V, self.H)
        if isinstance(self.emb_store, HostEmbeddingDeltas):
            self.emb_store.load(slot, emb)
        else:
            self.emb_store.load(slot, [emb], st)
        d["embed"] = dec(emb)
        erows = torch.randn(self.EXTRA, self.H) * 0.3
        self.emb_extras.load(slot, erows, st)
        d["embed_extra"] = erows.double()
        st.synchronize()
        return d

    # -------------------------------------------------------------- forward

    def route(self, slot_ids: list[int], head_rows: int | None = None) -> None:
        """What the manager does before a step: fill the persistent routing in place. The
        stack's LM head runs on all `head_rows` rows (its sampler rows: the padded batch)."""
        if not self.wrapped:
            return
        self.stager.wait()
        pad = [-1] * ((head_rows or len(slot_ids)) - len(slot_ids))
        self.ctx.set(slot_ids, list(slot_ids) + pad)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        residual = None
        for blk in self.layers:
            if residual is None:
                residual = h
                x = blk.norm1(h)
            else:
                x, residual = blk.norm1(h, residual)
            q, k, v = blk.qkv(x).split([self.Q, self.KV, self.KV], -1)
            h = blk.o(q * torch.sigmoid(k.repeat(1, self.Q // self.KV) + v.repeat(1, self.Q // self.KV)))
            x, residual = blk.norm2(h, residual)
            g, u = blk.gate_up(x).chunk(2, -1)
            h = blk.down(F.silu(g) * u)
        h, _ = self.final_norm(h, residual)
        return self.head(h)

    # -------------------------------------------------------------- reference

    @torch.no_grad()
    def reference(self, ids: torch.Tensor, slot: int, d: dict | None,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The same stack with slot `slot`'s merged weights (W + decode(D)), densely, in
        float64; with another dtype: the merged model as a user's merged checkpoint runs it
        (weights rounded once to dtype, every product in dtype, norms in float32)."""
        d = d or {}
        V = self.BASE_VOCAB
        c = lambda t: t.to(dtype)  # noqa: E731

        def lin(i, name, x):
            mod = getattr(self.layers[i], name)
            w = c(mod.weight.double() + d.get(f"{i}.{name}", 0))
            b = None if mod.bias is None else c(mod.bias.double() + d.get(f"{i}.{name}.bias", 0))
            return F.linear(x, w, b)

        def norm(mod, key, x):
            w = c(mod.base.weight.double() + d.get(key, 0))
            xf = x.double() if dtype == torch.float64 else x.float()
            return c(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)) * w

        ids = ids.cpu().long()
        emb = self.base_embed.weight.double().cpu().clone()
        emb[V:] = 0
        if "embed" in d:
            emb[:V] += d["embed"]
            emb[V:V + d["embed_extra"].shape[0]] = d["embed_extra"]
        dev = lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        d = {k: dev(v) for k, v in d.items()}
        h = c(emb[ids].to(self.device))
        residual = None
        for i, blk in enumerate(self.layers):
            residual = h if residual is None else h + residual
            x = norm(blk.norm1, f"{i}.norm1", residual)
            q, k, v = lin(i, "qkv", x).split([self.Q, self.KV, self.KV], -1)
            h = lin(i, "o", q * torch.sigmoid(k.repeat(1, self.Q // self.KV)
                                                + v.repeat(1, self.Q // self.KV)))
            residual = h + residual
            x = norm(blk.norm2, f"{i}.norm2", residual)
            g, u = lin(i, "gate_up", x).chunk(2, -1)
            h = lin(i, "down", F.silu(g) * u)
        h = norm(self.final_norm, "final_norm", h + residual)
        w = self.head.weight.double().clone()
        if "head" in d:
            w[:V] += d["head"]
        logits = h @ c(w).T
        extra = d.get("head_extra")
        n = 0 if extra is None else extra.shape[0]
        if n:
            logits[:, V:V + n] = h @ c(extra).T
        logits[:, V + n:] = float("-inf")
        return logits
