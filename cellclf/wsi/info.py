"""What ``cellclf info`` prints about a slide: metadata, pyramid, tissue area, fast-path levels."""

from __future__ import annotations

from pathlib import Path

from cellclf.wsi.jpeg_tiles import probe
from cellclf.wsi.slide import Slide
from cellclf.wsi.tissue import slide_tissue_mask


def slide_info(path: str | Path, mpp: float | None = None, max_px: int = 2048) -> dict:
    """What ``cellclf info`` prints: metadata, pyramid, tissue area and the fast-path levels."""
    with Slide(path, mpp) as slide:
        tissue = slide_tissue_mask(slide, max_px=max_px)
        fast = probe(slide.path, slide.level_dimensions, slide.vendor)
        return {
            "path": str(slide.path), "vendor": slide.vendor, "mpp": slide.mpp,
            "mpp_source": slide.mpp_source, "objective_power": slide.objective_power,
            "width": slide.width, "height": slide.height,
            "levels": [{"width": w, "height": h, "downsample": ds, "fast_jpeg": i in fast}
                       for i, ((w, h), ds) in enumerate(zip(slide.level_dimensions,
                                                            slide.level_downsamples,
                                                            strict=True))],
            "tissue_area_mm2": tissue.area_mm2(slide.mpp), "tissue_fraction": tissue.fraction,
        }
