"""The labelling loop of ``cellclf label``: start a project (detect, pick a diverse first batch,
queue it), then round after round (``--next``) train on the labels so far, estimate accuracy on
the held-aside labels, count what calibration still needs, and queue the next batch by
uncertainty and diversity; finally (``--calibrate``) calibrate the last bundle on the held-aside
labels.

Every batch has two parts (:mod:`cellclf.labelling.selection`): cells chosen actively (reason
``to_label``; they train) and cells drawn at random (reason ``held_aside``; they never train and
give unbiased estimates and the calibration set). The review store holds which cells were queued,
with which role, and every label (append-only): a round reads everything from it, so a crash or a
second reviewer never loses or doubles a label, and a rerun of a killed round redoes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.calibration.bundle_gate import write_calibration
from cellclf.detect.slide_detection import detect_slide
from cellclf.errors import CellclfError
from cellclf.gate.risk_bounds import min_cells_zero_errors
from cellclf.gate.slide_guard import fit_ood, slide_ood_stats
from cellclf.labelling.project import Pool, Project, ProjectConfig, ProjectSlide
from cellclf.labelling.selection import (
    cell_features,
    pool_features,
    random_batch,
    select_batch,
)
from cellclf.model.engine import TorchEngine
from cellclf.outputs.atomic import atomic_write_json
from cellclf.outputs.manifest import slide_id_for
from cellclf.pipeline.batch import expand_slides
from cellclf.pipeline.host_stage import jpeg_bytes, png_bytes
from cellclf.pipeline.stage import REVIEW_CONTEXT_PX
from cellclf.review.store import CANT_TELL, NOT_A_CELL, ReviewItem, ReviewStore
from cellclf.review.types import HELD_ASIDE, TO_LABEL
from cellclf.wsi.crops import extract_crops


class LabellingError(CellclfError):
    """A labelling project cannot go on as asked (too few labels, already started, …)."""


@dataclass(frozen=True)
class Labels:
    """The labelled cells of a project: pool indices, class indices and role."""

    index: np.ndarray  # (M,) into the pool
    label: np.ndarray  # (M,) into the project's classes
    held_aside: np.ndarray  # (M,) bool


def open_project_store(project: Project, cfg: ProjectConfig) -> ReviewStore:
    store = ReviewStore(project.store_url, classes=cfg.classes)
    if store.mode != "labelling":
        store.set_mode("labelling")
    return store


def start_project(slides: list[str], root: str | Path, cfg: ProjectConfig | None = None,
                  workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Detect candidates on ``slides``, store the pool and queue the first batch (spread over
    appearance and slide, plus a random held-aside share). Returns round 0's report."""
    project = Project(root)
    if project.pool_path.is_file():
        raise LabellingError(f"{project.root} is a started labelling project: run `cellclf label "
                             f"--next {project.root}` for the next round")
    cfg = cfg or ProjectConfig()
    cfg.check("labelling project")
    paths = expand_slides(slides)
    if not paths:
        raise LabellingError("no slides given: pass slide files, globs or folders")
    taken: set[str] = set()
    rng = np.random.default_rng(cfg.seed)
    parts: list[tuple] = []
    cfg.slides = []
    for k, path in enumerate(paths):
        if not path.is_file():
            raise LabellingError(f"{path}: slide not found; check the path")
        sid = slide_id_for(path, taken)
        taken.add(sid)
        mpp = next((s.mpp for s in cfg.slides if s.path == str(path)), None)
        xy0 = detect_slide(path, mpp=mpp, work_mpp=cfg.work_mpp, workers=workers,
                           progress=progress)
        ids = np.arange(len(xy0))
        if len(ids) > cfg.max_candidates_per_slide:
            ids = np.sort(rng.choice(ids, cfg.max_candidates_per_slide, replace=False))
        crops = extract_crops(path, xy0[ids], cfg.work_mpp, cfg.crop_px, workers=workers)
        parts.append((np.full(len(ids), k), ids, xy0[ids], crops))
        cfg.slides.append(ProjectSlide(sid, str(path.resolve())))
    slide_index = np.concatenate([p[0] for p in parts])
    if len(slide_index) == 0:
        raise LabellingError(f"the detector found no cell candidates on {len(paths)} slide(s): "
                             "check that the slides show tissue at the expected resolution")
    crops = np.concatenate([p[3] for p in parts])
    pool = Pool(slide_index=slide_index, cell_id=np.concatenate([p[1] for p in parts]),
                xy0=np.concatenate([p[2] for p in parts]), crops=crops,
                features=pool_features(cell_features(crops), slide_index, len(paths)))
    project.save_config(cfg)
    store = open_project_store(project, cfg)
    try:
        project.save_pool(pool)
        queued = queue_batch(project, cfg, store, pool, 0, None)
    finally:
        store.close()
    report = {"round": 0, "n_candidates": len(pool), "queued": queued,
              "slides": {s.slide_id: int((slide_index == k).sum())
                         for k, s in enumerate(cfg.slides)},
              "method": f"{cfg.selection} over stain-OD histograms, nucleus share, mean "
                        "colour and slide; plus a random held-aside share"}
    _write_report(project, 0, report)
    return report


def queued_mask(store: ReviewStore, cfg: ProjectConfig, pool: Pool) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """(queued, held_aside) bool masks over the pool, read from the store."""
    index = _pool_index(cfg, pool)
    queued = np.zeros(len(pool), bool)
    held = np.zeros(len(pool), bool)
    for slide_id, cell_id, reason in store.item_keys():
        i = index.get((slide_id, int(cell_id)))
        if i is not None:
            queued[i] = True
            held[i] = reason == HELD_ASIDE
    return queued, held


def _pool_index(cfg: ProjectConfig, pool: Pool) -> dict[tuple[str, int], int]:
    ids = [s.slide_id for s in cfg.slides]
    return {(ids[int(s)], int(c)): i for i, (s, c) in enumerate(zip(pool.slide_index,
                                                                     pool.cell_id, strict=True))}


def queue_batch(project: Project, cfg: ProjectConfig, store: ReviewStore, pool: Pool,
                round_no: int, probs: np.ndarray | None) -> dict[str, int]:
    """Choose and queue round ``round_no``'s batch; ``probs`` (pool × classes) from the current
    model, or None before the first model. Returns {to_label, held_aside}."""
    queued, _ = queued_mask(store, cfg, pool)
    n_hold = int(round(cfg.batch_size * cfg.holdout_fraction))
    seed = cfg.seed * 1009 + round_no
    hold = random_batch(n_hold, queued, seed)
    queued[hold] = True
    active = select_batch(pool.features, cfg.batch_size - len(hold), queued, probs, seed=seed,
                          method=cfg.selection)
    rows = np.concatenate([active, hold])
    roles = np.array([TO_LABEL] * len(active) + [HELD_ASIDE] * len(hold), dtype=object)
    order = np.random.default_rng(seed).permutation(len(rows))  # roles mixed in the queue
    rows, roles = rows[order], roles[order]
    k = len(cfg.classes)
    p = (probs[rows] if probs is not None else np.full((len(rows), k), 1.0 / k))
    other = cfg.classes.index(cfg.other_class)
    items = []
    for s, slide in enumerate(cfg.slides):
        mine = np.flatnonzero(pool.slide_index[rows] == s)
        if not len(mine):
            continue
        ctx = extract_crops(slide.path, pool.xy0[rows[mine]], cfg.work_mpp, REVIEW_CONTEXT_PX,
                            mpp=slide.mpp)
        for j, m in enumerate(mine):
            i = int(rows[m])
            pred = int(np.argmax(p[m])) if probs is not None else other
            items.append(ReviewItem(
                slide_id=slide.slide_id, cell_id=int(pool.cell_id[i]), x=float(pool.xy0[i, 0]),
                y=float(pool.xy0[i, 1]), predicted=cfg.classes[pred],
                probs={c: float(p[m, q]) for q, c in enumerate(cfg.classes)},
                conformal_set=[], reason=str(roles[m]),
                priority=float(-round_no - m / (len(rows) + 1)),
                crop_png=png_bytes(pool.crops[i]), context_image=jpeg_bytes(ctx[j]),
                slide_path=slide.path, image_mpp=cfg.work_mpp, slide_mpp=slide.mpp))
    store.add_items(items)
    return {"to_label": int(len(active)), "held_aside": int(len(hold))}


def read_labels(store: ReviewStore, cfg: ProjectConfig, pool: Pool) -> Labels:
    """Every agreed label of the project (``not_a_cell`` as the other class; ``can't tell``,
    pending and disputed cells left out)."""
    index = _pool_index(cfg, pool)
    _, held = queued_mask(store, cfg, pool)
    idx, lab = [], []
    for slide in cfg.slides:
        for f in store.final_labels(slide.slide_id):
            if f.status != "done" or f.label in (None, CANT_TELL):
                continue
            i = index.get((f.slide_id, int(f.cell_id)))
            if i is None:
                continue
            name = cfg.other_class if f.label == NOT_A_CELL else f.label
            idx.append(i)
            lab.append(cfg.classes.index(name))
    index_arr = np.asarray(idx, np.int64)
    return Labels(index_arr, np.asarray(lab, np.int64), held[index_arr])


def calibration_needs(held_labels: np.ndarray, cfg: ProjectConfig) -> dict[str, dict[str, Any]]:
    """Per class: held-aside labels so far, the fewest the gate needs to certify the class
    (zero errors among that many cells; δ split over the gate's statements, miss bound on), and
    the estimated further held-aside labels (at the class's share among them)."""
    k = len(cfg.classes)
    need = min_cells_zero_errors(cfg.alpha, cfg.delta, 2 * k - 1)
    total = len(held_labels)
    out = {}
    for q, c in enumerate(cfg.classes):
        n = int((held_labels == q).sum())
        more = max(0, need - n)
        share = n / total if total else 0.0
        out[c] = {"held_aside": n, "needed": need, "more": more,
                  "more_labels_est": (0 if more == 0 else
                                      math.ceil(more / share / max(cfg.holdout_fraction, 1e-9))
                                      if share > 0 else None)}
    return out


def holdout_metrics(pred: np.ndarray, truth: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy per class (recall), precision, F1 and macro-F1 over the classes present."""
    per = {}
    f1s = []
    for q, c in enumerate(classes):
        tp = int(((pred == q) & (truth == q)).sum())
        n_true, n_pred = int((truth == q).sum()), int((pred == q).sum())
        rec = tp / n_true if n_true else None
        prec = tp / n_pred if n_pred else None
        f1 = (2 * tp / (n_true + n_pred)) if n_true else None
        if f1 is not None:
            f1s.append(f1)
        per[c] = {"n": n_true, "accuracy": rec, "precision": prec, "f1": f1}
    return {"n": int(len(truth)), "accuracy": float((pred == truth).mean()) if len(truth) else None,
            "macro_f1": float(np.mean(f1s)) if f1s else None, "per_class": per}


def train_round(cfg: ProjectConfig, pool: Pool, labels: Labels, out: Path,
                previous: Path | None = None) -> Path:
    """Write the training labels as a crop folder and train a bundle on it (``cellclf train``'s
    :func:`~cellclf.model.training.fit`) with the project's training config, fine-tuning
    ``previous`` (the previous round's bundle) when given, else the project's ``init``
    (:meth:`ProjectConfig.training_config`); returns the bundle folder."""
    import shutil

    from cellclf.model.training import fit

    crops_dir = out / "crops"
    if crops_dir.exists():
        shutil.rmtree(crops_dir)
    train = ~labels.held_aside
    for i, q in zip(labels.index[train], labels.label[train], strict=True):
        d = crops_dir / cfg.classes[q]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"c{int(i):07d}.png").write_bytes(png_bytes(pool.crops[i]))
    return fit(cfg.training_config(previous), crops_dir, out / "bundle", progress=False)


def next_round(root: str | Path, target_f1: float | None = None,
               max_labels: int | None = None) -> dict[str, Any]:
    """One round: train on the labels so far, estimate on the held-aside ones, then queue the next
    batch unless the target is reached. Returns the round's report (also in report.json)."""
    project = Project(root)
    cfg = project.load_config()
    pool = project.load_pool()
    store = open_project_store(project, cfg)
    try:
        labels = read_labels(store, cfg, pool)
        queued, _ = queued_mask(store, cfg, pool)
        train_classes = np.unique(labels.label[~labels.held_aside])
        if len(train_classes) < 2:
            raise LabellingError(
                f"{project.root}: {int((~labels.held_aside).sum())} cells labelled for training "
                f"({len(train_classes)} class(es)); label at least two classes first: "
                f"`cellclf review serve --db {project.root / 'review.sqlite'}`")
        n = (project.rounds_done() or [0])[-1] + 1
        out = project.round_dir(n)
        out.mkdir(parents=True, exist_ok=True)
        previous = project.round_dir(n - 1) / "bundle" if n > 1 else None
        bundle = train_round(cfg, pool, labels, out, previous)
        engine = TorchEngine(bundle, device="cpu")
        probs = np.concatenate([engine.classify(pool.crops[s:s + 512])
                                for s in range(0, len(pool), 512)])
        held = labels.held_aside
        metrics = holdout_metrics(probs[labels.index[held]].argmax(axis=1), labels.label[held],
                                  cfg.classes)
        needs = calibration_needs(labels.label[held], cfg)
        reached = _target_reached(metrics, needs, len(labels.index), target_f1, max_labels)
        waiting = store.progress()["pending"]
        batch = ({"to_label": 0, "held_aside": 0} if reached or queued.all()
                 else queue_batch(project, cfg, store, pool, n, probs))
    finally:
        store.close()
    report = {"round": n, "bundle": str(bundle), "labels": {
        "total": int(len(labels.index)), "train": int((~held).sum()), "held_aside": int(held.sum()),
        "per_class_train": _counts(labels.label[~held], cfg.classes),
        "unanswered_before_this_round": int(waiting)},
        "held_aside_estimate": metrics, "calibration_needs": needs,
        "target_reached": reached, "queued": batch}
    _write_report(project, n, report)
    return report


def calibrate_project(root: str | Path, alpha: float | None = None, delta: float | None = None,
                      alpha_set: float = 0.1, workers: int = 0) -> dict[str, Any]:
    """Calibrate the last round's bundle on the held-aside labels (random cells of the project's
    slides that no round trained on) and the slides' stain/focus statistics."""
    project = Project(root)
    cfg = project.load_config()
    rounds = [r for r in project.rounds_done() if r > 0]
    if not rounds:
        raise LabellingError(f"{project.root}: no trained round yet: run `cellclf label --next "
                             f"{project.root}` first")
    bundle = project.round_dir(rounds[-1]) / "bundle"
    pool = project.load_pool()
    store = open_project_store(project, cfg)
    try:
        labels = read_labels(store, cfg, pool)
    finally:
        store.close()
    held = labels.held_aside
    if held.sum() < 2 * len(cfg.classes):
        raise LabellingError(f"{project.root}: only {int(held.sum())} held-aside labels; label "
                             "more rounds before calibrating")
    logits = TorchEngine(bundle, device="cpu").logits(pool.crops[labels.index[held]])
    stats = [slide_ood_stats(s.path, cfg.work_mpp, mpp=s.mpp, workers=workers)
             for s in cfg.slides]
    provenance = {"data": str(project.root), "slides": [s.slide_id for s in cfg.slides],
                  "assumption": "calibrated on held-aside cells drawn at random from the "
                                "candidates of the labelling project's slides (cells no round "
                                "trained on, slides that were): the guarantee holds for cells "
                                "exchangeable with them; check it on new slides of the lab "
                                "with `cellclf evaluate` before relying on it"}
    return write_calibration(bundle, logits, labels.label[held], fit_ood(stats).to_dict(),
                             provenance,
                             alpha=alpha if alpha is not None else cfg.alpha,
                             delta=delta if delta is not None else cfg.delta,
                             alpha_set=alpha_set, out=project.round_dir(rounds[-1]),
                             slide_of_cell=np.array([cfg.slides[i].slide_id for i in
                                                     pool.slide_index[labels.index[held]]])) | {
        "bundle": str(bundle)}


def _target_reached(metrics: dict, needs: dict, n_labels: int, target_f1: float | None,
                    max_labels: int | None) -> bool:
    if max_labels is not None and n_labels >= max_labels:
        return True
    if target_f1 is None:
        return False
    f1 = metrics.get("macro_f1")
    return f1 is not None and f1 >= target_f1 and all(v["more"] == 0 for v in needs.values())


def _counts(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    return {c: int((labels == q).sum()) for q, c in enumerate(classes)}


def _write_report(project: Project, n: int, report: dict) -> None:
    d = project.round_dir(n)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / "report.json", report)
