"""What KV-head compression measures on calibration text: one layer's key, value and query
second moments (docs/kv-heads.md, "Calibration").

Keys are measured as the softmax sees them. Adding the same vector to every key a query
sees adds the same number to all its logits, which the softmax ignores; so what a key
error costs is its deviation from the mean of the keys that query attends to, weighted by
how much it attends to each. After RoPE that mean is taken over the rotated keys: a
constant pre-RoPE offset at a frequency that barely turns over the context is invisible,
one at a fast frequency is not. Per reading KV head h (its query heads i, positions s):

    C_h = sum_{i in Q(h), s} [ sum_t A_ist r_t r_t^H  -  m_is m_is^H ],  m_is = sum_t A_ist r_t

with r_t the RoPE'd key of token t (all KV heads; per frequency, complex) and A the
original model's attention probabilities. Uncentred moments (the seed's SVD-a) instead
spend the maps on a large mean key (q/k biases, the hidden states' mean direction, which
grow in the slow frequencies as a model trains) that costs nothing to lose, and drop the
variation that the attention reads. Values are different: attention weights sum to one,
so a value's mean passes through to the output, and the uncentred moment is the right one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_maps import to_complex


@dataclass
class LayerStats:
    """Second moments of one layer's pre-RoPE keys, values and queries on calibration text.

    kcov_c:   [d/2, K0, K0] complex, sum over tokens of z_a,j conj(z_b,j) (uncentred keys)
    kcov_att: [K0, d/2, K0, K0] complex, C_h above (keys as the softmax of KV head h's
              query heads sees them); None when measured without attention
    kcov:     [K0*d, K0*d] real, uncentred key covariance (keys without RoPE)
    kcov_att_real: [K0*d, K0*d] real, C above without rotation, all query heads together
    vcov:     [K0*d, K0*d] real, uncentred value covariance
    q_energy: [K0, d/2] sum over the KV head's query heads and tokens of |z^q_j|^2
    q_cov:    [K0, d, d] sum over the KV head's query heads of q q^T
    o_metric: [K0, d, d] sum over the KV head's query heads of W_o,i^T W_o,i
    """

    kcov_c: torch.Tensor
    kcov: torch.Tensor
    vcov: torch.Tensor
    q_energy: torch.Tensor
    q_cov: torch.Tensor
    o_metric: torch.Tensor
    tokens: int
    kcov_att: torch.Tensor | None = None
    kcov_att_real: torch.Tensor | None = None

    @property
    def kv_heads(self) -> int:
        return self.q_energy.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q_cov.shape[-1]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_half RoPE (HF apply_rotary_pos_emb) of x [..., T, d] with tables [T, d]."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, rep: int) -> torch.Tensor:
    """Softmax probabilities [B, H, T, T] of (RoPE'd) q [B, H, T, d], k [B, K0, T, d]."""
    t, d = q.shape[-2], q.shape[-1]
    scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * d ** -0.5
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), -1)


class StatsAccumulator:
    """Accumulates LayerStats from projected q/k/v (pre-RoPE), all float64."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int):
        self.h, self.k0, self.d = heads, kv_heads, head_dim
        d, k0 = head_dim, kv_heads
        self.kcov_c = torch.zeros(d // 2, k0, k0, dtype=torch.complex128)
        self.kcov_att = torch.zeros(k0, d // 2, k0, k0, dtype=torch.complex128)
        self.kcov = torch.zeros(k0 * d, k0 * d, dtype=torch.float64)
        self.kcov_att_real = torch.zeros(k0 * d, k0 * d, dtype=torch.float64)
        self.vcov = torch.zeros(k0 * d, k0 * d, dtype=torch.float64)
        self.q_energy = torch.zeros(k0, d // 2, dtype=torch.float64)
        self.q_cov = torch.zeros(k0, d, d, dtype=torch.float64)
        self.tokens = 0
        self.rope = None

    def add(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> None:
        """Whole sequences: q [B, T, H*d], k and v [B, T, K0*d] (projection outputs incl.
        bias, before RoPE; 2-D: one sequence); cos/sin [T, d]: the model's rotary tables
        (rotate_half), None for keys without RoPE."""
        if q.dim() == 2:
            q, k, v = q[None], k[None], v[None]
        q, k, v = q.double(), k.double(), v.double()
        b, t = q.shape[:2]
        h, k0, d, rep = self.h, self.k0, self.d, self.h // self.k0
        self.rope = cos is not None
        kf, vf = k.reshape(b * t, -1), v.reshape(b * t, -1)
        self.kcov += kf.T @ kf
        self.vcov += vf.T @ vf
        zk = to_complex(k.view(b, t, k0, d))  # [B, T, K0, d/2]
        self.kcov_c += torch.einsum("ntaj,ntcj->jac", zk, zk.conj())
        q4 = q.view(b * t, k0, rep, d)
        self.q_energy += to_complex(q4).abs().square().sum((0, 2))
        self.q_cov += torch.einsum("tkri,tkrj->kij", q4, q4)
        self.tokens += b * t
        # keys as the softmax sees them (module docstring), with the model's own attention
        qh, kh = q.view(b, t, h, d).transpose(1, 2), k.view(b, t, k0, d).transpose(1, 2)
        if cos is not None:
            qh, kh = rope(qh, cos.double(), sin.double()), rope(kh, cos.double(), sin.double())
        att = causal_attention(qh, kh, rep)  # [B, H, T, T]
        keys = kh.transpose(1, 2).reshape(b, 1, t, k0 * d)  # (RoPE'd) keys of all KV heads
        for g in range(k0):  # the query heads of KV head g (one group at a time: memory)
            a_g = att[:, g * rep:(g + 1) * rep]  # [B, rep, T, T]
            got = a_g.sum((1, 2))  # attention each key receives from them  [B, T]
            mean = a_g @ keys  # attention-weighted mean key per query  [B, rep, T, K0*d]
            if cos is None:
                self.kcov_att_real += (torch.einsum("nt,nti,ntj->ij", got, kf.view(b, t, -1),
                                                    kf.view(b, t, -1))
                                       - torch.einsum("nrsi,nrsj->ij", mean, mean))
                continue
            zm = to_complex(mean.view(b, rep, t, k0, d))  # [B, rep, T, K0, d/2]
            self.kcov_att[g] += (torch.einsum("nt,ntaj,ntcj->jac", got.to(zk.dtype), zk,
                                              zk.conj())
                                 - torch.einsum("nrsaj,nrscj->jac", zm, zm.conj()))

    def finish(self, w_o: torch.Tensor) -> LayerStats:
        """w_o: o_proj.weight [D, H*d]."""
        rep = self.h // self.k0
        wo = w_o.double().view(w_o.shape[0], self.k0, rep, self.d)
        o_metric = torch.einsum("Dkri,Dkrj->kij", wo, wo)
        return LayerStats(self.kcov_c, self.kcov, self.vcov, self.q_energy, self.q_cov,
                          o_metric, self.tokens,
                          self.kcov_att if self.rope else None,
                          self.kcov_att_real if self.rope is False else None)
