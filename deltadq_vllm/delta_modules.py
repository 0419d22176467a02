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

# what a client may put in the OpenAI `model` field without quoting trouble
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
SYNTAX = ("use name=path pairs (math=/d/math,code=/d/code or math=/d/math code=/d/code) or "
          "JSON objects with \"name\" and \"path\"")


@dataclass(frozen=True)
class DeltaModule:
    name: str
    path: str


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
        if not m.name or not NAME_RE.match(m.name):
            raise DeltaDQError(f"--delta-modules: invalid fine-tune name {m.name!r}",
                               "use letters, digits and . _ - : / @ + (not starting with a symbol)")
        if not m.path:
            raise DeltaDQError(f"--delta-modules: fine-tune {m.name!r} has an empty path",
                               "give the directory written by `deltadq compress`")
        if m.name in seen:
            raise DeltaDQError(f"--delta-modules: the name {m.name!r} is used twice",
                               "give every fine-tune its own name")
        if m.name in base_names:
            raise DeltaDQError(f"--delta-modules: {m.name!r} is also the base model's name",
                               "choose another name for the fine-tune (or --served-model-name)")
        seen.add(m.name)
    return modules
