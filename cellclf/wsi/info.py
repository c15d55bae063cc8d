"""What ``cellclf info`` prints about a slide: metadata, pyramid, tissue area, fast-path levels.

The tissue area is measured exactly as ``cellclf infer`` measures it for the report (the same
thumbnail size, :func:`cellclf.wsi.tissue.tissue_thumbnail_px`, and the same mask), so the two agree.
A slide whose metadata lacks the pixel size still gets everything that does not need it, with
``mpp`` None and a note saying how to pass ``--mpp``.
"""

from __future__ import annotations

from pathlib import Path

from cellclf.errors import MissingMppError
from cellclf.wsi.jpeg_tiles import probe
from cellclf.wsi.slide import Slide
from cellclf.wsi.tissue import slide_tissue_mask

PLACEHOLDER_MPP = 0.25  # only to open a slide without a stated pixel size; never reported


def slide_info(path: str | Path, mpp: float | None = None, max_px: int | None = None) -> dict:
    """What ``cellclf info`` prints: metadata, pyramid, tissue area and the fast-path levels."""
    note = None
    try:
        slide = Slide(path, mpp)
    except MissingMppError as exc:
        note = str(exc)
        slide = Slide(path, PLACEHOLDER_MPP)
    with slide:
        fast = probe(slide.path, slide.level_dimensions, slide.vendor)
        facts = {
            "path": str(slide.path), "vendor": slide.vendor,
            "mpp": None if note else slide.mpp, "mpp_source": "missing" if note else slide.mpp_source,
            "objective_power": slide.objective_power, "width": slide.width, "height": slide.height,
            "levels": [{"width": w, "height": h, "downsample": ds, "fast_jpeg": i in fast}
                       for i, ((w, h), ds) in enumerate(zip(slide.level_dimensions,
                                                            slide.level_downsamples,
                                                            strict=True))],
            "tissue_area_mm2": None, "tissue_fraction": None, "note": note,
        }
        if note is None:  # the mask's morphology is sized in µm: it needs the real pixel size
            tissue = slide_tissue_mask(slide, max_px=max_px)
            facts["tissue_area_mm2"] = tissue.area_mm2(slide.mpp)
            facts["tissue_fraction"] = tissue.fraction
        return facts
