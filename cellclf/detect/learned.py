"""The learned detector at inference, torch-free: a detector bundle's ONNX heat map → cell centres.

Sits where the classical detector sits (``detect(tile_rgb, mpp) -> centres``)::

    RGB tile at any mpp ──resample to the card's mpp──▶ uint8[1, H, W, 3] (padded to ×4)
      ──onnxruntime (or torch)──▶ heat [0, 1] ──heat_peaks──▶ centres (tile px, continuous)

A detector bundle is a folder with ``card.json`` (the preprocessing contract: ``mpp``, input
layout, ``stride``; the peak rule: ``threshold``, ``peak_radius_um``; training data and their
terms) and the ONNX file named by ``card["onnx"]["file"]`` (sha256 checked). numpy/scipy +
onnxruntime only; the torch path (:meth:`LearnedDetector.detect_batch_torch`) is for the device
stage and the parity test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cellclf.card import file_sha256
from cellclf.detect.classical import _refine
from cellclf.errors import BundleError

SHIPPED_DETECTOR = Path(__file__).resolve().parents[2] / "models" / "cellclf-detector-v2"


def read_detector_card(bundle: str | Path) -> dict:
    """``card.json`` of a detector bundle (BundleError naming the folder when absent or bad)."""
    path = Path(bundle) / "card.json"
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{bundle}: not a detector bundle (cannot read card.json: {e}); pass the "
                          f"folder made by `cellclf train-detector` or {SHIPPED_DETECTOR}") from e
    if card.get("kind") != "cell-detector":
        raise BundleError(f"{path}: kind is {card.get('kind')!r}, not 'cell-detector'")
    return card


def resample(tile_rgb: np.ndarray, scale: float) -> np.ndarray:
    """RGB uint8 tile resized by ``scale`` (output px per input px); box filter when shrinking."""
    if abs(scale - 1.0) < 1e-3:
        return tile_rgb
    from PIL import Image

    h, w = tile_rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample_filter = Image.BOX if scale < 1 else Image.BILINEAR
    return np.asarray(Image.fromarray(tile_rgb).resize(size, resample_filter))


def pad_to(tile_rgb: np.ndarray, stride: int) -> np.ndarray:
    """Pad bottom/right by edge replication to multiples of ``stride``."""
    h, w = tile_rgb.shape[:2]
    ph, pw = (-h) % stride, (-w) % stride
    if ph == 0 and pw == 0:
        return tile_rgb
    return np.pad(tile_rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")


def heat_peaks(heat: np.ndarray, radius_px: int, threshold: float) -> np.ndarray:
    """(row, col) of heat-map pixels equal to their (2r+1)² window maximum and ≥ threshold, then
    plateau twins (exact ties within the window) reduced to the first in row-major order."""
    from scipy import ndimage

    mx = ndimage.maximum_filter(heat, size=2 * radius_px + 1, mode="nearest")
    rc = np.argwhere((heat == mx) & (heat >= threshold))
    if len(rc) < 2:
        return rc
    from scipy.spatial import cKDTree

    drop = np.zeros(len(rc), dtype=bool)
    for i, j in sorted(cKDTree(rc).query_pairs(radius_px)):
        if not drop[i]:
            drop[j] = True
    return rc[~drop]


class LearnedDetector:
    """``detector(tile_rgb, mpp) -> centres`` (M×2 float32 tile px) from a detector bundle."""

    def __init__(self, bundle: str | Path = SHIPPED_DETECTOR, threads: int = 0) -> None:
        self.bundle = Path(bundle)
        self.card = read_detector_card(self.bundle)
        self.mpp = float(self.card["mpp"])
        self.stride = int(self.card["stride"])
        self.threshold = float(self.card["threshold"])
        self.radius_px = max(1, int(round(float(self.card["peak_radius_um"]) / self.mpp)))
        self._threads = threads
        self._session = None

    def _onnx(self):
        if self._session is None:
            import onnxruntime as ort


            path = self.bundle / self.card["onnx"]["file"]
            if not path.exists():
                raise BundleError(f"{self.bundle}: ONNX file {path.name} is missing")
            if file_sha256(path) != self.card["onnx"]["sha256"]:
                raise BundleError(f"{path}: sha256 differs from card.json; the bundle is corrupt "
                                  "or was edited — re-export it")
            opts = ort.SessionOptions()
            if self._threads:
                opts.intra_op_num_threads = self._threads
            self._session = ort.InferenceSession(str(path), opts,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def prepare(self, tile_rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, float, tuple]:
        """Tile → network input (H', W', 3 uint8 at the card's mpp, padded), scale, unpadded size."""
        if tile_rgb.ndim != 3 or tile_rgb.shape[2] != 3 or tile_rgb.dtype != np.uint8:
            raise ValueError(f"tile_rgb must be (H, W, 3) uint8, got {tile_rgb.shape} "
                             f"{tile_rgb.dtype}")
        if not mpp > 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        scale = mpp / self.mpp
        x = resample(tile_rgb, scale)
        return pad_to(x, self.stride), scale, x.shape[:2]

    def heat(self, tile_rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, float]:
        """Heat map (at the card's mpp, cropped to the tile) and the scale used, via onnxruntime."""
        x, scale, (h, w) = self.prepare(tile_rgb, mpp)
        heat = self._onnx().run(None, {"tiles": x[None]})[0][0]
        return heat[:h, :w], scale

    def centres(self, heat: np.ndarray, scale: float) -> np.ndarray:
        """Peaks of one heat map → tile px (x, y) float32, continuous, sub-pixel refined."""

        rc = heat_peaks(heat, self.radius_px, self.threshold)
        if len(rc) == 0:
            return np.zeros((0, 2), dtype=np.float32)
        pos = _refine(heat, rc)
        return ((pos[:, ::-1] + 0.5) / scale).astype(np.float32)

    def __call__(self, tile_rgb: np.ndarray, mpp: float) -> np.ndarray:
        if tile_rgb.shape[0] < 2 or tile_rgb.shape[1] < 2:
            return np.zeros((0, 2), dtype=np.float32)
        return self.centres(*self.heat(tile_rgb, mpp))
