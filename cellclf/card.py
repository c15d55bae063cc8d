"""Model card and bundle layout: what travels with the weights (torch-free).

Sits at the end of training and the start of inference: ``train.fit`` writes a bundle directory
(``card.json`` + ``model.pt`` [+ ``model.ckpt``, ``model.onnx``]); the engine, the exporter, the
calibrator and the pipeline read the card to know the classes, the crop size, the working mpp, the
normalisation, the temperature and the gate. Loading validates every field and raises
:class:`~cellclf.errors.BundleError` naming the file and what to fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellclf.errors import BundleError

CARD_FILE = "card.json"
WEIGHTS_FILE = "model.pt"
CKPT_FILE = "model.ckpt"
ONNX_FILE = "model.onnx"
CARD_FORMAT = 1
DEFAULT_OTHER_CLASS = "other"  # the catch-all class of a card that names none

SYNTHETIC_NOTICE = (
    "Trained on synthetic H&E-like slides rendered by `cellclf synth`. A demo and a starting point "
    "for training on real annotated slides; NOT a clinical model and not evidence of accuracy on "
    "real tissue."
)
HYBRID_NOTICE = (
    "Trained on synthetic H&E slides (`cellclf synth`, v1 and v2 styles) and on hybrid slides: "
    "synthetic eosinophils, neutrophils and mast cells rendered into real tissue (the CC0 CMU skin "
    "slide and the OpenSlide OS-1 tumour crop), whose real nuclei are labelled `other`; bone marrow "
    "(bm_graz, full of real granulocytes) only calibrated it. It has seen real tissue as "
    "background and as `other`, but never a real eosinophil, neutrophil or mast cell with a label "
    "(no such tissue labels exist here): its target-class accuracy, and the gate's miss bound, are "
    "measured on synthetic cells only, and a real target cell may be called `other` and "
    "auto-accepted unseen (see metrics.real_tissue for a proxy on real blood-smear granulocytes). "
    "Before relying on its counts, calibrate it on your own slides with reviewed target cells and "
    "keep the blind audit on. NOT a clinical model."
)


@dataclass(frozen=True)
class BundlePaths:
    """Where a bundle's files live."""

    root: Path

    @property
    def card(self) -> Path:
        return self.root / CARD_FILE

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS_FILE

    @property
    def ckpt(self) -> Path:
        return self.root / CKPT_FILE

    @property
    def onnx(self) -> Path:
        return self.root / ONNX_FILE


def bundle_paths(path: str | Path) -> BundlePaths:
    """Accept a bundle directory or its card.json; BundleError if it does not exist."""
    p = Path(path)
    if p.is_file() and p.name == CARD_FILE:
        p = p.parent
    if not p.is_dir():
        raise BundleError(f"model bundle {p} not found: pass a directory holding {CARD_FILE} and "
                          f"{WEIGHTS_FILE} (as written by `cellclf train`)")
    return BundlePaths(p)


@dataclass(frozen=True)
class Card:
    """Everything needed to use the weights correctly; serialised as card.json."""

    name: str
    classes: tuple[str, ...]
    crop_px: int = 64
    mpp: float = 0.5
    stain: str = "H&E"
    normalization: dict[str, list[float]] = field(
        default_factory=lambda: {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    temperature: float = 1.0
    gate: dict[str, Any] | None = None
    version: str = "0.1.0"
    architecture: dict[str, Any] = field(default_factory=dict)  # {"backbone": ..., ...}
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None  # of model.pt
    weights_file: str = WEIGHTS_FILE
    other_class: str = DEFAULT_OTHER_CLASS
    description: str = ""
    intended_use: str = ""
    format: int = CARD_FORMAT
    # sections other modules add (e.g. "onnx", "conformal", "ood"); kept and written back as is
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target_classes(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c != self.other_class)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def replace(self, **changes: Any) -> Card:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        extra = d.pop("extra")
        d.update({k: v for k, v in extra.items() if k not in d})
        return d

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style read of a card key (also the ``extra`` sections)."""
        if key in self.extra:
            return self.extra[key]
        return getattr(self, key, default) if key in _FIELD_NAMES else default

    def __getitem__(self, key: str) -> Any:
        if key in self.extra or key in _FIELD_NAMES:
            return self.get(key)
        raise KeyError(key)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=_json_default)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "card") -> Card:
        if not isinstance(data, dict):
            raise BundleError(f"{source}: the card must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [k for k in ("name", "classes") if k not in data]
        if missing:
            raise BundleError(f"{source}: card lacks required keys {missing}")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["extra"] = {k: v for k, v in data.items() if k not in known}
        if isinstance(kwargs.get("classes"), list):
            kwargs["classes"] = tuple(kwargs["classes"])
        try:
            card = cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - guarded by the key checks above
            raise BundleError(f"{source}: {exc}") from exc
        card.validate(source)
        return card

    def validate(self, source: str = "card") -> None:
        """BundleError naming the field if anything is inconsistent."""
        def bad(msg: str) -> BundleError:
            return BundleError(f"{source}: {msg}; fix the card or retrain/re-export the bundle")

        if not isinstance(self.name, str) or not self.name:
            raise bad("'name' must be a non-empty string")
        if (not isinstance(self.classes, tuple) or len(self.classes) < 2
                or not all(isinstance(c, str) and c for c in self.classes)
                or len(set(self.classes)) != len(self.classes)):
            raise bad(f"'classes' must list ≥ 2 distinct names, got {self.classes!r}")
        if self.other_class not in self.classes:
            raise bad(f"'other_class' {self.other_class!r} is not one of the classes")
        if not isinstance(self.crop_px, int) or isinstance(self.crop_px, bool) or self.crop_px < 8:
            raise bad(f"'crop_px' must be an integer ≥ 8, got {self.crop_px!r}")
        if not _positive(self.mpp):
            raise bad(f"'mpp' must be a positive number (µm per pixel), got {self.mpp!r}")
        if not _positive(self.temperature):
            raise bad(f"'temperature' must be a positive number, got {self.temperature!r}")
        norm = self.normalization
        if (not isinstance(norm, dict) or set(norm) != {"mean", "std"}
                or any(not isinstance(norm[k], list | tuple) or len(norm[k]) != 3 for k in norm)
                or not all(_positive(s) for s in norm["std"])):
            raise bad("'normalization' must be {mean: [3 numbers], std: [3 positive numbers]}")
        if self.gate is not None:
            if not isinstance(self.gate, dict) or not isinstance(self.gate.get("thresholds"), dict):
                raise bad("'gate' must be null or an object with 'thresholds'")
            extra = sorted(set(self.gate["thresholds"]) - set(self.classes))
            if extra:
                raise bad(f"gate thresholds name classes {extra} that the model does not output")
        if self.sha256 is not None and (not isinstance(self.sha256, str) or len(self.sha256) != 64):
            raise bad("'sha256' must be a 64-character hex digest or null")


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Card)) - {"extra"}


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_card(path: str | Path) -> Card:
    """Read and validate ``card.json`` (path to the file or its bundle directory)."""
    paths = bundle_paths(path)
    if not paths.card.is_file():
        raise BundleError(f"{paths.root} has no {CARD_FILE}: not a cellclf bundle "
                          "(train one with `cellclf train`)")
    try:
        data = json.loads(paths.card.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{paths.card} is not valid JSON ({exc}); restore it from the bundle "
                          "you downloaded or retrain") from exc
    return Card.from_dict(data, source=str(paths.card))


def save_card(card: Card, bundle_dir: str | Path) -> Path:
    """Validate and write ``card.json`` atomically; returns its path."""
    card.validate(str(bundle_dir))
    root = Path(bundle_dir)
    root.mkdir(parents=True, exist_ok=True)
    out = root / CARD_FILE
    tmp = root / f".{CARD_FILE}.tmp"
    tmp.write_text(card.to_json() + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def verify_weights(card: Card, bundle_dir: str | Path) -> Path:
    """Check that the weights file exists and matches the card's sha256; returns its path."""
    paths = bundle_paths(bundle_dir)
    weights = paths.root / card.weights_file
    if not weights.is_file():
        raise BundleError(f"{paths.root} lacks its weights file {card.weights_file}; "
                          "copy the whole bundle directory")
    if card.sha256 is not None:
        digest = file_sha256(weights)
        if digest != card.sha256:
            raise BundleError(f"{weights} does not match the card's sha256 ({digest[:12]}… ≠ "
                              f"{card.sha256[:12]}…): the weights were changed or truncated")
    return weights


# -- shipped bundles -------------------------------------------------------------------------
DEFAULT_MODEL = "cellclf-he-v2"


def shipped_models_dir() -> Path:
    """Where shipped bundles live: ``$CELLCLF_MODELS`` or the ``models/`` folder beside the
    package (a source checkout), independent of the working directory."""
    env = os.environ.get("CELLCLF_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "models"


def resolve_model(value: str | Path) -> Path:
    """A bundle directory from ``--model``: an existing path (relative to the working directory),
    else the name of a shipped model in :func:`shipped_models_dir`."""
    given = Path(value)
    if given.exists():
        return given
    shipped = shipped_models_dir() / str(value)
    if given.name == str(value) and (shipped / "card.json").is_file():
        return shipped
    names = sorted(p.name for p in shipped_models_dir().glob("*") if (p / "card.json").is_file())
    offer = (f"shipped models: {', '.join(names)} (in {shipped_models_dir()})" if names else
             f"no shipped models found in {shipped_models_dir()} (set CELLCLF_MODELS to the "
             "folder that holds them)")
    raise BundleError(f"model bundle {value} not found: pass --model with a bundle folder (it "
                      f"holds card.json and model.onnx or model.pt) or the name of a shipped "
                      f"model; {offer}")
