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
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .kv_stats import LayerStats

# key maps: SVD of the keys as the softmax sees them, SVD of the uncentred keys (the
# seed's SVD-a), or the mean; value maps: SVD or the mean (kv_stats, docs/kv-heads.md)
KEY_KINDS = ("svd", "svd-uncentred", "meanpool")
VALUE_KINDS = ("svd", "meanpool")
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
    """The weighted covariances of one layer, shared by the builders and the grouping cost.

    Keys are weighted per (KV head, frequency) by the energy of the queries that read them
    (`attention` weighting) and, by default, measured as the softmax sees them
    (kv_stats: centred on each query's attention-weighted mean key); keys="svd-uncentred"
    uses the uncentred moments instead (the seed's SVD-a)."""

    def __init__(self, s: "LayerStats", rope: bool, weighting: str, keys: str = "svd"):
        self.s, self.rope, self.weighting = s, rope, weighting
        k0, d = s.kv_heads, s.head_dim
        soft = keys != "svd-uncentred"
        self.kc_per = s.kcov_att if soft else None   # [K0, d/2, K0, K0]: per reading head
        self.kr = (s.kcov_att_real if soft and s.kcov_att_real is not None else s.kcov)
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
        self.kcov_w = bd(self.lk) @ self.kr @ bd(self.lk)
        self.v_total = float(self.vcov_w.diagonal().sum())

    def key_cov(self, group, weighted: bool = True) -> torch.Tensor:
        """[d/2, r, r] per-frequency key covariance of a group (RoPE keys), as the group's
        query heads see it; weighted: scaled by sqrt(w_a w_b) (query energies)."""
        g = torch.tensor(group)
        if self.kc_per is not None:
            c = self.kc_per[g].sum(0)[:, g][:, :, g]
        else:
            c = self.s.kcov_c[:, g][:, :, g]
        if not weighted:
            return c
        sw = self.wk[g].T.sqrt()  # [d/2, r]
        return c * sw[:, :, None] * sw[:, None, :]

    def k_total(self, group) -> float:
        """Weighted key energy of a group, the denominator of its `k_residual`."""
        if not self.rope:
            idx = _block_idx(group, self.s.head_dim)
            return float(self.kcov_w[idx][:, idx].diagonal().sum())
        return float(self.key_cov(group).diagonal(dim1=-2, dim2=-1).real.sum())

    # -- residual energies (what a group loses), for grouping and reporting; the same
    # weighted metric for SVD and mean-pooling, so "energy kept" compares across methods
    def v_residual(self, group, method: str) -> float:
        d = self.s.head_dim
        idx = _block_idx(group, d)
        if method == "meanpool":
            metric = torch.stack([self.lv[h] @ self.lv[h] for h in group])
            return _meanpool_residual(self.s.vcov[idx][:, idx], metric)
        ev = torch.linalg.eigvalsh(self.vcov_w[idx][:, idx])
        return float(ev[:-d].clamp_min(0).sum())

    def k_residual(self, group, method: str) -> float:
        d = self.s.head_dim
        if not self.rope:
            idx = _block_idx(group, d)
            if method == "meanpool":
                metric = torch.stack([self.lk[h] @ self.lk[h] for h in group])
                return _meanpool_residual(self.kr[idx][:, idx], metric)
            ev = torch.linalg.eigvalsh(self.kcov_w[idx][:, idx])
            return float(ev[:-d].clamp_min(0).sum())
        if method == "meanpool":  # per frequency: sum_h w_h E|z_h - mean(z)|^2
            c = self.key_cov(group, weighted=False)  # [d/2, r, r]
            r = len(group)
            dev = (torch.eye(r, dtype=torch.complex128) - 1.0 / r)  # rows: z_h - mean
            e = torch.einsum("ha,jab,hb->jh", dev, c, dev.conj()).real  # [d/2, r]
            return float((e * self.wk[torch.tensor(group)].T).sum())
        ev = torch.linalg.eigvalsh(self.key_cov(group))
        return float(ev[:, :-1].clamp_min(0).sum())

    def cost(self, group, keys: str, values: str) -> float:
        return (self.k_residual(group, keys) / max(self.k_total(group), _EPS)
                + self.v_residual(group, values) / max(self.v_total, _EPS))


def _meanpool_residual(c: torch.Tensor, metric: torch.Tensor) -> float:
    """sum_h E ||x_h - mean(x)||^2 in head h's metric M_h ([r, d, d]), from the group's
    unweighted covariance c [r*d, r*d]."""
    r, d = metric.shape[0], metric.shape[-1]
    blocks = c.view(r, d, r, d).permute(0, 2, 1, 3)  # [a, b, d, d]
    mean_all = blocks.sum((0, 1)) / r**2
    total = 0.0
    for h in range(r):
        dev = blocks[h, h] - (blocks[h].sum(0) + blocks[:, h].sum(0)) / r + mean_all
        total += float((metric[h] * dev).sum())
    return total


def _svd_real(c_w: torch.Tensor, group, d: int, root, inv):
    """Top-d PCA of a weighted group covariance -> (map [d, r*d], per-member fold [r, d, d]).

    new = sum_h U_h^T L_h x_h;  x_h ~ L_h^-1 U_h new  (so a reader of x_h folds L_h^-1 U_h)."""
    evals, evecs = torch.linalg.eigh(c_w)
    u = evecs[:, -d:].flip(-1)  # [r*d, d], leading direction first
    blocks = u.view(len(group), d, d)  # U_h
    kmap = torch.cat([blocks[i].T @ root[h] for i, h in enumerate(group)], 1)  # [d, r*d]
    fold = torch.stack([inv[h] @ blocks[i] for i, h in enumerate(group)])  # [r, d, d]
    return kmap, fold


def build_layer_maps(s: "LayerStats", heads: int, kv_heads_new: int, keys: str = "svd",
                     values: str = "svd", grouping: str = "adjacent",
                     weighting: str = "attention", rope: bool = True) -> LayerMaps:
    """The maps of one layer from its calibration statistics. `keys` (KEY_KINDS) and
    `values` (VALUE_KINDS) are chosen independently: the key maps only touch k_proj/q_proj,
    the value maps only v_proj/o_proj. The residuals (energy not kept) are measured in the
    metric each map minimises (svd-uncentred: the uncentred key moments)."""
    k0, d = s.kv_heads, s.head_dim
    r = k0 // kv_heads_new
    if keys not in KEY_KINDS or values not in VALUE_KINDS:
        raise ValueError(f"keys {keys!r} / values {values!r}")
    prob = _Problem(s, rope, weighting, keys)
    if grouping == "adjacent":
        groups = [list(range(g * r, (g + 1) * r)) for g in range(kv_heads_new)]
    elif grouping == "similarity":
        groups = similarity_groups(prob, k0, r, keys, values)
    else:
        raise ValueError(grouping)
    n = kv_heads_new
    k_map = torch.zeros(n, d, r * d, dtype=torch.float64)
    v_map = torch.zeros(n, d, r * d, dtype=torch.float64)
    q_fold_kv = torch.zeros(k0, d, d, dtype=torch.float64)  # query fold of old KV head h
    o_fold_kv = torch.zeros(k0, d, d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    mean_map = torch.cat([eye / r] * r, 1)
    for g, grp in enumerate(groups):
        idx = _block_idx(grp, d)
        if values == "meanpool":
            v_map[g] = mean_map
            o_fold_kv[grp] = eye
        else:  # o_proj reads v_h ~ L_h^-1 U_h v'  -> o fold L_h^-1 U_h (right-multiplied)
            v_map[g], vfold = _svd_real(prob.vcov_w[idx][:, idx], grp, d, prob.lv, prob.lv_inv)
            for i, h in enumerate(grp):
                o_fold_kv[h] = vfold[i]
        if keys == "meanpool":
            k_map[g] = mean_map
            q_fold_kv[grp] = eye
        elif not rope:
            k_map[g], kfold = _svd_real(prob.kcov_w[idx][:, idx], grp, d, prob.lk, prob.lk_inv)
            for i, h in enumerate(grp):
                q_fold_kv[h] = kfold[i].T  # q' = fold^T q  (row-vector q L^-1 U as columns)
        else:
            k_map[g], folds = _complex_pca(prob, grp, d)
            for i, h in enumerate(grp):
                q_fold_kv[h] = folds[i]
    q_fold = _fold_per_slot(q_fold_kv, groups, heads, k0)
    o_fold = _fold_per_slot(o_fold_kv, groups, heads, k0)
    maps = LayerMaps(groups, q_sources(groups, heads, k0), k_map, v_map, q_fold, o_fold)
    maps.k_residual = (sum(prob.k_residual(g_, keys) for g_ in groups)
                       / max(sum(prob.k_total(g_) for g_ in groups), _EPS))
    maps.v_residual = sum(prob.v_residual(g_, values) for g_ in groups) / max(prob.v_total, _EPS)
    return maps


def _complex_pca(prob: _Problem, grp, d: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Keys with RoPE: per frequency j, the top eigenvector u of the weighted r x r Hermitian
    covariance; new z'_j = sum_h conj(u_h) sqrt(w_h) z_h, and a query reading head h maps
    z^q -> conj(u_h) / sqrt(w_h) z^q. -> (k_map [d, r*d], per-member q folds [d, d])."""
    gi = torch.tensor(grp)
    _, vecs = torch.linalg.eigh(prob.key_cov(grp))  # [d/2, r, r]
    u = vecs[:, :, -1]  # [d/2, r]
    sw = prob.wk[gi].T.sqrt()  # [d/2, r]
    k_map = torch.cat([complex_block(u[:, i].conj() * sw[:, i]) for i in range(len(grp))], 1)
    folds = [complex_block(u[:, i].conj() / sw[:, i]) for i in range(len(grp))]
    return k_map, folds


# ---------------------------------------------------------------------------- grouping


def similarity_groups(prob: _Problem, k0: int, r: int, keys: str, values: str,
                      max_sweeps: int = 50) -> list[list[int]]:
    """Partition the K0 old KV heads into groups of r with the least compression loss.

    Exhaustive when the number of partitions is small, otherwise greedy pairing refined by
    member swaps between groups until no swap lowers the summed cost (deterministic)."""
    cache: dict[tuple[int, ...], float] = {}

    def cost(grp) -> float:
        key = tuple(sorted(grp))
        if key not in cache:
            cache[key] = prob.cost(list(key), keys, values)
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
