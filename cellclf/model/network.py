"""The classifier network: uint8 NHWC crops in, logits out; bundle save/load (torch).

Sits at the classify step: crops (N×crop_px×crop_px×3 uint8 RGB, from ``crops.py``) go through
:class:`Preprocess` (scaling to [0, 1] and the card's mean/std normalisation, inside the graph so
ONNX export and every backend see the same contract) and a torchvision backbone whose last layer
has K outputs. ``train.py`` builds it; ``save_bundle``/``load_bundle`` write and read ``model.pt``
(state dict + architecture, loadable without Lightning) beside ``card.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellclf.card import Card, bundle_paths, file_sha256, load_card, save_card, verify_weights
from cellclf.errors import BundleError, ConfigError

WEIGHTS_FORMAT = 1


class Preprocess(nn.Module):
    """uint8 NHWC RGB → float NCHW, ``(x / 255 - mean) / std`` with mean/std as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, 3, 1, 1)
        # fold the scaling into one multiply-add: x * scale + shift
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).to(self.scale.dtype)
        return x * self.scale + self.shift


def build_backbone(name: str, num_classes: int) -> nn.Module:
    """A torchvision classification model with random weights and ``num_classes`` outputs."""
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except (ValueError, KeyError) as exc:
        known = [m for m in torchvision.models.list_models(module=torchvision.models)]
        import difflib

        near = difflib.get_close_matches(name, known, n=3)
        raise ConfigError(f"unknown backbone '{name}' (model.backbone); try one of "
                          f"{near or ['resnet18', 'mobilenet_v3_small', 'regnet_y_400mf']}") \
            from exc


class CellClassifier(nn.Module):
    """Preprocess + backbone. ``forward(uint8 N×H×W×3) → logits (N, K)``."""

    def __init__(self, backbone: str, num_classes: int, mean: Sequence[float],
                 std: Sequence[float]):
        super().__init__()
        self.arch = {"backbone": backbone, "num_classes": int(num_classes),
                     "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
        self.preprocess = Preprocess(mean, std)
        self.backbone = build_backbone(backbone, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(x))


def build_model(card: Card) -> CellClassifier:
    """An untrained network matching a card (its architecture, classes and normalisation)."""
    backbone = card.architecture.get("backbone")
    if not backbone:
        raise BundleError(f"card '{card.name}' has no architecture.backbone; retrain the bundle")
    return CellClassifier(backbone, card.num_classes, card.normalization["mean"],
                          card.normalization["std"])


def save_bundle(model: CellClassifier, card: Card, out_dir: str | Path,
                extra: dict[str, Any] | None = None, weights_dtype: str = "float32") -> Card:
    """Write ``model.pt`` (state dict + arch) and ``card.json`` with the weights' sha256.

    ``weights_dtype="float16"`` stores the floating-point weights in half precision (half the
    file size, for shipped bundles); loading always restores float32.
    """
    if weights_dtype not in ("float32", "float16"):
        raise ConfigError(f"weights_dtype must be float32 or float16, got {weights_dtype!r}")
    dtype = torch.float16 if weights_dtype == "float16" else torch.float32
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    payload = {"format": WEIGHTS_FORMAT, "arch": dict(model.arch), "classes": list(card.classes),
               "weights_dtype": weights_dtype, "state_dict": state, **(extra or {})}
    weights = out / card.weights_file
    tmp = out / f".{card.weights_file}.tmp"
    torch.save(payload, tmp)
    tmp.replace(weights)
    card = card.replace(sha256=file_sha256(weights),
                        architecture={**card.architecture, **model.arch,
                                      "weights_dtype": weights_dtype})
    save_card(card, out)
    return card


def load_bundle(path: str | Path, device: str | torch.device = "cpu",
                verify: bool = True) -> tuple[CellClassifier, Card]:
    """Read a bundle → (model in eval mode on ``device``, Card). BundleError if inconsistent."""
    paths = bundle_paths(path)
    card = load_card(paths.root)
    weights = verify_weights(card, paths.root) if verify else paths.root / card.weights_file
    try:
        payload = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise BundleError(f"{weights}: cannot load the weights ({exc}); the file is corrupt or "
                          "not a cellclf model.pt") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "arch" not in payload:
        raise BundleError(f"{weights}: not a cellclf model.pt (no state_dict/arch)")
    arch = payload["arch"]
    if list(payload.get("classes", card.classes)) != list(card.classes) or \
            int(arch["num_classes"]) != card.num_classes:
        raise BundleError(f"{weights}: the weights output {arch['num_classes']} classes "
                          f"but the card lists {list(card.classes)}; card and weights differ")
    model = CellClassifier(arch["backbone"], arch["num_classes"], arch["mean"], arch["std"])
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in payload["state_dict"].items()})
    except RuntimeError as exc:
        raise BundleError(f"{weights}: weights do not fit backbone {arch['backbone']} ({exc})") \
            from exc
    return model.to(device).eval(), card


def predict_logits(model: nn.Module, crops_uint8: np.ndarray, batch: int = 256,
                   device: str | torch.device | None = None) -> np.ndarray:
    """Logits (N, K) float32 for uint8 crops (N×H×W×3); bf16 autocast on CUDA."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model = model.to(device).eval()
    cuda = device.type == "cuda"
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for s in range(0, len(crops_uint8), batch):
            x = torch.from_numpy(np.require(crops_uint8[s:s + batch], np.uint8, ["C", "W"]))
            x = x.to(device, non_blocking=cuda)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out.append(model(x).float().cpu().numpy())
    if out:
        return np.concatenate(out)
    k = getattr(model, "arch", {}).get("num_classes", 0)
    return np.zeros((0, k), dtype=np.float32)
