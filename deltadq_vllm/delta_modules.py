"""`--delta-modules`: which fine-tunes a server offers, by name.

Accepted forms (they can be mixed; each command-line item is parsed on its own):

    --delta-modules math=/d/math,code=/d/code        comma-separated pairs
    --delta-modules math=/d/math code=/d/code        space-separated pairs
    --delta-modules '{"name": "math", "path": "/d/math"}'          JSON, like --lora-modules
    --delta-modules '[{"name": "math", "path": "/d/math"}, ...]'   a JSON list

Plain Python, no vLLM import: the API process, `deltadq serve` and the tests share it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import DeltaDQError

# One rule for every fine-tune name (--delta-modules and POST /v1/load_delta): what a
# client can put in the OpenAI `model` field without quoting trouble, and nothing a log
# line or an HTML page could be tricked by. `fullmatch`, not `$`: `$` also matches before
# a trailing newline.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")
NAME_MAX = 200
NAME_FIX = ("use 1-200 letters, digits and . _ - : / @ + (starting with a letter or digit), "
            "e.g. math-v2")
SYNTAX = ("use name=path pairs (math=/d/math,code=/d/code or math=/d/math code=/d/code) or "
          "JSON objects with \"name\" and \"path\"")


@dataclass(frozen=True)
class DeltaModule:
    name: str
    path: str


def validate_delta_name(name, base_names=(), source: str = "--delta-modules") -> str:
    """The name rule for every fine-tune, static or loaded at runtime. Returns the name;
    raises DeltaDQError naming the problem and the fix. `base_names` are the names the base
    model is served under (--served-model-name, else the model path): a fine-tune may not
    take one of them, or requests for the base would silently go to the fine-tune."""
    if not isinstance(name, str) or not name:
        raise DeltaDQError(f"{source}: invalid fine-tune name {name!r} (a name is needed)",
                           NAME_FIX)
    if len(name) > NAME_MAX or not NAME_RE.fullmatch(name):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise DeltaDQError(f"{source}: invalid fine-tune name {shown!r}", NAME_FIX)
    if name in set(base_names or ()):
        raise DeltaDQError(
            f"{source}: the fine-tune name {name!r} is also a name the base model is served "
            "under", "give the fine-tune another name, or serve the base under another name "
                     "with --served-model-name")
    return name


def base_served_names(args) -> tuple[str, ...]:
    """The names vLLM serves the base under: --served-model-name, else the model argument."""
    names = getattr(args, "served_model_name", None)
    if isinstance(names, str):
        names = [names]
    model = getattr(args, "model_tag", None) or getattr(args, "model", None)
    return tuple(names) if names else ((model,) if model else ())


def _parse_json(item: str) -> list[DeltaModule]:
    try:
        doc = json.loads(item)
    except ValueError as e:
        raise DeltaDQError(f"--delta-modules item {item!r} is not valid JSON ({e})", SYNTAX) from None
    docs = doc if isinstance(doc, list) else [doc]
    out = []
    for d in docs:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) \
                or not isinstance(d.get("path"), str):
            raise DeltaDQError(f"--delta-modules JSON entry {d!r} needs string fields "
                               "\"name\" and \"path\"", SYNTAX)
        unknown = set(d) - {"name", "path", "base_model_name"}
        if unknown:
            raise DeltaDQError(f"--delta-modules JSON entry has unknown fields {sorted(unknown)}",
                               "use only \"name\", \"path\" (and \"base_model_name\")")
        out.append(DeltaModule(d["name"].strip(), d["path"].strip()))
    return out


def _parse_pairs(item: str) -> list[DeltaModule]:
    out = []
    for part in item.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, path = part.partition("=")
        if not sep:
            raise DeltaDQError(f"--delta-modules item {part!r} is not name=path", SYNTAX)
        out.append(DeltaModule(name.strip(), path.strip()))
    return out


def parse_delta_modules(items, base_names: tuple[str, ...] = ()) -> list[DeltaModule]:
    """Parse every item of --delta-modules; check names are valid and unique."""
    if isinstance(items, str):
        items = [items]
    modules: list[DeltaModule] = []
    for item in items or ():
        if isinstance(item, DeltaModule):
            modules.append(item)
            continue
        item = item.strip()
        if not item:
            continue
        modules += _parse_json(item) if item[0] in "[{" else _parse_pairs(item)
    seen: set[str] = set()
    for m in modules:
        validate_delta_name(m.name, base_names)
        if not m.path:
            raise DeltaDQError(f"--delta-modules: fine-tune {m.name!r} has an empty path",
                               "give the directory written by `deltadq compress`")
        if m.name in seen:
            raise DeltaDQError(f"--delta-modules: the name {m.name!r} is used twice",
                               "give every fine-tune its own name")
        seen.add(m.name)
    return modules
