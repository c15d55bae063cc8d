"""Histology augmentation for training crops (train split only).

Sits between the crop cache (``dataset.py``) and the network (``train.py``): on the CPU, the
DataLoader workers run an albumentations pipeline on uint8 HWC crops (flips/rot90, HEStain jitter,
brightness/contrast, blur, JPEG); with ``augment.gpu_augment`` the same kind of jitter runs in
torch on the device on whole uint8 NHWC batches (:func:`gpu_augment`), so a fast GPU is not held
back by CPU workers. Labels never change: every transform keeps the cell at the centre.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cellclf.model.config import AugmentConfig

if TYPE_CHECKING:
    import torch


# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB/residual), unit OD per RGB.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def cpu_transform(cfg: AugmentConfig) -> Any:
    """An albumentations Compose for uint8 HWC crops, or None when augmentation is off."""
    if not cfg.enabled or cfg.gpu_augment:
        return None
    import albumentations as A

    ops: list[Any] = []
    if cfg.d4:
        ops.append(A.D4(p=1.0))
    if cfg.hestain_p > 0:
        ops.append(A.HEStain(method="random_preset", intensity_scale_range=(0.8, 1.2),
                             intensity_shift_range=(-0.1, 0.1), p=cfg.hestain_p))
    if cfg.brightness_contrast_p > 0:
        ops.append(A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15,
                                              p=cfg.brightness_contrast_p))
    if cfg.blur_p > 0:
        ops.append(A.GaussianBlur(sigma_limit=(0.3, 1.0), p=cfg.blur_p))
    if cfg.jpeg_p > 0:
        ops.append(A.ImageCompression(quality_range=tuple(cfg.jpeg_quality), p=cfg.jpeg_p))
    return A.Compose(ops) if ops else None


def apply_cpu(transform: Any, crop: np.ndarray) -> np.ndarray:
    """Run an albumentations transform on one uint8 HWC crop (identity when None)."""
    if transform is None:
        return crop
    return np.ascontiguousarray(transform(image=np.asarray(crop))["image"], dtype=np.uint8)


def gpu_augment(x: torch.Tensor, hed_sigma: float = 0.03, d4: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a uint8 NHWC RGB batch on its device; returns uint8 NHWC.

    Per crop: one of the 8 flips/rotations (dihedral group D4), then stain jitter in HED optical
    density space (each stain scaled by ``1 + N(0, σ)`` and shifted by ``N(0, σ)``; the ``tiatoolbox``
    / Tellez et al. recipe), back to RGB.
    """
    import torch

    n = x.shape[0]
    if n == 0:
        return x
    dev = x.device
    out = x
    if d4:
        k = torch.randint(0, 4, (n,), device="cpu", generator=generator)
        flip = torch.randint(0, 2, (n,), device="cpu", generator=generator).bool()
        parts = torch.empty_like(x)
        for kk in range(4):
            for ff in (False, True):
                sel = ((k == kk) & (flip == ff)).nonzero().flatten().to(dev)
                if sel.numel() == 0:
                    continue
                t = x.index_select(0, sel)
                if ff:
                    t = t.flip(2)
                parts.index_copy_(0, sel, torch.rot90(t, kk, dims=(1, 2)))
        out = parts
    if hed_sigma > 0:
        with torch.autocast(dev.type, enabled=False):  # colour maths in fp32 even under bf16
            out = _hed_jitter(out, hed_sigma, generator)
    return out


def _hed_jitter(x: torch.Tensor, hed_sigma: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Scale and shift each crop's H, E, D optical densities (uint8 NHWC in and out)."""
    import torch

    n, dev = x.shape[0], x.device
    od = -torch.log(x.float().clamp_(min=1.0) / 255.0)  # N H W 3; od = hed @ RGB_FROM_HED
    hed = od @ torch.as_tensor(HED_FROM_RGB, dtype=torch.float32, device=dev)
    alpha = 1 + hed_sigma * torch.randn((n, 1, 1, 3), generator=generator).to(dev)
    beta = hed_sigma * torch.randn((n, 1, 1, 3), generator=generator).to(dev)
    od = (hed * alpha + beta) @ torch.as_tensor(RGB_FROM_HED, dtype=torch.float32, device=dev)
    return (torch.exp(-od) * 255.0).clamp_(0, 255).round_().to(torch.uint8)
