"""Tokenizers of the test fixtures, trained on the generated corpus (nothing downloaded).

Two vocabularies, each trained with the `tokenizers` library, in the transformers classes
real models ship with, so the fixtures cover how each class is loaded:

| kind        | vocabulary                                  | saved as                        |
|-------------|---------------------------------------------|---------------------------------|
| `bytelevel` | byte-level BPE, digits split                | `TokenizersBackend` (generic)   |
| `qwen2`     | the same                                    | `Qwen2Tokenizer` (own regex)    |
| `gpt2`      | the same                                    | `GPT2Tokenizer`, no bos         |
| `llama`     | SentencePiece-style BPE (`▁`, byte fallback) | `LlamaTokenizer`                |
| `gemma`     | the same                                    | `GemmaTokenizer`                |

A spec with `class_from_model_type` drops `tokenizer_class` from the tokenizer_config.json
of the *models* built with it, so transformers and vLLM resolve the class from the
model's `model_type` (as for many hub models).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .tasks import TASKS, generic_corpus

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# bos comes from the template: vLLM's chat endpoint tokenizes with add_special_tokens=False
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
INFO_FILE = "fixture_info.json"
KINDS = ("bytelevel", "qwen2", "gpt2", "llama", "gemma")
MODEL_MAX_LENGTH = 1024


@dataclass(frozen=True)
class TokenizerSpec:
    name: str = "tokenizer"
    vocab_size: int = 384
    corpus_lines: int = 4000
    seed: int = 0
    kind: str = "bytelevel"
    class_from_model_type: bool = False


def _training_lines(spec: TokenizerSpec) -> list[str]:
    # task text is part of the corpus so its words ("upper", "Q:") get merges too
    rng = random.Random(spec.seed + 1)
    lines = generic_corpus(spec.corpus_lines, spec.seed)
    return lines + [f"{p} {a}" for t in ("math", "code") for p, a in
                    (TASKS[t].sample(rng) for _ in range(200))]


def _bytelevel(spec: TokenizerSpec):
    """Byte-level BPE (digits always single tokens, so arithmetic stays learnable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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
    tok.train_from_iterator(_training_lines(spec), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def _spm_vocab(spec: TokenizerSpec) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """SentencePiece-style BPE: spaces as `▁`, digits split, the 256 byte-fallback tokens
    `<0x00>`..`<0xFF>` after the specials. Returns (vocab, merges)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("▁", "merged_with_next"),
        pre_tokenizers.Digits(individual_digits=True)])
    specials = [UNK, BOS, EOS, PAD]
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size - 256, min_frequency=2,
                                  show_progress=False, special_tokens=specials)
    tok.train_from_iterator(_training_lines(spec), trainer)
    model = json.loads(tok.to_str())["model"]
    learned = sorted((i, t) for t, i in model["vocab"].items() if t not in specials)
    order = specials + [f"<0x{b:02X}>" for b in range(256)] + [t for _, t in learned]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return {t: i for i, t in enumerate(order)}, merges


def make_tokenizer(spec: TokenizerSpec):
    """The transformers tokenizer of a spec (trained now; deterministic)."""
    special = dict(bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                   model_max_length=MODEL_MAX_LENGTH, chat_template=CHAT_TEMPLATE)
    if spec.kind == "bytelevel":
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=_bytelevel(spec), **special)
    if spec.kind in ("qwen2", "gpt2"):
        from transformers import GPT2Tokenizer, Qwen2Tokenizer

        data = json.loads(_bytelevel(spec).to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                  for m in data["merges"]]
        cls = Qwen2Tokenizer if spec.kind == "qwen2" else GPT2Tokenizer
        return cls(vocab=data["vocab"], merges=merges, **special)
    if spec.kind in ("llama", "gemma"):
        from transformers import GemmaTokenizer, LlamaTokenizer

        vocab, merges = _spm_vocab(spec)
        cls = LlamaTokenizer if spec.kind == "llama" else GemmaTokenizer
        return cls(vocab=vocab, merges=merges, add_bos_token=True, **special)
    raise ValueError(f"unknown tokenizer kind {spec.kind!r}; known: {', '.join(KINDS)}")


def build_tokenizer(out_dir: Path, spec: TokenizerSpec) -> None:
    hf = make_tokenizer(spec)
    hf.save_pretrained(out_dir)
    (out_dir / INFO_FILE).write_text(json.dumps(
        {"kind": "tokenizer", "class": type(hf).__name__, "vocab_size": len(hf),
         "spec": dataclasses.asdict(spec)}, indent=2, sort_keys=True) + "\n")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def drop_tokenizer_class(model_dir: Path) -> None:
    """Let loaders resolve the tokenizer class from config.json's model_type."""
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("tokenizer_class", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
