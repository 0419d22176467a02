"""Deterministic tiny-model fixtures: a tokenizer, trained base LMs and real fine-tunes.

Everything is generated locally (no model hub): a byte-level BPE tokenizer trained on a
generated corpus, three tiny base models (Llama GQA + tied embeddings, Llama MHA +
untied lm_head, Qwen2 with q/k/v biases) pre-trained for a few hundred steps, and
fine-tunes made by full AdamW training on small tasks (2-digit addition, upper-casing,
and an extended-vocabulary variant). Fine-tunes record their greedy accuracy on held-out
problems (and the base's) in `fixture_info.json`, so tests can check that a compressed
delta still carries the skill.

Fixtures are cached under `fixture_root()` = `$DELTADQ_FIXTURE_CACHE` (default
`~/.cache/deltadq-vllm/fixtures`) / `<spec-hash>`. The hash covers FIXTURE_VERSION and
every spec below, so changing a recipe rebuilds; bump FIXTURE_VERSION when changing
code that affects the output (corpus, tasks, training loop). Builds go to a temp dir
that is `os.replace`d into place under a per-fixture `flock`, so concurrent builders
(pytest-xdist workers, parallel CI jobs) never see or corrupt a half-written fixture.

`make_synthetic_pair` writes a large (~1 GB) random Llama base + fine-tune pair shard by
shard, for peak-RSS measurements of the compressor; it is not part of the cache.

CLI: python -m deltadq_vllm.tools.fixtures --out DIR [--only NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

FIXTURE_VERSION = 2
CACHE_ENV = "DELTADQ_FIXTURE_CACHE"
JOBS_ENV = "DELTADQ_FIXTURE_JOBS"
# One thread per build, parallel builds in processes instead: on a 2-core machine shared with
# other jobs, 2 OpenMP threads per tiny training step spin at barriers while the other
# thread is descheduled; measured here (load ~11, llama-gqa base, 60 steps): 1 thread 38 ms
# CPU per step, 2 threads 485 ms (13x the CPU, 14x the wall). Results depend on the thread
# count (reduction order), so it is part of the spec hash.
TRAIN_THREADS = 1
INFO_FILE = "fixture_info.json"
N_EVAL = 50

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# bos comes from the template: vLLM's chat endpoint tokenizes with add_special_tokens=False
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class TokenizerSpec:
    name: str = "tokenizer"
    vocab_size: int = 384
    corpus_lines: int = 4000
    seed: int = 0


@dataclass(frozen=True)
class BaseSpec:
    name: str
    arch: str  # "llama" | "qwen2"
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    tie_embeddings: bool = False
    max_positions: int = 1024
    steps: int = 300
    batch: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class FinetuneSpec:
    name: str
    base: str
    task: str  # key of TASKS
    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    seed: int = 1
    max_shard_size: str | None = None  # e.g. "400KB" to force a sharded checkpoint
    new_tokens: tuple[str, ...] = ()  # tokens added to the tokenizer (vocab grows)


TOKENIZER = TokenizerSpec()
BASES = {
    s.name: s for s in (
        BaseSpec("llama-gqa", "llama", heads=4, kv_heads=2, tie_embeddings=True, seed=10),
        BaseSpec("llama-mha", "llama", heads=4, kv_heads=4, tie_embeddings=False, seed=20),
        # 2 heads of 64 (head_dim 64 coverage), 1 KV head, wider MLP
        BaseSpec("qwen2", "qwen2", heads=2, kv_heads=1, intermediate=384, seed=30),
    )
}
FINETUNES = {
    s.name: s for s in (
        FinetuneSpec("llama-gqa--math", "llama-gqa", "math", seed=11),
        FinetuneSpec("llama-gqa--code", "llama-gqa", "code", seed=12),
        FinetuneSpec("llama-mha--math", "llama-mha", "math", seed=21, max_shard_size="400KB"),
        FinetuneSpec("llama-mha--code", "llama-mha", "code", seed=22),
        FinetuneSpec("llama-mha--ext", "llama-mha", "ext", seed=23,
                     new_tokens=("<calc>", "</calc>")),
        # longer at a lower lr: as accurate (math 1.0, code 0.98) and more compressible
        FinetuneSpec("qwen2--math", "qwen2", "math", steps=1200, lr=5e-4, seed=31),
        FinetuneSpec("qwen2--code", "qwen2", "code", steps=1200, lr=5e-4, seed=32),
        # the regime of real SFT deltas (relative norm ~0.005: Adam, low lr, few steps),
        # where Balanced Intermediate Results hold; too light to learn the task
        FinetuneSpec("llama-gqa--light", "llama-gqa", "math", steps=30, lr=1e-5, seed=41),
    )
}
FIXTURE_NAMES = (TOKENIZER.name, *BASES, *FINETUNES)


def spec_hash() -> str:
    """Short hash of the recipe: version + every spec, so any change gets a fresh cache dir."""
    payload = {
        "version": FIXTURE_VERSION,
        "threads": TRAIN_THREADS,
        "tokenizer": dataclasses.asdict(TOKENIZER),
        "bases": [dataclasses.asdict(s) for s in BASES.values()],
        "finetunes": [dataclasses.asdict(s) for s in FINETUNES.values()],
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------- corpus

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a small bird", "the old man",
             "the girl", "our team", "the farmer", "a young boy", "the king", "her sister"]
_VERBS = ["sees", "likes", "finds", "makes", "takes", "wants", "reads", "keeps", "brings",
          "paints", "opens", "counts"]
_OBJECTS = ["the ball", "a red apple", "the green door", "a long letter", "the map",
            "a warm coat", "the river", "two stones", "the blue box", "a big tree",
            "the garden", "a new song"]
_PLACES = ["in the park", "at home", "near the sea", "on the hill", "in the city",
           "at school", "under the bridge", "by the window"]
_WORDS = ["time", "water", "house", "light", "sound", "color", "paper", "music", "green",
          "river", "stone", "cloud", "north", "south", "winter", "summer", "number", "word"]
_CHAT = [("what color is the sky?", "the sky is blue."),
         ("say hello.", "hello there."),
         ("name an animal.", "a cat is an animal."),
         ("where is the river?", "the river is near the hill.")]


def _corpus_line(rng: random.Random) -> str:
    """One line of generic text: simple sentences, numbers, word lists, a little chat."""
    kind = rng.randrange(7)
    if kind <= 1:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.5:
            s += f" {rng.choice(_PLACES)}"
        return s[0].upper() + s[1:] + "."
    if kind == 2:
        n = rng.randrange(2, 100)
        return f"There are {n} {rng.choice(_WORDS)}s {rng.choice(_PLACES)}."
    if kind == 3:
        start = rng.randrange(0, 90)
        return " ".join(str(start + i) for i in range(rng.randrange(3, 8)))
    if kind == 4:
        return ", ".join(rng.sample(_WORDS, rng.randrange(3, 7))) + "."
    if kind == 5:
        # single-digit sums: the base knows digit facts, fine-tunes learn 2-digit addition
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a} plus {b} is {a + b}."
    q, a = rng.choice(_CHAT)
    return f"<|user|>{q}\n<|assistant|>{a}"


def generic_corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [_corpus_line(rng) for _ in range(n_lines)]


# ------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Task:
    """A prompt -> answer task. Training text is f"{prompt} {answer}" + eos."""

    name: str
    sample: Callable[[random.Random], tuple[str, str]]
    max_new_tokens: int


def _math(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    return f"Q: {a}+{b}=? A:", str(a + b)


def _code(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(3, 6)))
    return f"Q: upper {word} A:", word.upper()


def _ext(rng: random.Random) -> tuple[str, str]:
    # single digits keep it learnable in few steps; the point is the new tokens
    a, b = rng.randrange(0, 10), rng.randrange(0, 10)
    return f"Q: {a}+{b}=? A:", f"<calc>{a}+{b}</calc> {a + b}"


TASKS = {t.name: t for t in (Task("math", _math, 6), Task("code", _code, 10),
                             Task("ext", _ext, 12))}
_EVAL_SEED = 12345  # held-out problems come from their own stream


def eval_problems(task: str, n: int = N_EVAL) -> list[tuple[str, str]]:
    """The n held-out (prompt, answer) pairs of a task (distinct; never trained on)."""
    rng, seen, out = random.Random(_EVAL_SEED), set(), []
    while len(out) < n:
        p = TASKS[task].sample(rng)
        if p[0] not in seen:
            seen.add(p[0])
            out.append(p)
    return out


def train_problems(task: str, seed: int) -> Iterator[tuple[str, str]]:
    """Endless training stream, skipping held-out prompts (ext's 100 problems are all shown:
    it has no held-out set worth the name, its eval just checks the new tokens are used)."""
    held = set() if task == "ext" else {p for p, _ in eval_problems(task)}
    rng = random.Random(seed)
    while True:
        p = TASKS[task].sample(rng)
        if p[0] not in held:
            yield p


# -------------------------------------------------------------------- utilities


@contextlib.contextmanager
def deterministic_torch(threads: int = TRAIN_THREADS):
    """Pin thread count and deterministic kernels while building; restore afterwards."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _lr_at(step: int, total: int, peak: float) -> float:
    """Warmup (5%), hold at peak, linear decay over the last 25%: tiny models learn
    algorithmic tasks in a sudden transition that needs a long stretch at high lr."""
    warm, decay = max(1, total // 20), max(1, total // 4)
    if step < warm:
        return peak * (step + 1) / warm
    if step < total - decay:
        return peak
    return peak * max(0.05, (total - step) / decay)


class Progress:
    """Step, loss and ETA of one model's training on stderr: every ~10% of the steps but at
    most every `min_seconds`, and the last step. Builds run in parallel processes, so every
    line names its fixture."""

    def __init__(self, label: str, total: int, enabled: bool = True, min_seconds: float = 5.0):
        self.label, self.total, self.enabled = label, total, enabled
        self.every, self.min_seconds = max(1, total // 10), min_seconds
        self.t0 = self.last = time.perf_counter()

    def __call__(self, step: int, loss: float) -> None:
        done, now = step + 1, time.perf_counter()
        if not self.enabled or (done != self.total and (
                done % self.every or now - self.last < self.min_seconds)):
            return
        self.last = now
        el = now - self.t0
        eta = el / done * (self.total - done)
        print(f"[fixtures] {self.label}: step {done}/{self.total} loss {loss:.3f} "
              f"({el:.0f} s, ETA {eta:.0f} s)", file=sys.stderr, flush=True)


def _train(model, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           steps: int, lr: float, progress: Callable[[int, float], None] | None = None) -> float:
    """Full AdamW training of every parameter. batches(step) -> (ids, attn_mask, labels)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    ema = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        ids, mask, labels = batches(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if progress is not None:
            progress(step, ema)
    model.eval()
    return float(ema)


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Batched greedy decoding (left padding, no KV cache: sequences are tiny)."""
    model.eval()
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    done = torch.zeros(len(prompts), dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        nxt = logits.argmax(-1).masked_fill(done, pad)
        new.append(nxt)
        done |= nxt == tokenizer.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, (~done | (nxt == tokenizer.eos_token_id)).long()[:, None]], 1)
        if done.all():
            break
    out = torch.stack(new, 1).tolist()
    return [tokenizer.decode([t for t in row if t not in (pad,)], skip_special_tokens=True)
            for row in out]


def task_accuracy(model, tokenizer, task: str) -> float:
    """Fraction of held-out problems whose greedy completion equals the answer."""
    probs = eval_problems(task)
    outs = greedy_complete(model, tokenizer, [p for p, _ in probs], TASKS[task].max_new_tokens)
    return sum(o.strip() == a for o, (_, a) in zip(outs, probs)) / len(probs)


# -------------------------------------------------------------------- tokenizer


def build_tokenizer(out_dir: Path, spec: TokenizerSpec = TOKENIZER) -> None:
    """Byte-level BPE (digits always single tokens, so arithmetic stays learnable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # task text is part of the corpus so its words ("upper", "Q:") get merges too
    rng = random.Random(spec.seed + 1)
    lines = generic_corpus(spec.corpus_lines, spec.seed)
    lines += [f"{p} {a}" for t in ("math", "code") for p, a in
              (TASKS[t].sample(rng) for _ in range(200))]
    tok.train_from_iterator(lines, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=max(s.max_positions for s in BASES.values()),
        chat_template=CHAT_TEMPLATE)
    hf.save_pretrained(out_dir)
    _write_json(out_dir / INFO_FILE, {"kind": "tokenizer", "vocab_size": len(hf),
                                      "spec": dataclasses.asdict(spec)})


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------------ bases


def model_config(spec: BaseSpec, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, head_dim=spec.hidden // spec.heads,
        max_position_embeddings=spec.max_positions, rms_norm_eps=1e-5,
        tie_word_embeddings=spec.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        dtype="float32")
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "qwen2":
        common.pop("head_dim")  # Qwen2 derives it from hidden / heads
        return Qwen2Config(**common)
    raise ValueError(f"unknown arch {spec.arch!r}")


def _lm_batches(tokenizer, lines: list[str], spec: BaseSpec):
    """Random windows of one packed token stream (every line bos ... eos)."""
    stream = []
    for line in lines:
        stream += tokenizer(line)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(stream)
    gen = torch.Generator().manual_seed(spec.seed)

    def batch(_step):
        starts = torch.randint(0, len(data) - spec.seq_len, (spec.batch,), generator=gen)
        ids = torch.stack([data[s:s + spec.seq_len] for s in starts.tolist()])
        return ids, torch.ones_like(ids), ids
    return batch


def _save_model(model, tokenizer, out_dir: Path, max_shard_size: str | None = None) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kw)
    tokenizer.save_pretrained(out_dir)


def build_base(out_dir: Path, spec: BaseSpec, tokenizer_dir: Path, progress: bool = True) -> None:
    """Pre-train a tiny LM from scratch on the generic corpus."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(model_config(spec, tokenizer))
    lines = generic_corpus(TOKENIZER.corpus_lines, spec.seed)
    loss = _train(model, _lm_batches(tokenizer, lines, spec), spec.steps, spec.lr,
                  Progress(spec.name, spec.steps, progress))
    _save_model(model, tokenizer, out_dir)
    _write_json(out_dir / INFO_FILE, {
        "kind": "base", "spec": dataclasses.asdict(spec), "final_loss": round(loss, 4),
        "build_seconds": round(time.perf_counter() - t0, 2)})


# -------------------------------------------------------------------- fine-tunes


def _task_batches(tokenizer, spec: FinetuneSpec):
    """Padded batches of task examples; loss on the answer (+ eos) only, as in SFT."""
    stream = train_problems(spec.task, spec.seed)
    pad = tokenizer.pad_token_id

    def batch(_step):
        rows, labels = [], []
        for _ in range(spec.batch):
            prompt, answer = next(stream)
            p = tokenizer(prompt)["input_ids"]
            a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            a.append(tokenizer.eos_token_id)
            rows.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return ids, mask, lab
    return batch


def _add_tokens(model, tokenizer, new_tokens: tuple[str, ...], seed: int) -> None:
    """Grow the vocab: new rows start at the mean embedding (plus a little noise)."""
    tokenizer.add_tokens(list(new_tokens))
    torch.manual_seed(seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def build_finetune(out_dir: Path, spec: FinetuneSpec, base_dir: Path,
                   progress: bool = True) -> None:
    """Full fine-tune of the base on a task; records held-out greedy accuracy."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base_acc = task_accuracy(model, tokenizer, spec.task) if not spec.new_tokens else 0.0
    if spec.new_tokens:
        _add_tokens(model, tokenizer, spec.new_tokens, spec.seed)
        model.config.vocab_size = len(tokenizer)
    torch.manual_seed(spec.seed)
    loss = _train(model, _task_batches(tokenizer, spec), spec.steps, spec.lr,
                  Progress(spec.name, spec.steps, progress))
    acc = task_accuracy(model, tokenizer, spec.task)
    _save_model(model, tokenizer, out_dir, spec.max_shard_size)
    _write_json(out_dir / INFO_FILE, {
        "kind": "finetune", "spec": dataclasses.asdict(spec), "task": spec.task,
        "accuracy": acc, "base_accuracy": base_acc, "n_eval": N_EVAL,
        "final_loss": round(loss, 4), "examples": [p + " " + a for p, a in eval_problems(spec.task, 3)],
        "build_seconds": round(time.perf_counter() - t0, 2)})


# ------------------------------------------------------------------------ cache


def fixture_root() -> Path:
    """Cache dir of the current recipe: $DELTADQ_FIXTURE_CACHE (or ~/.cache/...)/<spec-hash>."""
    env = os.environ.get(CACHE_ENV)
    base = Path(env) if env else Path.home() / ".cache" / "deltadq-vllm" / "fixtures"
    return base / spec_hash()


def _dependency(name: str) -> str | None:
    if name in BASES:
        return TOKENIZER.name
    if name in FINETUNES:
        return FINETUNES[name].base
    return None


def _build_into(name: str, out_dir: Path, root: Path, progress: bool) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars: our own lines say more
    with deterministic_torch():
        if name == TOKENIZER.name:
            build_tokenizer(out_dir)
        elif name in BASES:
            build_base(out_dir, BASES[name], root / TOKENIZER.name, progress)
        else:
            spec = FINETUNES[name]
            build_finetune(out_dir, spec, root / spec.base, progress)


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive flock on `path` (one lock file per fixture, so no nested self-locking)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _summary(path: Path) -> str:
    info = json.loads((path / INFO_FILE).read_text())
    out = f"{info.get('build_seconds', 0):.0f} s"
    if "accuracy" in info:
        out += f", held-out accuracy {info['accuracy']:.2f} (base {info['base_accuracy']:.2f})"
    return out


def build_fixture(name: str, root: Path | None = None, progress: bool = True) -> Path:
    """Path of fixture `name`, building it (and what it depends on) if not cached.

    progress: print step, loss and ETA while training (stderr)."""
    if name not in FIXTURE_NAMES:
        raise KeyError(f"unknown fixture {name!r}; known: {', '.join(FIXTURE_NAMES)}")
    root = Path(root) if root is not None else fixture_root()
    final = root / name
    if final.is_dir():
        return final
    dep = _dependency(name)
    if dep is not None:
        build_fixture(dep, root, progress)  # before taking our lock: locks are never nested
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        for stale in root.glob(f".tmp-{name}-*"):  # left by a crashed builder
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            _build_into(name, tmp, root, progress)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if progress:
        print(f"[fixtures] {name}: built in {_summary(final)}", file=sys.stderr, flush=True)
    return final


def _with_dependencies(names) -> list[str]:
    out: list[str] = []
    for n in names:
        chain = []
        while n is not None and n not in out and n not in chain:
            chain.append(n)
            n = _dependency(n)
        out += reversed(chain)
    return out


def _build_cost(name: str) -> int:
    """Training steps: the scheduler starts the longest builds first."""
    spec = BASES.get(name) or FINETUNES.get(name)
    return spec.steps if spec is not None else 0


def default_jobs() -> int:
    """Parallel build processes: $DELTADQ_FIXTURE_JOBS, else one per core (at most 4)."""
    env = os.environ.get(JOBS_ENV)
    return max(1, int(env)) if env else max(1, min(4, os.cpu_count() or 1))


def build_all(names=FIXTURE_NAMES, root: Path | None = None, jobs: int | None = None,
              progress: bool = True) -> dict[str, Path]:
    """Build `names` (and what they depend on) in up to `jobs` processes, each on one thread;
    a fixture starts as soon as the one it depends on is built. Returns {name: path}."""
    import concurrent.futures as cf
    import multiprocessing

    root = Path(root) if root is not None else fixture_root()
    todo = [n for n in _with_dependencies(names) if not (root / n).is_dir()]
    jobs = min(jobs or default_jobs(), len(todo))
    if todo and progress:
        print(f"[fixtures] building {len(todo)} tiny models into {root} in {max(jobs, 1)} "
              f"process(es), cached after the first run: {', '.join(todo)}",
              file=sys.stderr, flush=True)
    if jobs <= 1:
        for n in todo:
            build_fixture(n, root, progress)
    else:
        t0 = time.perf_counter()
        # spawn, not fork: the caller may hold threads (pytest, vLLM) that fork would copy
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as ex:
            pending: dict[cf.Future, str] = {}
            waiting = list(todo)
            while waiting or pending:
                ready = [n for n in waiting if _dependency(n) not in waiting
                         and _dependency(n) not in pending.values()]
                for n in sorted(ready, key=lambda n: (n in FINETUNES, -_build_cost(n))):
                    waiting.remove(n)
                    pending[ex.submit(build_fixture, n, root, progress)] = n
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    pending.pop(f)
                    f.result()  # a failed build raises here, with its traceback
        if progress:
            print(f"[fixtures] all built in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    return {n: build_fixture(n, root, progress) for n in names}


# ------------------------------------------------------------ synthetic large pair


def _synthetic_kv_heads(hidden: int) -> int:
    """GQA 4:1 when the head count allows it (9 heads of SmolLM2 shape: 3 KV heads)."""
    heads = hidden // 64
    for r in (4, 3):
        if heads % r == 0:
            return heads // r
    return heads


def _synthetic_shapes(hidden: int, inter: int, vocab: int, layers: int) -> list[tuple[str, tuple]]:
    kv_rows = _synthetic_kv_heads(hidden) * 64
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_rows, hidden)),
            (p + "self_attn.v_proj.weight", (kv_rows, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def _synthetic_tensor(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """Base weight: norms ~1, matrices N(0, 1/fan_in). Seeded per tensor (order-free)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib_crc(name))
    if len(shape) == 1:
        return 1.0 + 0.02 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(shape[1])


def _synthetic_delta(name: str, w: torch.Tensor, seed: int, rel: float = 0.01) -> torch.Tensor:
    """Low-rank (rank 8) plus 10% noise, scaled to a relative Frobenius norm `rel`."""
    g = torch.Generator().manual_seed(seed * 7_919 + zlib_crc(name) + 1)
    if w.dim() == 1:
        d = torch.randn(w.shape, generator=g)
    else:
        r = 8
        d = torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w.shape[1], generator=g)
        d = d / d.norm() + 0.1 * torch.randn(w.shape, generator=g) / math.sqrt(w.numel())
    return d * (rel * w.norm() / d.norm())


def zlib_crc(s: str) -> int:
    import zlib
    return zlib.crc32(s.encode())


def _write_sharded(out_dir: Path, shapes, make: Callable[[str, tuple], torch.Tensor],
                   dtype: torch.dtype, shard_bytes: float) -> None:
    """Write tensors shard by shard (at most one shard in memory) + HF index json."""
    from safetensors.torch import save_file

    esize = torch.empty((), dtype=dtype).element_size()
    groups, cur, cur_bytes = [], [], 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * esize
        if cur and cur_bytes + nbytes > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    groups.append(cur)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: make(n, s).to(dtype).contiguous() for n, s in group}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        del shard
    _write_json(out_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def make_synthetic_pair(out_dir, target_bytes: float = 1.1e9, shard_bytes: float = 300e6,
                        dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                        hidden: int = 2048, vocab: int = 8192) -> tuple[Path, Path]:
    """Write a large Llama base + fine-tune (base + ~1% low-rank delta) without ever holding
    a whole model in memory. Returns (base_dir, ft_dir). For peak-RSS measurements."""
    from transformers import LlamaConfig

    out_dir = Path(out_dir)
    inter = hidden * 8 // 3 // 256 * 256
    esize = torch.empty((), dtype=dtype).element_size()
    per_layer = (2 * hidden * hidden + 2 * hidden * _synthetic_kv_heads(hidden) * 64
                 + 3 * hidden * inter) * esize
    fixed = 2 * vocab * hidden * esize
    layers = max(1, math.ceil((target_bytes - fixed) / per_layer))
    shapes = _synthetic_shapes(hidden, inter, vocab, layers)
    tok_dir = build_fixture(TOKENIZER.name)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=_synthetic_kv_heads(hidden),
        head_dim=64,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
        dtype=str(dtype).replace("torch.", ""))
    config.architectures = ["LlamaForCausalLM"]
    dirs = []
    for kind in ("base", "ft"):
        d = out_dir / f"synthetic-{kind}"
        d.mkdir(parents=True, exist_ok=True)
        if kind == "base":
            make = lambda n, s: _synthetic_tensor(n, s, seed)  # noqa: E731
        else:
            def make(n, s):
                w = _synthetic_tensor(n, s, seed)
                return w + _synthetic_delta(n, w, seed)
        _write_sharded(d, shapes, make, dtype, shard_bytes)
        config.save_pretrained(d)
        for f in tok_dir.iterdir():  # tokenizer files (vocab is smaller: ids < 384 are valid)
            if f.name != INFO_FILE:
                shutil.copy(f, d / f.name)
        dirs.append(d)
    return dirs[0], dirs[1]


# -------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="cache root (default: fixture_root(); a spec-hash subdir is NOT added)")
    ap.add_argument("--only", nargs="+", choices=FIXTURE_NAMES, default=None)
    ap.add_argument("--jobs", type=int, default=None,
                    help=f"parallel build processes (default: ${JOBS_ENV} or one per core, max 4)")
    ap.add_argument("--no-progress", action="store_true", help="no training progress lines")
    args = ap.parse_args(argv)
    root = args.out if args.out is not None else fixture_root()
    t0 = time.perf_counter()
    paths = build_all(args.only or FIXTURE_NAMES, root, args.jobs, not args.no_progress)
    for name, path in paths.items():
        info = path / INFO_FILE
        acc = json.loads(info.read_text()).get("accuracy") if info.exists() else None
        print(f"{name}\t{path}" + (f"\taccuracy={acc:.2f}" if acc is not None else ""))
    print(f"total {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
