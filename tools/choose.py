"""Per-matrix decisions of `deltadq compress`: what each matrix is measured on, which method
stores it, and whether storing it is safe at all.

* Calibration: a linear layer (and the LM head, and a tied embedding, which *is* the LM
  head) is judged on its real inputs, one calibration row in HOLD_EVERY held out; the rest
  are what calibrated values are solved on. An untied embedding's output is its row, so it
  is judged by weight error over every row: rows the calibration text never touches count
  as much as the ones it does.
* Method: for the embedding and the LM head (vocab x hidden, where a fine-tune's change is
  often concentrated in few directions), low-rank at the same bytes is tried too, and the
  one with the smaller error is stored; the manifest entry then names its `method`. Where
  the method's encoding is worse than no delta and rank 1 needs up to LOWRANK_STRETCH
  times the share, rank 1 is stored and the matrices after it pay (a tied embedding goes
  first: compress_plan.order_plans).
* Safety: a matrix whose relative output error is >= UNSAFE_ERROR on held-out rows would
  move the model further from the fine-tune than storing nothing; compress drops it (its
  bytes flow to the rest), and the summary and `inspect` say so, with an estimate of the
  ratio at which it would become safe.
"""

from __future__ import annotations

import math

from .methods import (COMPRESSORS, MIN_GAIN, Calibration, Choice, UnfitError,  # noqa: F401
                      lowrank_bytes_per_rank)

UNSAFE_ERROR = 1.0
# --unsafe rules (is_unsafe): "output" (default): the stored delta's error on held-out rows
# is >= UNSAFE_OUTPUT_ERROR times the fine-tuned layer's own output there, i.e. the layer's
# output is swamped by the compression noise; "delta" (before): relative to the delta's own
# output (>= UNSAFE_ERROR: worse than no delta *for this matrix alone*; at high ratios the
# unbiased dropout noise of every matrix is above that and averages out at network level,
# so this rule drops matrices that carry the task); "keep": never drop (still reported).
UNSAFE_MODES = ("output", "delta", "keep")
UNSAFE_OUTPUT_ERROR = 1.0
LOWRANK_CLASSES = ("embedding", "lm_head")
CHOOSING_METHODS = ("deltadq", "dare")
# low-rank is tried up to this size (SmolLM2's 49152 x 576 LM head: yes; a 7B model's
# 32000 x 4096: no, a randomized SVD of it would cost more than compressing a layer)
LOWRANK_TRY_ELEMENTS = 1 << 26
# A tied embedding (compressed first) whose method encoding is worse than no delta at its
# share may take up to this many times the share for low-rank's rank 1 (choose). Measured
# on SmolLM2-135M's real fine-tunes at 1024x (share ~52 KB, rank 1 99 KB): deltadq's
# encoding had relative error 6-8 in the embedding rows' role (its 1-2 bit codes, rescaled
# by g/k ~ 72-144, swamp the rows), rank 1 0.5-0.7; whole-model KL / top-1 agreement with
# the fine-tune on the check text mix-heavy 0.223 / 0.718 -> 0.101 / 0.824 (base 0.253 /
# 0.733), arith-light 0.055 / 0.858 -> 0.036 / 0.894 (base 0.095 / 0.863). At 2048x
# (share ~26 KB: 3.8x) rank 1 took 76% of the artifact and starved the layers: mix-heavy
# 0.230 -> 0.332 (refused by the check), so the stretch stops at 2x
LOWRANK_STRETCH = 2.0


def tied_embedding(ft, plans) -> bool:
    """The fine-tune ties its LM head to the embedding (no lm_head tensor of its own)."""
    if not (ft.config or {}).get("tie_word_embeddings"):
        return False
    return not any(p.cls == "lm_head" for p in plans)


def calibration_for(p, calibrator, layer_inputs, tied: bool, factors_cache) -> Calibration:
    if calibrator is None:
        return Calibration()
    if p.cls == "embedding" and not tied:
        return Calibration()  # weight error over every row (the output *is* the row)
    numel = math.prod(p.base_rows)
    block = getattr(calibrator, "hold_block", 1)   # whole passages held out
    if p.cls in ("lm_head", "embedding"):
        # a tied embedding is the LM head AND the input embedding: judged on both roles
        return Calibration.split(calibrator.final_inputs(), factors_cache=factors_cache,
                                 numel=numel, input_rows=p.cls == "embedding",
                                 hold_block=block)
    x = layer_inputs.get(p.name)
    if x is None:
        return Calibration()
    return Calibration.split(x, factors_cache=factors_cache, numel=numel, hold_block=block)


def choose(opt, p, delta, calib, share, topts, seed, room: float | None = None) -> Choice:
    """The method's encoding, or low-rank where it is clearly better (embedding, LM head).

    `room`: the bytes the rest of the budget still has (this matrix's share included).
    Where the method's encoding at the share is worse than no delta (relative error >= 1
    in one of the matrix's roles) and low-rank's smallest encoding (rank 1) does not fit
    the share but fits LOWRANK_STRETCH times it (and the room), rank 1 is stored if it is
    below that error: the matrices after it pay the difference."""
    choice = COMPRESSORS[opt.method](p.name, delta, calib, share, topts, seed)
    if (opt.choose_method and share is not None and p.cls in LOWRANK_CLASSES
            and opt.method in CHOOSING_METHODS and delta.numel() <= LOWRANK_TRY_ELEMENTS):
        try:
            lr = COMPRESSORS["lowrank"](p.name, delta, calib, share, topts, seed)
        except UnfitError:
            rank1 = float(lowrank_bytes_per_rank(delta.shape))
            if not (choice.error >= UNSAFE_ERROR and room is not None
                    and rank1 <= min(room, LOWRANK_STRETCH * share)):
                return choice
            lr = COMPRESSORS["lowrank"](p.name, delta, calib, rank1, topts, seed)
            if lr.error >= min(choice.error, UNSAFE_ERROR):
                return choice
        if lr.error < choice.error:
            lr.method = "lowrank"
            lr.plain_error = choice.error  # what the artifact's method reached here
            return lr
    return choice


def output_error(calib, delta, w_ft, error: float, enc=None) -> float:
    """The choice's error relative to the fine-tuned layer's output (not the delta's) on the
    same held-out rows: error * |X delta| / |X W_ft|. A tied embedding (calib.input_rows,
    `enc` given): the worse of its roles, the LM head's output and the embedding rows
    themselves (|diff| / |W_ft|)."""
    if calib.input_rows and enc is not None:
        from deltadq_vllm.format.layouts import decode
        diff = delta.float() - decode(enc).float()
        return max(calib.role_errors(delta, diff, w_ft).values())
    ref_delta = calib.output_norm2(delta) ** 0.5
    ref_full = calib.output_norm2(w_ft) ** 0.5
    if ref_full <= 0:
        return error if ref_delta > 0 else 0.0
    return error * ref_delta / ref_full


def is_unsafe(rule: str, error: float, out_error: float) -> bool:
    if rule == "delta":
        return error >= UNSAFE_ERROR
    if rule == "output":
        return out_error >= UNSAFE_OUTPUT_ERROR
    return False


UNSAFE_RULE_TEXT = {
    "delta": "relative output error >= 1: worse than no delta for the matrix alone",
    "output": "error >= the fine-tuned layer's own output on held-out calibration rows",
}


def unsafe_reason(rule: str, error: float, out_error: float) -> str:
    if rule == "delta":
        return f"relative output error {error:.3f} >= {UNSAFE_ERROR:g} (worse than no delta)"
    return (f"output error {out_error:.3f} of the fine-tuned layer's output >= "
            f"{UNSAFE_OUTPUT_ERROR:g} (the layer's output swamped by compression noise)")


def choice_summary(choice: Choice | None) -> dict:
    if choice is None:
        return {}
    out = {"values": choice.values}
    if choice.plain_error is not None:
        out["plain_error"] = choice.plain_error
    if choice.method:
        out["method"] = choice.method
    if choice.width_rule:
        out["width_rule"] = True
    return out


def bytes_multiplier(opt, name, delta, calib, share, topts, seed, w_ft) -> int | None:
    """The smallest 2^m (m = 1..6) such that the matrix, given 2^m times `share` bytes, is
    safe by opt.unsafe's rule; None if 64x its share is not enough."""
    for m in range(1, 7):
        try:
            c = COMPRESSORS[opt.method](name, delta, calib, share * 2 ** m, topts, seed)
        except UnfitError:
            continue
        if not is_unsafe(opt.unsafe, c.error, output_error(calib, delta, w_ft, c.error, c.enc)):
            return 2 ** m
    return None


def safe_ratio(ratio, unsafe) -> float | None:
    """Estimate of the highest ratio at which no matrix dropped as unsafe would be: every
    such matrix with the bytes it needed (the rest of the artifact as it is)."""
    if not unsafe or ratio is None:
        return None
    need = [u.get("bytes_multiplier") for u in unsafe]
    if any(n is None for n in need):
        return None
    return ratio / max(need)
