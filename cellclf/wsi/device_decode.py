"""Tile windows decoded on the device: the ``read`` stage of the device pipeline, when it pays.

Where it sits: in place of the :class:`~cellclf.wsi.tile_reader.TileReader` threads, in front of
:class:`~cellclf.pipeline.device_stage.DeviceStage`.
For a batch of tiles, the host only ``pread``s the raw JPEG
tiles of the file (the fast path's :mod:`cellclf.wsi.jpeg_tiles` layout); ``torchvision.io.decode_jpeg``
decodes them all in one batched call on the device (nvJPEG on CUDA), the windows are assembled on the
device, and the downsample to the working mpp runs there too. Pixels never cross PCIe as pixels.

The downsample reproduces the host reader exactly for the case it serves: a read exactly 2× finer
than the working mpp at an integer level position (a 40× slide read at 0.5 µm/px from level 0). The
host reader's Pillow bilinear reduction is then a separable 4-tap filter (1, 3, 3, 1) / 8 with
rounding after each pass (horizontal first), which is integer arithmetic here, bit for bit.
Windows at other scales, RGB-coded JPEG (Aperio's convention; nvJPEG assumes YCbCr) and
non-JPEG levels are left to the host reader: :func:`device_readable` says which.
On the CPU (tests) torchvision decodes with libjpeg-turbo, so the pixels equal the host reader's;
nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few grey levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from cellclf.wsi.jpeg_tiles import JpegTileSource
from cellclf.wsi.slide import ReadPlan, plan_read
from cellclf.wsi.tiling import Tile


def plan_key(reader, tile: Tile) -> tuple:
    """Tiles with equal keys share one canvas and one reduction (a device batch)."""
    p = _plan(reader, tile)
    return (p.level, p.w, p.h, p.out_w, p.out_h, None if p.box is None else p.box[:2])


def _plan(reader, tile: Tile) -> ReadPlan:
    x0, y0, x1, y1 = tile.read
    return plan_read(reader.level_downsamples, x0, y0, x1 - x0, y1 - y0, tile.out_w, tile.out_h)


def _exact_half(plan: ReadPlan) -> bool:
    """The plan reduces its level pixels exactly 2× from an integer offset (or not at all)."""
    if plan.box is None:
        return True
    bx0, by0, bx1, by1 = plan.box
    return (bx0 == int(bx0) and by0 == int(by0) and bx0 >= 1 and by0 >= 1
            and bx1 - bx0 == 2 * plan.out_w and by1 - by0 == 2 * plan.out_h
            and bx0 + 2 * plan.out_w + 1 < plan.w and by0 + 2 * plan.out_h + 1 < plan.h)


def device_readable(reader, tiles: Sequence[Tile]) -> bool:
    """Whether every tile's window can be decoded and reduced on the device (see module doc)."""
    for tile in tiles:
        plan = _plan(reader, tile)
        level = reader.fast_levels.get(plan.level)
        if level is None or level.colorspace != "YCbCr" or not _exact_half(plan):
            return False
    return True


def reduce_half(x: torch.Tensor, bx: int, by: int, out_w: int, out_h: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, out_h, out_w, 3): Pillow's bilinear 2× reduction from integer box
    offsets (bx, by), horizontal pass then vertical, each rounded to uint8 (pure integer maths)."""
    def one_axis(v: torch.Tensor, start: int, n: int, dim: int) -> torch.Tensor:
        taps = [v.narrow(dim, start - 1 + k, 2 * n - 1)[(slice(None),) * dim + (slice(None, None, 2),)]
                for k in range(4)]
        s = taps[0] + 3 * (taps[1] + taps[2]) + taps[3] + 4
        return torch.bitwise_right_shift(s, 3)

    v = x.to(torch.int16)
    v = one_axis(v, bx, out_w, 2)
    v = one_axis(v, by, out_h, 1)
    return v.to(torch.uint8)


class DeviceTileReader:
    """Reads batches of tile windows of one slide onto ``device`` (see module doc)."""

    def __init__(self, reader, device: str | torch.device, io_workers: int = 8) -> None:
        self.reader = reader
        self.device = torch.device(device)
        self.levels = reader.fast_levels
        self._source = JpegTileSource(reader.path, self.levels)  # its own file handle
        self._pool = ThreadPoolExecutor(max(1, io_workers), thread_name_prefix="cellclf-pread")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._source.close()

    def __enter__(self) -> DeviceTileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bytes(self, level: int, index: int) -> torch.Tensor | None:
        data = self._source.raw_tile(level, index)
        if data is None:
            return None
        tables = self.levels[level].tables
        if tables:  # abbreviated stream: the tables' SOI…(no EOI) + the tile's data after SOI
            data = tables[:-2] + data[2:]
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def fetch(self, tiles: Sequence[Tile]) -> tuple[list[ReadPlan], list[tuple[int, int]], list]:
        """Host part (threads): plans, the JPEG tiles they need and those tiles' bytes."""
        plans = [_plan(self.reader, t) for t in tiles]
        keys = list(dict.fromkeys((p.level, span[0]) for p in plans
                                  for span in self.levels[p.level].spans(p.x, p.y, p.w, p.h)))
        data = list(self._pool.map(lambda k: self._bytes(*k), keys))
        return plans, keys, data

    def decode(self, fetched: tuple) -> torch.Tensor:
        """Device part: batched decode, assembly and reduction → (B, out_h, out_w, 3) uint8."""
        import warnings

        plans, keys, data = fetched
        present = [i for i, d in enumerate(data) if d is not None]
        with warnings.catch_warnings():  # torchvision ≥ 0.29 points to torchcodec; still works
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import decode_jpeg

            decoded = decode_jpeg([data[i] for i in present], device=self.device) if present else []
        tiles = {keys[i]: img for i, img in zip(present, decoded, strict=True)}
        p0 = plans[0]
        canvas = torch.full((len(plans), p0.h, p0.w, 3), 255, dtype=torch.uint8, device=self.device)
        for b, p in enumerate(plans):
            for index, ox, oy, ax0, ay0, ax1, ay1 in self.levels[p.level].spans(p.x, p.y, p.w, p.h):
                img = tiles.get((p.level, index))
                if img is not None:  # a missing tile stays white
                    part = img[:3, ay0 - oy:ay1 - oy, ax0 - ox:ax1 - ox].permute(1, 2, 0)
                    canvas[b, ay0 - p.y:ay1 - p.y, ax0 - p.x:ax1 - p.x] = part
        if p0.box is None:
            return canvas
        return reduce_half(canvas, int(p0.box[0]), int(p0.box[1]), p0.out_w, p0.out_h)

    def read_batch(self, tiles: Sequence[Tile]) -> torch.Tensor:
        """Windows of equally-sized ``tiles`` at the working mpp on the device."""
        return self.decode(self.fetch(tiles))
