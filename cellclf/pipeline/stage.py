"""The one interface of ``run_slide``'s detect → crop → classify stage, wherever it runs.

A :class:`Stage` turns a slide's tiles into :class:`CellBatch` es: the cells the tiles own
(level-0 centres), their class probabilities, and a way to cut the review images of chosen rows.
:class:`~cellclf.pipeline.host_stage.HostStage` runs on the CPU (detector and crops in threads,
any engine); :class:`~cellclf.pipeline.device_stage.DeviceStage` runs on the torch engine's
device (GPU in production). ``run_slide`` gates each batch the same way whichever stage made it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cellclf.wsi.tiling import Tile

REVIEW_CONTEXT_PX = 160  # side of the context image at the model's mpp (80 µm at 0.5 µm/px)

# a cell detector: (tile RGB uint8 at the working mpp, that mpp) → (N, 2) centres in tile px
Detector = Callable[[np.ndarray, float], np.ndarray]
# rows of a batch → (model crops (n, crop, crop, 3), context views (n, ctx, ctx, 3) or None)
ReviewImages = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class CellBatch:
    """Classified cells of some tiles (possibly none)."""

    xy0: np.ndarray  # (N, 2) float64 level-0 px centres
    probs: np.ndarray  # (N, K) float32 class probabilities, columns in card.classes order
    review_images: ReviewImages  # review images of chosen rows (only gated cells are asked for)
    tiles_done: int  # tiles finished with this batch (progress)

    def __len__(self) -> int:
        return len(self.xy0)


class Stage(Protocol):
    """Detect, crop and classify: tiles in, batches of classified cells out, in tile order."""

    timings: dict[str, float]  # seconds per step, as written to summary.json
    info: dict[str, str]  # {"stage": "host" | "device", "decode": "host" | "device"}

    def run(self, tiles: list[Tile]) -> Iterator[CellBatch]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...
