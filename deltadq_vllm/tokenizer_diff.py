"""A fine-tune's tokenizer, stored as what differs from its base's and rebuilt exactly.

Storing a fine-tune's tokenizer files whole costs what a tokenizer costs (on a
384-token test vocabulary, half of a 32x delta; megabytes on a real one), while a
fine-tune usually adds a few tokens or changes its chat template. The manifest's
`finetune.tokenizer` therefore holds, per tokenizer file of the fine-tune
(docs/format.md, "Tokenizer"):

* identical to the base's file: its sha256 only;
* a text file that differs: line edits against the base's file (`[start, end, text]`:
  base lines [start, end) become `text`) when they are smaller than the file;
* otherwise the whole file (`text`, or `base64` for a binary file).

Rebuilding checks the base's file against the sha256 recorded at compression and the
result against the fine-tune's, so the tokenizer served is byte for byte the
fine-tune's own. `materialize` writes it, with the fine-tune's config.json, into a
content-addressed directory: transformers and vLLM's `get_tokenizer` resolve the
tokenizer class from config.json's model type, so that directory loads exactly as the
`deltadq merge` output (the fine-tune's folder) does.
"""

from __future__ import annotations

import base64
import difflib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DeltaDQError

SCHEME = "deltadq-tokenizer-diff-v1"
TOKENIZER_FILE_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json", "spiece.model", "sentencepiece.bpe.model", "tekken.json",
)
# config.json fields that decide which tokenizer class transformers / vLLM build
CLASS_KEYS = ("model_type", "tokenizer_class")
_DIFF_MAX_LINES = 50_000   # beyond this the changed middle of a file is stored whole


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_files(model_dir) -> list[Path]:
    d = Path(model_dir)
    return [d / n for n in TOKENIZER_FILE_NAMES if (d / n).is_file()]


def _read_files(model_dir) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in tokenizer_files(model_dir)}


# ---------------------------------------------------------------------------- diff


def _line_edits(base: str, new: str) -> list[list]:
    a, b = base.splitlines(keepends=True), new.splitlines(keepends=True)
    pre = 0
    while pre < min(len(a), len(b)) and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < min(len(a), len(b)) - pre and a[-1 - suf] == b[-1 - suf]:
        suf += 1
    am, bm = a[pre:len(a) - suf], b[pre:len(b) - suf]
    if not am and not bm:
        return []
    if max(len(am), len(bm)) > _DIFF_MAX_LINES:
        return [[pre, pre + len(am), "".join(bm)]]
    edits = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, am, bm, autojunk=False).get_opcodes():
        if tag != "equal":
            edits.append([pre + i1, pre + i2, "".join(bm[j1:j2])])
    return edits


def _file_entry(name: str, new: bytes, base: bytes | None) -> dict:
    entry = {"sha256": _sha(new), "bytes": len(new)}
    if base is not None:
        entry["base_sha256"] = _sha(base)
        if base == new:
            return entry
    try:
        text = new.decode("utf-8")
        base_text = base.decode("utf-8") if base is not None else None
    except UnicodeDecodeError:
        entry.pop("base_sha256", None)
        entry["base64"] = base64.b64encode(new).decode("ascii")
        return entry
    if base_text is not None:
        edits = _line_edits(base_text, text)
        if sum(len(e[2]) + 16 for e in edits) < len(text):
            entry["edits"] = edits
            return entry
    entry.pop("base_sha256", None)
    entry["text"] = text
    return entry


def diff_tokenizer(base_dir, ft_dir) -> dict | None:
    """The manifest's `finetune.tokenizer` for a fine-tune (None: it ships no tokenizer
    files, or exactly the base's)."""
    ft, base = _read_files(ft_dir), _read_files(base_dir)
    if not ft or ft == base:
        return None
    return {"scheme": SCHEME,
            "files": {n: _file_entry(n, data, base.get(n)) for n, data in sorted(ft.items())}}


def stored_bytes(diff: dict | None) -> int:
    """Bytes the diff adds to the gzipped manifest (for the compressor's byte budget)."""
    if not diff:
        return 0
    return len(gzip.compress(json.dumps(diff, separators=(",", ":")).encode(), 9))


# ------------------------------------------------------------------------- rebuild


def _apply(base: bytes, edits: list) -> bytes:
    lines = base.decode("utf-8").splitlines(keepends=True)
    out, pos = [], 0
    for start, end, text in edits:
        if not (pos <= start <= end <= len(lines)):
            raise ValueError("edits out of order or out of range")
        out += lines[pos:start]
        out.append(text)
        pos = end
    out += lines[pos:]
    return "".join(out).encode("utf-8")


def rebuild_files(tok: dict | str | None, base_dir, stored: dict[str, bytes] | None = None,
                  where: str = "delta") -> dict[str, bytes]:
    """{file name: bytes} of the fine-tune's tokenizer files.

    tok:    the manifest's `finetune.tokenizer`: a diff (above), the name of a directory
            of whole files in the artifact (format 2), or None (the base's files)
    stored: for a directory: the artifact's verified file bytes, {"tokenizer/x": bytes}
    """
    if tok is None:
        return _read_files(base_dir)
    if isinstance(tok, str):
        prefix = tok.rstrip("/") + "/"
        return {k[len(prefix):]: bytes(v) for k, v in (stored or {}).items()
                if k.startswith(prefix) and "/" not in k[len(prefix):]}
    if not isinstance(tok, dict) or tok.get("scheme") != SCHEME:
        raise DeltaDQError(f"{where}: unknown tokenizer storage {str(tok)[:80]!r}",
                           "upgrade deltadq-vllm or re-compress the fine-tune")
    base = _read_files(base_dir)
    out = {}
    for name, e in tok["files"].items():
        if "/" in name or name.startswith("."):
            raise DeltaDQError(f"{where}: bad tokenizer file name {name!r}",
                               "re-run `deltadq compress`")
        if "text" in e:
            data = e["text"].encode("utf-8")
        elif "base64" in e:
            data = base64.b64decode(e["base64"])
        else:
            have = base.get(name)
            if have is None or _sha(have) != e.get("base_sha256"):
                raise DeltaDQError(
                    f"{where}: the fine-tune's tokenizer is stored as changes to the base's "
                    f"{name}, but the base at {base_dir} has "
                    + ("no such file" if have is None else "a different one")
                    + " (not the base the delta was compressed against)",
                    "serve or merge with the base's original tokenizer files, or re-compress "
                    "the fine-tune against this base")
            try:
                data = _apply(have, e.get("edits", []))
            except (ValueError, TypeError, UnicodeDecodeError) as ex:
                raise DeltaDQError(f"{where}: tokenizer edits of {name} do not apply ({ex})",
                                   "re-run `deltadq compress`") from None
        if _sha(data) != e.get("sha256"):
            raise DeltaDQError(f"{where}: rebuilt tokenizer file {name} does not match the "
                               "fine-tune's (checksum)", "re-run `deltadq compress`")
        out[name] = data
    return out


def needs_own_tokenizer(tok, ft_config: dict, base_config: dict) -> bool:
    """Whether requests for the fine-tune must not use the base's tokenizer: it has its own
    files, or its config.json resolves another tokenizer class."""
    if tok is not None:
        return True
    return any(ft_config.get(k) != base_config.get(k) for k in CLASS_KEYS)


def materialize(files: dict[str, bytes], ft_config: dict, root: Path | None = None) -> Path:
    """A directory holding exactly `files` plus config.json (the fine-tune's): loads as the
    fine-tune's own folder does. Content-addressed and published atomically, so a reload
    with other content never reuses a cached copy (vLLM caches chat-template lookups by
    tokenizer path) and concurrent servers never see a half-written one."""
    config = json.dumps(ft_config, indent=2, sort_keys=True).encode()
    key = hashlib.sha256(config)
    for name in sorted(files):
        key.update(f"\0{name}\0{_sha(files[name])}".encode())
    from .content_hash import cache_root

    parent = Path(root) if root is not None else cache_root() / "tokenizers"
    final = parent / key.hexdigest()[:32]
    if final.is_dir() and _matches(final, files, config):
        return final
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    except OSError:
        if root is not None:
            raise
        return materialize(files, ft_config, Path(tempfile.gettempdir()) / "deltadq-tokenizers")
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / "config.json").write_bytes(config)
        os.chmod(tmp, 0o755)
        if final.exists():      # a stale or damaged copy
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:         # another process published the same content first
            if not _matches(final, files, config):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _matches(d: Path, files: dict[str, bytes], config: bytes) -> bool:
    try:
        present = {p.name for p in d.iterdir()}
        return (present == set(files) | {"config.json"}
                and (d / "config.json").read_bytes() == config
                and all((d / n).read_bytes() == data for n, data in files.items()))
    except OSError:
        return False


def describe(tok) -> str | None:
    """One line for `deltadq inspect`: how the fine-tune's tokenizer is stored."""
    if tok is None:
        return None
    if isinstance(tok, str):
        return f"whole files in {tok}/ (format 2)"
    parts = []
    for name, e in sorted(tok.get("files", {}).items()):
        if "edits" in e:
            parts.append(f"{name}: {len(e['edits'])} edit(s) of the base's")
        elif "text" in e or "base64" in e:
            parts.append(f"{name}: stored whole")
        else:
            parts.append(f"{name}: the base's")
    return "; ".join(parts)
