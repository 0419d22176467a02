"""Compress time and peak memory of the fidelity sweep's artifacts, each re-made alone by
the command a user runs.

    .venv/bin/python benchmarks/fidelity/compress_cost.py --finetunes arith-light,spell-heavy \\
        --ratios 16,64,256,1024,2048 [--methods deltadq,dare]
    .venv/bin/python benchmarks/fidelity/run.py --report ...   # the table shows them
    .venv/bin/python benchmarks/fidelity/compress_cost.py ... --tag T   # a later compressor:
        # results/compress_cost-T.json, the rows untouched

The sweep (run.py) compresses every row in one process that also holds the server client
and the base's recorded calibration, often beside other jobs: its times say little about one
compression and its peak is that process's. Here each cached artifact of the sweep's default
settings is made again by `deltadq compress` in a process of its own (the settings
sweep_deltas.make_delta passes: --ratio as the sweep passed it, --quant-range auto, --min-gain, --unsafe, --plain-gain, --check warn, the builtin
calibration and check texts), into a scratch directory, one row at a time, nothing else
started by this script alongside. The new artifact must be the cached one byte for byte (its
tensor files equal, its manifest equal once decompressed): only then are its numbers written
into the row (`compress_alone`: wall and CPU seconds of the whole command, imports and the
base's calibration included; the command's own peak RSS, its `--json` summary's VmHWM;
`peak_rss_scope` "alone"), so the table's compress time and peak RSS are those of the
artifact that was measured. A mismatch is recorded and the row's numbers left as they were.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "compress"))
from timed import run_timed  # noqa: E402  (benchmarks/compress/timed.py)
import sweep_common as C  # noqa: E402  (the sweep's settings, cache paths and row files)
from sweep_deltas import delta_dir, same_tensor_bytes  # noqa: E402


def cli_args(ft: str, method: str, ratio: float, out: Path) -> list[str]:
    """`deltadq compress` with the options sweep_deltas.make_delta passes for these settings
    (`ratio`: the --ratio it passed, above the row's target where its first try fell short)."""
    v = C.VALUES
    return ["compress", "--base", str(C.FT.base_dir()), "--finetune", str(C.FT.finetune_dir(ft)),
            "--out", str(out), "--method", method, "--ratio", f"{ratio:g}",
            "--quant-range", C.QUANT["range"], "--min-gain", str(v["min_gain"]),
            "--unsafe", v["unsafe"], "--plain-gain", str(v["plain_gain"]),
            "--check", C.CHECK["mode"], "--budget", "share", "--values", "plain",
            "--force", "--json", "--no-progress"]


def same_artifact(a: Path, b: Path) -> tuple[bool, str]:
    """(equal, what differs): every tensor file byte for byte, the manifests as JSON."""
    if not same_tensor_bytes(a, b):
        return False, "tensor files differ"
    ma, mb = (json.loads(gzip.decompress((p / "deltadq.json.gz").read_bytes())) for p in (a, b))
    if ma != mb:
        keys = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
        return False, f"manifests differ in {keys}"
    return True, ""


def run_alone(ft: str, method: str, ratio: int, scratch: Path) -> dict:
    out = scratch / f"{ft}-{method}-{ratio}"
    shutil.rmtree(out, ignore_errors=True)
    d = delta_dir(ft, method, ratio)
    passed = json.loads((d.parent / f"{d.name}.json").read_text()).get("ratio_passed") or ratio
    cmd = [str(Path(sys.executable).parent / "deltadq"), *cli_args(ft, method, passed, out)]
    proc, t = run_timed(cmd)
    rec = {"command": "deltadq " + " ".join(cmd[1:]).replace(str(out), "OUT"),
           "returncode": proc.returncode, "seconds": round(t["wall_s"], 1),
           "cpu_seconds": round(t["user_s"] + t["sys_s"], 1),
           "cpu_capability": C.cpu_capability(), "torch_threads_env":
           os.environ.get("OMP_NUM_THREADS", "default"), "load_average_after": os.getloadavg(),
           "measured": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"}
    if proc.returncode != 0:
        rec["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return rec
    summary = json.loads(proc.stdout)
    rec["peak_rss_mb"] = summary.get("peak_rss_mb")
    rec["summary_seconds"] = summary.get("seconds")
    rec["identical"], rec["difference"] = same_artifact(out, d)
    shutil.rmtree(out, ignore_errors=True)
    return rec


def row_files(ft: str, artifact: str) -> list[Path]:
    """The sweep's measured rows of the artifact named `artifact`: every --n-eval, --n-text
    and serving dtype (the compression is the same for all)."""
    return sorted((C.FT.cache_root() / "fidelity" / "rows" / ft).glob(f"{artifact}-n*.json"))


def record(ft: str, method: str, ratio: int, rec: dict) -> None:
    """The measurement into the artifact's summary and the sweep's rows (each keeps what
    the sweep measured under `compress_seconds_sweep` / `peak_rss_mb_sweep`)."""
    d = delta_dir(ft, method, ratio)
    for path in [d.parent / f"{d.name}.json", *row_files(ft, d.name)]:
        s = json.loads(path.read_text())
        if s.get("compress_alone") == rec:
            continue
        s["compress_alone"] = rec
        if rec.get("identical"):
            for k in ("compress_seconds", "peak_rss_mb", "peak_rss_scope"):
                if k in s and f"{k}_sweep" not in s:
                    s[f"{k}_sweep"] = s[k]
            s["compress_seconds"] = rec["seconds"]
            s["peak_rss_mb"] = rec["peak_rss_mb"]
            s["peak_rss_scope"] = "alone"
        else:   # (the sweep's own numbers stand: a mismatch says nothing of this one's cost)
            for k in ("compress_seconds", "peak_rss_mb", "peak_rss_scope"):
                if f"{k}_sweep" in s:
                    s[k] = s.pop(f"{k}_sweep")
        C._write_json(path, s)


def commit_of_checkout() -> str:
    """HEAD's short hash, "+dirty" where tracked package files (deltadq_vllm/, tools/,
    kernels/) differ from it."""
    import subprocess

    root = HERE.parent.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            "deltadq_vllm", "tools", "kernels"],
                           cwd=root, capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def write_tagged(tag: str, row: dict) -> Path:
    """Add `row` (this checkout's measurement of one artifact, beside the sweep row's earlier
    one, `before`) to benchmarks/results/compress_cost-<tag>.json, replacing an earlier
    measurement of the same artifact there."""
    path = HERE.parent / "results" / f"compress_cost-{tag}.json"
    key = ("finetune", "method", "ratio")
    old = json.loads(path.read_text()).get("rows", []) if path.exists() else []
    rows = [r for r in old if any(r.get(k) != row[k] for k in key)] + [row]
    C._write_json(path, {"what": "deltadq compress of the fidelity sweep's artifacts, each "
                                 "alone (compress_cost.py --tag); `commit`: the package's",
                         "cpu_capability": C.cpu_capability(), "rows": rows})
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetunes", required=True, help="comma list")
    ap.add_argument("--ratios", required=True, help="comma list")
    ap.add_argument("--methods", default="deltadq,dare")
    ap.add_argument("--scratch", default=None,
                    help="where the artifacts are re-made (default <cache>/compress-cost)")
    ap.add_argument("--redo", action="store_true", help="measure rows measured before")
    ap.add_argument("--tag", default=None,
                    help="measure every row again and write the numbers to "
                         "benchmarks/results/compress_cost-TAG.json only, leaving the rows "
                         "as they are (a later version of the compressor, timed on the same "
                         "artifacts: they must still come out byte for byte)")
    args = ap.parse_args(argv)
    scratch = Path(args.scratch or C.FT.cache_root() / "compress-cost")
    scratch.mkdir(parents=True, exist_ok=True)
    for ft in args.finetunes.split(","):
        for ratio in (int(r) for r in args.ratios.split(",")):
            for method in args.methods.split(","):
                d = delta_dir(ft, method, ratio)
                info = d.parent / f"{d.name}.json"
                if not d.exists() or not info.exists():
                    C.log(f"{ft} {method} {ratio}x: no cached artifact ({d.name}): skipped")
                    continue
                done = json.loads(info.read_text()).get("compress_alone")
                if done and not args.redo and args.tag is None:
                    record(ft, method, ratio, done)   # (rows measured since: given it too)
                    continue
                C.log(f"{ft} {method} {ratio}x: compressing alone")
                rec = run_alone(ft, method, ratio, scratch)
                if args.tag is None:
                    record(ft, method, ratio, rec)
                else:
                    write_tagged(args.tag, {"finetune": ft, "method": method, "ratio": ratio,
                                            "commit": commit_of_checkout(), "before": done,
                                            **rec})
                C.log(f"{ft} {method} {ratio}x: {rec['seconds']} s, peak RSS "
                      f"{rec.get('peak_rss_mb')} MB, identical {rec.get('identical')}"
                      + (f" ({rec['difference']})" if rec.get("difference") else "")
                      + (f" ERROR {rec['error']}" if rec.get("error") else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
