"""Per-cell gate decisions from calibrated probabilities and a model card: the one implementation
used by ``infer`` (:mod:`cellclf.pipeline.run_slide`) and ``classify-cells``
(:mod:`cellclf.pipeline.classify_cells`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cellclf.gate.conformal import aps_sets
from cellclf.gate.thresholds import GateParams, apply_gate


def gate_decisions(probs: np.ndarray, card: dict[str, Any],
                   ood_slide: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(accept, reason, conformal)`` for N×K calibrated ``probs``: the card's certified gate
    (every cell to review as ``uncertified_class`` when the card has none) and the reviewer's
    conformal label sets (the top class when the card has no conformal section)."""
    if card.get("gate"):
        gate = GateParams.from_dict(card["gate"], classes=list(card["classes"]))
        accept, reason = apply_gate(probs, gate, ood_slide=ood_slide)
    else:
        accept = np.zeros(len(probs), bool)
        reason = np.full(len(probs), "uncertified_class", dtype=object)
    aps = card.get("conformal")
    conf = aps_sets(probs, aps) if aps else probs >= probs.max(axis=1, keepdims=True)
    return accept, np.asarray(reason, dtype=object), conf
