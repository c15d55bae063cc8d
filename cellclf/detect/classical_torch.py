"""Cell candidate detection in torch: the maths of ``detect.py`` on a batch of tiles, on any device.

Sits where ``detect.detect_cells`` sits (tile reader → detect → owned level-0 candidates) when the
slide is processed on a GPU: block averaging (``avg_pool2d``), optical density and colour
deconvolution, a separable Gaussian (``conv2d``) and the local-maximum test (``max_pool2d``) run
batched on the device; the few peaks per tile then go through the same numpy merge/refine step as
the CPU path, so both backends give the same candidates (tested on CPU). torch is imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cellclf.detect.classical import (
    DetectParams,
    _check_tile,
    gaussian_kernel,
    postprocess,
    stain_projection,
    window_radius,
)


class TorchDetector:
    """Batched detector; ``detect(tiles, mpp)`` returns one (M, 2) float32 array per tile."""

    def __init__(self, params: DetectParams | None = None, device: str | torch.device | None = None):
        self.params = params or DetectParams()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        hv, ev = stain_projection(self.params)
        self._hv = torch.as_tensor(hv, device=self.device).view(1, 3, 1, 1)
        self._ev = torch.as_tensor(ev, device=self.device).view(1, 3, 1, 1)
        self._glass = torch.tensor(self.params.glass_per_channel(), dtype=torch.float32,
                                   device=self.device).view(1, 3, 1, 1)
        self._kernels: dict[float, torch.Tensor] = {}

    @torch.inference_mode()
    def smoothed(self, batch_u8: torch.Tensor,
                 mpp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Cellness, merge and granule maps (N, h, w) float32 on the device; block factor."""
        p = self.params
        f = p.factor(mpp)
        n, h, w, _ = batch_u8.shape
        h, w = (h // f) * f, (w // f) * f
        x = batch_u8[:, :h, :w].to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if f > 1:
            x = F.avg_pool2d(x, kernel_size=f, stride=f)
        od = torch.log(x.clamp_(min=1.0).div_(self._glass)).neg_().clamp_(min=0.0)
        hem = (od * self._hv).sum(dim=1, keepdim=True).clamp_(0.0, p.hem_cap).div_(p.hem_cap)
        grid_um = f * mpp
        nuc = self._smooth(hem, p.sigma_um / grid_um)
        eos = (od * self._ev).sum(dim=1, keepdim=True).sub_(p.body_eosin)
        eos = eos.clamp_(0.0, p.body_eosin_cap).div_(p.body_eosin_cap)
        body = self._smooth(eos, p.body_sigma_um / grid_um)
        ridge = nuc + (p.body_weight + p.merge_body_weight) * body
        cell = nuc + p.body_weight * body
        if p.surround_weight:
            cell -= p.surround_weight * self._smooth(hem, p.surround_sigma_um / grid_um)
        return cell[:, 0], ridge[:, 0], body[:, 0], f

    def _smooth(self, img: torch.Tensor, sigma_px: float) -> torch.Tensor:
        """Separable Gaussian with edge replication, as ``detect.smooth``."""
        k = self._kernels.get(sigma_px)
        if k is None:  # built once per width: a host→device copy here would stall the stream
            k = torch.as_tensor(gaussian_kernel(sigma_px, self.params.truncate), device=self.device)
            self._kernels[sigma_px] = k
        r = (len(k) - 1) // 2
        img = F.conv2d(F.pad(img, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        return F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))

    @torch.inference_mode()
    def peaks(self, sm: torch.Tensor, grid_um: float) -> torch.Tensor:
        """(K, 3) long tensor of (tile index, row, col) of thresholded local maxima."""
        rad = window_radius(self.params, grid_um)
        mx = F.max_pool2d(sm[:, None], kernel_size=2 * rad + 1, stride=1, padding=rad)[:, 0]
        return torch.nonzero((sm == mx) & (sm >= self.params.threshold))

    def detect(self, tiles: Sequence[np.ndarray] | torch.Tensor, mpp: float) -> list[np.ndarray]:
        """Centres (x, y) in tile px for each tile; tiles of different sizes are grouped."""
        if isinstance(tiles, torch.Tensor):
            groups = {tuple(tiles.shape[1:]): list(range(len(tiles)))}
            get = lambda idx: tiles[idx]  # noqa: E731
        else:
            for t in tiles:
                _check_tile(t, mpp)
            groups: dict[tuple, list[int]] = {}
            for i, t in enumerate(tiles):
                groups.setdefault(t.shape, []).append(i)
            get = lambda idx: torch.from_numpy(np.stack([tiles[i] for i in idx]))  # noqa: E731
        out: list[np.ndarray] = [np.zeros((0, 2), np.float32)] * len(tiles)
        for shape, idx in groups.items():
            if shape[0] < 2 or shape[1] < 2:
                continue
            sm, ridge, body, f = self.smoothed(get(idx), mpp)
            pk = self.peaks(sm, f * mpp).cpu().numpy()
            sm_np, ridge_np, body_np = sm.cpu().numpy(), ridge.cpu().numpy(), body.cpu().numpy()
            bounds = np.searchsorted(pk[:, 0], np.arange(len(idx) + 1))
            for j, i in enumerate(idx):
                rc = pk[bounds[j]:bounds[j + 1], 1:]
                out[i] = postprocess(sm_np[j], ridge_np[j], body_np[j], rc, f, mpp,
                                     self.params)
        return out
