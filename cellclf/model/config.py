"""Training/evaluation configuration: frozen dataclasses filled from YAML plus ``key=value`` overrides.

Sits before everything in the training flow: ``cellclf train --config configs/train.yaml a.b=c``
→ :func:`load_config` → :class:`Config` → dataset building, the Lightning run and the bundle's card
(which records the whole config). Unknown keys, in the file or in an override, raise
:class:`~cellclf.errors.ConfigError` naming the key and the closest valid one. Torch-free.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cellclf.errors import ConfigError

TARGET_CLASSES: tuple[str, ...] = ("eosinophil", "neutrophil", "mast_cell")
DEFAULT_CLASSES: tuple[str, ...] = (*TARGET_CLASSES, "other")


@dataclass(frozen=True)
class DataConfig:
    """Which cells become training crops and how they are cut."""

    classes: tuple[str, ...] = DEFAULT_CLASSES  # model outputs, in order; last is the catch-all
    other_class: str = "other"  # the catch-all class (non-targets, false detections)
    class_map: dict[str, str] = field(default_factory=dict)  # extra source name -> class
    unknown_class: str = "other"  # "other" maps unknown names to other_class; "error" refuses
    work_mpp: float = 0.5  # µm per pixel the model sees
    crop_px: int = 64  # crop side at work_mpp (64 px = 32 µm)
    match_um: float = 4.0  # a candidate within this distance of an annotation takes its label
    use_detector: bool = True  # add detector candidates (unmatched -> other) and centre on them
    max_other_ratio: float = 0.0  # train: keep ≤ ratio × target crops of "other" per slide (0=all)
    coords: str = "px"  # CSV coordinate unit: "px" (level-0) or "um"
    crop_mpp: float | None = None  # µm/px of a crop-folder's images (required for crop folders)
    crop_um: float | None = None  # crop folders: model field of view in µm (None = the crops'
    #   own field; 0 = keep work_mpp × crop_px); work_mpp becomes crop_um / crop_px
    val_fraction: float = 0.2  # share of slides for validation when no manifest split is given
    test_fraction: float = 0.0  # share of slides held out for testing
    split_seed: int = 0
    cache_dir: str = ""  # crop cache; "" = <data>/.cellclf-cache (or CELLCLF_CACHE)
    workers: int = 0  # slide reader threads (0 = automatic)


@dataclass(frozen=True)
class ModelConfig:
    """Network and the preprocessing contract that travels with the weights."""

    name: str = "cellclf-model"
    version: str = "0.1.0"
    backbone: str = "resnet18"  # any torchvision classification model name
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # on [0, 1] RGB
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    stain: str = "H&E"
    description: str = ""
    norm: str = "batch"  # normalisation layers: "batch" (BatchNorm) or "group" (GroupNorm)


@dataclass(frozen=True)
class AugmentConfig:
    """Histology augmentation (train split only)."""

    enabled: bool = True
    d4: bool = True  # flips + 90° rotations
    hestain_p: float = 0.5  # albumentations HEStain jitter
    brightness_contrast_p: float = 0.3
    blur_p: float = 0.1
    jpeg_p: float = 0.2
    jpeg_quality: tuple[int, int] = (60, 95)
    gpu_augment: bool = False  # flips/rot90 + HED jitter in torch on the device instead
    gpu_hed_sigma: float = 0.03  # HED-space jitter strength for gpu_augment


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the Lightning trainer."""

    epochs: int = 30
    batch_size: int = 0  # 0 = automatic: scales with the training set (16…256)
    min_steps: int = 400  # optimiser steps before early stopping may fire (epochs extended)
    init: str = ""  # bundle whose weights start the training (a new head if classes differ)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    balance: str = "sampler"  # "sampler" (weighted sampling), "loss" (class weights), "none"
    patience: int = 6  # early stopping on val macro-F1 (0 = off)
    seed: int = 0
    accelerator: str = "auto"
    devices: Any = "auto"  # int, list or "auto"
    strategy: str = "auto"  # e.g. "ddp" for several GPUs
    precision: str = "auto"  # auto: bf16-mixed on CUDA, 32-true on CPU
    num_workers: int = -1  # DataLoader worker processes (-1 = automatic from the CPU count)
    deterministic: bool = True  # same seed, same metrics (CPU); warn-only on CUDA
    save_ckpt: bool = True  # copy the best Lightning checkpoint into the bundle as model.ckpt
    limit_train_batches: float = 1.0
    log_every_n_steps: int = 10
    progress: bool = True


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serialisable dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _closest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; ConfigError naming ``key`` if not."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return _plain(value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: '{key}' cannot be null")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' needs {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, key, source): _coerce(v, vt, key, source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    raise ConfigError(f"{source}: '{key}' has an unsupported type {tp!r}")  # pragma: no cover


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'{_closest(str(key), fields)}; "
                f"valid keys here: {', '.join(fields)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}", source)
    return cls(**kwargs)


def _validate(cfg: Config, source: str) -> Config:
    d = cfg.data
    if len(set(d.classes)) != len(d.classes) or len(d.classes) < 2:
        raise ConfigError(f"{source}: data.classes must be ≥ 2 distinct names, got {d.classes}")
    if d.other_class not in d.classes:
        raise ConfigError(f"{source}: data.other_class '{d.other_class}' is not in data.classes")
    if d.unknown_class not in ("other", "error"):
        raise ConfigError(f"{source}: data.unknown_class must be 'other' or 'error'")
    bad = sorted(set(d.class_map.values()) - set(d.classes))
    if bad:
        raise ConfigError(f"{source}: data.class_map maps to {bad}, which are not in data.classes")
    if d.coords not in ("px", "um"):
        raise ConfigError(f"{source}: data.coords must be 'px' or 'um', got '{d.coords}'")
    if d.work_mpp <= 0 or d.crop_px < 8 or d.match_um <= 0:
        raise ConfigError(f"{source}: data.work_mpp, data.match_um must be > 0, crop_px ≥ 8")
    if not 0 <= d.val_fraction < 1 or not 0 <= d.test_fraction < 1:
        raise ConfigError(f"{source}: data.val_fraction and data.test_fraction must be in [0, 1)")
    if cfg.train.balance not in ("sampler", "loss", "none"):
        raise ConfigError(f"{source}: train.balance must be 'sampler', 'loss' or 'none'")
    if cfg.train.epochs < 1 or cfg.train.batch_size < 0 or cfg.train.min_steps < 0:
        raise ConfigError(f"{source}: train.epochs must be ≥ 1, train.batch_size ≥ 0 (0 = "
                          "automatic) and train.min_steps ≥ 0")
    if cfg.train.num_workers < -1:
        raise ConfigError(f"{source}: train.num_workers must be ≥ 0, or -1 for automatic")
    if d.crop_mpp is not None and not (math.isfinite(d.crop_mpp) and d.crop_mpp > 0):
        raise ConfigError(f"{source}: data.crop_mpp (--mpp) must be the crops' µm per pixel, a "
                          f"positive number, got {d.crop_mpp:g}")
    if d.crop_um is not None and not (math.isfinite(d.crop_um) and d.crop_um >= 0):
        raise ConfigError(f"{source}: data.crop_um must be ≥ 0 µm (0 = keep work_mpp × crop_px)")
    if cfg.model.norm not in ("batch", "group"):
        raise ConfigError(f"{source}: model.norm must be 'batch' or 'group', got "
                          f"'{cfg.model.norm}'")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` → (["train", "epochs"], 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return parts, value


def _check_override_key(parts: list[str], text: str) -> None:
    """ConfigError naming the override if its dotted key does not exist."""
    cls: Any = Config
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            if typing.get_origin(cls) is dict and depth == len(parts) - 1:
                return  # a mapping entry, e.g. data.class_map.eos
            raise ConfigError(f"override '{text}': '{'.'.join(parts[:depth])}' has no sub-keys")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:depth + 1])
            raise ConfigError(f"override '{text}': unknown key '{where}'{_closest(part, hints)}; "
                              f"valid keys here: {', '.join(hints)}")
        cls = hints[part]


def config_from_dict(data: Mapping[str, Any] | None, overrides: Iterable[str] = (),
                     source: str = "config") -> Config:
    """Build a :class:`Config` from a nested mapping plus dotted ``key=value`` overrides."""
    merged: dict[str, Any] = _plain(dict(data or {}))
    for text in overrides:
        parts, value = parse_override(text)
        _check_override_key(parts, text)
        node = merged
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return _validate(_build(Config, merged, "", source), source)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (None = defaults) and apply overrides; ConfigError on any bad key."""
    if path is None:
        return config_from_dict({}, overrides, source="defaults")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found; pass --config configs/train.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    return config_from_dict(data, overrides, source=str(p))


def auto_batch_size(n_train: int, configured: int = 0) -> int:
    """``configured`` if > 0, else a power of two near n/40 within 16…256, so that even a few
    hundred crops give a dozen optimiser steps per epoch."""
    if configured > 0:
        return configured
    target = max(16, min(256, n_train // 40))
    return 1 << int(round(math.log2(target)))


def auto_num_workers(configured: int = -1, cpus: int | None = None) -> int:
    """``configured`` if ≥ 0, else worker processes the machine can feed: none on ≤ 2 cores
    (the main process already uses them), else cores − 2, at most 8."""
    if configured >= 0:
        return configured
    n = cpus if cpus is not None else (len(os.sched_getaffinity(0))
                                       if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return 0 if n <= 2 else min(8, n - 2)
