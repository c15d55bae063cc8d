"""The device stage of ``run_slide``: detect → crop → classify for batches of tiles on one torch
device (the GPU in production; the CPU in tests), so crops never leave the device before the model.

Where it sits: tiles arrive either decoded by the ``TileReader`` threads on the CPU (uploaded once
per batch, :meth:`DeviceStage.run`) or decoded on the device itself from the file's JPEG bytes
(:mod:`cellclf.wsi.device_decode`, :meth:`DeviceStage.run_decoding`) → the
:class:`~cellclf.detect.classical_torch.TorchDetector` computes the smoothed maps and local maxima on the
device → the per-tile merge/refine step (numpy, the same code as the CPU detector) runs in a thread
pool on the host → crops are gathered from the tiles still on the device → the engine classifies
them (bf16 autocast on CUDA) → probabilities come back to the host for the gate; review crops of
gated cells are gathered on the device too. Only the maps, the peaks, the probabilities and the
gated cells' crops cross PCIe.

Batches are pipelined two deep: the device work of batch k+1 is issued before batch k's host-side
merge results are awaited, so the GPU, the reader threads and the merge threads overlap.
Candidates, crops and probabilities equal those of the CPU path (tested on CPU).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from cellclf.detect.classical import DetectParams, postprocess
from cellclf.detect.classical_torch import TorchDetector
from cellclf.errors import ConfigError
from cellclf.model.engine import TorchEngine
from cellclf.pipeline.stage import REVIEW_CONTEXT_PX, CellBatch
from cellclf.wsi.crops import crop_corners
from cellclf.wsi.device_decode import DeviceTileReader, device_readable, plan_key
from cellclf.wsi.tile_reader import TileReader, default_workers
from cellclf.wsi.tiling import Tile


@dataclass
class StageOutput:
    """Owned cells of one batch of tiles: level-0 centres, probabilities, and where each came from."""

    xy0: np.ndarray  # (N, 2) float64 level-0 px
    probs: np.ndarray  # (N, K) float32
    tiles: list  # the batch's Tiles
    x: torch.Tensor  # (B, H, W, 3) uint8: the batch's windows, still on the device
    tile_of: np.ndarray  # (N,) index into ``tiles``
    centres_px: np.ndarray  # (N, 2) float32 tile px


@dataclass
class _Pending:
    tiles: list
    x: torch.Tensor  # (B, H, W, 3) uint8 on the device
    futures: list[Future]


class DeviceStage:
    """Detect, crop and classify batches of tiles on ``engine.device`` (a TorchEngine).

    :meth:`run` (the :class:`~cellclf.pipeline.stage.Stage` interface) reads ``reader``'s tiles,
    decoded on the device when ``device_decode`` is "on", or "auto" on CUDA where
    :func:`~cellclf.wsi.device_decode.device_readable` says the slide allows it."""

    def __init__(self, engine: TorchEngine, work_mpp: float, crop_px: int, *,
                 reader: TileReader | None = None, device_decode: str = "auto",
                 io_workers: int = 0, tiles_per_batch: int = 8, merge_workers: int = 4,
                 params: DetectParams | None = None) -> None:
        if device_decode not in ("auto", "on", "off"):
            raise ConfigError(f"device_decode must be auto, on or off, got {device_decode!r}")
        self.engine, self.reader, self.device_decode = engine, reader, device_decode
        self.io_workers = io_workers or default_workers()
        self.device = torch.device(engine.device)
        self.work_mpp, self.crop_px = float(work_mpp), int(crop_px)
        self.tiles_per_batch = max(1, tiles_per_batch)
        self.params = params or DetectParams()
        self.detector = TorchDetector(self.params, self.device)
        self.pool = ThreadPoolExecutor(max(1, merge_workers), thread_name_prefix="cellclf-merge")
        # wall seconds the calling thread spent in each step (device work is asynchronous: it is
        # paid where the host next waits for it, the maps' copy back or the probabilities)
        self.steps: dict[str, float] = {"windows": 0.0, "detect": 0.0, "merge_wait": 0.0,
                                        "classify": 0.0}
        self.waited = 0.0  # seconds the consumer of :meth:`run` waited for a batch
        self.info = {"stage": "device", "decode": "host"}

    @property
    def timings(self) -> dict[str, float]:
        """As written to summary.json: the consumer's wait, then the steps above."""
        return {"device_stage_wait": self.waited,
                **{f"device_{k}": v for k, v in self.steps.items()}}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DeviceStage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pipeline -------------------------------------------------------------------------------
    def run(self, tiles: list[Tile]) -> Iterator[CellBatch]:
        """The slide's ``tiles`` read by ``reader`` → batches of classified cells, in order; review
        images of chosen rows are cut on the device from the batch's tiles."""
        if self.reader is None:
            raise ConfigError("DeviceStage.run needs the slide's TileReader (reader=...)")
        with ExitStack() as stack:
            decode_here = self.device_decode == "on" or (
                self.device_decode == "auto" and self.device.type == "cuda"
                and device_readable(self.reader, tiles))
            if decode_here:
                dreader = stack.enter_context(DeviceTileReader(self.reader, self.device,
                                                               io_workers=self.io_workers))
                outputs = self.run_decoding(tiles, dreader)
                self.info["decode"] = "device"
            else:
                outputs = self.run_decoded(self.reader.iter_tiles(tiles))
            while True:
                t0 = time.perf_counter()
                out = next(outputs, None)
                self.waited += time.perf_counter() - t0
                if out is None:
                    break
                yield CellBatch(out.xy0, out.probs, lambda rows, out=out: self._review_images(out, rows),
                                len(out.tiles))

    def _review_images(self, out: StageOutput, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        owner, centres = out.tile_of[rows], out.centres_px[rows]
        return (self.gather_crops(out.x, owner, centres, self.crop_px).cpu().numpy(),
                self.gather_crops(out.x, owner, centres, REVIEW_CONTEXT_PX).cpu().numpy())

    def run_decoded(self, tiles: Iterable[tuple]) -> Iterator[StageOutput]:
        """``(tile, rgb)`` decoded on the host in → one :class:`StageOutput` per batch of
        equally-sized tiles, in order."""
        cuda = self.device.type == "cuda"

        def upload(batch: list[tuple]) -> tuple[list, torch.Tensor]:
            host = torch.from_numpy(np.stack([rgb for _, rgb in batch]))
            x = (host.pin_memory() if cuda else host).to(self.device, non_blocking=cuda)
            return [t for t, _ in batch], x

        batches = consecutive_batches(tiles, self.tiles_per_batch, lambda item: item[1].shape)
        return self._pipeline(upload(b) for b in batches)

    def run_decoding(self, tiles: list, reader: DeviceTileReader) -> Iterator[StageOutput]:
        """Tiles decoded on the device by a :class:`~cellclf.wsi.device_decode.DeviceTileReader`; the
        host reads the next batch's JPEG bytes while the device decodes this one."""
        batches = list(consecutive_batches(tiles, self.tiles_per_batch,
                                           lambda t: plan_key(reader.reader, t)))

        def windows() -> Iterator[tuple[list, torch.Tensor]]:
            with ThreadPoolExecutor(1, thread_name_prefix="cellclf-fetch") as fetcher:
                nxt = fetcher.submit(reader.fetch, batches[0]) if batches else None
                for i, batch in enumerate(batches):
                    fetched = nxt.result()
                    if i + 1 < len(batches):
                        nxt = fetcher.submit(reader.fetch, batches[i + 1])
                    yield batch, reader.decode(fetched)

        return self._pipeline(windows())

    def _pipeline(self, windows: Iterable[tuple[list, torch.Tensor]]) -> Iterator[StageOutput]:
        previous: _Pending | None = None
        windows = iter(windows)
        while True:
            t0 = time.perf_counter()
            item = next(windows, None)
            self.steps["windows"] += time.perf_counter() - t0
            if item is None:
                break
            current = self._launch(*item)
            if previous is not None:
                yield self._finish(previous)
            previous = current
        if previous is not None:
            yield self._finish(previous)

    def _launch(self, tiles: list, x: torch.Tensor) -> _Pending:
        """Maps and peaks of a batch on the device; the merge goes to the pool."""
        t0 = time.perf_counter()
        sm, ridge, body, f = self.detector.smoothed(x, self.work_mpp)
        peaks = self.detector.peaks(sm, f * self.work_mpp)
        maps = torch.stack((sm, ridge, body), dim=1).cpu().numpy()  # (B, 3, h, w)
        pk = peaks.cpu().numpy()
        bounds = np.searchsorted(pk[:, 0], np.arange(len(tiles) + 1))
        futures = [self.pool.submit(_merge, maps[j], pk[bounds[j]:bounds[j + 1], 1:], f,
                                    self.work_mpp, self.params, tile)
                   for j, tile in enumerate(tiles)]
        self.steps["detect"] += time.perf_counter() - t0
        return _Pending(tiles, x, futures)

    def _finish(self, pending: _Pending) -> StageOutput:
        """Owned centres → crops gathered on the device → probabilities on the host."""
        t0 = time.perf_counter()
        xy0s, centres, tile_of = [], [], []
        for j, fut in enumerate(pending.futures):
            c, xy0 = fut.result()
            xy0s.append(xy0)
            centres.append(c)
            tile_of.append(np.full(len(c), j, np.int64))
        xy0 = np.concatenate(xy0s) if xy0s else np.zeros((0, 2))
        cxy = np.concatenate(centres) if centres else np.zeros((0, 2), np.float32)
        t_idx = np.concatenate(tile_of) if tile_of else np.zeros(0, np.int64)
        t1 = time.perf_counter()
        self.steps["merge_wait"] += t1 - t0
        k = len(self.engine.classes)
        if len(xy0) == 0:
            return StageOutput(xy0.reshape(0, 2), np.zeros((0, k), np.float32), pending.tiles,
                               pending.x, t_idx, cxy.reshape(0, 2))
        probs = self.engine.classify_tensor(self.gather_crops(pending.x, t_idx, cxy, self.crop_px))
        self.steps["classify"] += time.perf_counter() - t1
        return StageOutput(xy0, probs, pending.tiles, pending.x, t_idx, cxy)

    def gather_crops(self, x: torch.Tensor, tile_idx: np.ndarray, centres_px: np.ndarray,
                     crop_px: int) -> torch.Tensor:
        """(N, crop_px, crop_px, 3) uint8 windows of the device tiles ``x`` centred on tile-px
        centres, with :func:`cellclf.wsi.crops.crop_corners`'s rounding; white outside the tile
        (exactly ``cut_crops``)."""
        _, h, w, _ = x.shape
        corners = torch.as_tensor(crop_corners(centres_px, crop_px), device=x.device)
        offsets = torch.arange(crop_px, device=x.device)
        rows = corners[:, 1, None] + offsets  # (N, crop)
        cols = corners[:, 0, None] + offsets
        t = torch.as_tensor(tile_idx, device=x.device)
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        crops = x[t[:, None, None], rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
        if not bool(inside.all()):
            crops = torch.where(inside[..., None], crops, torch.full_like(crops, 255))
        return crops


def _merge(maps: np.ndarray, rc: np.ndarray, f: int, mpp: float, params: DetectParams,
           tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """Host side of detection for one tile: merge/refine peaks, keep the centres the tile owns."""
    return tile.owned_cells(postprocess(maps[0], maps[1], maps[2], rc, f, mpp, params))


def consecutive_batches(items: Iterable, n: int, key) -> Iterator[list]:
    """Consecutive runs of at most ``n`` items with one ``key`` (a key change starts a new batch)."""
    batch: list = []
    for item in items:
        if batch and (len(batch) >= n or key(item) != key(batch[0])):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch
