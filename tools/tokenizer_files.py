"""Which files make up an HF tokenizer, and whether a fine-tune's differs from its base's."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILE_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_files(model_dir: Path) -> list[Path]:
    return [Path(model_dir) / n for n in TOKENIZER_FILE_NAMES if (Path(model_dir) / n).is_file()]


def tokenizer_differs(base_dir: Path, ft_dir: Path) -> bool:
    """True when the fine-tune ships tokenizer files whose bytes differ from the base's."""
    ft = {f.name: f.read_bytes() for f in tokenizer_files(ft_dir)}
    if not ft:
        return False
    base = {f.name: f.read_bytes() for f in tokenizer_files(base_dir)}
    return ft != base
