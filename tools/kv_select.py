"""Choosing a layer's KV-head conversion by what attention actually outputs.

Every candidate conversion of a layer (SVD or mean-pooled keys, SVD or mean-pooled values,
adjacent or similarity grouping: tools/kv_maps.py) is applied to the layer's own attention
weights and run, in float64, on calibration sequences that the maps were not fitted on.
The error of a candidate is the relative squared error of the layer's attention output
(after o_proj), original vs converted, on those held-out tokens:

    err = sum ||attn_conv(x) - attn_orig(x)||^2 / sum ||attn_orig(x)||^2

The layer keeps the candidate with the least error. Reconstruction residuals of keys and
values (what the maps minimise) are only a proxy for this: a key error that shifts every
logit of a query equally costs nothing after the softmax, a value error averaged away by
attention costs little, and a map fitted on one set of tokens can miss another (the first
token of a sequence, say). The held-out attention output is what the next layer sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_maps import KEY_KINDS, VALUE_KINDS, LayerMaps, apply_maps

METHODS = ("auto", "svd", "svd-uncentred", "meanpool")
GROUPINGS = ("auto", "adjacent", "similarity")


@dataclass
class HeldOut:
    """Held-out calibration inputs of one layer: x [B, T, D] is the input of q/k/v_proj
    (after the layer's input norm), cos/sin [T, d] the model's rotary tables (rotate_half)."""

    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.x.shape[0] * self.x.shape[1]


@dataclass
class AttnWeights:
    """One layer's attention projections in HF layout (biases None when absent)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None

    def mapped(self, m: LayerMaps) -> "AttnWeights":
        f = lambda role, w: None if w is None else apply_maps(role, w, m)  # noqa: E731
        return AttnWeights(f("q_proj.weight", self.q), f("k_proj.weight", self.k),
                           f("v_proj.weight", self.v), f("o_proj.weight", self.o),
                           f("q_proj.bias", self.q_bias), f("k_proj.bias", self.k_bias),
                           f("v_proj.bias", self.v_bias))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb (rotate_half convention) for x [B, heads, T, d]."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def attention_output(w: AttnWeights, held: HeldOut, heads: int, head_dim: int,
                     chunk: int = 4) -> torch.Tensor:
    """The layer's causal self-attention output after o_proj (no o_proj bias: it is the
    same before and after conversion), float64, [B, T, D]."""
    d = head_dim
    kv = w.k.shape[0] // d
    rep = heads // kv
    cos, sin = held.cos.double(), held.sin.double()
    outs = []
    for x in torch.split(held.x.double(), chunk):
        b, t, _ = x.shape

        def proj(weight, bias, n):
            y = x @ weight.T + (0 if bias is None else bias)
            return y.view(b, t, n, d).transpose(1, 2)  # [B, n, T, d]

        q = _rotate(proj(w.q, w.q_bias, heads), cos, sin)
        k = _rotate(proj(w.k, w.k_bias, kv), cos, sin).repeat_interleave(rep, 1)
        v = proj(w.v, w.v_bias, kv).repeat_interleave(rep, 1)
        scores = q @ k.transpose(-1, -2) * d ** -0.5
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        att = torch.softmax(scores.masked_fill(mask, float("-inf")), -1)
        y = (att @ v).transpose(1, 2).reshape(b, t, heads * d)
        outs.append(y @ w.o.T)
    return torch.cat(outs)


def output_error(reference: torch.Tensor, w: AttnWeights, held: HeldOut, heads: int,
                 head_dim: int) -> float:
    """Relative squared error of the attention output of `w` against `reference`."""
    got = attention_output(w, held, heads, head_dim)
    return float((got - reference).square().sum() / reference.square().sum().clamp_min(1e-300))


# ------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    keys: str      # kv_maps.KEY_KINDS: "svd" | "svd-uncentred" | "meanpool"
    values: str    # kv_maps.VALUE_KINDS: "svd" | "meanpool"
    grouping: str  # "adjacent" | "similarity"

    @property
    def name(self) -> str:
        """keys/values, e.g. "svd/svd", "meanpool/meanpool", "svd-uncentred/svd" (the seed's
        SVD-a), with "+sim" when the heads are grouped by similarity."""
        return f"{self.keys}/{self.values}" + ("+sim" if self.grouping == "similarity" else "")


SEED_SVD = Candidate("svd-uncentred", "svd", "adjacent")  # the seed paper's SVD-a
MEANPOOL = Candidate("meanpool", "meanpool", "adjacent")  # GQA-uptraining initialisation


def candidates(method: str, grouping: str, kv_heads_new: int) -> list[Candidate]:
    """The conversions a layer chooses among. method: auto (every key map with every value
    map: SVD as the softmax sees the keys, SVD of the uncentred keys, mean-pooling; SVD or
    mean-pooling of the values) | svd | svd-uncentred (the seed's SVD-a) | meanpool; grouping: auto (adjacent and similarity)
    | adjacent | similarity. With one new KV head there is one group: similarity grouping
    is the adjacent one."""
    kinds = {"auto": [(k, v) for k in KEY_KINDS for v in VALUE_KINDS],
             "svd-uncentred": [("svd-uncentred", "svd")]}.get(method, [(method, method)])
    groupings = ["adjacent", "similarity"] if grouping == "auto" else [grouping]
    if kv_heads_new == 1:
        groupings = groupings[:1]
    return [Candidate(k, v, g) for g in groupings for k, v in kinds]


@dataclass
class Judged:
    candidate: Candidate
    maps: LayerMaps
    error: float  # relative attention-output error on held-out tokens

    def info(self) -> dict:
        return {"name": self.candidate.name, "keys": self.candidate.keys,
                "values": self.candidate.values, "grouping": self.candidate.grouping,
                "groups": self.maps.groups, "attn_error": _round(self.error),
                "k_energy_kept": _round(1 - self.maps.k_residual),
                "v_energy_kept": _round(1 - self.maps.v_residual)}


def _round(x: float):
    return None if x != x else round(float(x), 6)


def choose_layer_maps(stats, weights: AttnWeights, held: HeldOut, heads: int,
                      kv_heads_new: int, allowed: list[Candidate], reference: list[Candidate],
                      weighting: str, rope: bool) -> tuple[Judged, list[Judged]]:
    """Build every candidate's maps, judge each by its held-out attention-output error and
    return (the best of `allowed`, all judged). `reference` candidates are judged for the
    report only (e.g. plain mean-pooling when it is not allowed)."""
    from .kv_maps import build_layer_maps

    d = stats.head_dim
    ref_out = attention_output(weights, held, heads, d)
    judged, seen = [], {}
    for c in list(dict.fromkeys(allowed + reference)):
        maps = build_layer_maps(stats, heads, kv_heads_new, c.keys, c.values, c.grouping,
                                weighting, rope)
        key = (c.keys, c.values, str(maps.groups))  # similarity may find the adjacent groups
        err = seen.get(key)
        if err is None:
            err = seen[key] = output_error(ref_out, weights.mapped(maps), held, heads, d)
        judged.append(Judged(c, maps, err))
    ok = [j for j in judged if j.candidate in allowed]
    least = min(j.error for j in ok)
    # ties (e.g. exactly redundant heads: several maps are exact) go to the first listed
    best = next(j for j in ok if j.error <= least * (1 + 1e-9) + 1e-15)
    return best, judged
