"""Fine-tune folders made in seconds from a fixture base (no training): the base's weights
plus small random changes, saved by transformers the way a user's fine-tune is.

Used where what matters is the folder's *shape* (its tokenizer, added vocabulary rows),
not a learned skill: the reference every test compares against is vLLM or transformers
running this folder (or `deltadq merge` output), so any fixed weights will do.

`make_finetune(base, out, add_tokens=(...))` mirrors the case of a Qwen2 fine-tune whose
tokenizer was built with the `tokenizers` library: the tokenizer is loaded as
`TokenizersBackend` and saved with that class name, so transformers and vLLM resolve the
fine-tune's tokenizer class from config.json's model type (Qwen2Tokenizer for qwen2),
which normalizes and pre-tokenizes differently from the stored tokenizer.json alone.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

ADDED = ("<calc>", "</calc>")
TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def random_texts(seed: int, n: int) -> list[str]:
    """Fresh random strings: added tokens, runs of spaces/newlines, digits, punctuation,
    contractions, composed and decomposed accents, CJK, emoji."""
    rng = random.Random(seed)
    pieces = list("abcXYZ019 .,-_'!?\n\r\t") + ["  ", "\n\n", "'S", "'ll", "e\u0301", "\u00e9",
                                                "\ufb01", "\u4e2d\u6587", "\U0001f600", *ADDED]
    return ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40))) for _ in range(n)]


def make_finetune(base_dir, out_dir, *, add_tokens: tuple[str, ...] = (), seed: int = 0,
                  scale: float = 0.02, chat_template: str | None = None,
                  eos_token: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    out = Path(out_dir)
    tok = TokenizersBackend.from_pretrained(str(base_dir))
    if add_tokens:
        tok.add_tokens(list(add_tokens))
    if chat_template is not None:
        tok.chat_template = chat_template
    if eos_token is not None:
        tok.add_special_tokens({"eos_token": eos_token})
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if len(tok) != model.config.vocab_size:
            model.resize_token_embeddings(len(tok), mean_resizing=False)
            model.config.vocab_size = len(tok)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
