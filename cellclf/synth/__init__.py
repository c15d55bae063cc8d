"""Synthetic H&E slides with ground truth, for tests, the demo and benchmarks (``cellclf synth``).

Data flow: ``layout`` (islands, epithelium, hotspots; µm) → ``placement`` (cells per 256 µm
block, deterministic from the seed) → ``cells``/``stamps`` (each cell type drawn in stain
concentrations) → ``render`` (stroma texture, Beer–Lambert optics, blur, noise) → ``writer``
(pyramidal JPEG TIFF/SVS that OpenSlide opens, plus a truth GeoJSON). This is test data, not
evidence of clinical accuracy.

``--style v2`` (``architecture``) adds glands, crowding, larger vessels, collagen clefts,
out-of-plane nuclei, uneven staining and real-range optics; v1 stays the default.
Hybrid slides (``cellclf synth-hybrid``): ``backgrounds`` (a real slide or tile folder and its
real nuclei) → ``local_optics`` (stain, focus, noise measured per window) → ``hybrid``
(synthetic target cells drawn with the same ``cells`` stamps, blended in optical density).
"""

from __future__ import annotations

from .celltypes import CELL_TYPES, CLASS_COLORS, TARGET_TYPES
from .writer import default_name, pyramid_levels, render_slide

__all__ = ["CELL_TYPES", "CLASS_COLORS", "TARGET_TYPES", "default_name", "pyramid_levels",
           "render_slide"]
