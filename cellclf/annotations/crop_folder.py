"""Crop folders: ``DIR/<class>/*.png|jpg|tif`` (or unlabelled ``DIR/*.png``) read into uint8 crops
at the model's field of view.

Sits at the start of the crop-folder flow (``train``, ``evaluate``, ``calibrate``, ``classify`` on
crops; ``labelled_data.discover`` recognises the folder). Each image is resampled from the crops'
µm/px (``crop_mpp``, stated by the user) to the model's ``work_mpp`` and centre-cut to
``crop_px``; an image that covers less than the model's field of view (``crop_px × work_mpp`` µm)
is padded by mirroring its own border (never with white glass) and the share of padding is
reported loudly. 16-bit images are scaled to 8 bits (never clipped at 255).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellclf.annotations.labelled_data import IMAGE_EXTS, ClassMap, normalise_name
from cellclf.errors import AnnotationError

log = logging.getLogger(__name__)

PAD_WARN_SHARE = 0.05  # warn when the mean padding share of a folder's crops exceeds this


@dataclass(frozen=True)
class CropFile:
    """One image of a crop folder: its path relative to the folder and its class folder."""

    rel: Path
    folder: str | None  # class folder name (None: image at the top level, unlabelled)


@dataclass(frozen=True)
class CropFolder:
    crops: np.ndarray  # (N, crop_px, crop_px, 3) uint8
    labels: np.ndarray  # (N,) int64 into classes
    files: tuple[Path, ...]
    resized: int  # how many crops were rescaled to the model's field of view
    pad_share: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) padded share
    mapped_to_other: dict[str, int] = field(default_factory=dict)  # folder -> crops sent to other


def check_crop_mpp(crop_mpp: float | None, root: Path | str, work_mpp: float | None = None) -> float:
    """The crops' µm/px, or AnnotationError saying how to give it (None, ≤ 0, NaN refused)."""
    hint = f"; the model works at {work_mpp:g}" if work_mpp else ""
    if crop_mpp is None:
        raise AnnotationError(f"{root}: a crop folder needs the crops' pixel size: pass --mpp "
                              f"(µm per pixel of the images{hint})")
    if not (isinstance(crop_mpp, int | float) and math.isfinite(crop_mpp) and crop_mpp > 0):
        raise AnnotationError(f"{root}: --mpp {crop_mpp} is not a pixel size; give the crops' "
                              f"µm per pixel as a positive number, e.g. --mpp 0.25{hint}")
    return float(crop_mpp)


def list_crop_files(root: str | Path) -> list[CropFile]:
    """Images at the top level (unlabelled) and in ``<class>/`` sub-folders, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"{root}: crop folder not found; pass DIR holding DIR/<class>/*.png")
    out = [CropFile(p.relative_to(root), None) for p in sorted(root.iterdir())
           if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")]
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out += [CropFile(p.relative_to(root), d.name) for p in sorted(d.iterdir())
                if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")]
    if not out:
        raise AnnotationError(f"{root}: no {'/'.join(IMAGE_EXTS)} images under {root} or "
                              f"{root}/<class>/")
    return out


def to_uint8_rgb(arr: np.ndarray, source: str) -> np.ndarray:
    """An image array as (H, W, 3) uint8: 16-bit data scaled by 255/65535 (never clipped at
    255), grey repeated to RGB, alpha dropped; float or wider data refused."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        if a.dtype.kind not in "ui" or a.min(initial=0) < 0 or a.max(initial=0) > 65535:
            raise AnnotationError(f"{source}: unsupported pixel data ({a.dtype}, values "
                                  f"{a.min(initial=0)}…{a.max(initial=0)}); save the crop as 8- "
                                  "or 16-bit RGB PNG, JPEG or TIFF")
        a = np.round(a.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise AnnotationError(f"{source}: expected an RGB or grey image, got shape {a.shape}")
    if a.shape[2] < 3:  # grey (+ alpha)
        a = np.repeat(a[..., :1], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def read_image(path: Path, crop_mpp: float, work_mpp: float) -> tuple[np.ndarray, float]:
    """Read one crop as uint8 RGB → (image, its µm/px). JPEGs are decoded at a reduced scale
    when that still leaves at least the model's pixel count (faster, no loss at the model's mpp)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w0 = im.size[0]
            if im.format == "JPEG" and crop_mpp < work_mpp:
                scale = crop_mpp / work_mpp
                im.draft("RGB", (max(1, math.ceil(w0 * scale)),
                                 max(1, math.ceil(im.size[1] * scale))))
            mpp = crop_mpp * w0 / im.size[0]
            if im.mode in ("RGB", "L") or im.mode.startswith("I;16"):
                arr = np.asarray(im)
            elif im.mode == "I":  # 16-bit grey as Pillow opens some PNG/TIFF files
                arr = np.asarray(im).astype(np.int64)
            elif im.mode == "F":
                raise AnnotationError(f"{path}: floating-point image; save the crop as 8- or "
                                      "16-bit RGB PNG, JPEG or TIFF")
            else:
                arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise AnnotationError(f"{path}: not a readable image ({exc}); remove it or re-save it "
                              "as PNG/JPEG") from None
    return to_uint8_rgb(arr, str(path)), mpp


def pad_mirror(img: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """Pad by mirroring the border (repeated mirroring when the pad exceeds the image)."""
    while top or bottom or left or right:
        h, w = img.shape[:2]
        t, b, lft, r = min(top, h), min(bottom, h), min(left, w), min(right, w)
        img = np.pad(img, ((t, b), (lft, r), (0, 0)), mode="symmetric")
        top, bottom, left, right = top - t, bottom - b, left - lft, right - r
    return img


def fit_crop(img: np.ndarray, crop_mpp: float, work_mpp: float,
             crop_px: int) -> tuple[np.ndarray, float]:
    """Resample an RGB crop from ``crop_mpp`` to ``work_mpp`` and centre-cut to ``crop_px``
    → (crop, share of its pixels that are padding). Too small a crop is padded by mirroring
    its border, never with white."""
    from PIL import Image

    h, w = img.shape[:2]
    scale = crop_mpp / work_mpp
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))
    sy, sx = max(0, (nh - crop_px) // 2), max(0, (nw - crop_px) // 2)
    img = img[sy:sy + crop_px, sx:sx + crop_px]
    ch, cw = img.shape[:2]
    pad_share = 1.0 - (ch * cw) / float(crop_px * crop_px)
    if pad_share > 0:
        dy, dx = (crop_px - ch) // 2, (crop_px - cw) // 2
        img = pad_mirror(img, dy, crop_px - ch - dy, dx, crop_px - cw - dx)
    return np.ascontiguousarray(img, dtype=np.uint8), float(pad_share)


def read_crops(root: str | Path, files: list[CropFile], crop_mpp: float, work_mpp: float,
               crop_px: int) -> tuple[np.ndarray, np.ndarray, int]:
    """All images at the model's field of view → (crops (N, c, c, 3) uint8, pad share (N,),
    how many were resampled)."""
    root = Path(root)
    crops = np.zeros((len(files), crop_px, crop_px, 3), np.uint8)
    pad = np.zeros(len(files))
    resized = 0
    for i, f in enumerate(files):
        img, mpp = read_image(root / f.rel, crop_mpp, work_mpp)
        if img.shape[:2] != (crop_px, crop_px) or abs(mpp - work_mpp) > 1e-6:
            img, pad[i] = fit_crop(img, mpp, work_mpp, crop_px)
            resized += 1
        crops[i] = img
    return crops, pad, resized


def field_um(root: str | Path, files: list[CropFile], crop_mpp: float, sample: int = 200) -> float:
    """The crops' own field of view: median shorter image side × ``crop_mpp`` (µm)."""
    from PIL import Image

    step = max(1, len(files) // sample)
    sides = []
    for f in files[::step]:
        try:
            with Image.open(Path(root) / f.rel) as im:
                sides.append(min(im.size))
        except OSError:
            continue
    if not sides:
        raise AnnotationError(f"{root}: no readable images to measure the field of view")
    return float(np.median(sides)) * crop_mpp


def warn_padding(root: str | Path, pad: np.ndarray, crop_px: int, work_mpp: float) -> None:
    """Say loudly how much of the model's input is padding when crops are too small."""
    short = pad > 0
    if short.any() and float(pad.mean()) > PAD_WARN_SHARE:
        log.warning(
            "%s: %d of %d crops cover less than the model's field of view (%d px × %.3g µm/px = "
            "%.1f µm): on average %.0f %% of each input (up to %.0f %%) is padding, filled by "
            "mirroring the crop's border. Give crops that cover the field, or a model trained "
            "on this field (train chooses it from crop folders).", root, int(short.sum()),
            len(pad), crop_px, work_mpp, crop_px * work_mpp, 100 * float(pad.mean()),
            100 * float(pad.max()))


def folder_labels(files: list[CropFile], class_map: ClassMap,
                  root: str | Path) -> tuple[np.ndarray, dict[str, int]]:
    """Class index per file from its folder → (labels, {folder: n} of folders that are not a
    class name but were mapped to the catch-all class). Top-level images are refused."""
    loose = [str(f.rel) for f in files if f.folder is None]
    if loose:
        raise AnnotationError(f"{root}: {len(loose)} images (e.g. {loose[0]}) are not in a class "
                              f"folder; put labelled crops in {root}/<class>/")
    labels = np.empty(len(files), np.int64)
    mapped: dict[str, int] = {}
    for i, f in enumerate(files):
        cls = class_map.label(f.folder, where=f"{root}/{f.folder}")
        labels[i] = class_map.classes.index(cls)
        if cls == class_map.other_class and normalise_name(f.folder or "") != cls:
            mapped[f.folder or ""] = mapped.get(f.folder or "", 0) + 1
    if mapped:
        log.warning("%s: class folders %s are not classes of the model and were mapped to '%s' "
                    "(%s)", root, sorted(mapped), class_map.other_class,
                    ", ".join(f"{k}: {v}" for k, v in sorted(mapped.items())))
    return labels, mapped


def read_crop_folder(path: str | Path, class_map: ClassMap, crop_px: int, work_mpp: float,
                     crop_mpp: float | None) -> CropFolder:
    """Read ``DIR/<class>/*`` at the model's field of view (module docstring)."""
    root = Path(path)
    crop_mpp = check_crop_mpp(crop_mpp, root, work_mpp)
    files = list_crop_files(root)
    labels, mapped = folder_labels(files, class_map, root)
    crops, pad, resized = read_crops(root, files, crop_mpp, work_mpp, crop_px)
    if resized:
        log.info("%s: %d of %d crops resampled from %.3g µm/px to the model's %d px at %.3g "
                 "µm/px", root, resized, len(files), crop_mpp, crop_px, work_mpp)
    warn_padding(root, pad, crop_px, work_mpp)
    return CropFolder(crops, labels, tuple(root / f.rel for f in files), resized, pad, mapped)
