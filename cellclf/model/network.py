"""The classifier network: uint8 NHWC crops in, logits out; bundle save/load (torch).

Sits at the classify step: crops (N×crop_px×crop_px×3 uint8 RGB, from ``crops.py``) go through
:class:`Preprocess` (scaling to [0, 1] and the card's mean/std normalisation, inside the graph so
ONNX export and every backend see the same contract) and a torchvision backbone whose last layer
has K outputs. ``train.py`` builds it; ``save_bundle``/``load_bundle`` write and read ``model.pt``
(state dict + architecture, loadable without Lightning) beside ``card.json``.
"""

from __future__ import annotations

import math
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


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of ≥ 4 channels: per-sample statistics, so a batch from
    another lab or scanner is normalised by itself, not by the training set's running means."""
    groups = math.gcd(channels, 32)
    while groups > 1 and channels // groups < 4:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def build_backbone(name: str, num_classes: int, norm: str = "batch") -> nn.Module:
    """A torchvision classification model with random weights and ``num_classes`` outputs;
    ``norm="group"`` swaps its BatchNorm layers for :func:`group_norm`."""
    import torchvision

    kw: dict[str, Any] = {} if norm == "batch" else {"norm_layer": group_norm}
    if norm not in ("batch", "group"):
        raise ConfigError(f"model.norm must be 'batch' or 'group', got {norm!r}")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    except (ValueError, KeyError) as exc:
        known = [m for m in torchvision.models.list_models(module=torchvision.models)]
        import difflib

        near = difflib.get_close_matches(name, known, n=3)
        raise ConfigError(f"unknown backbone '{name}' (model.backbone); try one of "
                          f"{near or ['resnet18', 'mobilenet_v3_small', 'regnet_y_400mf']}") \
            from exc
    except TypeError as exc:
        raise ConfigError(f"backbone '{name}' cannot take model.norm={norm} ({exc}); use "
                          "model.norm=batch or a resnet/regnet/mobilenet backbone") from exc


class CellClassifier(nn.Module):
    """Preprocess + backbone. ``forward(uint8 N×H×W×3) → logits (N, K)``."""

    def __init__(self, backbone: str, num_classes: int, mean: Sequence[float],
                 std: Sequence[float], norm: str = "batch"):
        super().__init__()
        self.arch = {"backbone": backbone, "num_classes": int(num_classes),
                     "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
        if norm != "batch":  # old bundles have no "norm": BatchNorm
            self.arch["norm"] = norm
        self.preprocess = Preprocess(mean, std)
        self.backbone = build_backbone(backbone, num_classes, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(x))


def build_model(card: Card) -> CellClassifier:
    """An untrained network matching a card (its architecture, classes and normalisation)."""
    backbone = card.architecture.get("backbone")
    if not backbone:
        raise BundleError(f"card '{card.name}' has no architecture.backbone; retrain the bundle")
    return CellClassifier(backbone, card.num_classes, card.normalization["mean"],
                          card.normalization["std"], card.architecture.get("norm", "batch"))


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
    model = CellClassifier(arch["backbone"], arch["num_classes"], arch["mean"], arch["std"],
                           arch.get("norm", "batch"))
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


def head_module(model: nn.Module) -> nn.Linear:
    """The last linear layer of a network (its classification head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("the backbone has no linear classification layer to replace")
    return linears[-1]


def init_from_bundle(model: CellClassifier, bundle: str | Path,
                     classes: Sequence[str]) -> dict[str, Any]:
    """Copy a bundle's weights into ``model`` (same backbone and normalisation layers). The head
    is copied only when the bundle has the same classes in the same order, else it stays new.
    Returns what was done (for the card)."""
    src, card = load_bundle(bundle)
    if src.arch["backbone"] != model.arch["backbone"] or \
            src.arch.get("norm", "batch") != model.arch.get("norm", "batch"):
        raise ConfigError(f"--init {bundle}: its network is {src.arch['backbone']} with "
                          f"{src.arch.get('norm', 'batch')} norm, the config asks for "
                          f"{model.arch['backbone']} with {model.arch.get('norm', 'batch')} norm; "
                          f"set model.backbone={src.arch['backbone']} "
                          f"model.norm={src.arch.get('norm', 'batch')}")
    same_classes = list(card.classes) == list(classes)
    head = {id(p) for p in head_module(model).parameters()}
    head_names = {n for n, p in model.named_parameters() if id(p) in head}
    state = src.state_dict()
    keep = {k: v for k, v in state.items()
            if not k.startswith("preprocess.") and (same_classes or k not in head_names)}
    missing, _ = model.load_state_dict(keep, strict=False)
    missing = [k for k in missing if not k.startswith("preprocess.")]
    return {"bundle": str(bundle), "name": card.name, "version": card.version,
            "sha256": card.sha256, "classes": list(card.classes),
            "new_head": not same_classes, "not_copied": missing}
