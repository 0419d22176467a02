"""Target check for the fidelity results (benchmarks/results/fidelity*/fidelity.json).

    .venv/bin/python benchmarks/fidelity/summary.py [RESULTS_DIR]     # prints markdown

Targets (issues #6/#7): at true 16x DeltaDQ keeps >= 100% of the uncompressed fine-tune's
accuracy through the server, at 64x >= 95%, at 128x >= 90%; and it beats every baseline
(strictly higher accuracy) at each ratio measured.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results" / "fidelity"
KEEP_TARGETS = {16: 1.00, 64: 0.95, 128: 0.90}
BASELINES = ("dare", "bitdelta", "magnitude", "lowrank")


def checks(rows: list[dict]) -> list[str]:
    out = ["| fine-tune | ratio | DeltaDQ acc (kept) | keep target | best baseline | beats every baseline |",
           "|---|---|---|---|---|---|"]
    for ft in dict.fromkeys(r["finetune"] for r in rows):
        mine = [r for r in rows if r["finetune"] == ft]
        ratios = sorted({r["ratio_target"] for r in mine if r.get("ratio_target")})
        for ratio in ratios:
            at = {r["method"]: r for r in mine if r.get("ratio_target") == ratio}
            d = at.get("deltadq")
            if not d or d.get("accuracy") is None:
                out.append(f"| {ft} | {ratio} | not measured | - | - | - |")
                continue
            kept = d.get("accuracy_kept")
            tgt = KEEP_TARGETS.get(ratio)
            if tgt is None:
                keep_s = "(no target)"
            elif kept is None:
                keep_s = "n/a"
            else:
                keep_s = f">= {tgt:.0%}: {'MET' if kept >= tgt else 'MISSED'}"
            base = [(m, at[m].get("accuracy")) for m in BASELINES
                    if m in at and at[m].get("accuracy") is not None]
            missing = [m for m in BASELINES if m not in at or at[m].get("accuracy") is None]
            if base:
                bm, ba = max(base, key=lambda x: x[1])
                best_s = f"{bm} {ba:.3f}"
                if d["accuracy"] > ba:
                    beat = "yes"
                elif d["accuracy"] == ba:
                    beat = f"no (tie with {bm})"
                else:
                    beat = "no"
            else:
                best_s, beat = "-", "-"
            if missing:
                beat += f" (not measured / failed: {', '.join(missing)})"
            kept_s = f"{kept:.0%}" if kept is not None else "-"
            out.append(f"| {ft} | {ratio} | {d['accuracy']:.3f} ({kept_s}) | {keep_s} | "
                       f"{best_s} | {beat} |")
    return out


def main() -> int:
    import sys

    where = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    doc = json.loads((where / "fidelity.json").read_text())
    print("\n".join(checks(doc["rows"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
