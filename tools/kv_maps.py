"""The linear maps of KV-head compression (docs/kv-heads.md): build them, apply them.

One decoder layer with H query heads, K0 KV heads of size d becomes one with N KV heads.
Old KV heads are partitioned into N groups of r = K0 / N; query heads follow their old KV
head (GQA: query head i uses KV head i // (H / K0)), so new query-head slot i reads old
query head `q_src[i]` and the groups end up contiguous, as GQA runtimes expect.

Everything is a fixed linear map of the weights (no affine term), so the same maps apply
to a base, to a fine-tune and to a fine-tune's delta: T(base + delta) = T(base) + T(delta).

    k_proj rows of new KV head g  = k_map[g] @ [k_proj rows of the group's old heads]
    v_proj rows of new KV head g  = v_map[g] @ [v_proj rows of the group's old heads]
    q_proj rows of new q slot i   = q_fold[i] @ q_proj rows of old q head q_src[i]
    o_proj cols of new q slot i   = o_proj cols of old q head q_src[i] @ o_fold[i]
    (biases of q/k/v exactly like their weight rows; o_proj's bias is unchanged)

Keys carry RoPE in the "rotate_half" (neox) convention of HF Llama/Qwen2 and vLLM: the pair
(j, j + d/2) is one complex number z_j = k_j + i k_{j+d/2}, multiplied by e^{i m theta_j} at
position m. A map that multiplies every z_j by a complex scalar c_j (a 2x2 rotation-and-scale
block on the pair, the same at every position) commutes with that rotation, so it can be
folded into q_proj. `svd` keys therefore use per-frequency complex PCA across the group's
heads; values (no RoPE) use a real SVD of the group's concatenated values.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

METHODS = ("svd", "meanpool")
GROUPINGS = ("adjacent", "similarity")
WEIGHTINGS = ("none", "attention")
_EPS = 1e-9


# ------------------------------------------------------------------------ RoPE helpers


def to_complex(x: torch.Tensor) -> torch.Tensor:
    """[..., d] real (rotate_half layout) -> [..., d/2] complex: z_j = x_j + i x_{j+d/2}."""
    h = x.shape[-1] // 2
    return torch.complex(x[..., :h].double(), x[..., h:].double())


def complex_block(coef: torch.Tensor) -> torch.Tensor:
    """[d/2] complex scalars -> the [d, d] real matrix multiplying each z_j by coef_j."""
    h = coef.shape[-1]
    a, b = coef.real.double(), coef.imag.double()
    m = torch.zeros(2 * h, 2 * h, dtype=torch.float64)
    idx = torch.arange(h)
    m[idx, idx] = a
    m[idx, idx + h] = -b
    m[idx + h, idx] = b
    m[idx + h, idx + h] = a
    return m


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Reference RoPE in the rotate_half convention: x [..., T, d], positions [T]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None]  # [T, d/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rot = torch.cat([-x2, x1], -1)
    return (x.double() * cos + rot.double() * sin).to(x.dtype)


# ---------------------------------------------------------------------- layer statistics


@dataclass
class LayerStats:
    """Second moments of one layer's pre-RoPE keys, values and queries on calibration text.

    kcov_c: [d/2, K0, K0] complex, sum over tokens of z_a,j conj(z_b,j) (keys, per frequency)
    kcov:   [K0*d, K0*d] real, uncentred key covariance (for keys without RoPE)
    vcov:   [K0*d, K0*d] real, uncentred value covariance
    q_energy: [K0, d/2] sum over the KV head's query heads and tokens of |z^q_j|^2
    q_cov:  [K0, d, d] sum over the KV head's query heads of q q^T
    o_metric: [K0, d, d] sum over the KV head's query heads of W_o,i^T W_o,i
    """

    kcov_c: torch.Tensor
    kcov: torch.Tensor
    vcov: torch.Tensor
    q_energy: torch.Tensor
    q_cov: torch.Tensor
    o_metric: torch.Tensor
    tokens: int

    @property
    def kv_heads(self) -> int:
        return self.q_energy.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q_cov.shape[-1]


class StatsAccumulator:
    """Accumulates LayerStats from chunks of projected q/k/v (pre-RoPE), all float64."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int):
        self.h, self.k0, self.d = heads, kv_heads, head_dim
        d, k0 = head_dim, kv_heads
        self.kcov_c = torch.zeros(d // 2, k0, k0, dtype=torch.complex128)
        self.kcov = torch.zeros(k0 * d, k0 * d, dtype=torch.float64)
        self.vcov = torch.zeros(k0 * d, k0 * d, dtype=torch.float64)
        self.q_energy = torch.zeros(k0, d // 2, dtype=torch.float64)
        self.q_cov = torch.zeros(k0, d, d, dtype=torch.float64)
        self.tokens = 0

    def add(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """q [T, H*d], k and v [T, K0*d] (projection outputs incl. bias, before RoPE)."""
        q, k, v = q.double(), k.double(), v.double()
        t = q.shape[0]
        self.kcov += k.T @ k
        self.vcov += v.T @ v
        zk = to_complex(k.view(t, self.k0, self.d))  # [T, K0, d/2]
        self.kcov_c += torch.einsum("taj,tbj->jab", zk, zk.conj())
        rep = self.h // self.k0
        q4 = q.view(t, self.k0, rep, self.d)
        self.q_energy += to_complex(q4).abs().square().sum((0, 2))
        self.q_cov += torch.einsum("tkri,tkrj->kij", q4, q4)
        self.tokens += t

    def finish(self, w_o: torch.Tensor) -> LayerStats:
        """w_o: o_proj.weight [D, H*d]."""
        rep = self.h // self.k0
        wo = w_o.double().view(w_o.shape[0], self.k0, rep, self.d)
        o_metric = torch.einsum("Dkri,Dkrj->kij", wo, wo)
        return LayerStats(self.kcov_c, self.kcov, self.vcov, self.q_energy, self.q_cov,
                          o_metric, self.tokens)


# ---------------------------------------------------------------------------- the maps


@dataclass
class LayerMaps:
    groups: list[list[int]]      # new KV head g -> its old KV heads (r each)
    q_src: torch.Tensor          # [H] long: old query head of each new query-head slot
    k_map: torch.Tensor          # [N, d, r*d]
    v_map: torch.Tensor          # [N, d, r*d]
    q_fold: torch.Tensor         # [H, d, d]
    o_fold: torch.Tensor         # [H, d, d]
    k_residual: float = float("nan")  # share of calibration key energy not kept (weighted)
    v_residual: float = float("nan")

    @property
    def kv_heads(self) -> int:
        return len(self.groups)

    @property
    def head_dim(self) -> int:
        return self.k_map.shape[1]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.groups": torch.tensor(self.groups, dtype=torch.int64),
                f"{prefix}.q_src": self.q_src.to(torch.int64),
                f"{prefix}.k_map": self.k_map.contiguous(), f"{prefix}.v_map": self.v_map.contiguous(),
                f"{prefix}.q_fold": self.q_fold.contiguous(),
                f"{prefix}.o_fold": self.o_fold.contiguous()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str) -> "LayerMaps":
        return cls(groups=t[f"{prefix}.groups"].tolist(), q_src=t[f"{prefix}.q_src"],
                   k_map=t[f"{prefix}.k_map"].double(), v_map=t[f"{prefix}.v_map"].double(),
                   q_fold=t[f"{prefix}.q_fold"].double(), o_fold=t[f"{prefix}.o_fold"].double())


def q_sources(groups: list[list[int]], heads: int, kv_heads: int) -> torch.Tensor:
    """Query heads follow their old KV head into the new, contiguous group order."""
    rep = heads // kv_heads
    return torch.tensor([h * rep + i for grp in groups for h in grp for i in range(rep)])


def _fold_per_slot(per_kv: torch.Tensor, groups, heads: int, kv_heads: int) -> torch.Tensor:
    rep = heads // kv_heads
    return torch.stack([per_kv[h] for grp in groups for h in grp for _ in range(rep)])


# ------------------------------------------------------------------------ application


def map_q(w: torch.Tensor, m: LayerMaps) -> torch.Tensor:
    """q_proj weight [H*d, D] or bias [H*d] -> the same shape, in float64."""
    h, d = m.q_src.numel(), m.head_dim
    w3 = w.double().reshape(h, d, -1)[m.q_src]
    return torch.bmm(m.q_fold, w3).reshape(w.shape)


def map_kv(w: torch.Tensor, kv_map: torch.Tensor, groups) -> torch.Tensor:
    """k_proj/v_proj weight [K0*d, D] or bias [K0*d] -> [N*d, D] / [N*d], in float64."""
    n, d = kv_map.shape[0], kv_map.shape[1]
    k0 = w.shape[0] // d
    w3 = w.double().reshape(k0, d, -1)
    members = torch.tensor(groups)
    stacked = w3[members].reshape(n, -1, w3.shape[-1])  # [N, r*d, D]
    out = torch.bmm(kv_map, stacked)  # [N, d, D]
    return out.reshape((n * d,) + tuple(w.shape[1:]))


def map_o(w: torch.Tensor, m: LayerMaps) -> torch.Tensor:
    """o_proj weight [D, H*d] -> the same shape, in float64."""
    h, d = m.q_src.numel(), m.head_dim
    w3 = w.double().reshape(w.shape[0], h, d)[:, m.q_src]  # [D, H, d]
    return torch.einsum("Dhj,hjk->Dhk", w3, m.o_fold).reshape(w.shape)


ROLES = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight",
         "v_proj.bias", "o_proj.weight")


def apply_maps(role: str, w: torch.Tensor, m: LayerMaps) -> torch.Tensor:
    """Map one attention tensor (`role` as in ROLES) of a base, fine-tune or delta."""
    if role.startswith("q_proj."):
        return map_q(w, m)
    if role.startswith("k_proj."):
        return map_kv(w, m.k_map, m.groups)
    if role.startswith("v_proj."):
        return map_kv(w, m.v_map, m.groups)
    if role == "o_proj.weight":
        return map_o(w, m)
    raise KeyError(role)


# ---------------------------------------------------------------------------- builders


def _metric_sqrt(metric: torch.Tensor, reg: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root and its inverse of PSD [K0, d, d] metrics (common scale)."""
    d = metric.shape[-1]
    scale = metric.diagonal(dim1=-2, dim2=-1).sum(-1).mean() / d
    m = metric / scale.clamp_min(_EPS)
    m = m + reg * torch.eye(d, dtype=m.dtype)
    evals, evecs = torch.linalg.eigh(m)
    evals = evals.clamp_min(reg)
    root = evecs @ torch.diag_embed(evals.sqrt()) @ evecs.transpose(-1, -2)
    inv = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.transpose(-1, -2)
    return root, inv


def _block_idx(group, d: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * d, (h + 1) * d) for h in group])


class _Problem:
    """The weighted covariances of one layer, shared by the builders and the grouping cost."""

    def __init__(self, s: LayerStats, rope: bool, weighting: str):
        self.s, self.rope, self.weighting = s, rope, weighting
        k0, d = s.kv_heads, s.head_dim
        eye = torch.eye(d, dtype=torch.float64).expand(k0, d, d)
        if weighting == "attention":
            self.lv, self.lv_inv = _metric_sqrt(s.o_metric)
            self.lk, self.lk_inv = _metric_sqrt(s.q_cov)
            qe = s.q_energy / s.q_energy.mean(0, keepdim=True).clamp_min(_EPS)  # [K0, d/2]
            self.wk = qe.clamp_min(1e-6)
        else:
            self.lv = self.lv_inv = self.lk = self.lk_inv = eye
            self.wk = torch.ones(k0, d // 2, dtype=torch.float64)
        # weighted covariances: block (a, b) = L_a C_ab L_b
        bd = lambda L: torch.block_diag(*L)  # noqa: E731
        self.vcov_w = bd(self.lv) @ s.vcov @ bd(self.lv)
        self.kcov_w = bd(self.lk) @ s.kcov @ bd(self.lk)
        sw = self.wk.sqrt().T  # [d/2, K0]
        self.kcov_cw = s.kcov_c * sw[:, :, None] * sw[:, None, :]
        self.v_total = float(self.vcov_w.diagonal().sum())
        self.k_total_real = float(self.kcov_w.diagonal().sum())
        self.k_total_complex = float(self.kcov_cw.diagonal(dim1=-2, dim2=-1).real.sum())

    def k_total(self, method: str) -> float:
        """Total key energy in the space `k_residual` measures for `method`."""
        return self.k_total_complex if (self.rope and method != "meanpool") else self.k_total_real

    # -- residual energies (what a group loses), for grouping and reporting
    def v_residual(self, group, method: str) -> float:
        d = self.s.head_dim
        idx = _block_idx(group, d)
        c = self.vcov_w[idx][:, idx]
        if method == "meanpool":
            return _meanpool_residual(c, len(group), d)
        ev = torch.linalg.eigvalsh(c)
        return float(ev[:-d].clamp_min(0).sum())

    def k_residual(self, group, method: str) -> float:
        d = self.s.head_dim
        if method == "meanpool" or not self.rope:
            idx = _block_idx(group, d)
            c = self.kcov_w[idx][:, idx]
            if method == "meanpool":
                return _meanpool_residual(c, len(group), d)
            ev = torch.linalg.eigvalsh(c)
            return float(ev[:-d].clamp_min(0).sum())
        g = torch.tensor(group)
        c = self.kcov_cw[:, g][:, :, g]  # [d/2, r, r]
        ev = torch.linalg.eigvalsh(c)
        return float(ev[:, :-1].clamp_min(0).sum())

    def cost(self, group, method: str) -> float:
        return (self.k_residual(group, method) / max(self.k_total(method), _EPS)
                + self.v_residual(group, method) / max(self.v_total, _EPS))


def _meanpool_residual(c: torch.Tensor, r: int, d: int) -> float:
    """Energy of x_h - mean(x) summed over the group's r heads, from their covariance."""
    blocks = c.view(r, d, r, d)
    diag = sum(float(blocks[a, :, a, :].trace()) for a in range(r))
    allsum = sum(float(blocks[a, :, b, :].trace()) for a in range(r) for b in range(r))
    return diag - allsum / r


def _svd_real(c_w: torch.Tensor, group, d: int, root, inv):
    """Top-d PCA of a weighted group covariance -> (map [d, r*d], per-member fold [r, d, d]).

    new = sum_h U_h^T L_h x_h;  x_h ~ L_h^-1 U_h new  (so a reader of x_h folds L_h^-1 U_h)."""
    evals, evecs = torch.linalg.eigh(c_w)
    u = evecs[:, -d:].flip(-1)  # [r*d, d], leading direction first
    blocks = u.view(len(group), d, d)  # U_h
    kmap = torch.cat([blocks[i].T @ root[h] for i, h in enumerate(group)], 1)  # [d, r*d]
    fold = torch.stack([inv[h] @ blocks[i] for i, h in enumerate(group)])  # [r, d, d]
    return kmap, fold


def build_layer_maps(s: LayerStats, heads: int, kv_heads_new: int, method: str = "svd",
                     grouping: str = "adjacent", weighting: str = "attention",
                     rope: bool = True) -> LayerMaps:
    """The maps of one layer from its calibration statistics."""
    k0, d = s.kv_heads, s.head_dim
    r = k0 // kv_heads_new
    prob = _Problem(s, rope, weighting)
    if grouping == "adjacent":
        groups = [list(range(g * r, (g + 1) * r)) for g in range(kv_heads_new)]
    elif grouping == "similarity":
        groups = similarity_groups(prob, k0, r, method)
    else:
        raise ValueError(grouping)
    n = kv_heads_new
    k_map = torch.zeros(n, d, r * d, dtype=torch.float64)
    v_map = torch.zeros(n, d, r * d, dtype=torch.float64)
    q_fold_kv = torch.zeros(k0, d, d, dtype=torch.float64)  # query fold of old KV head h
    o_fold_kv = torch.zeros(k0, d, d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    for g, grp in enumerate(groups):
        if method == "meanpool":
            k_map[g] = torch.cat([eye / r] * r, 1)
            v_map[g] = torch.cat([eye / r] * r, 1)
            for h in grp:
                q_fold_kv[h] = eye
                o_fold_kv[h] = eye
            continue
        # values: o_proj reads v_h ~ L_h^-1 U_h v'  -> o fold L_h^-1 U_h (right-multiplied)
        idx = _block_idx(grp, d)
        vmap, vfold = _svd_real(prob.vcov_w[idx][:, idx], grp, d, prob.lv, prob.lv_inv)
        v_map[g] = vmap
        for i, h in enumerate(grp):
            o_fold_kv[h] = vfold[i]
        if not rope:
            kmap, kfold = _svd_real(prob.kcov_w[idx][:, idx], grp, d, prob.lk, prob.lk_inv)
            k_map[g] = kmap
            for i, h in enumerate(grp):
                q_fold_kv[h] = kfold[i].T  # q' = fold^T q  (row-vector q L^-1 U as columns)
            continue
        # keys with RoPE: per frequency j, top eigenvector u of the weighted r x r Hermitian
        # covariance; new z'_j = sum_h conj(u_h) sqrt(w_h) z_h, query z^q' = conj(u_h)/sqrt(w_h) z^q
        gi = torch.tensor(grp)
        c = prob.kcov_cw[:, gi][:, :, gi]  # [d/2, r, r]
        _, vecs = torch.linalg.eigh(c)
        u = vecs[:, :, -1]  # [d/2, r]
        sw = prob.wk[gi].T.sqrt()  # [d/2, r]
        for i, h in enumerate(grp):
            kc = u[:, i].conj() * sw[:, i]
            qc = u[:, i].conj() / sw[:, i]
            blk = complex_block(kc)
            k_map[g][:, i * d:(i + 1) * d] = blk
            q_fold_kv[h] = complex_block(qc)
    heads_q = heads
    q_fold = _fold_per_slot(q_fold_kv, groups, heads_q, k0)
    o_fold = _fold_per_slot(o_fold_kv, groups, heads_q, k0)
    maps = LayerMaps(groups, q_sources(groups, heads_q, k0), k_map, v_map, q_fold, o_fold)
    maps.k_residual = (sum(prob.k_residual(g_, method) for g_ in groups)
                       / max(prob.k_total(method), _EPS))
    maps.v_residual = sum(prob.v_residual(g_, method) for g_ in groups) / max(prob.v_total, _EPS)
    return maps


# ---------------------------------------------------------------------------- grouping


def similarity_groups(prob: _Problem, k0: int, r: int, method: str,
                      max_sweeps: int = 50) -> list[list[int]]:
    """Partition the K0 old KV heads into groups of r with the least compression loss.

    Exhaustive when the number of partitions is small, otherwise greedy pairing refined by
    member swaps between groups until no swap lowers the summed cost (deterministic)."""
    cache: dict[tuple[int, ...], float] = {}

    def cost(grp) -> float:
        key = tuple(sorted(grp))
        if key not in cache:
            cache[key] = prob.cost(list(key), method)
        return cache[key]

    if r == 1:
        return [[h] for h in range(k0)]
    if k0 // r == 1:
        return [list(range(k0))]
    parts = _partitions(list(range(k0)), r, limit=20000)
    if parts is not None:
        best = min(parts, key=lambda p: (sum(cost(g) for g in p), p))
        return [sorted(g) for g in best]
    # greedy: repeatedly seed a group with the lowest free head and add the best partners
    free, groups = list(range(k0)), []
    while free:
        grp = [free.pop(0)]
        while len(grp) < r:
            nxt = min(free, key=lambda h: cost(grp + [h]))
            grp.append(nxt)
            free.remove(nxt)
        groups.append(grp)
    for _ in range(max_sweeps):
        improved = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            for i, j in itertools.product(range(r), range(r)):
                ga, gb = list(groups[a]), list(groups[b])
                ga[i], gb[j] = gb[j], ga[i]
                if cost(ga) + cost(gb) < cost(groups[a]) + cost(groups[b]) - 1e-12:
                    groups[a], groups[b] = ga, gb
                    improved = True
        if not improved:
            break
    groups = [sorted(g) for g in groups]
    return sorted(groups)


def _partitions(items: list[int], r: int, limit: int):
    """All partitions of `items` into groups of r (first group holds items[0]); None if
    there would be more than `limit`."""
    import math
    n = len(items)
    count = math.factorial(n) // (math.factorial(r) ** (n // r) * math.factorial(n // r))
    if count > limit:
        return None

    def rec(rest):
        if not rest:
            yield []
            return
        first, others = rest[0], rest[1:]
        for combo in itertools.combinations(others, r - 1):
            grp = [first, *combo]
            remaining = [x for x in others if x not in combo]
            for tail in rec(remaining):
                yield [grp, *tail]

    return list(rec(items))
