"""Training crops from annotated slides, cached on disk, split by slide (torch-free).

Sits between annotations in (``annotations.py``) and training (``train.py``). Per slide:
detector candidates (``detect.detect_slide``) are matched to the annotated cells within
``match_um`` (``match.match_points``); a matched cell is cropped **at its candidate** (what the
classifier sees at inference) with the annotated label, an undetected cell at its annotation point,
an unmatched candidate becomes ``other`` (a false detection in stroma etc.; second detections of
an annotated cell are dropped). Crops come from ``crops.extract_crops`` and are cached as ``.npy``
files (memory-mapped on reading) keyed by the slide's path, size and mtime, the annotation file's
hash, work_mpp, crop_px and the detector's parameters and code, so a rerun never re-reads slides.
Source class names are cached, not labels: a new class map reuses the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellclf.annotations.crop_folder import check_crop_mpp, field_um, list_crop_files, read_crop_folder
from cellclf.annotations.labelled_data import (
    ClassMap,
    DataSource,
    SlideEntry,
    load_points,
)
from cellclf.detect.matching import match_points
from cellclf.detect.slide_detection import detect_slide
from cellclf.errors import AnnotationError
from cellclf.wsi.crops import extract_crops
from cellclf.wsi.slide import Slide

log = logging.getLogger(__name__)

CACHE_VERSION = 1
KIND_CANDIDATE, KIND_ANNOTATION, KIND_FALSE_DETECTION, KIND_CROP_FILE = 0, 1, 2, 3


@dataclass
class CropSet:
    """Crops with labels and where they came from (one row per crop)."""

    crops: np.ndarray  # (N, crop_px, crop_px, 3) uint8
    labels: np.ndarray  # (N,) int64 into classes
    slide_ids: np.ndarray  # (N,) str
    xy0: np.ndarray  # (N, 2) float64 level-0 centre (NaN for crop files)
    kind: np.ndarray  # (N,) int8: KIND_*
    ambiguous: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self, classes: Sequence[str]) -> dict[str, int]:
        bc = np.bincount(self.labels, minlength=len(classes))
        return {c: int(n) for c, n in zip(classes, bc, strict=True)}

    @staticmethod
    def empty(crop_px: int) -> CropSet:
        return CropSet(np.zeros((0, crop_px, crop_px, 3), np.uint8), np.zeros(0, np.int64),
                       np.zeros(0, dtype=str), np.zeros((0, 2)), np.zeros(0, np.int8),
                       np.zeros(0, bool))

    @staticmethod
    def concat(parts: Sequence[CropSet], crop_px: int) -> CropSet:
        parts = [p for p in parts if len(p)]
        if not parts:
            return CropSet.empty(crop_px)
        return CropSet(*(np.concatenate([getattr(p, f) for p in parts])
                         for f in ("crops", "labels", "slide_ids", "xy0", "kind", "ambiguous")))


@dataclass
class Datasets:
    """Train/val/test crop sets plus a JSON-ready summary for the model card."""

    splits: dict[str, CropSet]
    classes: tuple[str, ...]
    slides: dict[str, list[str]] = field(default_factory=dict)  # split -> slide ids
    cache_hits: int = 0
    cache_misses: int = 0
    crop_folder: dict = field(default_factory=dict)  # crop folders: field of view, padding, …

    def summary(self) -> dict:
        return {"counts": {s: cs.counts(self.classes) for s, cs in self.splits.items()},
                "slides": self.slides, "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses, "crop_folder": self.crop_folder}


# ---------------------------------------------------------------- splits (pure)


def split_entries(entries: Sequence[SlideEntry], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, list[SlideEntry]]:
    """Assign slides to train/val/test. A split named in the manifest wins; the rest are shuffled
    with ``seed`` and cut by the fractions (rounded, at least one slide for a non-zero fraction
    while one slide stays for training). No slide is ever in two splits."""
    out: dict[str, list[SlideEntry]] = {"train": [], "val": [], "test": []}
    free: list[SlideEntry] = []
    for e in entries:
        (out[e.split] if e.split else free).append(e)
    order = np.random.default_rng(seed).permutation(len(free))
    free = [free[i] for i in order]
    n = len(free)

    def take(frac: float, room: int) -> int:
        if frac <= 0 or room <= 1:
            return 0
        return int(min(room - 1, max(1, round(frac * n))))

    n_test = take(test_fraction, n)
    n_val = take(val_fraction, n - n_test)
    out["test"] += free[:n_test]
    out["val"] += free[n_test:n_test + n_val]
    out["train"] += free[n_test + n_val:]
    return out


def crop_group(path: Path) -> str:
    """Group key of a crop file for splitting: the name before ``__`` (e.g. its slide)."""
    return path.stem.split("__", 1)[0] if "__" in path.stem else path.stem


# ---------------------------------------------------------------- the crop cache


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _code_fingerprint() -> str:
    h = hashlib.sha256()
    for mod in ("detect.py", "crops.py"):
        p = Path(__file__).with_name(mod)
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cache_key(entry: SlideEntry, work_mpp: float, crop_px: int, match_um: float,
              use_detector: bool, coords: str, detector: str) -> str:
    """Hash of everything that determines a slide's crops."""
    st = entry.slide.stat()
    ann = entry.annotations
    parts = {
        "v": CACHE_VERSION, "slide": str(entry.slide.resolve()), "size": st.st_size,
        "mtime_ns": st.st_mtime_ns, "ann": _sha256(ann) if ann else None,
        "mpp": entry.mpp, "work_mpp": work_mpp, "crop_px": crop_px, "match_um": match_um,
        "use_detector": use_detector, "coords": coords, "detector": detector,
        "code": _code_fingerprint() if use_detector else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir(data: Path) -> Path:
    env = os.environ.get("CELLCLF_CACHE")
    if env:
        return Path(env)
    return (data if data.is_dir() else data.parent) / ".cellclf-cache"


_ARRAYS = ("crops", "xy0", "name_idx", "kind", "ambiguous")


def _load_cached(d: Path) -> tuple[dict[str, np.ndarray], list[str | None]] | None:
    meta_p = d / "meta.json"
    if not meta_p.is_file():
        return None
    try:
        meta = json.loads(meta_p.read_text())
        arrays = {a: np.load(d / f"{a}.npy", mmap_mode="r") for a in _ARRAYS}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable crop cache %s (%s)", d, exc)
        return None
    return arrays, meta["names"]


def _save_cache(d: Path, arrays: dict[str, np.ndarray], names: list[str | None],
                meta: dict) -> None:
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
    try:
        for a in _ARRAYS:
            np.save(tmp / f"{a}.npy", arrays[a])
        (tmp / "meta.json").write_text(json.dumps({**meta, "names": names}, indent=1))
        try:
            os.rename(tmp, d)
        except OSError:  # another process (e.g. a DDP rank) wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- one slide


def slide_crops(entry: SlideEntry, *, work_mpp: float, crop_px: int, match_um: float = 4.0,
                use_detector: bool = True, coords: str = "px", workers: int = 0,
                cache_dir: Path | None = None, progress: bool = False, detect_params=None,
                ) -> tuple[dict[str, np.ndarray], list[str | None], bool]:
    """Cached crops of one slide → (arrays, source names, cache hit?).

    ``arrays``: crops (N,c,c,3) uint8, xy0 (N,2), name_idx (N,) int32 into names (-1 = false
    detection), kind (N,) int8, ambiguous (N,) bool.
    """
    detector = repr(detect_params) if detect_params is not None else "default"
    key = cache_key(entry, work_mpp, crop_px, match_um, use_detector, coords, detector)
    cdir = cache_dir / f"{entry.slide_id}-{key}" if cache_dir else None
    if cdir is not None and (hit := _load_cached(cdir)) is not None:
        return hit[0], hit[1], True

    pts = load_points(entry, coords)
    with Slide(entry.slide, mpp=entry.mpp) as slide:
        slide_mpp, width, height = slide.mpp, slide.width, slide.height
    truth = pts.level0(slide_mpp)
    outside = np.flatnonzero((truth[:, 0] < 0) | (truth[:, 1] < 0) | (truth[:, 0] >= width)
                             | (truth[:, 1] >= height))
    if len(outside):
        i = int(outside[0])
        hint = "" if coords == "um" else " (coordinates in µm? set data.coords=um)"
        raise AnnotationError(
            f"{pts.source}: annotation {i} at ({truth[i, 0]:.1f}, {truth[i, 1]:.1f}) lies outside "
            f"slide {entry.slide.name} ({width}×{height} px){hint}; {len(outside)} such points")
    names = sorted({n for n in pts.names}, key=lambda n: (n is None, n or ""))
    index = {n: i for i, n in enumerate(names)}
    name_idx = np.array([index[n] for n in pts.names], dtype=np.int32)
    centres, kind = truth.copy(), np.full(len(truth), KIND_ANNOTATION, np.int8)
    extra = np.zeros((0, 2))
    if use_detector:
        cands = detect_slide(entry.slide, mpp=entry.mpp, work_mpp=work_mpp, workers=workers,
                             progress=progress, params=detect_params, blank_fields_ok=True)
        m = match_points(cands, truth, match_um / slide_mpp)
        hit_t = np.flatnonzero(m.truth_to_pred >= 0)
        centres[hit_t] = cands[m.truth_to_pred[hit_t]]
        kind[hit_t] = KIND_CANDIDATE
        extra = cands[(m.pred_to_truth < 0) & ~m.duplicates]
    all_xy = np.concatenate([centres, extra]).astype(np.float64)
    arrays = {
        "xy0": all_xy,
        "name_idx": np.concatenate([name_idx, np.full(len(extra), -1, np.int32)]),
        "kind": np.concatenate([kind, np.full(len(extra), KIND_FALSE_DETECTION, np.int8)]),
        "ambiguous": np.concatenate([pts.ambiguous, np.zeros(len(extra), bool)]),
        "crops": (extract_crops(entry.slide, all_xy, work_mpp, crop_px, mpp=entry.mpp,
                                workers=workers) if len(all_xy)
                  else np.zeros((0, crop_px, crop_px, 3), np.uint8)),
    }
    if cdir is not None:
        _save_cache(cdir, arrays, names, {"slide": str(entry.slide), "slide_mpp": slide_mpp,
                                          "annotations": str(entry.annotations)})
    return arrays, names, False


def label_slide(arrays: dict[str, np.ndarray], names: list[str | None], class_map: ClassMap,
                slide_id: str, where: str, max_other_ratio: float = 0.0, seed: int = 0) -> CropSet:
    """Map cached source names to labels (false detections → other). ``max_other_ratio`` > 0
    keeps at most that many ``other`` crops per target-class crop (a seeded random subset)."""
    other = class_map.classes.index(class_map.other_class)
    lut = np.array([class_map.index(n, where) for n in names] + [other], dtype=np.int64)
    idx = np.asarray(arrays["name_idx"]).astype(np.int64)
    labels = lut[np.where(idx < 0, len(names), idx)]
    keep = np.arange(len(labels))
    others = np.flatnonzero(labels == other)
    n_max = int(max_other_ratio * (len(labels) - len(others)))
    if max_other_ratio > 0 and len(others) > n_max:
        rng = np.random.default_rng(seed)
        drop = rng.choice(others, len(others) - n_max, replace=False)
        keep = np.setdiff1d(keep, drop)
    return CropSet(np.asarray(arrays["crops"])[keep], labels[keep],
                   np.full(len(keep), slide_id, dtype=object), np.asarray(arrays["xy0"])[keep],
                   np.asarray(arrays["kind"])[keep], np.asarray(arrays["ambiguous"])[keep])


# ---------------------------------------------------------------- whole datasets


def build_datasets(source: DataSource, cfg, cache_dir: Path | None = None,
                   progress: bool = False) -> Datasets:
    """All crops of a data source, split by slide (or by crop-file group for crop folders)."""
    d = cfg.data
    cmap = ClassMap.from_config(d)
    if source.kind == "crops":
        return _crop_folder_datasets(source.path, cfg, cmap)
    cache_dir = cache_dir or (Path(d.cache_dir) if d.cache_dir else default_cache_dir(source.path))
    ids = [e.slide_id for e in source.entries]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise AnnotationError(f"{source.path}: several slides share the name(s) {sorted(dup)}; "
                              "slide ids must be unique")
    parts = split_entries(source.entries, d.val_fraction, d.test_fraction, d.split_seed)
    splits: dict[str, CropSet] = {}
    slides: dict[str, list[str]] = {}
    hits = misses = 0
    for split, entries in parts.items():
        sets = []
        for k, e in enumerate(entries):
            arrays, names, hit = slide_crops(
                e, work_mpp=d.work_mpp, crop_px=d.crop_px, match_um=d.match_um,
                use_detector=d.use_detector, coords=d.coords, workers=d.workers,
                cache_dir=cache_dir, progress=progress)
            hits, misses = hits + hit, misses + (not hit)
            sets.append(label_slide(arrays, names, cmap, e.slide_id, str(e.annotations),
                                    d.max_other_ratio if split == "train" else 0.0,
                                    seed=d.split_seed + k))
        splits[split] = CropSet.concat(sets, d.crop_px)
        slides[split] = [e.slide_id for e in entries]
    return Datasets(splits, cmap.classes, slides, hits, misses)


def crop_folder_field(cfg, root: Path):
    """The config with the model's field of view chosen for a crop folder: ``data.crop_um``
    (None = the crops' own field, median shorter side × crop_mpp) over ``crop_px`` pixels, so a
    crop-trained model sees whole crops, not a white-padded corner of them. ``crop_um`` 0 keeps
    ``work_mpp``."""
    import dataclasses


    d = cfg.data
    crop_mpp = check_crop_mpp(d.crop_mpp, root, d.work_mpp)
    if d.crop_um == 0:
        return cfg
    um = d.crop_um if d.crop_um is not None else field_um(root, list_crop_files(root), crop_mpp)
    work_mpp = round(um / d.crop_px, 6)
    log.info("%s: field of view %.1f µm → the model works at %.4g µm/px over %d px", root, um,
             work_mpp, d.crop_px)
    return cfg.replace(data=dataclasses.replace(d, work_mpp=work_mpp, crop_um=float(um)))


def stratified_groups(groups: np.ndarray, labels: np.ndarray, val_fraction: float,
                      test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Split crop-file groups train/val/test per class (a group's class: its first crop's)."""
    first: dict[str, int] = {}
    for g, y in zip(groups, labels, strict=True):
        first.setdefault(g, int(y))
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for y in sorted(set(first.values())):
        names = sorted(g for g, c in first.items() if c == y)
        parts = split_entries([SlideEntry(Path(g), None) for g in names], val_fraction,
                              test_fraction, seed + y)
        for split, entries in parts.items():
            out[split] += [e.slide.name for e in entries]
    return out


def _crop_folder_datasets(root: Path, cfg, cmap: ClassMap) -> Datasets:
    d = cfg.data
    folder = read_crop_folder(root, cmap, d.crop_px, d.work_mpp, d.crop_mpp)
    groups = np.array([crop_group(f) for f in folder.files], dtype=object)
    parts = stratified_groups(groups, folder.labels, d.val_fraction, d.test_fraction,
                              d.split_seed)
    splits, slides = {}, {}
    n = len(folder.labels)
    for split, names in parts.items():
        idx = np.flatnonzero(np.isin(groups, names))
        splits[split] = CropSet(folder.crops[idx], folder.labels[idx], groups[idx],
                                np.full((len(idx), 2), np.nan), np.full(len(idx), KIND_CROP_FILE,
                                                                         np.int8),
                                np.zeros(len(idx), bool))
        slides[split] = names
    assert sum(len(s) for s in splits.values()) == n
    info = {"crop_mpp": d.crop_mpp, "field_um": round(d.crop_px * d.work_mpp, 3),
            "work_mpp": d.work_mpp, "crop_px": d.crop_px, "n_crops": n,
            "resampled": folder.resized, "padding_share_mean": round(float(folder.pad_share.mean()), 4),
            "cropped_short": int((folder.pad_share > 0).sum()),
            "folders_mapped_to_other": folder.mapped_to_other}
    return Datasets(splits, cmap.classes, slides, crop_folder=info)
