"""GPU validation in one command, for a machine with a CUDA GPU and no vLLM (no network needed).

    bash benchmarks/gpu/run.sh [--budget-s 480] [--only sweep,stack] [--quick]

(`run.sh` makes the package importable without installing it, then runs this file.) Stages,
each a subprocess with its own time limit, so one failure or device fault does not stop the
others; every stage appends to its own JSON under benchmarks/results/gpu/ (and $OUT/ when
set, with a tarball of everything), and the last lines printed are a summary table:

  env     device name, capability, clocks, torch/Triton versions; measured ceilings: device
          copy bandwidth (read + write) and a bf16 GEMM rate (8192^3, random data)
  sweep   kernel correctness on CUDA: random configurations vs the float64 reference within
          derived rounding bounds (benchmarks/gpu/kernel_sweep.py)
  tune    the kernel tuner for 7B/8B shapes (python -m deltadq_vllm.kernels.tune): writes the
          config table the launcher reads (no autotuning while serving)
  bench   benchmarks/kernels/bench_gpu.py with that table: delta time / byte floor for T <= 16
          and N = 1..32 at 16x-128x, vs dense bf16 deltas, vs the base GEMM
  stack   benchmarks/gpu/layer_stack.py: a 7B-shaped layer stack with delta layers under one
          CUDA graph per T replayed with changing slot maps (== eager), and the decode-step
          time of base alone vs base + N distinct deltas
Stage budgets scale with --budget-s; a stage that runs out of time is killed and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "gpu"
PY = sys.executable

# name -> (share of the budget, argv builder)
STAGES = ["env", "sweep", "tune", "bench", "stack"]
SHARES = {"env": 0.04, "sweep": 0.14, "tune": 0.36, "bench": 0.26, "stack": 0.20}


def env_stage(out: Path) -> dict:
    """Device facts and the two measured ceilings."""
    import torch

    res: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0],
                 "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    try:
        res["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
             "clocks.mem,power.draw,power.limit,temperature.gpu", "--format=csv"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        res["nvidia_smi"] = f"unavailable: {e}"
    if not torch.cuda.is_available():
        return res
    p = torch.cuda.get_device_properties(0)
    res.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
               memory_GiB=round(p.total_memory / 2 ** 30, 1),
               l2_MiB=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1), cuda=torch.version.cuda)

    def timed(fn, reps):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return sorted(ts)[len(ts) // 2]

    n = 1024 * 2 ** 20  # 4 GiB of fp32
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), 10)
    res["copy_bandwidth_GBps"] = 2 * n * 4 / t / 1e9
    assert torch.equal(a[-1000:], b[-1000:])
    del a, b
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: x @ w, 10)
    res["bf16_gemm_TFLOPs"] = 2 * m ** 3 / t / 1e12
    del x, w
    torch.cuda.empty_cache()
    return res


def stage_argv(name: str, budget: float, args) -> list[str] | None:
    gpu = RESULTS
    smoke = ["--smoke"] if args.smoke else []
    if name == "sweep":
        return [PY, str(ROOT / "benchmarks/gpu/kernel_sweep.py"), "--budget-s", str(max(20, budget - 25)),
                "--out", str(gpu / "kernel_sweep.json")] + smoke
    if name == "tune":
        return [PY, "-m", "deltadq_vllm.kernels.tune", "--out", str(gpu / "tuned_table.json"),
                "--preset", args.tune_preset, "--ratios", args.tune_ratios,
                "--variants", args.tune_variants, "--tokens", args.tune_tokens,
                "--budget-s", str(max(30, budget - 20))] + smoke + (
                    ["--merge-into", str(ROOT / args.tune_merge_into)] if args.tune_merge_into else [])
    if name == "bench":
        argv = [PY, str(ROOT / "benchmarks/kernels/bench_gpu.py"), "--out", "../gpu/bench_gpu.json",
                "--variant", args.bench_variants, "--reps", "20"] + smoke
        if not args.smoke:
            argv += ["--shapes", args.bench_shapes, "--ratios", args.bench_ratios,
                     "--T", args.bench_T, "--N", args.bench_N]
        if args.kernel_table and (gpu / "tuned_table.json").exists():
            argv += ["--config-table", str(gpu / "tuned_table.json")]
        return argv
    if name == "stack":
        argv = [PY, str(ROOT / "benchmarks/gpu/layer_stack.py"), "--out", str(gpu / "layer_stack.json"),
                "--tokens", args.stack_T, "--N", args.stack_N] + smoke
        if args.quick:
            argv += ["--layers", "8"]
        return argv
    return None


def run_stage(name: str, argv: list[str], budget: float, log) -> dict:
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if name in ("bench", "stack") and (RESULTS / "tuned_table.json").exists():
        env["DELTADQ_KERNEL_CONFIGS"] = str(RESULTS / "tuned_table.json")  # what was just tuned
    print(f"\n=== stage {name} (limit {budget:.0f} s): {' '.join(argv[1:])}", flush=True)
    log.write(f"\n=== stage {name}: {' '.join(argv)}\n")
    log.flush()
    # cwd outside the repo: `python -m` must import the package from PYTHONPATH (run.sh's
    # shim or the installed package), not the bare deltadq_vllm/ folder of the checkout
    proc = subprocess.Popen(argv, cwd=str(RESULTS), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    killed = threading.Event()

    def kill():  # the stage's time limit: kill it even while it prints nothing
        killed.set()
        proc.kill()

    timer = threading.Timer(budget, kill)
    timer.start()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail = (tail + [line.rstrip()])[-30:]
        proc.wait()
    finally:
        timer.cancel()
    timed_out = killed.is_set()
    log.flush()
    rc = proc.returncode
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.time() - t0, 1), "tail": tail[-12:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=480.0, help="all stages together")
    ap.add_argument("--only", default=",".join(STAGES), help="comma-separated stages")
    ap.add_argument("--quick", action="store_true", help="smaller stack")
    ap.add_argument("--tune-preset", default="7b,8b")
    ap.add_argument("--tune-ratios", default="16,64")
    ap.add_argument("--bench-shapes", default="q/o 4096x4096,gate_up 4096->2x11008,down 11008->4096")
    ap.add_argument("--bench-ratios", default="16,64,128")
    ap.add_argument("--bench-T", default="1,4,16")
    ap.add_argument("--bench-N", default="1,4,16")
    ap.add_argument("--stack-T", default="16,1")
    ap.add_argument("--stack-N", default="0,1,4,8,16")
    ap.add_argument("--tune-variants", default="v4,v3")
    ap.add_argument("--tune-tokens", default="1,2,4,8,16,32,64,128,256,512")
    ap.add_argument("--tune-merge-into", default=None,
                    help="also merge the tuned entries into this table (repo-relative), e.g. "
                         "kernels/configs/NVIDIA_H200.json")
    ap.add_argument("--bench-variants", default="v4,v3")
    ap.add_argument("--smoke", action="store_true",
                    help="every stage in its tiny CPU mode (TRITON_INTERPRET=1): checks the flow")
    ap.add_argument("--no-kernel-table", dest="kernel_table", action="store_false")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    only = [s for s in args.only.split(",") if s]
    total_share = sum(SHARES[s] for s in only) or 1.0
    summary: dict = {"stages": {}}
    with open(RESULTS / "validate.log", "a") as log:
        for name in only:
            left = args.budget_s - (time.time() - t_start)
            budget = min(left, args.budget_s * SHARES[name] / total_share)
            if budget < 10:
                summary["stages"][name] = {"skipped": "no time left"}
                continue
            if name == "env":
                t0 = time.time()
                try:
                    summary["env"] = env_stage(RESULTS)
                    summary["stages"]["env"] = {"rc": 0, "seconds": round(time.time() - t0, 1)}
                except Exception as e:  # noqa: BLE001
                    summary["stages"]["env"] = {"rc": 1, "error": repr(e)}
                print("env:", json.dumps(summary.get("env"), default=str), flush=True)
                continue
            argv_ = stage_argv(name, budget, args)
            summary["stages"][name] = run_stage(name, argv_, budget, log)
            (RESULTS / "validate.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["seconds"] = round(time.time() - t_start, 1)
    (RESULTS / "validate.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n=== summary")
    env = summary.get("env", {})
    print(f"device {env.get('gpu')} (cc {env.get('capability')}), torch {env.get('torch')}, "
          f"triton {env.get('triton')}; copy {env.get('copy_bandwidth_GBps', 0):.0f} GB/s, "
          f"bf16 GEMM {env.get('bf16_gemm_TFLOPs', 0):.0f} TFLOP/s")
    for name, st in summary["stages"].items():
        print(f"  {name:6} rc={st.get('rc')} {'TIMED OUT ' if st.get('timed_out') else ''}"
              f"{st.get('seconds', '')}s {st.get('skipped', '')}")
    out = os.environ.get("OUT")
    if out:
        with tarfile.open(Path(out) / "gpu_results.tgz", "w:gz") as tar:
            tar.add(RESULTS, arcname="gpu")
            cfg = ROOT / "kernels" / "configs"
            if cfg.exists():
                tar.add(cfg, arcname="kernel_configs")
        shutil.copy(RESULTS / "validate.json", Path(out) / "validate.json")
    bad = [n for n, st in summary["stages"].items() if st.get("rc") not in (0, None)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
