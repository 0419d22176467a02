"""Device bytes a fine-tune will take in the delta arena, read from its manifest only.

The default arena of a GPU server is sized from the deltas given at start
(`--delta-modules`): room for the `max_deltas` largest of them, in the kernels' layout as
this rank holds them (tensor-parallel slices; a low-rank LM head or embedding counts as
its factors, other layouts than hash_groupwise as their 16-bit conversion), plus the shared units tables and `--delta-arena-reserve-mb`
for fine-tunes loaded at runtime. No tensor data is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..kernels.arena import align_words
from ..kernels.slots import CONVERTED_BITS, lowrank_words
from ..format.positions import units

SLACK = 1.01   # first-fit fragmentation before compaction kicks in


@dataclass
class DeltaSurvey:
    words: list[int] = field(default_factory=list)      # arena words per fine-tune
    group_sizes: set[int] = field(default_factory=set)
    max_keep: int = 1
    unreadable: list[str] = field(default_factory=list)  # paths whose manifest did not open


def _segment_words(entry, rows: int, cols: int, factors: bool = False) -> tuple[int, int | None, int]:
    """(words, group size, keep) of one tensor slice [rows, cols] in the arena; factors:
    slots that keep a low-rank delta as U and V (the LM head's, the embedding's)."""
    if rows <= 0 or cols <= 0:
        return 0, None, 1
    if factors and entry.layout == "lowrank":
        return align_words(lowrank_words(rows, cols, entry.params["rank"])[1]), None, 1
    if entry.layout == "hash_groupwise":
        p = entry.params
        g, k, bits, rps = p["group_size"], p["keep"], p["bits"], p["rows_per_scale"]
        code = math.ceil(rows * (cols // g * k) * bits / 32)
        return align_words(code + math.ceil(rows / rps) + 1), g, k
    return align_words(math.ceil(rows * cols * CONVERTED_BITS / 32) + rows), 1, 1


def survey(paths, targets, base_vocab: int | None) -> DeltaSurvey:
    """Arena words of each fine-tune in `paths` as this rank's targets would hold it."""
    from ..format.artifact import DeltaArtifact
    from ..errors import DeltaDQError

    out = DeltaSurvey()
    rename = targets.rename or (lambda n: n)
    emb, head = targets.embedding, targets.lm_head
    for path in paths:
        try:
            art = DeltaArtifact(path, verify_files=False)
        except (DeltaDQError, OSError, ValueError):
            out.unreadable.append(str(path))   # reported when the delta is loaded
            continue
        total = 0
        for name, e in art.entries.items():
            hits = targets.by_hf_name.get(rename(name))
            if not hits or e.absolute or len(e.rows_shape) != 2:
                continue
            kinds = {kind for kind, _, _ in hits}
            shapes = []    # (rows, cols, slots keep low-rank factors)
            for kind, tname, i in hits:   # a fused checkpoint tensor: one per row block
                if kind == "linear":
                    t = targets.linears[tname]
                    r0, r1 = t.slices[i].rows
                    shapes.append((r1 - r0, t.in_features, False))
            if kinds & {"embedding", "lm_head"}:
                rows = e.rows_shape[0]
                key = rename(name)
                tied = emb is not None and head is not None and emb.hf_name == head.hf_name
                if head is not None and head.hf_name == key:
                    shapes.append((min(head.rows[1], rows) - min(head.rows[0], rows), head.dim,
                                   True))
                if emb is not None and emb.hf_name == key and not (tied and head.rows[0] == 0
                                                                    and head.rows[1] >= rows):
                    shapes.append((base_vocab or rows, emb.dim, True))
            for rows, cols, factors in shapes:
                w, g, k = _segment_words(e, rows, cols, factors)
                total += w
                if g is not None:
                    out.group_sizes.add(g)
                    out.max_keep = max(out.max_keep, k)
        out.words.append(total)
    return out


def default_arena_bytes(s: DeltaSurvey, n_slots: int, reserve_mb: float) -> int:
    """Room for the n_slots largest fine-tunes surveyed, their units tables, the reserve."""
    biggest = sorted(s.words, reverse=True)[:n_slots]
    tables = sum(align_words(len(units(g))) for g in s.group_sizes)
    return int(math.ceil((sum(biggest) + tables) * 4 * SLACK) + reserve_mb * 2 ** 20)
