"""A labelling project on disk: ``PROJECT/project.yaml`` (the class list and knobs, editable),
``PROJECT/review.sqlite`` (the labels: the review store in labelling mode, append-only audit),
``PROJECT/pool/`` (the detector's candidates: centres, crops, features) and
``PROJECT/rounds/NN/`` (each round's training crops, bundle and report).

The store is the only place labels live; everything else can be rebuilt from the slides, so a
crash loses no label and two reviewers can label at once (the store's leases and audit rows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.card import DEFAULT_MODEL, resolve_model
from cellclf.errors import BundleError, ConfigError
from cellclf.labelling.selection import SELECTION_METHODS
from cellclf.model.config import Config, DataConfig, config_from_dict, load_config
from cellclf.outputs.atomic import atomic_write_text

_DATA = DataConfig()  # cellclf's training defaults: classes, catch-all class, resolution, crop

PROJECT_FILE = "project.yaml"

# How a round trains when project.yaml names no train_config: fine-tune a pretrained bundle
# (``init``, then the previous round's) for a fixed ~150 optimiser steps (epochs stretch to
# train.min_steps), with no validation split — every training label trains; the held-aside
# labels are the check. About a minute a round on 2 CPU cores (docs/labelling.md).
ROUND_SCHEDULE: dict[str, dict[str, Any]] = {
    "data": {"val_fraction": 0.0},
    "model": {"backbone": "regnet_y_400mf"},  # the shipped model's network (cheap on a CPU)
    "train": {"epochs": 1, "min_steps": 150, "patience": 0, "save_ckpt": False,
              "progress": False},
}


@dataclass
class ProjectSlide:
    slide_id: str
    path: str
    mpp: float | None = None


@dataclass
class ProjectConfig:
    """The editable settings of a labelling project (``PROJECT/project.yaml``)."""

    classes: list[str] = field(default_factory=lambda: list(_DATA.classes))
    other_class: str = _DATA.other_class  # "not a cell" answers train as this class
    work_mpp: float = _DATA.work_mpp
    crop_px: int = _DATA.crop_px
    batch_size: int = 40  # cells queued per round
    holdout_fraction: float = 0.25  # share of each batch drawn at random and held aside
    selection: str = "kmeans"  # how a batch is spread: kmeans (medoids) or kcenter (greedy)
    max_candidates_per_slide: int = 4000  # the pool: a random subset of each slide's candidates
    train_config: str | None = None  # a training YAML (default: ROUND_SCHEDULE)
    train_overrides: list[str] = field(default_factory=list)
    # the bundle round 1 fine-tunes (a folder or a shipped model's name; "" = from scratch);
    # later rounds fine-tune the previous round's bundle
    init: str = DEFAULT_MODEL
    alpha: float = 0.01  # the gate's error bound per class (calibration counts)
    delta: float = 0.05
    seed: int = 0
    slides: list[ProjectSlide] = field(default_factory=list)

    def check(self, where: str) -> None:
        if self.other_class not in self.classes:
            raise ConfigError(f"{where}: other_class {self.other_class!r} is not one of the "
                              f"classes {self.classes}")
        if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ConfigError(f"{where}: classes must be at least two unique names")
        if self.batch_size < 1 or not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"{where}: batch_size must be ≥ 1 and holdout_fraction in [0, 1)")
        if self.selection not in SELECTION_METHODS:
            raise ConfigError(f"{where}: selection must be one of {SELECTION_METHODS}, got "
                              f"{self.selection!r}")
        if not 0 < self.alpha < 1 or not 0 < self.delta < 1:
            raise ConfigError(f"{where}: alpha and delta must be in (0, 1)")
        if self.init:  # a missing bundle is refused at the start, not after a round's labels
            try:
                resolve_model(self.init)
            except BundleError as exc:
                raise ConfigError(f"{where}: init {self.init!r} is neither a bundle folder nor "
                                  "a shipped model's name; pass --init with one, or --init none "
                                  f"to train from scratch ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def training_config(self, previous: Path | None = None) -> Config:
        """The config a round trains with: ``train_config`` (else :data:`ROUND_SCHEDULE`) with
        the project's classes and crops, fine-tuning ``previous`` (the previous round's bundle)
        when it exists, else ``init``."""
        init = (str(previous) if previous is not None and (previous / "card.json").is_file()
                else str(resolve_model(self.init)) if self.init else "")
        overrides = [f"data.classes={list(self.classes)}", f"data.other_class={self.other_class}",
                     f"data.work_mpp={self.work_mpp}", f"data.crop_px={self.crop_px}",
                     f"data.crop_mpp={self.work_mpp}",
                     *([f"train.init={init}"] if init else []), *self.train_overrides]
        if self.train_config:
            return load_config(self.train_config, overrides)
        return config_from_dict(ROUND_SCHEDULE, overrides, source="the label loop's schedule")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> ProjectConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown settings {unknown}; known: {sorted(known)}")
        d = dict(d)
        d["slides"] = [ProjectSlide(**s) for s in d.get("slides", [])]
        cfg = cls(**d)
        cfg.check(where)
        return cfg


@dataclass(frozen=True)
class Pool:
    """The candidates of every project slide, concatenated (index = candidate id)."""

    slide_index: np.ndarray  # (N,) int: into the project's slides
    cell_id: np.ndarray  # (N,) int: the candidate's index within its slide
    xy0: np.ndarray  # (N, 2) level-0 px
    crops: np.ndarray  # (N, crop_px, crop_px, 3) uint8
    features: np.ndarray  # (N, F) float32, z-scored with the slide one-hot

    def __len__(self) -> int:
        return len(self.cell_id)


class Project:
    """Paths and config of ``PROJECT``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / PROJECT_FILE

    @property
    def store_url(self) -> str:
        return f"sqlite:///{(self.root / 'review.sqlite').resolve()}"

    @property
    def pool_path(self) -> Path:
        return self.root / "pool" / "pool.npz"

    def round_dir(self, n: int) -> Path:
        return self.root / "rounds" / f"{n:02d}"

    def rounds_done(self) -> list[int]:
        """Rounds that finished (their report.json exists), ascending."""
        d = self.root / "rounds"
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir()
                      if p.name.isdigit() and (p / "report.json").is_file())

    def exists(self) -> bool:
        return self.config_path.is_file()

    def load_config(self) -> ProjectConfig:
        import yaml

        if not self.exists():
            raise ConfigError(f"{self.root}: not a labelling project (no {PROJECT_FILE}); start "
                              f"one with `cellclf label SLIDES --out {self.root}`")
        data = yaml.safe_load(self.config_path.read_text()) or {}
        return ProjectConfig.from_dict(data, str(self.config_path))

    def save_config(self, cfg: ProjectConfig) -> None:
        import yaml

        self.root.mkdir(parents=True, exist_ok=True)
        text = ("# cellclf labelling project: edit classes/other_class before the first label;\n"
                "# batch_size, holdout_fraction, train_config and alpha may change between "
                "rounds.\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        atomic_write_text(self.config_path, text)

    def save_pool(self, pool: Pool) -> None:
        self.pool_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pool_path.with_suffix(".tmp.npz")
        np.savez(tmp, **asdict(pool))
        tmp.replace(self.pool_path)

    def load_pool(self) -> Pool:
        if not self.pool_path.is_file():
            raise ConfigError(f"{self.pool_path} is missing: start the project again with "
                              f"`cellclf label SLIDES --out {self.root}` (labels are kept)")
        with np.load(self.pool_path) as z:
            return Pool(**{k: z[k] for k in z.files})
