"""Config: YAML + dotted overrides into frozen dataclasses; unknown keys and bad types refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cellclf.errors import ConfigError
from cellclf.model.config import Config, config_from_dict, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_the_architecture_decisions() -> None:
    cfg = load_config()
    assert cfg.data.work_mpp == 0.5 and cfg.data.crop_px == 64
    assert cfg.data.classes == ("eosinophil", "neutrophil", "mast_cell", "other")
    assert cfg.model.backbone == "resnet18"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["train.yaml", "train-tiny.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, Config)
    assert load_config(REPO / "configs" / name, ["train.epochs=7"]).train.epochs == 7


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 4\nmodel:\n  mean: [0.5, 0.5, 0.5]\n")
    cfg = load_config(p, ["train.lr=0.01", "data.classes=[a, b, other]",
                          "data.class_map.eos=a", "train.devices=2", "data.crop_mpp=0.25",
                          "augment.jpeg_quality=[50, 90]"])
    assert cfg.train.epochs == 4 and cfg.train.lr == 0.01
    assert cfg.model.mean == (0.5, 0.5, 0.5)
    assert cfg.data.classes == ("a", "b", "other")
    assert cfg.data.class_map == {"eos": "a"}
    assert cfg.train.devices == 2
    assert cfg.data.crop_mpp == 0.25
    assert cfg.augment.jpeg_quality == (50, 90)
    # an int given for a float is widened; None allowed for optional
    assert config_from_dict({"data": {"work_mpp": 1, "crop_mpp": None}}).data.work_mpp == 1.0


def test_parse_override() -> None:
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("model.name=a=b") == (["model", "name"], "a=b")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")


def test_unknown_keys_name_the_key_and_suggest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.epoch'.*did you mean 'epochs'"):
        load_config(None, ["train.epoch=3"])
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  crop_pix: 32\n")
    with pytest.raises(ConfigError, match=rf"{p.name}.*data\.crop_pix.*crop_px"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(None, ["trian.epochs=3"])


@pytest.mark.parametrize("override, msg", [
    ("train.epochs=two", "integer"),
    ("train.epochs=1.5", "integer"),
    ("augment.enabled=maybe", "true or false"),
    ("model.mean=[1, 2]", "3 values"),
    ("data.other_class=rest", "not in data.classes"),
    ("data.class_map.eos=eosinophils", "not in data.classes"),
    ("data.coords=mm", "'px' or 'um'"),
    ("train.balance=oversample", "sampler"),
    ("data.unknown_class=drop", "'other' or 'error'"),
    ("train=3", "must be a mapping"),
])
def test_bad_values_are_refused(override: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_to_dict_round_trips() -> None:
    cfg = load_config(None, ["train.epochs=5", "data.class_map.Eos=eosinophil"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
