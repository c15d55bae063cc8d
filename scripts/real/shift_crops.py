"""A crop batch from another "source": the same cells with another stain and a softer focus.

``python scripts/real/shift_crops.py IN OUT [--strength mild|strong]`` writes
``OUT/<class>/<name>.png`` for every image of ``IN/<class>/``: optical density
OD = −log10((I + 1) / 256) scaled per channel (R, G, B) and a Gaussian blur in µm at the images'
µm/px (``--mpp``, default 0.1), as another lab's stain and scanner focus would give (:data:`SHIFTS`:
"mild" = a smear stained a little longer and bluer, "strong" = a clearly different stain protocol
and a defocused scanner). Deterministic (no randomness).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SHIFTS = {"mild": (np.array([1.35, 1.2, 0.9]), 0.4),  # OD scale per R, G, B; blur σ in µm
          "strong": (np.array([1.8, 1.5, 0.7]), 1.0)}
EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def shift(rgb: np.ndarray, mpp: float, strength: str = "mild") -> np.ndarray:
    """Stain and focus shift of one uint8 RGB image (module docstring)."""
    od_scale, blur_um = SHIFTS[strength]
    od = -np.log10((rgb.astype(np.float64) + 1.0) / 256.0) * od_scale
    out = np.clip(np.round(256.0 * 10.0 ** (-od) - 1.0), 0, 255).astype(np.uint8)
    blurred = Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=blur_um / mpp))
    return np.asarray(blurred)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--mpp", type=float, default=0.1)
    ap.add_argument("--strength", choices=sorted(SHIFTS), default="mild")
    args = ap.parse_args()
    n = 0
    for d in sorted(p for p in args.src.iterdir() if p.is_dir()):
        (args.out / d.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in EXTS):
            rgb = np.asarray(Image.open(f).convert("RGB"))
            Image.fromarray(shift(rgb, args.mpp, args.strength)).save(args.out / d.name / f"{f.stem}.png")
            n += 1
    od_scale, blur_um = SHIFTS[args.strength]
    print(f"wrote {n} {args.strength}ly shifted crops to {args.out} (OD × {od_scale.tolist()}, "
          f"blur {blur_um} µm)")


if __name__ == "__main__":
    main()
