"""Model, augmentation and training: preprocessing maths, bundle save/load, a tiny CPU training run
from a crop folder and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellclf.card import Card, save_card
from cellclf.errors import BundleError, ConfigError
from cellclf.model.config import load_config
from cellclf.model.network import CellClassifier, Preprocess, load_bundle, predict_logits, save_bundle

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("eosinophil", "neutrophil", "mast_cell", "other")
COLOURS = {"eosinophil": (230, 110, 80), "neutrophil": (225, 190, 200), "mast_cell": (120, 60, 150),
           "lymphocyte": (60, 50, 110)}


def test_preprocess_hand_computed() -> None:
    pre = Preprocess([0.5, 0.25, 0.0], [0.5, 0.25, 1.0])
    x = torch.tensor([[[[255, 0, 51]]]], dtype=torch.uint8)  # N=1, H=W=1, RGB
    y = pre(x)
    assert y.shape == (1, 3, 1, 1) and y.dtype == torch.float32
    # (1 - 0.5)/0.5 = 1; (0 - 0.25)/0.25 = -1; (0.2 - 0)/1 = 0.2
    torch.testing.assert_close(y.flatten(), torch.tensor([1.0, -1.0, 0.2]))


def _model() -> CellClassifier:
    torch.manual_seed(0)
    return CellClassifier("mobilenet_v3_small", 4, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.mark.slow
def test_bundle_round_trip_and_tampering(tmp_path: Path) -> None:
    model = _model().eval()
    card = save_bundle(model, Card(name="t", classes=CLASSES), tmp_path)
    assert card.sha256 and card.architecture["backbone"] == "mobilenet_v3_small"
    crops = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    want = predict_logits(model, crops, batch=2)
    loaded, card2 = load_bundle(tmp_path)
    assert not loaded.training and card2 == card
    np.testing.assert_allclose(predict_logits(loaded, crops, batch=3), want, rtol=1e-5, atol=1e-5)
    assert want.shape == (5, 4) and predict_logits(loaded, crops[:0]).shape == (0, 4)
    # the card and the weights must agree
    save_card(card.replace(classes=("a", "other")), tmp_path)
    with pytest.raises(BundleError, match="card and weights differ"):
        load_bundle(tmp_path)
    save_card(card, tmp_path)
    with (tmp_path / "model.pt").open("ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="does not match the card's sha256"):
        load_bundle(tmp_path)


def test_unknown_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'resnet_18'.*resnet18"):
        CellClassifier("resnet_18", 4, [0, 0, 0], [1, 1, 1])


def test_augmentations_keep_shape_and_dtype() -> None:
    from cellclf.model.augment import apply_cpu, cpu_transform, gpu_augment
    from cellclf.model.config import AugmentConfig

    crop = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    t = cpu_transform(AugmentConfig(hestain_p=1.0, jpeg_p=1.0, blur_p=1.0))
    out = apply_cpu(t, crop)
    assert out.shape == crop.shape and out.dtype == np.uint8
    assert cpu_transform(AugmentConfig(enabled=False)) is None
    x = torch.from_numpy(np.stack([crop] * 4))
    g = torch.Generator().manual_seed(0)
    y = gpu_augment(x, hed_sigma=0.0, generator=g)
    # D4 only: every output is one of the 8 flips/rotations of the input
    views = [torch.rot90(v, k, dims=(0, 1)) for v in (x[0], x[0].flip(1)) for k in range(4)]
    assert all(any(torch.equal(y[i], v) for v in views) for i in range(4))
    # the RGB → HED → RGB round trip alone changes nothing (but 0, clamped to 1 for the log)
    rt = gpu_augment(x, hed_sigma=1e-9, d4=False, generator=g)
    assert torch.equal(rt, x.clamp(min=1))
    z = gpu_augment(x, hed_sigma=0.05, d4=False, generator=g)
    assert z.dtype == torch.uint8 and z.shape == x.shape
    diff = (z.float() - x.float()).abs().mean()
    assert 0 < diff < 40  # jittered, not destroyed


def write_crop_folder(root: Path, per_class: int = 16, size: int = 64) -> Path:
    """Class-coloured discs on a pale background with noise, four groups (``gK__i.png``)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for name, col in COLOURS.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            r = rng.uniform(8, 14)
            img = np.full((size, size, 3), (235, 215, 225), np.float64)
            disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r
            img[disc] = col
            img += rng.normal(0, 8, img.shape)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"g{i % 4}__{i}.png")
    return root


@pytest.mark.slow
def test_fit_from_crop_folder_writes_a_loadable_bundle(tmp_path: Path) -> None:
    from cellclf.model.training import fit

    data = write_crop_folder(tmp_path / "crops", per_class=32)
    cfg = load_config(REPO / "configs" / "train-tiny.yaml",
                      ["data.crop_mpp=0.5", "train.epochs=4"])
    out = fit(cfg, data, tmp_path / "bundle")
    model, card = load_bundle(out)
    assert card.classes == CLASSES and card.crop_px == 64 and card.mpp == 0.5
    assert card.temperature == 1.0 and card.gate is None
    counts = card.training["counts"]
    # groups g0..g3: half the groups go to validation, none in two splits
    assert set(card.training["slides"]["train"]).isdisjoint(card.training["slides"]["val"])
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 4 * 32
    assert counts["train"]["other"] == 32 * sum(
        g in card.training["slides"]["train"] for g in ("g0", "g1", "g2", "g3")) // 4
    assert card.training["config"]["train"]["epochs"] == 4
    assert "torch" in card.training["software"]
    val = card.metrics["val"]
    assert set(val["per_class"]) == set(CLASSES) and val["macro_f1"] is not None
    # the classes are easy (colour): 16 steps learn them well above chance (0.25)
    assert val["accuracy"] > 0.5
    assert (out / "logs").is_dir()
    crop = np.asarray(Image.open(next((data / "mast_cell").iterdir())))[None]
    assert predict_logits(model, crop).shape == (1, 4)


@pytest.mark.slow
def test_cli_train_from_crop_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cellclf.cli import app

    data = write_crop_folder(tmp_path / "crops", per_class=8)
    out = tmp_path / "b"
    res = CliRunner().invoke(app, ["train", "-c", str(REPO / "configs" / "train-tiny.yaml"),
                                   "--data", str(data), "--out", str(out), "--mpp", "0.25",
                                   "train.epochs=1", "model.name=cli-model"])
    assert res.exit_code == 0, res.output
    card = json.loads((out / "card.json").read_text())
    assert card["name"] == "cli-model" and card["training"]["config"]["data"]["crop_mpp"] == 0.25
    # crops at 0.25 µm/px were rescaled to the model's 0.5: the bundle still says 0.5
    assert card["mpp"] == 0.5
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out),
                                   "train.epohcs=1"])
    assert res.exit_code != 0 and "did you mean 'epochs'" in str(res.exception)


@pytest.mark.slow
def test_cli_train_then_evaluate_on_tiny_synthetic_slides(tiny_slide, tiny_svs,
                                                          tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cellclf.cli import app
    from cellclf.evaluation.evaluate import evaluate

    data, held_out = tmp_path / "data", tmp_path / "held_out"
    for folder, pairs in ((data, (tiny_slide, tiny_svs)), (held_out, (tiny_svs,))):
        folder.mkdir()
        for slide, truth in pairs:
            (folder / slide.name).symlink_to(slide)
            (folder / truth.name).symlink_to(truth)
    out = tmp_path / "bundle"
    res = CliRunner().invoke(app, [
        "train", "-c", str(REPO / "configs" / "train-tiny.yaml"), "--data", str(data),
        "--out", str(out), "--cache", str(tmp_path / "cache"), "train.epochs=1",
        "data.max_other_ratio=1.0", "data.crop_px=32"])
    assert res.exit_code == 0, res.output
    model, card = load_bundle(out)
    t = card.training
    assert t["data_kind"] == "slides" and t["crop_cache"] == {"hits": 0, "misses": 2}
    assert sorted(t["slides"]["train"] + t["slides"]["val"]) == ["tiny", "tiny_svs"]
    train_counts = t["counts"]["train"]
    assert all(train_counts[c] > 0 for c in ("eosinophil", "neutrophil", "other"))
    assert train_counts["other"] <= sum(v for k, v in train_counts.items() if k != "other") * 2
    assert "val" in card.metrics and card.metrics["val"]["n"] == sum(t["counts"]["val"].values())
    assert len(list((tmp_path / "cache").iterdir())) == 2
    table, metrics = evaluate(out, held_out, tmp_path / "eval", progress=False)
    assert metrics["n_slides"] == 1 and len(table) == metrics["n"]
    assert metrics["detection"]["recall_all"] > 0.3
    assert {"macro_f1", "balanced_accuracy", "per_class", "count_error"} <= set(metrics)
    assert table.probs.shape == (len(table), 4)


def test_batch_loader_keeps_crops_and_labels_together():
    """The whole-batch loader (no CPU augmentation): every crop arrives once per epoch, with its label."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from cellclf.model.training import CropBatchDataset

    n = 103
    crops = np.zeros((n, 4, 4, 3), np.uint8)
    crops[:, 0, 0, 0] = np.arange(n) % 256
    labels = np.arange(n) % 4
    ds = CropBatchDataset(crops, labels)
    sampler = BatchSampler(RandomSampler(ds, generator=torch.Generator().manual_seed(0)), 16, False)
    seen = []
    for x, y in DataLoader(ds, batch_size=None, sampler=sampler, num_workers=0):
        assert x.dtype == torch.uint8 and x.shape[1:] == (4, 4, 3) and len(x) == len(y) <= 16
        assert (x[:, 0, 0, 0].long() % 4 == y).all()
        seen += x[:, 0, 0, 0].tolist()
    assert sorted(seen) == list(range(n))


@pytest.mark.gpu
def test_fit_on_cuda_bf16_with_gpu_augment(tmp_path: Path) -> None:
    """bf16-mixed training on CUDA fed by the whole-batch loader and device-side augmentation."""
    import torch

    from cellclf.model.training import fit

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    data = write_crop_folder(tmp_path / "crops", per_class=32)
    cfg = load_config(REPO / "configs" / "train-tiny.yaml",
                      ["data.crop_mpp=0.5", "train.epochs=6", "augment.gpu_augment=true",
                       "train.accelerator=gpu"])
    out = fit(cfg, data, tmp_path / "bundle")
    model, card = load_bundle(out)
    assert card.training["config"]["train"]["accelerator"] == "gpu"
    assert card.metrics["val"]["accuracy"] > 0.5


@pytest.mark.slow
def test_cli_train_ddp_two_processes_on_cpu(tmp_path: Path) -> None:
    """`train.strategy=ddp` with two processes (gloo on CPU; NCCL on GPUs is the same code path):
    the whole-batch loader is sharded by Lightning, rank 0 alone writes the bundle."""
    import subprocess
    import sys

    data = write_crop_folder(tmp_path / "crops", per_class=16)
    out = tmp_path / "ddp"
    launcher = tmp_path / "cellclf_cli.py"  # Lightning relaunches this file for rank 1
    launcher.write_text("from cellclf.cli import main\n\nmain()\n")
    cmd = [sys.executable, str(launcher), "train",
           "-c", str(REPO / "configs" / "train-tiny.yaml"), "--data", str(data), "--out", str(out),
           "data.crop_mpp=0.5", "train.epochs=2", "train.accelerator=cpu", "train.devices=2",
           "train.strategy=ddp", "augment.gpu_augment=true", "train.num_workers=0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["config"]["train"]["strategy"] == "ddp"
    assert card["training"]["config"]["train"]["devices"] == 2
