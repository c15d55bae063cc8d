"""Count correctness after review (issue: batch inference, "correct counts"): on slides with truth,
per-class count error of auto-accepted + reviewed cells, where reviewed cells are answered with the
ground truth (a perfect reviewer), and the count error of the auto-accepted cells alone.

    python scripts/eval_counts.py --model models/cellclf-synth-he-v1 --data runs/ship-work/eval
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    a = ap.parse_args()

    import numpy as np

    from cellclf.calibrate import softmax
    from cellclf.card import load_card
    from cellclf.evaluate import evaluate
    from cellclf.gate import GateParams, apply_gate

    card = load_card(a.model)
    table, _ = evaluate(a.model, a.data, None, progress=False)
    classes = list(card.classes)
    gate = GateParams.from_dict(card.gate, classes=classes)
    det = table.detected
    probs = softmax(table.logits[det], card.temperature)
    accept, _ = apply_gate(probs, gate)
    pred, truth, slide = probs.argmax(1), table.truth[det], table.slide[det]
    out: dict = {}
    for s in np.unique(table.slide):
        in_s = slide == s
        row = {}
        for k, c in enumerate(classes):
            if c == card.other_class:
                continue
            true_n = int(((table.slide == s) & (table.truth == k)).sum())  # incl. missed cells
            auto = int((in_s & accept & (pred == k)).sum())
            final = auto + int((in_s & ~accept & (truth == k)).sum())
            row[c] = {"truth": true_n, "auto_only": auto, "final": final,
                      "err_final": (final - true_n) / true_n if true_n else None,
                      "err_auto_only": (auto - true_n) / true_n if true_n else None}
        out[str(s)] = row
    pooled = {c: float(np.mean([abs(r[c]["err_final"]) for r in out.values()]))
              for c in classes if c != card.other_class}
    pooled_auto = {c: float(np.mean([abs(r[c]["err_auto_only"]) for r in out.values()]))
                   for c in classes if c != card.other_class}
    print(json.dumps({"mean_abs_count_error_after_review": pooled,
                      "mean_abs_count_error_auto_only": pooled_auto,
                      "review_share": float((~accept).mean()), "per_slide": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
