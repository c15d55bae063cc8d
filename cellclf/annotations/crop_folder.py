"""Crop folders for training: ``DIR/<class>/*.png|jpg`` read into uint8 crops at the model's
field of view.

Sits at the start of the training flow beside :mod:`~cellclf.annotations.labelled_data` (which
recognises a crop
folder in ``discover``): crops at another µm/px or size are rescaled and centre-cut or padded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellclf.annotations.labelled_data import IMAGE_EXTS, ClassMap
from cellclf.errors import AnnotationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropFolder:
    crops: np.ndarray  # (N, crop_px, crop_px, 3) uint8
    labels: np.ndarray  # (N,) int64 into classes
    files: tuple[Path, ...]
    resized: int  # how many crops were rescaled to the model's field of view


def fit_crop(img: np.ndarray, crop_mpp: float, work_mpp: float, crop_px: int) -> np.ndarray:
    """Rescale an RGB crop from ``crop_mpp`` to ``work_mpp`` and centre-crop/pad (white) to
    ``crop_px`` so it covers the model's field of view (crop_px × work_mpp µm)."""
    from PIL import Image

    h, w = img.shape[:2]
    scale = crop_mpp / work_mpp
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))
    out = np.full((crop_px, crop_px, 3), 255, dtype=np.uint8)
    sy, sx = max(0, (nh - crop_px) // 2), max(0, (nw - crop_px) // 2)
    dy, dx = max(0, (crop_px - nh) // 2), max(0, (crop_px - nw) // 2)
    ch, cw = min(crop_px, nh), min(crop_px, nw)
    out[dy:dy + ch, dx:dx + cw] = img[sy:sy + ch, sx:sx + cw]
    return out


def read_crop_folder(path: str | Path, class_map: ClassMap, crop_px: int, work_mpp: float,
                     crop_mpp: float | None) -> CropFolder:
    """Read ``DIR/<class>/*.png|jpg``. The crops' µm/px (``crop_mpp``) is required; crops at
    another mpp or size are rescaled to the model's field of view with a warning."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if crop_mpp is None:
        raise AnnotationError(f"{root}: a crop folder needs the crops' pixel size: pass --mpp "
                              f"(µm/px; the model works at {work_mpp}) or data.crop_mpp=…")
    crops, labels, files = [], [], []
    resized = 0
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = class_map.index(d.name, where=str(d))
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS):
            try:
                with Image.open(f) as im:
                    img = np.asarray(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise AnnotationError(f"{f}: not a readable image ({exc}); remove it") from None
            if img.shape[:2] != (crop_px, crop_px) or abs(crop_mpp - work_mpp) > 1e-6:
                img = fit_crop(img, crop_mpp, work_mpp, crop_px)
                resized += 1
            crops.append(img)
            labels.append(label)
            files.append(f)
    if not crops:
        raise AnnotationError(f"{root}: no .png/.jpg crops found under {root}/<class>/")
    if resized:
        log.warning("%s: %d of %d crops rescaled from %.3g µm/px to the model's %d px at %.3g "
                    "µm/px", root, resized, len(crops), crop_mpp, crop_px, work_mpp)
    return CropFolder(np.stack(crops), np.array(labels, dtype=np.int64), tuple(files), resized)
