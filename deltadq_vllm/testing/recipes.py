"""The recipes of the test fixtures: tokenizers, tiny trained bases and real fine-tunes.

Bases are pre-trained from scratch on the generated corpus (tasks.py); fine-tunes are
full AdamW fine-tunes of a base on one task, and record their greedy accuracy on held-out
problems (and the base's) in `fixture_info.json`, so tests can check that a compressed
delta still carries the skill. Every recipe is a frozen spec: fixtures.py hashes it to
name the fixture's cache folder, so changing a spec rebuilds exactly what depends on it.

The first three bases and their fine-tunes are the suite's workhorses; the others (and the
`--ext`/`--small` fine-tunes) are the architecture matrix of tests/test_arch_matrix.py:
one base per architecture (architectures.py), a fine-tune that adds vocabulary (a large
delta: a new skill and two new tokens) and a short light one (a small delta).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import model_config
from .tasks import N_EVAL, eval_problems, generic_corpus, train_problems
from .training import Progress, task_accuracy, train
from .vocab import INFO_FILE, TokenizerSpec, build_tokenizer, drop_tokenizer_class, load_tokenizer


@dataclass(frozen=True)
class BaseSpec:
    name: str
    arch: str                      # architectures.ARCHS
    tokenizer: str = "tokenizer"   # a TOKENIZERS name
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None    # default hidden // heads
    intermediate: int = 256
    tie_embeddings: bool = False
    bias: bool = False             # attention biases where the architecture has the option
    max_positions: int = 1024
    steps: int = 300
    batch: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0
    corpus_lines: int = 4000


@dataclass(frozen=True)
class FinetuneSpec:
    name: str
    base: str
    task: str  # key of tasks.TASKS
    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    seed: int = 1
    max_shard_size: str | None = None  # e.g. "400KB" to force a sharded checkpoint
    new_tokens: tuple[str, ...] = ()  # tokens added to the tokenizer (vocab grows)


CALC = ("<calc>", "</calc>")
TOKENIZERS = {s.name: s for s in (
    TokenizerSpec(),
    TokenizerSpec("tokenizer-qwen2", kind="qwen2", class_from_model_type=True),
    TokenizerSpec("tokenizer-gpt2", kind="gpt2"),
    TokenizerSpec("tokenizer-llama", vocab_size=448, kind="llama"),
    TokenizerSpec("tokenizer-gemma", vocab_size=448, kind="gemma"),
)}
BASES = {s.name: s for s in (
    BaseSpec("llama-gqa", "llama", heads=4, kv_heads=2, tie_embeddings=True, seed=10),
    BaseSpec("llama-mha", "llama", heads=4, kv_heads=4, tie_embeddings=False, seed=20),
    # 2 heads of 64 (head_dim 64 coverage), 1 KV head, wider MLP
    BaseSpec("qwen2", "qwen2", heads=2, kv_heads=1, intermediate=384, seed=30),
    # the architecture matrix
    BaseSpec("qwen3", "qwen3", tokenizer="tokenizer-qwen2", head_dim=32, tie_embeddings=True,
             seed=50),
    BaseSpec("mistral", "mistral", tokenizer="tokenizer-llama", kv_heads=1, seed=60),
    BaseSpec("phi3", "phi3", kv_heads=4, seed=70),
    BaseSpec("gemma2", "gemma2", tokenizer="tokenizer-gemma", tie_embeddings=True, seed=80),
    BaseSpec("olmo2", "olmo2", tokenizer="tokenizer-gpt2", kv_heads=4, bias=True, seed=90),
)}
MATRIX_BASES = ("llama-gqa", "llama-mha", "qwen2", "qwen3", "mistral", "phi3", "gemma2",
                "olmo2")


def _matrix_finetunes(base: str, seed: int) -> tuple[FinetuneSpec, ...]:
    """A large delta that adds vocabulary (a new skill and two new tokens) and a small one
    (a short, light fine-tune: moves the log-probs, rarely a greedy token)."""
    return (FinetuneSpec(f"{base}--ext", base, "ext", steps=300, seed=seed, new_tokens=CALC),
            FinetuneSpec(f"{base}--small", base, "code", steps=60, lr=3e-4, seed=seed + 1))


FINETUNES = {s.name: s for s in (
    FinetuneSpec("llama-gqa--math", "llama-gqa", "math", seed=11),
    FinetuneSpec("llama-gqa--code", "llama-gqa", "code", seed=12),
    FinetuneSpec("llama-mha--math", "llama-mha", "math", seed=21, max_shard_size="400KB"),
    FinetuneSpec("llama-mha--code", "llama-mha", "code", seed=22),
    FinetuneSpec("llama-mha--ext", "llama-mha", "ext", seed=23, new_tokens=CALC),
    # longer at a lower lr: as accurate (math 1.0, code 0.98) and more compressible
    FinetuneSpec("qwen2--math", "qwen2", "math", steps=1200, lr=5e-4, seed=31),
    FinetuneSpec("qwen2--code", "qwen2", "code", steps=1200, lr=5e-4, seed=32),
    # the regime of real SFT deltas (relative norm ~0.005: Adam, low lr, few steps),
    # where Balanced Intermediate Results hold; too light to learn the task
    FinetuneSpec("llama-gqa--light", "llama-gqa", "math", steps=30, lr=1e-5, seed=41),
    # the matrix (llama-mha's vocabulary fine-tune is llama-mha--ext above)
    FinetuneSpec("llama-mha--small", "llama-mha", "code", steps=60, lr=3e-4, seed=24),
    *(ft for i, b in enumerate(("llama-gqa", "qwen2", "qwen3", "mistral", "phi3", "gemma2",
                                "olmo2"))
      for ft in _matrix_finetunes(b, 101 + 10 * i)),
)}


def dependency(name: str) -> str | None:
    """The fixture a fixture is built from (a base's tokenizer, a fine-tune's base)."""
    if name in BASES:
        return BASES[name].tokenizer
    if name in FINETUNES:
        return FINETUNES[name].base
    return None


def spec_of(name: str):
    return TOKENIZERS.get(name) or BASES.get(name) or FINETUNES[name]


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _tokenizer_spec_of_model(spec) -> TokenizerSpec:
    base = BASES[spec.base] if isinstance(spec, FinetuneSpec) else spec
    return TOKENIZERS[base.tokenizer]


# ------------------------------------------------------------------------ bases


def _lm_batches(tokenizer, lines: list[str], spec: BaseSpec):
    """Random windows of one packed token stream (every line [bos] ... eos)."""
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


def _save_model(model, tokenizer, out_dir: Path, spec, max_shard_size: str | None = None) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kw)
    tokenizer.save_pretrained(out_dir)
    if _tokenizer_spec_of_model(spec).class_from_model_type:
        drop_tokenizer_class(out_dir)


def build_base(out_dir: Path, spec: BaseSpec, tokenizer_dir: Path, progress: bool = True) -> None:
    """Pre-train a tiny LM from scratch on the generic corpus."""
    from transformers import AutoModelForCausalLM

    t0, c0 = time.perf_counter(), time.process_time()
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(model_config(spec, tokenizer))
    lines = generic_corpus(spec.corpus_lines, spec.seed)
    loss = train(model, _lm_batches(tokenizer, lines, spec), spec.steps, spec.lr,
                 Progress(spec.name, spec.steps, progress))
    _save_model(model, tokenizer, out_dir, spec)
    _write_json(out_dir / INFO_FILE, {
        "kind": "base", "spec": dataclasses.asdict(spec), "final_loss": round(loss, 4),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "build_cpu_seconds": round(time.process_time() - c0, 2)})


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

    t0, c0 = time.perf_counter(), time.process_time()
    tokenizer = load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base_acc = task_accuracy(model, tokenizer, spec.task) if not spec.new_tokens else 0.0
    if spec.new_tokens:
        _add_tokens(model, tokenizer, spec.new_tokens, spec.seed)
        model.config.vocab_size = len(tokenizer)
    torch.manual_seed(spec.seed)
    loss = train(model, _task_batches(tokenizer, spec), spec.steps, spec.lr,
                 Progress(spec.name, spec.steps, progress))
    acc = task_accuracy(model, tokenizer, spec.task)
    _save_model(model, tokenizer, out_dir, spec, spec.max_shard_size)
    _write_json(out_dir / INFO_FILE, {
        "kind": "finetune", "spec": dataclasses.asdict(spec), "task": spec.task,
        "accuracy": acc, "base_accuracy": base_acc, "n_eval": N_EVAL,
        "final_loss": round(loss, 4),
        "examples": [p + " " + a for p, a in eval_problems(spec.task, 3)],
        "build_seconds": round(time.perf_counter() - t0, 2),
        "build_cpu_seconds": round(time.process_time() - c0, 2)})


def build(name: str, out_dir: Path, dependency_dir: Path | None, progress: bool) -> None:
    """Build fixture `name` into out_dir from its (built) dependency."""
    if name in TOKENIZERS:
        build_tokenizer(out_dir, TOKENIZERS[name])
    elif name in BASES:
        build_base(out_dir, BASES[name], dependency_dir, progress)
    else:
        build_finetune(out_dir, FINETUNES[name], dependency_dir, progress)
