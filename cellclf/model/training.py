"""Training: Lightning module and data module, and ``fit`` (DATA + config → model bundle).

Sits after the crop cache (``dataset.py``) and before calibration/export: ``fit`` discovers the
data (slides + truth, manifest or crop folder), builds the split crop sets, trains the
:class:`~cellclf.model.network.CellClassifier` with Lightning (bf16-mixed on CUDA, fp32 on CPU, DDP by
config, early stopping on validation macro-F1 over the target classes), and writes the bundle:
``card.json`` + ``model.pt`` (+ ``model.ckpt``) with the data summary and validation metrics.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from cellclf.annotations.labelled_data import discover
from cellclf.card import DEFAULT_OTHER_CLASS, SYNTHETIC_NOTICE, Card, load_card
from cellclf.errors import AnnotationError
from cellclf.evaluation.evaluate import classification_metrics, metrics_from_confusion
from cellclf.model.augment import apply_cpu, cpu_transform, gpu_augment
from cellclf.model.config import Config, auto_batch_size, auto_num_workers
from cellclf.model.dataset import CropSet, Datasets, build_datasets, crop_folder_field
from cellclf.model.network import CellClassifier, init_from_bundle, predict_logits, save_bundle
from cellclf.versions import TRAINING_PACKAGES, software_versions

log = logging.getLogger(__name__)
# Lightning's advice for its own cloud logger and its notes on options we set on purpose are noise
# to a user of `cellclf train`; its warnings still show.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)


class CropDataset(Dataset):
    """uint8 HWC crops (possibly memory-mapped) → (uint8 tensor HWC, label)."""

    def __init__(self, crops: np.ndarray, labels: np.ndarray, transform: Any = None):
        self.crops, self.labels, self.transform = crops, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        crop = apply_cpu(self.transform, np.asarray(self.crops[i]))
        return torch.from_numpy(np.require(crop, np.uint8, ["C", "W"])), int(self.labels[i])


class CropBatchDataset(Dataset):
    """Whole batches by one (sorted) fancy index: the loader for runs with no CPU augmentation
    (``augment.gpu_augment`` or augmentation off), where per-sample Python work would be the
    bottleneck. Used with a ``BatchSampler`` and ``batch_size=None``."""

    def __init__(self, crops: np.ndarray, labels: np.ndarray):
        self.crops, self.labels = crops, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        i = np.sort(np.asarray(idx, dtype=np.int64))
        crops = np.ascontiguousarray(self.crops[i])
        return torch.from_numpy(crops), torch.from_numpy(np.asarray(self.labels[i], np.int64))


def class_weights(labels: np.ndarray, k: int) -> np.ndarray:
    """Inverse-frequency weights ``N / (K' · n_c)`` (K' = classes present; absent classes → 0)."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    present = counts > 0
    w = np.zeros(k)
    w[present] = len(labels) / (present.sum() * counts[present])
    return w


class CellDataModule(L.LightningDataModule):
    def __init__(self, data: Datasets, cfg: Config):
        super().__init__()
        self.data, self.cfg = data, cfg

    def _loader(self, cs: CropSet, train: bool) -> DataLoader:
        t = self.cfg.train
        kw: dict[str, Any] = {"batch_size": t.batch_size, "num_workers": t.num_workers,
                              "pin_memory": torch.cuda.is_available(),
                              "persistent_workers": t.num_workers > 0}
        if not train:
            return DataLoader(CropDataset(cs.crops, cs.labels), shuffle=False, **kw)
        transform = cpu_transform(self.cfg.augment, seed=t.seed)
        gen = torch.Generator().manual_seed(t.seed)
        drop_last = len(cs) > t.batch_size
        if t.balance == "sampler":
            w = class_weights(cs.labels, len(self.data.classes))[cs.labels]
            sampler: Any = WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(cs),
                                                 replacement=True, generator=gen)
        else:
            sampler = RandomSampler(cs, generator=gen)
        if transform is None:  # nothing per sample: fetch whole batches at once
            kw.pop("batch_size")
            return DataLoader(CropBatchDataset(cs.crops, cs.labels), batch_size=None,
                              sampler=BatchSampler(sampler, t.batch_size, drop_last), **kw)
        ds = CropDataset(cs.crops, cs.labels, transform)
        return DataLoader(ds, sampler=sampler, drop_last=drop_last, **kw)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data.splits["train"], True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data.splits["val"], False)


class CellLitModule(L.LightningModule):
    """Cross-entropy training of a CellClassifier; logs val macro-F1 over target classes."""

    def __init__(self, backbone: str, classes: list[str], mean: list[float], std: list[float],
                 other_class: str = DEFAULT_OTHER_CLASS, lr: float = 1e-3, weight_decay: float = 1e-4,
                 loss_weights: list[float] | None = None, label_smoothing: float = 0.0,
                 gpu_augment: bool = False, gpu_hed_sigma: float = 0.03, norm: str = "batch"):
        super().__init__()
        self.save_hyperparameters()
        self.model = CellClassifier(backbone, len(classes), mean, std, norm)
        w = torch.as_tensor(loss_weights, dtype=torch.float32) if loss_weights else None
        self.loss = nn.CrossEntropyLoss(weight=w, label_smoothing=label_smoothing)
        self.targets = [i for i, c in enumerate(classes) if c != other_class]
        self._cm: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":  # NHWC input permuted to NCHW is channels-last already
            self.model.to(memory_format=torch.channels_last)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        if self.hparams.gpu_augment:
            x = gpu_augment(x, self.hparams.gpu_hed_sigma)
        loss = self.loss(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=len(y))
        return loss

    def on_validation_epoch_start(self) -> None:
        k = len(self.hparams.classes)
        self._cm = torch.zeros((k, k), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", self.loss(logits, y), on_epoch=True, sync_dist=True,
                 batch_size=len(y))
        k = len(self.hparams.classes)
        idx = y * k + logits.argmax(1)
        self._cm += torch.bincount(idx, minlength=k * k).view(k, k).to(self._cm.dtype)

    def on_validation_epoch_end(self) -> None:
        cm = self.trainer.strategy.reduce(self._cm, reduce_op="sum")
        m = metrics_from_confusion(cm.cpu().numpy(), list(self.hparams.classes),
                                   self.hparams.other_class)
        self.log("val_macro_f1", float(m["macro_f1"] or 0.0), prog_bar=True)
        self.log("val_balanced_accuracy", float(m["balanced_accuracy"] or 0.0))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=total,
                                                    pct_start=min(0.3, 100 / total + 0.05))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}



def _precision(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    cpu = cfg.train.accelerator == "cpu" or not torch.cuda.is_available()
    return "32-true" if cpu else "bf16-mixed"


def _loggers(out: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(out, name="logs")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out, name="tb"))
    except ImportError:
        pass
    return loggers


def eval_split(model: CellClassifier, cs: CropSet, classes: list[str], other: str,
               batch: int = 512) -> dict[str, Any] | None:
    """Crop-level metrics of a trained model on one split (None when the split is empty)."""
    if len(cs) == 0:
        return None

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pred = predict_logits(model, cs.crops, batch=batch, device=dev).argmax(1)
    return classification_metrics(cs.labels, pred, classes, other)


def scale_to_data(cfg: Config, n_train: int) -> tuple[Config, dict[str, Any]]:
    """Resolve the automatic batch size and worker count, and stretch the epochs so that
    training takes at least ``train.min_steps`` optimiser steps (early stopping cannot fire
    before them). Returns (config as run, schedule for the card)."""
    import dataclasses

    t = cfg.train
    batch = auto_batch_size(n_train, t.batch_size)
    workers = auto_num_workers(t.num_workers)
    steps = n_train // batch if n_train > batch else 1  # the train loader drops a last partial
    if t.limit_train_batches < 1:
        steps = max(1, int(steps * t.limit_train_batches))
    epochs = max(t.epochs, math.ceil(t.min_steps / steps))
    if epochs > t.epochs:
        log.info("%d training crops in batches of %d = %d steps per epoch: %d epochs to reach "
                 "train.min_steps = %d", n_train, batch, steps, epochs, t.min_steps)
    cfg = cfg.replace(train=dataclasses.replace(t, batch_size=batch, num_workers=workers))
    return cfg, {"batch_size": batch, "steps_per_epoch": steps, "max_epochs": epochs,
                 "min_steps": min(t.min_steps, steps * epochs), "num_workers": workers,
                 "configured_epochs": t.epochs}


def adopt_init_network(cfg: Config) -> Config:
    """Take backbone, normalisation layers and input normalisation from the ``--init`` bundle
    (its weights only fit that network), saying so when the config asked for another."""
    import dataclasses

    init = load_card(cfg.train.init)
    arch = init.architecture
    want = {"backbone": arch.get("backbone", cfg.model.backbone),
            "norm": arch.get("norm", "batch"),
            "mean": tuple(float(v) for v in arch.get("mean", init.normalization["mean"])),
            "std": tuple(float(v) for v in arch.get("std", init.normalization["std"]))}
    changed = {k: v for k, v in want.items() if getattr(cfg.model, k) != v}
    if changed:
        log.warning("--init %s: using its network %s (config had %s)", cfg.train.init, changed,
                    {k: getattr(cfg.model, k) for k in changed})
    return cfg.replace(model=dataclasses.replace(cfg.model, **want))


def _short(ids: list[str], n: int = 50) -> list[str] | dict[str, Any]:
    return ids if len(ids) <= n else {"n": len(ids), "first": ids[:n]}


def fit(cfg: Config, data: str | Path, out: str | Path, cache_dir: str | Path | None = None,
        progress: bool | None = None, notice: str = "", weights_dtype: str = "float32") -> Path:
    """Train on DATA and write a bundle to ``out``; returns ``out``.

    ``notice`` (e.g. :data:`cellclf.card.SYNTHETIC_NOTICE`) goes into the card's description and
    intended use; ``weights_dtype="float16"`` halves model.pt for shipped bundles.
    """
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar

    t0 = time.time()
    out = Path(out)
    progress = cfg.train.progress if progress is None else progress
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    source = discover(data, mpp=cfg.data.crop_mpp)
    if cfg.train.init:
        cfg = adopt_init_network(cfg)
    if source.kind == "crops":
        cfg = crop_folder_field(cfg, source.path)
    ds = build_datasets(source, cfg, Path(cache_dir) if cache_dir else None, progress=progress)
    classes, other = list(ds.classes), cfg.data.other_class
    train_cs, val_cs = ds.splits["train"], ds.splits["val"]
    if len(train_cs) == 0:
        raise AnnotationError(f"{data}: no training crops (check the annotations and splits)")
    cfg, schedule = scale_to_data(cfg, len(train_cs))
    missing = [c for c, n in train_cs.counts(classes).items() if n == 0]
    if missing:
        log.warning("no training examples of %s: the model cannot learn them", missing)
    has_val = len(val_cs) > 0
    if not has_val:
        log.warning("validation split is empty: no early stopping, the last epoch is kept")
    m = cfg.model
    lw = class_weights(train_cs.labels, len(classes)).tolist() if cfg.train.balance == "loss" \
        else None
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = CellLitModule(m.backbone, classes, list(m.mean), list(m.std), other,
                           cfg.train.lr, cfg.train.weight_decay, lw, cfg.train.label_smoothing,
                           cfg.augment.enabled and cfg.augment.gpu_augment,
                           cfg.augment.gpu_hed_sigma, m.norm)
    init_info = init_from_bundle(module.model, cfg.train.init, classes) if cfg.train.init \
        else None
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", save_top_k=1,
                           monitor="val_macro_f1" if has_val else None, mode="max",
                           save_last=False)
    callbacks: list[Any] = [ckpt]
    if has_val and cfg.train.patience > 0:
        callbacks.append(EarlyStopping("val_macro_f1", mode="max", patience=cfg.train.patience))
    if progress:
        callbacks.append(RichProgressBar())
    cpu = _precision(cfg) == "32-true" and not torch.cuda.is_available()
    trainer = L.Trainer(
        max_epochs=schedule["max_epochs"], min_steps=schedule["min_steps"],
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices, strategy=cfg.train.strategy, precision=_precision(cfg),
        callbacks=callbacks, logger=_loggers(out), default_root_dir=out,
        enable_progress_bar=progress, enable_model_summary=False,
        deterministic=(True if cpu else "warn") if cfg.train.deterministic else False,
        limit_train_batches=cfg.train.limit_train_batches,
        limit_val_batches=1.0 if has_val else 0, num_sanity_val_steps=0,
        log_every_n_steps=cfg.train.log_every_n_steps)
    trainer.fit(module, datamodule=CellDataModule(ds, cfg))
    if ckpt.best_model_path:
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
    if not trainer.is_global_zero:
        return out
    model = module.model.cpu().eval()
    metrics = {s: eval_split(model, ds.splits[s], classes, other) for s in ("val", "test")}
    summary = ds.summary()
    training = {
        "data": str(data), "data_kind": source.kind, "counts": summary["counts"],
        "slides": {s: _short(v) for s, v in summary["slides"].items()},
        "crop_cache": {"hits": summary["cache_hits"], "misses": summary["cache_misses"]},
        "epochs": trainer.current_epoch, "max_epochs": schedule["max_epochs"],
        "optimizer_steps": int(trainer.global_step), "schedule": schedule, "init": init_info,
        "best_epoch_score": float(ckpt.best_model_score) if ckpt.best_model_score is not None
        else None,
        "seed": cfg.train.seed, "config": cfg.to_dict(), "software": software_versions(TRAINING_PACKAGES),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "precision": _precision(cfg), "seconds": round(time.time() - t0, 1),
    }
    if ds.crop_folder:
        training["crop_folder"] = ds.crop_folder
    card = Card(
        name=m.name, version=m.version, classes=tuple(classes), crop_px=cfg.data.crop_px,
        mpp=cfg.data.work_mpp, stain=m.stain, normalization={"mean": list(m.mean),
                                                             "std": list(m.std)},
        temperature=1.0, gate=None, architecture={"backbone": m.backbone}, training=training,
        metrics={k: v for k, v in metrics.items() if v is not None}, other_class=other,
        description=m.description or notice,
        intended_use=notice or "Research use; calibrate (cellclf calibrate) before gating.",
        extra={"field_um": round(cfg.data.crop_px * cfg.data.work_mpp, 4)},
    )
    save_bundle(model, card, out, weights_dtype=weights_dtype)
    if cfg.train.save_ckpt and ckpt.best_model_path:
        shutil.copyfile(ckpt.best_model_path, out / "model.ckpt")
    return out


__all__ = ["CellDataModule", "CellLitModule", "CropDataset", "SYNTHETIC_NOTICE", "class_weights",
           "fit"]
