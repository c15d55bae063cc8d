"""Model card: JSON round trip, validation with BundleError, weights checksum, extra sections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellclf.card import Card, bundle_paths, file_sha256, load_card, save_card, verify_weights
from cellclf.errors import BundleError

CLASSES = ("eosinophil", "neutrophil", "mast_cell", "other")


def _card(**kw) -> Card:
    return Card(name="m", classes=CLASSES, **kw)


def test_round_trip_and_extra_sections(tmp_path: Path) -> None:
    card = _card(architecture={"backbone": "resnet18"}, training={"epochs": 3},
                 metrics={"val": {"macro_f1": 0.9}})
    save_card(card, tmp_path)
    data = json.loads((tmp_path / "card.json").read_text())
    assert data["classes"] == list(CLASSES) and data["temperature"] == 1.0 and data["gate"] is None
    # another module adds a section (e.g. the exporter's "onnx"): kept, readable, written back
    data["onnx"] = {"opset": 18}
    (tmp_path / "card.json").write_text(json.dumps(data))
    again = load_card(tmp_path)
    assert again.extra == {"onnx": {"opset": 18}}
    assert again["onnx"] == {"opset": 18} and again.get("crop_px") == 64
    assert again.get("nope", 1) == 1
    save_card(again.replace(temperature=1.5), tmp_path)
    final = json.loads((tmp_path / "card.json").read_text())
    assert final["onnx"] == {"opset": 18} and final["temperature"] == 1.5
    assert load_card(tmp_path / "card.json").target_classes == CLASSES[:3]


@pytest.mark.parametrize("change, msg", [
    ({"classes": ("a",)}, "classes"),
    ({"classes": ("a", "a", "other")}, "classes"),
    ({"other_class": "rest"}, "other_class"),
    ({"crop_px": 4}, "crop_px"),
    ({"crop_px": 64.0}, "crop_px"),
    ({"mpp": 0}, "mpp"),
    ({"temperature": -1.0}, "temperature"),
    ({"normalization": {"mean": [0, 0, 0], "std": [1, 0, 1]}}, "normalization"),
    ({"normalization": {"mean": [0, 0]}}, "normalization"),
    ({"gate": {"thresholds": {"basophil": 0.9}}}, "basophil"),
    ({"gate": {"alpha": 0.01}}, "thresholds"),
    ({"sha256": "abc"}, "sha256"),
])
def test_invalid_cards_are_refused(tmp_path: Path, change: dict, msg: str) -> None:
    data = _card().to_dict()
    data.update({k: list(v) if isinstance(v, tuple) else v for k, v in change.items()})
    (tmp_path / "card.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=msg) as err:
        load_card(tmp_path)
    assert "card.json" in str(err.value)


def test_missing_and_corrupt_cards(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        bundle_paths(tmp_path / "absent")
    with pytest.raises(BundleError, match="no card.json"):
        load_card(tmp_path)
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_card(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"classes": ["a", "other"]}))
    with pytest.raises(BundleError, match="name"):
        load_card(tmp_path)


def test_weights_checksum(tmp_path: Path) -> None:
    w = tmp_path / "model.pt"
    w.write_bytes(b"weights")
    card = _card(sha256=file_sha256(w))
    assert verify_weights(card, tmp_path) == w
    w.write_bytes(b"weights, changed")
    with pytest.raises(BundleError, match="does not match"):
        verify_weights(card, tmp_path)
    w.unlink()
    with pytest.raises(BundleError, match="lacks its weights"):
        verify_weights(card, tmp_path)
    # sha256 of b"abc", a hand-checkable value
    (tmp_path / "abc").write_bytes(b"abc")
    assert file_sha256(tmp_path / "abc").startswith("ba7816bf8f01cfea")
