"""Native-resolution review views, cut from the slide on demand.

Batch inference stores each queued cell's crop and context at the model's µm/px (0.5: half the
resolution of a 40× scan) as small JPEGs. While the slide file is reachable at the path inference
recorded (``items.slide_path``), the review app shows the same field of view at the slide's own
level-0 resolution instead: :class:`NativeViews` opens the slide (a few kept open), cuts the box
centred on the cell and encodes it as JPEG. When the slide is gone (moved, another machine), the
app falls back to the stored images; both carry their µm/px for the scale bar.

The path comes from the store (written by ``cellclf infer``), never from a request.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from cellclf.errors import CellclfError
from cellclf.review.types import Item
from cellclf.wsi.crops import crop_corners
from cellclf.wsi.slide import Slide

NATIVE_JPEG_QUALITY = 92
MAX_NATIVE_SIDE_PX = 1024  # a 80 µm context at 0.08 µm/px; larger asks are refused
OPEN_SLIDES = 8


def image_side_px(data: bytes) -> int:
    """Width of a stored PNG/JPEG image (header only; the stored views are square)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return int(img.size[0])


def native_side_px(stored_side_px: int, image_mpp: float, slide_mpp: float) -> int:
    """Side in level-0 px of the box the stored view covers (same µm extent)."""
    return max(1, round(stored_side_px * image_mpp / slide_mpp))


def native_box(x: float, y: float, side_px: int) -> tuple[int, int]:
    """Top-left level-0 px of the ``side_px`` box centred on (x, y), rounded as crops are."""
    corner = crop_corners(np.array([[x, y]]), side_px)[0]
    return int(corner[0]), int(corner[1])


class NativeViews:
    """Open slides by stored path, or by name in ``slide_dirs`` (at most ``OPEN_SLIDES`` kept), and
    cut native views."""

    def __init__(self, max_open: int = OPEN_SLIDES, slide_dirs: tuple[Path, ...] = ()) -> None:
        """``slide_dirs``: folders to look in, by file name, when a slide is no longer at the
        path inference recorded (moved, or this machine mounts the slides elsewhere)."""
        self.max_open = max_open
        self.slide_dirs = tuple(Path(d) for d in slide_dirs)
        self._open: OrderedDict[tuple[str, float, float], Slide] = OrderedDict()  # path, mtime, mpp
        self._unreadable: set[tuple[str, float, float]] = set()  # not retried until it changes
        self._lock = threading.Lock()

    def slide_for(self, item: Item) -> Slide | None:
        """The item's slide, open (at the recorded ``slide_mpp``, else the file's own pixel size);
        None when the item predates pixel sizes or the slide file is not reachable or not readable
        here."""
        if not item.slide_path or item.image_mpp is None:
            return None
        path = self.locate(item.slide_path)
        if path is None:
            return None
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (str(path), stat.st_mtime, float(item.slide_mpp or 0.0))
        with self._lock:
            slide = self._open.get(key)
            if slide is not None:
                self._open.move_to_end(key)
                return slide
            if key in self._unreadable:
                return None
            try:
                slide = Slide(path, mpp=item.slide_mpp)
            except (CellclfError, OSError):
                self._unreadable.add(key)
                return None
            self._open[key] = slide
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
            return slide

    def locate(self, recorded: str) -> Path | None:
        """The recorded slide path when it is a file here, else the first ``slide_dirs`` entry
        holding a file of the same name; None when neither exists."""
        path = Path(recorded)
        for candidate in (path, *(d / path.name for d in self.slide_dirs)):
            if candidate.is_file():
                return candidate
        return None

    def native_mpp(self, item: Item) -> float | None:
        """The µm/px of the item's native views; None when the slide is not reachable."""
        slide = self.slide_for(item)
        return None if slide is None else slide.mpp

    def view_jpeg(self, item: Item, stored: bytes) -> bytes | None:
        """The field of view of the ``stored`` image at the slide's level-0 resolution, as JPEG;
        None when the slide is not reachable."""
        slide = self.slide_for(item)
        if slide is None or item.image_mpp is None:
            return None
        side = native_side_px(image_side_px(stored), item.image_mpp, slide.mpp)
        if side > MAX_NATIVE_SIDE_PX:
            return None
        x0, y0 = native_box(item.x, item.y, side)
        rgb, _shift = slide.read_level(0, x0, y0, side, side)
        import imagecodecs

        return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb), level=NATIVE_JPEG_QUALITY))

    def close(self) -> None:
        with self._lock:
            for slide in self._open.values():
                slide.close()
            self._open.clear()
