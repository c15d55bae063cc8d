"""Training the learned detector from point annotations → a detector bundle (ONNX + card.json).

Sits beside the classifier's training: point-annotated images (tile folders with a points CSV,
slides with QuPath GeoJSON points, the synthetic slides' truth) become :class:`PointImage`
samples at the bundle's µm/px; random patches with flips and stain/brightness jitter train
:class:`~cellclf.detect.learned_net.HeatmapNet` against Gaussian heat maps; the peak threshold is
chosen on held-out images by F1 (one-to-one matching within ``match_um``); the graph is exported
to ONNX and checked against torch (parity) before ``card.json`` is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellclf.annotations.geojson import read_points
from cellclf.annotations.tile_folder import TileSet, open_tile_set, parse_where, read_tile
from cellclf.card import file_sha256
from cellclf.detect.learned import LearnedDetector, read_detector_card, resample
from cellclf.detect.matching import detection_metrics
from cellclf.errors import AnnotationError
from cellclf.wsi.slide import Slide

NOT_NUCLEI = ("red_cell",)  # synthetic truth classes with no nucleus: not detection targets


@dataclass(frozen=True)
class PointImage:
    """One training image at the bundle's mpp: RGB uint8 and cell centres (continuous px)."""

    name: str
    rgb: np.ndarray
    xy: np.ndarray
    weight: np.ndarray | None = None  # uint8 H×W loss weight ×255 (0: ignore); None: all 255
    sampling: float = 1.0  # patches are drawn by area × this


def from_tile_set(tiles: TileSet, mpp: float) -> list[PointImage]:
    """Every tile of an annotated tile set, resampled to ``mpp``."""
    if tiles.truth is None:
        raise AnnotationError(f"{tiles.root}: training needs a points CSV (--truth)")
    scale = tiles.mpp / mpp
    return [PointImage(name, resample(read_tile(path), scale),
                       (tiles.truth_of(name).xy + 0.5) * scale)
            for name, path in tiles.images.items()]


def from_slide(slide: str | Path, points: str | Path, mpp: float, slide_mpp: float | None = None,
               max_side_px: int = 12000, exclude: Sequence[str] = NOT_NUCLEI) -> PointImage:
    """The annotated region of a slide (bounding box of its GeoJSON points + 40 µm) at ``mpp``."""

    pts = [p for p in read_points(points) if (p.name or "") not in exclude]
    if not pts:
        raise AnnotationError(f"{points}: no annotated cells to train the detector on")
    xy0 = np.array([(p.x, p.y) for p in pts], dtype=np.float64)
    with Slide(slide, mpp=slide_mpp) as s:
        margin = 40.0 / s.mpp
        x0, y0 = np.maximum(np.floor(xy0.min(axis=0) - margin), 0).astype(int)
        x1 = int(min(s.width, np.ceil(xy0[:, 0].max() + margin)))
        y1 = int(min(s.height, np.ceil(xy0[:, 1].max() + margin)))
        if max(x1 - x0, y1 - y0) > max_side_px:
            raise AnnotationError(f"{points}: the annotated region is {x1 - x0}×{y1 - y0} px; "
                                  f"annotate regions up to {max_side_px} px or split the file")
        rgb, _ = s.read_level(0, int(x0), int(y0), x1 - x0, y1 - y0)
        scale = s.mpp / mpp
    return PointImage(Path(slide).stem, resample(rgb, scale), (xy0 - [x0, y0]) * scale)


def _patches(images: list[PointImage], n: int, size: int, rng: np.random.Generator,
             scale_jitter: float = 0.0):
    """``n`` random ``size``² patches (uint8 N×size×size×3), their points and loss weights
    (float32 N×size×size in [0, 1]), area-weighted; each patch magnified by a random factor in
    [1/(1+j), 1+j] (``scale_jitter`` j)."""
    areas = np.array([im.rgb.shape[0] * im.rgb.shape[1] * im.sampling for im in images],
                     dtype=np.float64)
    picks = rng.choice(len(images), n, p=areas / areas.sum())
    out = np.empty((n, size, size, 3), np.uint8)
    weights = np.ones((n, size, size), np.float32)
    pts = []
    for k, i in enumerate(picks):
        zoom = float(np.exp(rng.uniform(-1, 1) * np.log1p(scale_jitter)))
        src = max(8, int(round(size / zoom)))
        im, wt = images[i].rgb, images[i].weight
        if im.shape[0] < src or im.shape[1] < src:
            pad = ((0, max(0, src - im.shape[0])), (0, max(0, src - im.shape[1])))
            im = np.pad(im, (*pad, (0, 0)), mode="reflect")
            wt = None if wt is None else np.pad(wt, pad, mode="reflect")
        y = rng.integers(0, im.shape[0] - src + 1)
        x = rng.integers(0, im.shape[1] - src + 1)
        p = (images[i].xy - [x, y]) * (size / src)
        p = p[(p >= 0).all(axis=1) & (p < size).all(axis=1)]
        patch = _fit(im[y:y + src, x:x + src], size)
        wpatch = None if wt is None else _fit(wt[y:y + src, x:x + src], size)
        if rng.random() < 0.5:
            patch, p = patch[:, ::-1], np.column_stack([size - p[:, 0], p[:, 1]])
            wpatch = None if wpatch is None else wpatch[:, ::-1]
        k90 = int(rng.integers(4))
        for _ in range(k90):  # rotate 90° counter-clockwise: (x, y) -> (y, size - x)
            patch, p = np.rot90(patch), np.column_stack([p[:, 1], size - p[:, 0]])
            wpatch = None if wpatch is None else np.rot90(wpatch)
        out[k] = patch
        if wpatch is not None:
            weights[k] = wpatch / np.float32(255.0)
        pts.append(p)
    return out, pts, weights


def _fit(patch: np.ndarray, size: int) -> np.ndarray:
    """A square crop resampled (and if short, edge-padded) to exactly ``size``²."""
    if patch.shape[0] != size:
        patch = resample(patch, size / patch.shape[0])[:size, :size]
        if patch.shape[:2] != (size, size):
            pad = ((0, size - patch.shape[0]), (0, size - patch.shape[1]))
            patch = np.pad(patch, pad + ((0, 0),) * (patch.ndim - 2), mode="edge")
    return patch


def _blur(x, rng: np.random.Generator, max_sigma_px: float, share: float = 0.5):
    """A random Gaussian blur (σ up to ``max_sigma_px``) on ``share`` of the images (torch)."""
    import torch
    from torch.nn import functional as F  # noqa: N812

    out = x.clone()
    for k in np.flatnonzero(rng.random(x.shape[0]) < share):
        sigma = float(rng.uniform(0.3, max_sigma_px))
        r = max(1, int(round(2.5 * sigma)))
        g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
        g = (g / g.sum()).repeat(3, 1)
        img = F.pad(x[k:k + 1], (r, r, r, r), mode="replicate")
        img = F.conv2d(img, g[:, None, None, :], groups=3)
        out[k:k + 1] = F.conv2d(img, g[:, None, :, None], groups=3)
    return out


def _stain_jitter(x, rng: np.random.Generator, strength: float):
    """Per-image random stain: optical density mixed by a near-identity 3×3 matrix, scaled,
    and a random glass tint (torch, (N, 3, H, W) in [0, 1])."""
    import torch

    n = x.shape[0]
    od = -torch.log(x.clamp(min=1.0 / 255.0))
    mix = torch.eye(3) + torch.as_tensor(rng.normal(0, 0.12 * strength, (n, 3, 3)),
                                         dtype=torch.float32)
    gain = torch.as_tensor(rng.uniform(1 - 0.35 * strength, 1 + 0.35 * strength, (n, 1, 1)),
                           dtype=torch.float32)
    od = torch.einsum("nij,njhw->nihw", mix * gain, od).clamp(min=0.0)
    glass = torch.as_tensor(rng.uniform(1 - 0.08 * strength, 1.0, (n, 3, 1, 1)),
                            dtype=torch.float32)
    return (glass * torch.exp(-od)).clamp(0.0, 1.0)


def choose_threshold(detector: LearnedDetector, images: list[PointImage], match_um: float,
                     grid: Sequence[float] = tuple(np.arange(0.15, 0.76, 0.05))) -> dict:
    """The peak threshold with the best pooled F1 on ``images`` (at the detector's mpp)."""
    heats = [detector.heat(im.rgb, detector.mpp)[0] for im in images]
    best = {"f1": -1.0}
    for t in grid:
        detector.threshold = float(t)
        tp = n_pred = n_truth = 0
        for im, heat in zip(images, heats, strict=True):
            m = detection_metrics(detector.centres(heat, 1.0), im.xy, ["cell"] * len(im.xy),
                                  match_um / detector.mpp)
            tp, n_pred, n_truth = tp + m["n_matched"], n_pred + m["n_pred"], n_truth + len(im.xy)
        f1 = 2 * tp / max(1, n_pred + n_truth)
        if f1 > best["f1"]:
            best = {"threshold": round(float(t), 3), "f1": f1, "recall": tp / max(1, n_truth),
                    "precision": tp / max(1, n_pred)}
    detector.threshold = best["threshold"]
    return best


def train_detector(train: list[PointImage], val: list[PointImage], out: str | Path,
                   data_card: list[dict], mpp: float = 0.5, minutes: float = 10.0,
                   max_steps: int = 6000, batch: int = 16, patch_px: int = 96,
                   sigma_um: float = 1.5, width: int = 12, seed: int = 0, threads: int = 2,
                   init: str | Path | None = None, match_um: float = 4.0,
                   scale_jitter: float = 0.25, levels: int = 3, blur_um: float = 0.0,
                   lr: float = 3e-3, log=print) -> dict:
    """Fit the heat-map network (or fine-tune ``init``'s), tune the threshold on ``val``, export
    ``out/detector.onnx`` + ``out/card.json``; returns the card."""
    import torch

    from cellclf.detect.learned_net import HeatmapGraph, HeatmapNet, gaussian_targets, net_from_card

    if not train:
        raise AnnotationError("no training images for the detector")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    net = HeatmapNet(width, levels)
    if init is not None:
        net = net_from_card(read_detector_card(init))
        width, levels = net.head.in_channels, 3 if net.enc4 is None else 4
        net.load_state_dict(torch.load(Path(init) / "detector.pt", weights_only=True))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sigma_px = sigma_um / mpp
    t0, step, losses = time.monotonic(), 0, []
    net.train()
    while step < max_steps and time.monotonic() - t0 < minutes * 60:
        done = max((time.monotonic() - t0) / (minutes * 60), step / max_steps)
        for g in opt.param_groups:
            g["lr"] = max(lr * 0.5 * (1 + np.cos(np.pi * min(1.0, done))), lr / 30)
        tiles, pts, weights = _patches(train, batch, patch_px, rng, scale_jitter)
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
        x = _stain_jitter(x, rng, 1.0)
        if blur_um > 0:
            x = _blur(x, rng, blur_um / mpp)
        target = gaussian_targets([torch.from_numpy(p).float() for p in pts], patch_px, patch_px,
                                  sigma_px)
        heat = torch.sigmoid(net(x)[:, 0])
        loss = ((heat - target) ** 2 * (1.0 + 20.0 * target) * torch.from_numpy(weights)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 25 == 0:
            log(f"step {step} loss {np.mean(losses[-50:]):.4f} "
                f"({time.monotonic() - t0:.0f} s)")
    net.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / "detector.pt")
    card = {"kind": "cell-detector", "name": out.name, "mpp": mpp, "stride": 2 ** (levels - 1),
            "input": "uint8[N, H, W, 3] RGB at mpp, H and W multiples of stride (pad by edge "
                     "replication); output float32[N, H, W] heat in [0, 1]",
            "threshold": 0.5, "peak_radius_um": 2.0, "sigma_um": sigma_um, "match_um": match_um,
            "network": {"type": "HeatmapNet", "width": width, "levels": levels,
                        "parameters": sum(p.numel() for p in net.parameters())},
            "training": {"steps": step, "seconds": round(time.monotonic() - t0, 1),
                         "batch": batch, "patch_px": patch_px, "seed": seed,
                         "scale_jitter": scale_jitter, "blur_um": blur_um, "lr": lr,
                         "final_loss": float(np.mean(losses[-50:])) if losses else None,
                         "init": str(init) if init else None,
                         "init_training": (LearnedDetector(init).card.get("training")
                                           if init else None)},
            "data": data_card}
    export_onnx(HeatmapGraph(net).eval(), out / "detector.onnx")
    card["onnx"] = {"file": "detector.onnx", "sha256": file_sha256(out / "detector.onnx")}
    (out / "card.json").write_text(json.dumps(card, indent=2))
    parity = onnx_torch_parity(out, HeatmapGraph(net).eval())
    detector = LearnedDetector(out, threads=threads)
    card["validation"] = choose_threshold(detector, val, match_um) if val else None
    card["threshold"] = detector.threshold
    card["parity_max_abs_diff"] = parity
    (out / "card.json").write_text(json.dumps(card, indent=2))
    return card


def export_onnx(graph, path: Path) -> None:
    """The uint8 → heat graph as ONNX (dynamic batch, height and width; one file)."""
    import torch

    example = torch.zeros((1, 64, 64, 3), dtype=torch.uint8)
    torch.onnx.export(graph, (example,), str(path), input_names=["tiles"], output_names=["heat"],
                      dynamic_axes={"tiles": {0: "n", 1: "h", 2: "w"}, "heat": {0: "n", 1: "h",
                                                                               2: "w"}},
                      opset_version=17, dynamo=False)


def onnx_torch_parity(bundle: Path, graph) -> float:
    """Largest |heat_onnx - heat_torch| on random tiles of two sizes (raises above 1e-4)."""
    import torch

    det = LearnedDetector(bundle)
    rng = np.random.default_rng(1)
    worst = 0.0
    for h, w in ((96, 128), (200, 152)):
        x = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        a = det._onnx().run(None, {"tiles": x})[0]
        with torch.inference_mode():
            b = graph(torch.from_numpy(x)).numpy()
        worst = max(worst, float(np.abs(a - b).max()))
    if worst > 1e-4:
        raise RuntimeError(f"ONNX and torch heat maps differ by {worst:.2e} (> 1e-4)")
    return worst


def _split_image(im: PointImage) -> tuple[PointImage, PointImage]:
    """An image cut into a left (train) and a right (held-out) part, 4:1 by width."""
    cut = int(im.rgb.shape[1] * 0.8)
    left = im.xy[:, 0] < cut
    return (PointImage(im.name + "_train", im.rgb[:, :cut], im.xy[left]),
            PointImage(im.name + "_val", im.rgb[:, cut:], im.xy[~left] - [cut, 0]))


def fit_from_annotations(data: str | Path, truth: str | Path, out: str | Path,
                         mpp: float | None = None, where: list[str] | None = None,
                         init: str | Path | None = None, minutes: float = 10.0,
                         val_share: float = 0.2, threads: int = 1, log=print) -> dict:
    """``cellclf train-detector``: a tile folder + CSV or a slide + GeoJSON → detector bundle."""

    bundle_mpp = float(read_detector_card(init)["mpp"]) if init else 1.0
    data = Path(data)
    if data.is_dir():
        images = from_tile_set(open_tile_set(data, mpp, truth, parse_where(where)), bundle_mpp)
    else:
        images = [from_slide(data, truth, bundle_mpp, slide_mpp=mpp)]
    n_val = int(round(val_share * len(images)))
    if n_val == 0 or n_val == len(images):
        pairs = [_split_image(im) for im in images]
        train, val = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        train, val = images[:-n_val], images[-n_val:]
    card_data = [{"name": str(data), "what": f"points from {truth}", "terms": "the user's own"}]
    if init:
        card_data = read_detector_card(init).get("data", []) + card_data
    return train_detector(train, val, out, card_data, mpp=bundle_mpp, minutes=minutes,
                          threads=threads, init=init, log=log)
