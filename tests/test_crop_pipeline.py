"""The crop-folder door end to end on the CPU: train → calibrate → evaluate → classify, the
stain/focus guard on a crop batch, folders the model does not know, reproducible training and
``--init`` from a bundle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellclf.errors import AnnotationError, CellclfError, ConfigError
from cellclf.model.config import load_config
from cellclf.model.network import CellClassifier, head_module, init_from_bundle, save_bundle

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"eosinophil": (230, 110, 80), "neutrophil": (225, 190, 200), "mast_cell": (120, 60, 150),
           "lymphocyte": (60, 50, 110)}


def crop_folder(root: Path, per_class: int, seed: int, cast: tuple[float, float, float] = (1, 1, 1),
                prefix: str = "c") -> Path:
    """Class-coloured discs on a pale background with noise; ``cast`` scales R, G, B."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    for name, col in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            r = rng.uniform(9, 14)
            img = np.full((64, 64, 3), (235, 215, 225), np.float64)
            img[(yy - 32) ** 2 + (xx - 32) ** 2 < r * r] = col
            img = (img + rng.normal(0, 8, img.shape)) * np.asarray(cast)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
                root / name / f"{prefix}{seed}_{name}_{i}.png")
    return root


def _train(tmp_path: Path, name: str, extra: list[str] = ()) -> Path:
    from cellclf.model.training import fit

    data = tmp_path / "train"
    if not data.exists():
        crop_folder(data, 24, seed=1, prefix="t")
    cfg = load_config(REPO / "configs" / "train-tiny.yaml",
                      ["data.crop_mpp=0.5", "data.crop_px=32", "train.epochs=3",
                       "train.batch_size=16", *extra])
    return fit(cfg, data, tmp_path / name)


@pytest.mark.slow
def test_crop_folder_train_calibrate_evaluate_classify(tmp_path: Path) -> None:
    from cellclf.calibration.bundle_gate import calibrate_bundle
    from cellclf.card import load_card
    from cellclf.evaluation.crops import classify_crops, evaluate_crops

    bundle = _train(tmp_path, "bundle")
    card = load_card(bundle)
    assert card.mpp == 1.0 and card.crop_px == 32 and card.get("field_um") == 32.0
    with pytest.raises(CellclfError, match="were used to train"):
        calibrate_bundle(bundle, tmp_path / "train", crop_mpp=0.5, beta=None, progress=False)
    cal = crop_folder(tmp_path / "cal", 40, seed=2)
    s = calibrate_bundle(bundle, cal, crop_mpp=0.5, beta=None, progress=False)
    card = load_card(bundle)
    assert s["n_cells"] == 160 and card.temperature == pytest.approx(s["temperature"])
    assert card.get("ood")["unit"] == "crop batch" and card.get("ood")["n_batches"] == 3
    assert card.get("calibration")["kind"] == "crops" and card.get("conformal")

    test = crop_folder(tmp_path / "test", 10, seed=3)
    _, m = evaluate_crops(bundle, test, tmp_path / "eval", crop_mpp=0.5)
    assert {"macro_f1", "balanced_accuracy", "per_class", "confusion", "ece_before",
            "ece_after", "gate", "no_gate"} <= set(m)
    assert m["n"] == m["n_images"] == 40 and not m["ood"]["flagged"]
    assert m["balanced_accuracy"] > 0.5  # colours: learnt well above chance (0.25)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["per_class"]["other"]["support"] == 10
    assert (tmp_path / "eval" / "report.md").is_file()

    res = classify_crops(bundle, test, tmp_path / "cls", crop_mpp=0.5)
    with (tmp_path / "cls" / "classified.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 40 and rows[0]["image"].startswith("eosinophil/")
    assert set(rows[0]) == {"image", "class", "decision", "reason", "prob_eosinophil",
                            "prob_neutrophil", "prob_mast_cell", "prob_other"}
    assert {r["decision"] for r in rows} <= {"accepted", "review"}
    for r in rows:
        p = [float(r[f"prob_{c}"]) for c in card.classes]
        assert abs(sum(p) - 1) < 1e-4 and r["class"] == card.classes[int(np.argmax(p))]
        assert (r["decision"] == "accepted") == (r["reason"] == "accepted")
    # 160 calibration cells cannot certify α = 0.01 (≥ 437 needed): everything is reviewed
    assert res["reasons"] == {"uncertified_class": 40} and res["automation_rate"] == 0.0
    assert res["folders_not_model_classes"] == {"lymphocyte": 10}

    # another "lab": a strong blue cast is caught by the stain guard → all cells to review
    shifted = crop_folder(tmp_path / "shifted", 10, seed=4, cast=(0.6, 0.75, 1.0))
    res = classify_crops(bundle, shifted, tmp_path / "cls2", crop_mpp=0.5)
    assert res["ood"]["flagged"] and res["reasons"] == {"ood_batch": 40}
    assert "look unlike the calibration crop batches" in res["ood"]["message"]


@pytest.mark.slow
def test_folders_the_model_does_not_know_are_reported(tmp_path: Path) -> None:
    from cellclf.evaluation.crops import evaluate_crops

    bundle = _train(tmp_path, "bundle", ["train.epochs=1"])
    test = crop_folder(tmp_path / "test", 3, seed=3)
    (test / "lymphocyte").rename(test / "monocyte")
    with pytest.raises(AnnotationError, match=r"unknown to the model: monocyte \(3 images\).*"
                                              r"--class-map monocyte=other"):
        evaluate_crops(bundle, test, None, crop_mpp=0.5)
    _, m = evaluate_crops(bundle, test, None, crop_mpp=0.5, class_map={"monocyte": "other"})
    assert m["per_class"]["other"]["support"] == 3


@pytest.mark.slow
def test_same_seed_same_model_on_cpu(tmp_path: Path) -> None:
    a = _train(tmp_path, "a", ["train.epochs=2"])
    b = _train(tmp_path, "b", ["train.epochs=2"])
    ca, cb = (json.loads((p / "card.json").read_text()) for p in (a, b))
    assert ca["metrics"]["val"] == cb["metrics"]["val"]
    sa = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = _train(tmp_path, "c", ["train.epochs=2", "train.seed=1"])
    sc = torch.load(c / "model.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_init_from_bundle_copies_the_body_and_replaces_the_head(tmp_path: Path) -> None:
    from cellclf.card import Card

    torch.manual_seed(0)
    src = CellClassifier("resnet18", 4, [0.5] * 3, [0.25] * 3)
    save_bundle(src, Card(name="src", classes=("a", "b", "c", "other")), tmp_path / "src")
    torch.manual_seed(1)
    new = CellClassifier("resnet18", 3, [0.5] * 3, [0.25] * 3)
    head_before = head_module(new).weight.detach().clone()
    info = init_from_bundle(new, tmp_path / "src", ["x", "y", "other"])
    assert info["new_head"] and info["name"] == "src"
    assert torch.equal(new.backbone.conv1.weight, src.backbone.conv1.weight)
    assert torch.equal(new.backbone.layer4[1].bn2.running_mean, src.backbone.layer4[1].bn2.running_mean)
    assert torch.equal(head_module(new).weight, head_before)
    same = CellClassifier("resnet18", 4, [0.5] * 3, [0.25] * 3)
    assert not init_from_bundle(same, tmp_path / "src", ["a", "b", "c", "other"])["new_head"]
    assert torch.equal(head_module(same).weight, head_module(src).weight)
    other_norm = CellClassifier("resnet18", 3, [0.5] * 3, [0.25] * 3, norm="group")
    with pytest.raises(ConfigError, match="model.norm=batch"):
        init_from_bundle(other_norm, tmp_path / "src", ["x", "y", "other"])


def test_group_norm_backbone_round_trips(tmp_path: Path) -> None:
    from cellclf.card import Card
    from cellclf.model.network import load_bundle, predict_logits

    torch.manual_seed(0)
    m = CellClassifier("resnet18", 2, [0.5] * 3, [0.25] * 3, norm="group")
    assert any(isinstance(x, torch.nn.GroupNorm) for x in m.modules())
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    save_bundle(m.eval(), Card(name="g", classes=("a", "other")), tmp_path)
    loaded, card = load_bundle(tmp_path)
    assert card.architecture["norm"] == "group"
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(predict_logits(loaded, x), predict_logits(m, x), atol=1e-5)


@pytest.mark.slow
def test_fit_with_init_adopts_the_network_and_starts_a_new_head(tmp_path: Path) -> None:
    from cellclf.card import Card, load_card

    torch.manual_seed(0)
    src = CellClassifier("mobilenet_v3_small", 4, [0.5] * 3, [0.25] * 3)
    save_bundle(src, Card(name="start", classes=("a", "b", "c", "other")), tmp_path / "start")
    out = _train(tmp_path, "tuned", ["train.epochs=1", f"train.init={tmp_path / 'start'}"])
    card = load_card(out)
    init = card.training["init"]
    assert init["name"] == "start" and init["new_head"]
    assert set(init["not_copied"]) == {"backbone.classifier.3.weight", "backbone.classifier.3.bias"}
    assert card.architecture["backbone"] == "mobilenet_v3_small"  # the config said resnet18
    assert card.normalization == {"mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.mark.slow
def test_cli_calibrate_evaluate_classify_on_crops(tmp_path: Path) -> None:
    """The three commands through the CLI (an untrained bundle: the wiring, not the accuracy)."""
    from typer.testing import CliRunner

    from cellclf.card import Card
    from cellclf.cli import app

    torch.manual_seed(0)
    model = CellClassifier("mobilenet_v3_small", 4, [0.5] * 3, [0.25] * 3).eval()
    save_bundle(model, Card(name="u", classes=("eosinophil", "neutrophil", "mast_cell", "other"),
                            crop_px=32, mpp=1.0), tmp_path / "b")
    cal = crop_folder(tmp_path / "cal", 12, seed=2)
    run = CliRunner().invoke
    res = run(app, ["calibrate", str(tmp_path / "b"), "-d", str(cal), "--mpp", "0.5", "--beta",
                    "0"])
    assert res.exit_code == 0, res.output
    assert "gate unit: cells" in res.output and "no class could be certified" in res.output
    res = run(app, ["evaluate", str(tmp_path / "b"), "-d", str(cal), "--mpp", "0.5", "-o",
                    str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ev" / "metrics.json").is_file()
    res = run(app, ["classify", str(cal), "--model", str(tmp_path / "b"), "--mpp", "0.5", "-o",
                    str(tmp_path / "cl")])
    assert res.exit_code == 0, res.output
    assert "48 images" in res.output and (tmp_path / "cl" / "classified.csv").is_file()
    res = run(app, ["evaluate", str(tmp_path / "b"), "-d", str(cal), "-o", str(tmp_path / "x")])
    assert res.exit_code != 0 and "pass --mpp" in str(res.exception)
