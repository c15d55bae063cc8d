"""What one slide produced, in memory: arrays aligned by cell, before anything is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SlideResult:
    """Everything one slide produced; arrays are aligned by cell (index = cell_id)."""

    slide_id: str
    path: str
    mpp: float
    width: int
    height: int
    vendor: str | None
    classes: list[str]
    xy0: np.ndarray  # (N, 2) float64, level-0 px
    probs: np.ndarray  # (N, K) float32, calibrated
    accept: np.ndarray  # (N,) bool
    reason: np.ndarray  # (N,) str: accepted | low_confidence | uncertified_class | ood_slide
    conformal: np.ndarray  # (N, K) bool: plausible labels for the reviewer
    tissue_area_mm2: float
    thumbnail: np.ndarray  # RGB uint8 for the overlay
    thumb_downsample: float  # level-0 px per thumbnail px
    ood: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    audited: np.ndarray | None = None  # (N,) bool: auto-accepted cells sent to review as audit
    audit_rate: float = 0.0
    other_class: str | None = None  # the card's catch-all class (no hotspot, no overlay dots)

    @property
    def target_classes(self) -> list[str]:
        """The classes the model is for: every class but the card's catch-all."""
        return [c for c in self.classes if c != self.other_class]

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1) if len(self.probs) else np.zeros(0, dtype=np.int64)

    @property
    def n_cells(self) -> int:
        return len(self.xy0)
