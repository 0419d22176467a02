"""`deltadq compress`'s options: what the user can ask for, checked before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass

from deltadq_vllm.errors import DeltaDQError

from .budget import BUDGET_MODES
from .check_publish import CHECK_MODES
from .choose import MIN_GAIN, UNSAFE_MODES
from .methods import METHODS

DEFAULT_RATIO = 16.0
DENSE_DTYPES = ("auto", "float32", "bfloat16", "int8", "int4", "int2")
QUANT_RANGES = ("auto", "search", "minmax")
# Measured through the server on real SmolLM2 fine-tunes (benchmarks/README.md): the range
# search keeps a heavy fine-tune's accuracy at 1024-2048x (91% / 88% vs 15% / 0% with
# min-max ranges) but costs a few points at 16-256x (95% vs 98%), where it trades 2-4 bit
# codes for 1-bit ones. "auto" uses it from this target ratio up.
AUTO_SEARCH_RATIO = 512.0


def resolve_quant_range(mode: str, ratio: float | None) -> str:
    if mode != "auto":
        return mode
    return "search" if ratio is not None and ratio >= AUTO_SEARCH_RATIO else "minmax"


@dataclass
class CompressOptions:
    method: str = "deltadq"
    ratio: float | None = None
    group_size: int | None = None
    bits: int | None = None
    decompose_bits: int = 0
    keep: float | None = None
    seed: int = 0
    calibration: str | None = None
    calib_seqs: int = 8
    calib_seq_len: int = 128
    dense_dtype: str = "auto"
    tp_align: int = 8
    quant_range: str = "auto"         # "search", "minmax", or "auto" (resolve_quant_range)
    reuse_calibration: bool = False   # keep the base's calibration for later calls (sweeps)
    # solve kept values on calibration inputs (tools/refine.py; --values calibrated). Off by
    # default: on the real SmolLM2 fine-tunes they kept no more of the task than plain
    # values and were further from the fine-tune on held-out text in 11 of 13 artifacts
    # (16x, several seeds; from 64x hardly any calibrated set is stored), for ~1.5x the
    # compress time at 16x (benchmarks/README.md, "Plain values by default")
    calibrated: bool = False
    calibrate_on: str = "finetune"    # "finetune" or "base": whose layer inputs are X
    choose_method: bool = True        # embedding / LM head: low-rank when it beats the method
    budget: str = "share"             # "share" (element count) or "sensitivity" (probe pass,
                                      # tools/budget.py; loses a narrow task, docs/compression.md)
    min_gain: float = MIN_GAIN        # refined values must keep this much of the delta (refine.py)
    plain_gain: float = 0.0           # clipped plain values raised to carry this much (0: off)
    width_rule: bool = True           # where no bit width beats zero, widths that keep the
                                      # delta first (method_base.WIDTH_MIN_GAIN); compress()
                                      # retries without it where the check refuses the result
    unsafe: str = "output"            # which matrices are dropped as unsafe (choose.is_unsafe)
    check: str = "fail"               # whole-model check (tools/model_check.py): fail/warn/off
    check_text: str | None = None     # its held-out text (None: builtin check.txt)
    force: bool = False
    progress: bool = True


def validate_options(opt: CompressOptions) -> None:
    if opt.method not in METHODS:
        raise DeltaDQError(f"unknown method {opt.method!r}",
                           f"choose one of: {', '.join(METHODS)}")
    if opt.ratio is not None and not (opt.ratio > 1 and math.isfinite(opt.ratio)):
        raise DeltaDQError(f"--ratio must be a number > 1, got {opt.ratio}",
                           "pass e.g. --ratio 16")
    if opt.bits is not None and not 1 <= opt.bits <= 8:
        raise DeltaDQError(f"--bits must be in [1, 8], got {opt.bits}", "pass e.g. --bits 4")
    if opt.quant_range not in QUANT_RANGES:
        raise DeltaDQError(f"--quant-range {opt.quant_range!r} is not one of "
                           f"{', '.join(QUANT_RANGES)}", "use --quant-range auto (default), "
                           "search or minmax")
    if opt.decompose_bits and opt.method != "deltadq":
        raise DeltaDQError("--decompose-bits applies to --method deltadq only",
                           "drop --decompose-bits or use --method deltadq")
    if opt.decompose_bits < 0 or (opt.bits is not None and opt.decompose_bits > opt.bits):
        raise DeltaDQError(f"--decompose-bits {opt.decompose_bits} must be in [0, --bits]",
                           "pass a value between 0 and the number of bits")
    if opt.group_size is not None and opt.group_size < 1:
        raise DeltaDQError("--group-size must be 'auto' or a positive integer",
                           "pass --group-size auto")
    if opt.tp_align < 1:
        raise DeltaDQError(f"--tp-align must be >= 1, got {opt.tp_align}", "pass --tp-align 8")
    if opt.keep is not None and not 0 < opt.keep <= 1:
        raise DeltaDQError(f"--keep must be in (0, 1], got {opt.keep}", "pass e.g. --keep 0.125")
    if opt.method == "dense" and opt.ratio is not None:
        raise DeltaDQError("--method dense stores the exact delta and cannot meet a --ratio",
                           "drop --ratio, or choose a compressing --method")
    if opt.keep is not None and opt.ratio is not None:
        raise DeltaDQError("--keep and --ratio both set the sparsity",
                           "pass only one of --keep and --ratio")
    if opt.budget not in BUDGET_MODES:
        raise DeltaDQError(f"--budget {opt.budget!r} is not one of {', '.join(BUDGET_MODES)}",
                           "use --budget share (default) or sensitivity")
    if opt.unsafe not in UNSAFE_MODES:
        raise DeltaDQError(f"--unsafe {opt.unsafe!r} is not one of {', '.join(UNSAFE_MODES)}",
                           "use --unsafe output (default), delta or keep")
    if not 0 <= opt.plain_gain <= 1:
        raise DeltaDQError(f"--plain-gain must be in [0, 1], got {opt.plain_gain}",
                           "use 0 (off, the default) or e.g. 0.9")
    if not 0 <= opt.min_gain <= 1:
        raise DeltaDQError(f"--min-gain must be in [0, 1], got {opt.min_gain}",
                           f"pass --min-gain {MIN_GAIN:g} (default) or 0 (choose values by "
                           "error alone)")
    if opt.check not in CHECK_MODES:
        raise DeltaDQError(f"--check {opt.check!r} is not one of {', '.join(CHECK_MODES)}",
                           "use --check fail (default), warn or off")
    if opt.dense_dtype not in DENSE_DTYPES:
        raise DeltaDQError(f"--dense-dtype must be one of {', '.join(DENSE_DTYPES)}",
                           "pass --dense-dtype auto")


def checks_model(opt: CompressOptions) -> bool:
    """Whether compress() runs the whole-model check (the exact `dense` delta needs none)."""
    return opt.check != "off" and opt.method != "dense"
