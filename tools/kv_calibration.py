"""Which attention a checkpoint has, and its pre-RoPE key/value statistics on real text.

Statistics are captured layer by layer with `calibration.LayerwiseCalibrator` (the model
lives on the meta device; one decoder layer is materialised at a time): the input of
q/k/v_proj is recorded, projected with the checkpoint's own q/k/v weights (bias included,
RoPE not applied) and reduced to second moments (kv_stats.StatsAccumulator), so memory is
one layer plus the calibration activations, whatever the model size.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from deltadq_vllm.checkpoint import Checkpoint
from deltadq_vllm.errors import DeltaDQError

from .calibration import CalibrationUnavailable, LayerwiseCalibrator
from .kv_stats import LayerStats, StatsAccumulator
from .kv_select import AttnWeights, HeldOut

SUPPORTED = ("llama", "mistral", "qwen2")
_Q_RE = re.compile(r"^(.*\.layers)\.(\d+)\.self_attn\.q_proj\.weight$")


@dataclass(frozen=True)
class AttnLayout:
    model_type: str
    prefix: str          # e.g. "model.layers"
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    qkv_bias: bool
    o_bias: bool
    rope: bool = True

    def name(self, layer: int, role: str) -> str:
        return f"{self.prefix}.{layer}.self_attn.{role}"

    def roles(self) -> list[str]:
        r = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
        if self.qkv_bias:
            r += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
        return r

    def kv_bytes_per_token(self, kv_heads: int | None = None, bytes_per_value: int = 2) -> int:
        """K and V cache bytes one token costs across all layers."""
        n = self.kv_heads if kv_heads is None else kv_heads
        return 2 * self.layers * n * self.head_dim * bytes_per_value


def attention_layout(ckpt: Checkpoint) -> AttnLayout:
    """The attention geometry of a checkpoint; refuses what the maps cannot represent."""
    c = ckpt.config
    mt = c.get("model_type")
    fix = (f"kv-compress supports {', '.join(SUPPORTED)} checkpoints (standard multi-head "
           "attention with q/k/v/o projections and full rotary embeddings)")
    if mt not in SUPPORTED:
        raise DeltaDQError(f"{ckpt.role} {ckpt.path} has model_type {mt!r}, which kv-compress "
                           "does not support", fix)
    if float(c.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise DeltaDQError(f"{ckpt.path} uses partial rotary embeddings "
                           f"(partial_rotary_factor={c['partial_rotary_factor']})", fix)
    layers = {}
    for n in ckpt.names():
        m = _Q_RE.match(n)
        if m:
            layers.setdefault(m.group(1), set()).add(int(m.group(2)))
    if len(layers) != 1:
        raise DeltaDQError(f"{ckpt.path} has no recognisable attention projections "
                           "(*.layers.N.self_attn.q_proj.weight)", fix)
    prefix, idx = next(iter(layers.items()))
    n_layers = int(c.get("num_hidden_layers", len(idx)))
    if idx != set(range(n_layers)):
        raise DeltaDQError(f"{ckpt.path} has q_proj weights for layers {sorted(idx)[:5]}..., but "
                           f"its config says num_hidden_layers={n_layers}", fix)
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hidden = int(c["hidden_size"])
    head_dim = int(c.get("head_dim") or hidden // heads)
    lay = AttnLayout(mt, prefix, n_layers, heads, kv, head_dim, hidden,
                     qkv_bias=f"{prefix}.0.self_attn.k_proj.bias" in ckpt.tensors,
                     o_bias=f"{prefix}.0.self_attn.o_proj.bias" in ckpt.tensors)
    if head_dim % 2:
        raise DeltaDQError(f"{ckpt.path} has an odd head_dim {head_dim}", fix)
    if heads % kv:
        raise DeltaDQError(f"{ckpt.path}: num_attention_heads {heads} is not a multiple of "
                           f"num_key_value_heads {kv}", "repair the config.json")
    for i in range(n_layers):
        for role in lay.roles():
            name = lay.name(i, role)
            if name not in ckpt.tensors:
                raise DeltaDQError(f"{ckpt.path} lacks {name}", fix)
        shapes = {r: ckpt.info(lay.name(i, r)).shape for r in ("q_proj.weight", "k_proj.weight",
                                                              "v_proj.weight", "o_proj.weight")}
        want = {"q_proj.weight": (heads * head_dim, hidden), "k_proj.weight": (kv * head_dim, hidden),
                "v_proj.weight": (kv * head_dim, hidden), "o_proj.weight": (hidden, heads * head_dim)}
        if shapes != want:
            raise DeltaDQError(f"{ckpt.path} layer {i}: attention shapes {shapes} do not match "
                               f"its config (expected {want})", fix)
    return lay


def _projection(ckpt: Checkpoint, lay: AttnLayout, layer: int, role: str):
    w = ckpt.get(lay.name(layer, f"{role}.weight")).double()
    b = ckpt.get(lay.name(layer, f"{role}.bias")).double() if lay.qkv_bias else None
    return lambda x: x @ w.T if b is None else x @ w.T + b


@dataclass
class LayerCalibration:
    """One layer's calibration: second moments of the fitting sequences (what the maps are
    built from) and the held-out sequences' layer inputs (what candidates are judged on)."""

    stats: LayerStats
    heldout: HeldOut


@dataclass
class Calibration:
    layers: list[LayerCalibration]
    tokens: int            # fitting tokens
    heldout_tokens: int    # tokens the candidates are judged on
    heldout_separate: bool  # False: too little text to hold any out (judged in-sample)


def heldout_split(n_seqs: int) -> int:
    """How many of n calibration sequences are held out: a quarter, at least one (none
    when there is a single sequence)."""
    return 0 if n_seqs < 2 else max(1, n_seqs // 4)


def collect_stats(ckpt: Checkpoint, lay: AttnLayout, text: str, n_seqs: int, seq_len: int,
                  seed: int = 0, progress: bool = True) -> Calibration:
    """Per-layer key/value/query second moments of `ckpt` on most of the calibration
    sequences, and the layer inputs of the rest (held out for judging conversions)."""
    try:
        cal = LayerwiseCalibrator(ckpt, text, n_seqs=n_seqs, seq_len=seq_len,
                                  max_rows=n_seqs * seq_len, seed=seed)
    except CalibrationUnavailable as e:
        raise DeltaDQError(f"cannot run {ckpt.path} on calibration text: {e}",
                           "pass a model directory with its tokenizer files, or use "
                           "--method meanpool (needs no calibration)") from None
    n, t = cal.input_ids.shape
    n_ho = heldout_split(n)
    out = []
    for i in tqdm(range(lay.layers), desc="calibrate", unit="layer", disable=not progress,
                  file=sys.stderr):
        # every row is kept (max_rows = all tokens), in sequence order
        x = cal.inputs_for_layer(i)[lay.name(i, "k_proj.weight")].view(n, t, -1)
        cos, sin = (e[0].double() for e in cal.position_embeddings)
        acc = StatsAccumulator(lay.heads, lay.kv_heads, lay.head_dim)
        proj = [_projection(ckpt, lay, i, r) for r in ("q_proj", "k_proj", "v_proj")]
        for seqs in torch.split(x[: n - n_ho].double(), max(1, 4096 // t)):
            acc.add(*(p(seqs) for p in proj), *((cos, sin) if lay.rope else (None, None)))
        held = HeldOut(x[n - n_ho:] if n_ho else x, cos, sin)
        out.append(LayerCalibration(acc.finish(ckpt.get(lay.name(i, "o_proj.weight"))), held))
    return Calibration(out, (n - n_ho) * t, (n_ho or n) * t, n_ho > 0)


def layer_weights(ckpt: Checkpoint, lay: AttnLayout, layer: int) -> AttnWeights:
    """One layer's attention projections, float64."""
    def get(role):
        name = lay.name(layer, role)
        return ckpt.get(name).double() if name in ckpt.tensors else None
    return AttnWeights(get("q_proj.weight"), get("k_proj.weight"), get("v_proj.weight"),
                       get("o_proj.weight"), get("q_proj.bias"), get("k_proj.bias"),
                       get("v_proj.bias"))


def weight_only_stats(ckpt: Checkpoint, lay: AttnLayout, layer: int) -> LayerStats:
    """Statistics for methods that need no calibration (meanpool): the o_proj metric only."""
    acc = StatsAccumulator(lay.heads, lay.kv_heads, lay.head_dim)
    return acc.finish(ckpt.get(lay.name(layer, "o_proj.weight")))
