"""The tile reader's 2× reduction to the working resolution, off the GIL (stage ``read``).

A 40× scan read at the model's 0.5 µm/px is a level-0 window reduced exactly 2×:
:func:`cellclf.wsi.slide.finish_read` sends such reads here instead of to Pillow. The result is
Pillow's BILINEAR resize of the same box bit for bit (tested); numpy's array operations release
the GIL, so the reader's threads reduce in parallel, and there are no fromarray/asarray copies.
No project imports.
"""

from __future__ import annotations

import numpy as np


def halves_exactly(level_rgb: np.ndarray, box: tuple[float, float, float, float], out_w: int,
                   out_h: int) -> bool:
    """Resizing ``box`` of ``level_rgb`` to ``out_w × out_h`` is an exact 2× reduction of an
    integer box with a pixel of the array around it on every side (the tile reader's
    working-resolution reads of a 40× scan)."""
    bx0, by0, bx1, by1 = box
    h, w = level_rgb.shape[:2]
    return (level_rgb.dtype == np.uint8 and level_rgb.ndim == 3 and level_rgb.shape[2] == 3
            and all(float(v).is_integer() for v in box)
            and bx1 - bx0 == 2 * out_w and by1 - by0 == 2 * out_h
            and bx0 >= 1 and by0 >= 1 and bx1 + 1 <= w and by1 + 1 <= h)


def reduce_half_bilinear(rgb: np.ndarray, x0: int, y0: int, out_w: int, out_h: int) -> np.ndarray:
    """Pillow's BILINEAR ``resize((out_w, out_h), box=(x0, y0, x0 + 2·out_w, y0 + 2·out_h))``,
    bit for bit, in numpy (whose array operations release the GIL, so reader threads scale; about
    twice Pillow's speed here). At an exact 2× reduction Pillow's 4 taps per axis weigh
    1/8, 3/8, 3/8, 1/8 (exact in its 22-bit fixed point): ``(a + 3b + 3c + d + 4) >> 3``, first
    along rows, rounded to uint8, then along columns. Needs a pixel of ``rgb`` beyond the box on
    every side (:func:`halves_exactly`). Works in bands of output rows (small temporaries)."""
    out = np.empty((out_h, out_w, 3), np.uint8)
    flat = rgb.reshape(rgb.shape[0], -1)  # whole rows of bytes: taps are shifted slices of them
    b0, length = 3 * (x0 - 1), 3 * (2 * out_w - 1)
    for r0 in range(0, out_h, _BAND_ROWS):
        r1 = min(out_h, r0 + _BAND_ROWS)
        rows = flat[y0 - 1 + 2 * r0:y0 + 1 + 2 * r1]  # input rows of the band's taps
        every = _taps4(*(rows[:, b0 + 3 * k:b0 + 3 * k + length] for k in range(4)))
        pixels = every.view(np.dtype((np.void, 3)))[:, ::2]  # the even pixels are the outputs
        across = np.ascontiguousarray(pixels).view(np.uint8).reshape(len(rows), out_w, 3)
        n = r1 - r0
        out[r0:r1] = _taps4(*(across[k:k + 2 * n - 1:2] for k in range(4)))
    return out


_BAND_ROWS = 64  # output rows per band of reduce_half_bilinear (temporaries ~2 MB at 1188 px)


def _taps4(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    t = np.add(b, c, dtype=np.uint16)
    t *= 3
    np.add(t, a, out=t)
    np.add(t, d, out=t)
    t += 4
    t >>= 3
    return t.astype(np.uint8)
