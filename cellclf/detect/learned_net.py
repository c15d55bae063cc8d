"""The learned detector's network (torch): RGB tile → heat map of Gaussian peaks at cell centres.

Sits behind :mod:`cellclf.detect.learned` (which runs the exported ONNX graph without torch) and
:mod:`cellclf.detect.learned_train` (which fits it). Torch only; imported lazily by those.

The network is a three-level U-Net of plain 3×3 convolutions (batch norm, ReLU), about 0.1 M
parameters: it sees ~40 µm around each pixel at the bundle's 0.5 µm/px, enough for a nucleus
and its surround. :class:`HeatmapGraph` wraps it with the preprocessing contract of the bundle:
``uint8[N, H, W, 3]`` RGB (H, W multiples of 4) → ``float32[N, H, W]`` heat in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from cellclf.detect.learned import read_detector_card


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True))


def _merge(c_in: int, c_out: int) -> nn.Sequential:
    """Decoder step: a 1×1 convolution merges the upsampled and skip features, one 3×3 refines."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True))


class HeatmapNet(nn.Module):
    """Float RGB in [0, 1] (N, 3, H, W) → heat-map logits (N, 1, H, W); ``levels`` resolutions
    (3: input H, W multiples of 4; 4: multiples of 8), channels ``width`` × 1, 2, 3, 4."""

    def __init__(self, width: int = 12, levels: int = 3) -> None:
        super().__init__()
        if levels not in (3, 4):
            raise ValueError(f"levels must be 3 or 4, got {levels}")
        chans = [width * (k + 1) for k in range(levels)]
        self.enc1, self.enc2, self.enc3 = (_block(3, chans[0]), _block(chans[0], chans[1]),
                                           _block(chans[1], chans[2]))
        self.enc4 = _block(chans[2], chans[3]) if levels == 4 else None
        self.dec3 = _merge(chans[3] + chans[2], chans[2]) if levels == 4 else None
        self.dec2, self.dec1 = _merge(chans[2] + chans[1], chans[1]), _merge(chans[1] + chans[0],
                                                                             chans[0])
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def up(a: torch.Tensor) -> torch.Tensor:
            return F.interpolate(a, scale_factor=2.0, mode="nearest")

        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        if self.enc4 is not None:
            e3 = self.dec3(torch.cat([up(self.enc4(F.max_pool2d(e3, 2))), e3], 1))
        d2 = self.dec2(torch.cat([up(e3), e2], 1))
        d1 = self.dec1(torch.cat([up(d2), e1], 1))
        return self.head(d1)


def net_from_card(card: dict) -> HeatmapNet:
    """The (untrained) network a detector card describes."""
    return HeatmapNet(int(card["network"]["width"]), int(card["network"].get("levels", 3)))


class HeatmapGraph(nn.Module):
    """The bundle's graph: ``uint8[N, H, W, 3]`` RGB → ``float32[N, H, W]`` heat in [0, 1]."""

    def __init__(self, net: HeatmapNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, tiles_u8: torch.Tensor) -> torch.Tensor:
        x = tiles_u8.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
        return torch.sigmoid(self.net(x))[:, 0]


def gaussian_targets(points: list[torch.Tensor], h: int, w: int, sigma_px: float) -> torch.Tensor:
    """Heat-map targets (N, H, W): the max over each image's points (x, y in continuous px) of a
    unit-height Gaussian of σ ``sigma_px`` (pure; exact at the pixel centres)."""
    import numpy as np

    out = np.zeros((len(points), h, w), np.float32)
    ys = np.arange(h, dtype=np.float32) + 0.5
    xs = np.arange(w, dtype=np.float32) + 0.5
    r = int(3 * sigma_px) + 1
    inv = -0.5 / sigma_px**2
    for k, pts in enumerate(points):
        for x, y in np.asarray(pts, dtype=np.float32).reshape(-1, 2):
            x0, x1 = max(0, int(x) - r), min(w, int(x) + r + 1)
            y0, y1 = max(0, int(y) - r), min(h, int(y) + r + 1)
            if x0 >= x1 or y0 >= y1:
                continue
            g = np.exp(inv * (((xs[x0:x1] - x) ** 2)[None, :] + ((ys[y0:y1] - y) ** 2)[:, None]))
            np.maximum(out[k, y0:y1, x0:x1], g, out=out[k, y0:y1, x0:x1])
    return torch.from_numpy(out)


def heat_peaks_torch(heat: torch.Tensor, radius_px: int, threshold: float) -> list[torch.Tensor]:
    """Peaks of a batch of heat maps on the device: (row, col) per image of pixels equal to
    their (2r+1)² window maximum and ≥ threshold (the torch twin of ``learned.heat_peaks``)."""
    mx = F.max_pool2d(heat[:, None], 2 * radius_px + 1, stride=1, padding=radius_px)[:, 0]
    keep = (heat == mx) & (heat >= threshold)
    return [torch.nonzero(k) for k in keep]


class TorchLearnedDetector:
    """The learned detector on torch for the device stage: a batch of equal-size tiles (already on
    the device, no host round trip) → centres per tile (tile px, continuous).

    Same contract as :class:`cellclf.detect.learned.LearnedDetector` (the card's mpp, stride,
    threshold and peak radius); resampling is ``F.interpolate`` (area when shrinking, bilinear
    when enlarging), so centres agree with the onnxruntime path to within the resampling
    difference (measured in tests/test_detect_learned.py)."""

    def __init__(self, bundle, device: str | torch.device | None = None) -> None:
        from pathlib import Path


        self.bundle = Path(bundle)
        self.card = read_detector_card(self.bundle)
        net = net_from_card(self.card)
        net.load_state_dict(torch.load(self.bundle / "detector.pt", weights_only=True,
                                       map_location="cpu"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.graph = HeatmapGraph(net).eval().to(self.device)
        self.mpp = float(self.card["mpp"])
        self.stride = int(self.card["stride"])
        self.threshold = float(self.card["threshold"])
        self.radius_px = max(1, int(round(float(self.card["peak_radius_um"]) / self.mpp)))

    @torch.inference_mode()
    def detect(self, tiles_u8: torch.Tensor, mpp: float) -> list:
        """``uint8[N, H, W, 3]`` (any device) at ``mpp`` → list of (M, 2) float32 numpy centres."""
        x = tiles_u8.to(self.device)
        n, h, w, _ = x.shape
        scale = mpp / self.mpp
        hh, ww = max(1, round(h * scale)), max(1, round(w * scale))
        if (hh, ww) != (h, w):
            f = x.permute(0, 3, 1, 2).float()
            mode = "area" if scale < 1 else "bilinear"
            f = F.interpolate(f, size=(hh, ww), mode=mode,
                              **({} if mode == "area" else {"align_corners": False}))
            x = f.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        ph, pw = (-hh) % self.stride, (-ww) % self.stride
        if ph or pw:
            x = F.pad(x.permute(0, 3, 1, 2).float(), (0, pw, 0, ph), mode="replicate")
            x = x.to(torch.uint8).permute(0, 2, 3, 1)
        heat = self.graph(x.contiguous())[:, :hh, :ww]
        out = []
        for rc in heat_peaks_torch(heat, self.radius_px, self.threshold):
            xy = (rc.flip(1).float() + 0.5) / scale
            out.append(xy.cpu().numpy().astype("float32"))
        return out
