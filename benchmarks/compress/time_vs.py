"""Compress time of this checkout against another version of the compressor, interleaved.

    .venv/bin/python benchmarks/compress/time_vs.py --against a8a8d85 --ratios 16,256,1024 \\
        [--finetune arith-light] [--rounds 3] [--tag s21]

Issue #13's "compress time <= 2x today's at equal ratio": the full default command of each
version (`deltadq compress --base B --finetune F --out O --ratio R --json`) on a real
SmolLM2 fine-tune (benchmarks/finetunes/build.py), one process per run, the two versions
alternating within each round and ratio (so a slow spell of a shared machine hits both),
`OMP_NUM_THREADS=2`. The other version runs from a git worktree (made once under
<cache>/time-vs/<rev>, with links to the package's `tools` and `kernels` as the installed
layout has them) with `python -P`, so this checkout's package is not imported in its place.
Recorded per run: wall seconds, the child's user and system CPU seconds, the command's own
peak RSS (its --json summary; versions without one: the child's ru_maxrss), the load average
before it, the time it ended (utc). Printed: per ratio the medians and their ratio. JSON:
benchmarks/results/compress_time-<tag>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "finetunes"))
import build as FT  # noqa: E402  (benchmarks/finetunes/build.py: cache paths)
from timed import run_timed  # noqa: E402

CLI = "import sys; from deltadq_vllm.cli import main; sys.exit(main(sys.argv[1:]))"


def worktree(rev: str) -> Path:
    """A checkout of `rev` laid out as the installed package is (deltadq_vllm.tools and
    deltadq_vllm.kernels are the repository's top-level folders)."""
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = FT.cache_root() / "time-vs" / sha[:12]
    if not (path / "deltadq_vllm").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT,
                       check=True, capture_output=True)
        for sub in ("tools", "kernels"):
            link = path / "deltadq_vllm" / sub
            if not link.exists():
                link.symlink_to(Path("..") / sub)
    return path


def run_once(code: Path | None, ft: str, ratio: int, out: Path) -> dict:
    """One `deltadq compress` of `code` (None: this checkout's installed package)."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["compress", "--base", str(FT.base_dir()), "--finetune", str(FT.finetune_dir(ft)),
            "--out", str(out), "--ratio", str(ratio), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    if code is None:
        cmd = [sys.executable, "-c", CLI, *args]
    else:
        cmd = [sys.executable, "-P", "-c", CLI, *args]
        env["PYTHONPATH"] = str(code)
    load = os.getloadavg()[0]
    p, t = run_timed(cmd, env)
    rec = {"wall_s": round(t["wall_s"], 2), "user_s": round(t["user_s"], 2),
           "sys_s": round(t["sys_s"], 2), "load_before": round(load, 2),
           "utc": f"{dt.datetime.now(dt.timezone.utc):%H:%M:%S}",   # (when it ended)
           "returncode": p.returncode}
    if p.returncode != 0:
        rec["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        return rec
    try:
        s = json.loads(p.stdout)
        rec["peak_rss_mb"] = s.get("peak_rss_mb")
        rec["true_ratio"] = s.get("true_ratio")
    except json.JSONDecodeError:
        pass
    if rec.get("peak_rss_mb") is None:   # (ru_maxrss: the largest child so far, an upper bound)
        rec["peak_rss_mb_upper"] = round(t["children_maxrss_kb"] / 1024, 1)
    shutil.rmtree(out, ignore_errors=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", required=True, help="git revision of the other version")
    ap.add_argument("--ratios", default="16,256,1024", help="comma list of --ratio values")
    ap.add_argument("--finetune", default="arith-light")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default=None, help="results file tag (default: today's date)")
    args = ap.parse_args(argv)
    import torch

    other = worktree(args.against)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    scratch = FT.cache_root() / "time-vs" / "out"
    ratios = [int(r) for r in args.ratios.split(",")]
    rows = []
    for rnd in range(args.rounds):
        for ratio in ratios:
            # (the order alternates between rounds: neither version always runs first)
            order = [("this", None), ("other", other)]
            for name, code in (order if rnd % 2 == 0 else order[::-1]):
                rec = run_once(code, args.finetune, ratio, scratch)
                rec.update(code=name, ratio=ratio, round=rnd + 1)
                rows.append(rec)
                print(f"[{rec['utc']}] round {rnd + 1} {ratio}x {name}: {rec['wall_s']} s, "
                      f"peak {rec.get('peak_rss_mb')} MB"
                      + (f" ERROR {rec['error']}" if "error" in rec else ""), flush=True)
    summary = []
    print(f"\n| ratio | {args.against} (median s) | {head} (median s) | ratio | peak RSS MB |")
    print("|---|---|---|---|---|")
    for ratio in ratios:
        def med(code, key="wall_s"):
            v = [r[key] for r in rows if r["ratio"] == ratio and r["code"] == code
                 and r.get(key) is not None and "error" not in r]
            return statistics.median(v) if v else None
        a, b = med("other"), med("this")
        summary.append({"ratio": ratio, "other_median_s": a, "this_median_s": b,
                        "this_over_other": round(b / a, 3) if a and b else None,
                        "this_peak_rss_mb_median": med("this", "peak_rss_mb"),
                        "other_peak_rss_mb_median": med("other", "peak_rss_mb")})
        s = summary[-1]
        print(f"| {ratio} | {a:.1f} | {b:.1f} | {s['this_over_other']}x | "
              f"{s['other_peak_rss_mb_median']} / {s['this_peak_rss_mb_median']} |")
    tag = args.tag or f"{dt.datetime.now(dt.timezone.utc):%Y%m%d}"
    doc = {"what": "deltadq compress, full default command of each version (--ratio R, "
                   "--json), OMP_NUM_THREADS=2, versions alternating per ratio and round",
           "finetune": args.finetune, "this": head, "other": args.against,
           "machine": platform.machine(), "cpus": os.cpu_count(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "rows": rows, "summary": summary,
           "written": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"}
    out = ROOT / "benchmarks" / "results" / f"compress_time-{tag}.json"
    out.write_text(json.dumps(doc, indent=1))
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
