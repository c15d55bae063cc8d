"""A crop batch from another "source": the same cells with another stain and a softer focus.

``python scripts/real/shift_crops.py IN OUT`` writes ``OUT/<class>/<name>.png`` for every image of
``IN/<class>/``: optical density OD = −log10((I + 1) / 256) scaled per channel by
:data:`OD_SCALE` (R, G, B; a smear stained longer and bluer: more absorption in red and green)
and a Gaussian blur of :data:`BLUR_UM` µm at the images' µm/px (``--mpp``, default 0.1), as
another lab's stain and scanner focus would give. Deterministic (no randomness).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

OD_SCALE = np.array([1.35, 1.2, 0.9])
BLUR_UM = 0.4
EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def shift(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Stain and focus shift of one uint8 RGB image (module docstring)."""
    od = -np.log10((rgb.astype(np.float64) + 1.0) / 256.0) * OD_SCALE
    out = np.clip(np.round(256.0 * 10.0 ** (-od) - 1.0), 0, 255).astype(np.uint8)
    blurred = Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=BLUR_UM / mpp))
    return np.asarray(blurred)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--mpp", type=float, default=0.1)
    args = ap.parse_args()
    n = 0
    for d in sorted(p for p in args.src.iterdir() if p.is_dir()):
        (args.out / d.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in EXTS):
            rgb = np.asarray(Image.open(f).convert("RGB"))
            Image.fromarray(shift(rgb, args.mpp)).save(args.out / d.name / f"{f.stem}.png")
            n += 1
    print(f"wrote {n} shifted crops to {args.out} (OD × {OD_SCALE.tolist()}, blur {BLUR_UM} µm)")


if __name__ == "__main__":
    main()
