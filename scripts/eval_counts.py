"""Count correctness after review (issue: batch inference, "correct counts"): on slides with truth,
per class the card's gate threshold, automation and error among auto-accepted cells (per predicted
class), the count error of auto-accepted + reviewed cells, where reviewed cells are answered with the
ground truth (a perfect reviewer), the count error of the auto-accepted cells alone, and the share
of true target cells auto-accepted as `other` (what the gate's miss bound certifies).

    python scripts/eval_counts.py --model models/cellclf-synth-he-v1 --data runs/ship-work/eval

Count errors are the mean over slides of |counted − true| / true; true counts include cells the
detector missed. Prints a table and, with --json, writes every number (per slide too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()

    from cellclf.card import load_card
    from cellclf.evaluation.evaluate import evaluate

    card = load_card(a.model)
    if not card.gate:
        print(f"{a.model}: the card has no gate; run `cellclf calibrate` first", file=sys.stderr)
        return 2
    _, metrics = evaluate(a.model, a.data, None, progress=False, workers=a.workers)
    gate, counts = metrics["gate"], metrics["counts_after_review"]
    g = card.gate
    print(f"{a.model} on {a.data} ({metrics['n_slides']} slides): α = {g['alpha']}, "
          f"β = {g.get('beta')}, δ = {g['delta']}; automation {_pct(gate['automation_rate'])}, "
          f"accepted error {_pct(gate['accepted_error'])}")
    head = ("class", "threshold", "automation", "accepted err", "count err after review",
            "auto-only count err", "miss as other")
    print(" | ".join(f"{h:>12}" for h in head))
    for c in card.classes:
        pc, thr = gate["per_class"][c], g["thresholds"].get(c)
        row = (c, "—" if thr is None else f"{thr:.4f}", _pct(pc["automation_rate"]),
               _pct(pc["accepted_error"]), _pct(counts["mean_abs_after_review"].get(c)),
               _pct(counts["mean_abs_auto_only"].get(c)),
               _pct(counts["pooled"].get(c, {}).get("miss_rate_other")))
        print(" | ".join(f"{v:>12}" for v in row))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"model": str(a.model), "data": str(a.data),
                                      "gate_card": g, "gate": gate, "counts": counts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
