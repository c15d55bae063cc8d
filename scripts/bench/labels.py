"""Label efficiency of ``cellclf label``: macro-F1 against the number of labels, active selection
vs random selection, with a simulated labeller who answers with the truth.

Two pools of cells, each with a disjoint test set:

- ``synth``: three synthetic 40× slides (``cellclf synth``); the detector's candidates on two are
  the pool, the third slide's candidates are the test set; the truth answers each candidate with
  the nearest truth cell within 4 µm (non-target kinds → ``other``; none near → not a cell →
  ``other``), as the label loop's test does.
- ``pbc``: real peripheral-blood cells (``../shared/data/real/pbc``, May-Grünwald-Giemsa smear,
  ≈ 0.1 µm/px, rescaled to the model's 64 px at 0.5 µm/px): classes eosinophil, neutrophil,
  basophil and ``other`` (lymphocyte, monocyte, ig, erythroblast, platelet); a class-balanced
  pool and test set drawn at random.

Active = the project's selection (:mod:`cellclf.labelling.selection`): a first batch spread over
the pool (k-means medoids), then the most uncertain ×5 under the current model spread the same
way; random = uniform draws. Both arms train the same learner at each budget; the full pool gives
the reference score. Budgets count training labels only (the held-aside share that ``cellclf
label`` also queues for estimates and calibration is left out of both arms). Learners:

- ``cnn``: exactly what ``cellclf label --next`` trains (:func:`cellclf.labelling.rounds.
  train_round` with a default :class:`~cellclf.labelling.project.ProjectConfig`): budget 1 fine-
  tunes the shipped ``cellclf-synth-he-v1`` (regnet_y_400mf), each later budget fine-tunes the
  previous budget's bundle of the same arm, ~150 optimiser steps each (the label loop's
  schedule); the full-pool reference is one round on every pool label. About a minute per point
  on a 2-core machine.
- ``linear`` (seconds, so several seeds): class-balanced multinomial logistic regression on the
  crops' stain/size/colour features (:func:`cellclf.labelling.selection.cell_features` plus RGB
  histograms of the central disc). It measures the *selection*, not the network.

The gate's side (``--gate``, cnn): how many random (held-aside) labels the gate needs before it
certifies each class at α = 0.01, δ = 0.05 split over the K classes
(:func:`cellclf.gate.thresholds.fit_gate`, no miss bound): the full-pool model's probabilities on
a calibration set disjoint from pool and test (pbc: the remaining images; synth: the test slide's
candidates), growing in steps of 100 labels in random order; plus the computed floor
``min_cells_zero_errors / share of cells predicted as the class``.

    python scripts/bench/labels.py                                   # linear, 5 seeds
    python scripts/bench/labels.py --learner cnn --seeds 1 --budgets 40 80 160 320 640 \
        --sets pbc --pbc-per-class 400 --gate
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import append_section  # noqa: E402

from cellclf.labelling.project import Pool, ProjectConfig  # noqa: E402
from cellclf.labelling.rounds import Labels, holdout_metrics, train_round  # noqa: E402
from cellclf.labelling.selection import (  # noqa: E402
    SELECTION_METHODS,
    cell_features,
    pool_features,
    select_batch,
)

TARGETS = ("eosinophil", "neutrophil", "mast_cell")
PBC = REPO.parent / "shared" / "data" / "real" / "pbc"


def synth_data(work: Path, size_px: int) -> tuple[list[str], tuple, tuple]:
    """(classes, (crops, labels, slide_index) of the pool, (crops, labels) of the test set)."""
    from scipy.spatial import cKDTree

    from cellclf.annotations.geojson import read_points
    from cellclf.detect.slide_detection import detect_slide
    from cellclf.synth import render_slide
    from cellclf.wsi.crops import extract_crops

    classes = [*TARGETS, "other"]
    parts = []
    for k, seed in enumerate((31, 32, 33)):
        slide, truth = work / f"bench{seed}.tif", work / f"bench{seed}.geojson"
        if not (slide.is_file() and truth.is_file()):  # rendered once per --work folder
            slide, truth = render_slide(work, size_px, size_px, mpp=0.25, seed=seed,
                                        difficulty=0.3, name=f"bench{seed}", workers=2)
        xy0 = detect_slide(slide, work_mpp=0.5, workers=2, progress=False)
        pts = read_points(truth)
        d, j = cKDTree([(p.x, p.y) for p in pts]).query(xy0)
        names = [pts[i].name if (dist * 0.25 <= 4.0 and pts[i].name in TARGETS) else "other"
                 for dist, i in zip(d, j, strict=True)]
        labels = np.array([classes.index(n) for n in names])
        parts.append((extract_crops(slide, xy0, 0.5, 64, workers=2), labels, np.full(len(xy0), k)))
    pool = tuple(np.concatenate([p[i] for p in parts[:2]]) for i in range(3))
    return classes, pool, parts[2][:2]


def pbc_data(per_class: int, test_per_class: int, seed: int,
             cal_per_class: int = 0) -> tuple[list[str], tuple, tuple, tuple]:
    """(classes, pool, test, calibration): class-balanced pool and test; the calibration set
    takes up to ``cal_per_class`` of each class's remaining images (disjoint from both)."""
    from PIL import Image

    from cellclf.annotations.crop_folder import fit_crop

    classes = ["eosinophil", "neutrophil", "basophil", "other"]
    others = ["lymphocyte", "monocyte", "ig", "erythroblast", "platelet"]
    rng = np.random.default_rng(seed)
    parts: tuple[tuple[list, list], ...] = (([], []), ([], []), ([], []))
    for q, c in enumerate(classes):
        files = sorted(f for d in ([c] if c != "other" else others)
                       for f in (PBC / d).glob("*.jpg"))
        files = [files[i] for i in rng.permutation(len(files))]
        files = files[:per_class + test_per_class + cal_per_class]
        for n, f in enumerate(files):
            with Image.open(f) as im:
                crop, _ = fit_crop(np.asarray(im.convert("RGB")), 0.1, 0.5, 64)
            dst = parts[0 if n < per_class else 1 if n < per_class + test_per_class else 2]
            dst[0].append(crop)
            dst[1].append(q)
    pool, test, cal = ((np.stack(x), np.array(y)) if x else
                       (np.zeros((0, 64, 64, 3), np.uint8), np.zeros(0, int)) for x, y in parts)
    return classes, (*pool, np.zeros(len(pool[1]), int)), test, cal


def learner_features(crops: np.ndarray) -> np.ndarray:
    """The linear learner's inputs: stain/size/colour features + 8-bin RGB histograms of the
    central disc."""
    disc = np.hypot(*(np.mgrid[:64, :64] + 0.5 - 32)) <= 0.35 * 64
    hist = np.stack([np.concatenate([np.histogram(c[disc][:, ch], 8, (0, 256))[0]
                                     for ch in range(3)]) / disc.sum() for c in crops])
    return np.hstack([cell_features(crops), hist]).astype(np.float64)


def fit_linear(x: np.ndarray, y: np.ndarray, k: int, l2: float = 1e-2) -> np.ndarray:
    """Class-balanced multinomial logistic regression (L-BFGS); weights (F + 1, K)."""
    from scipy.optimize import minimize

    xb = np.hstack([x, np.ones((len(x), 1))])
    counts = np.bincount(y, minlength=k).astype(float)
    w_cls = np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 0.0)[y]
    onehot = np.eye(k)[y]

    def loss(wflat: np.ndarray) -> tuple[float, np.ndarray]:
        w = wflat.reshape(xb.shape[1], k)
        z = xb @ w
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        nll = -(w_cls * np.log(np.maximum((p * onehot).sum(axis=1), 1e-12))).sum() / len(y)
        grad = xb.T @ ((p - onehot) * w_cls[:, None]) / len(y) + l2 * w
        return nll + 0.5 * l2 * (w**2).sum(), grad.ravel()

    res = minimize(loss, np.zeros(xb.shape[1] * k), jac=True, method="L-BFGS-B",
                   options={"maxiter": 500})
    return res.x.reshape(xb.shape[1], k)


def predict_linear(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    z = np.hstack([x, np.ones((len(x), 1))]) @ w
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def run_arm(name: str, classes: list[str], pool: tuple, test: tuple, budgets: list[int],
            active: bool, learner: str, seed: int, work: Path, method: str = "kmeans",
            extra: np.ndarray | None = None,
            overrides: tuple[str, ...] = ()) -> tuple[list[tuple[int, float, float]], Any]:
    """(labels, macro-F1 on the test set, seconds) per budget, and the last model's
    probabilities on ``extra`` crops (cnn; None otherwise)."""
    crops, truth, slide_index = pool
    n_slides = int(slide_index.max()) + 1
    p = Pool(slide_index=slide_index, cell_id=np.arange(len(truth)),
             xy0=np.zeros((len(truth), 2)), crops=crops,
             features=pool_features(cell_features(crops), slide_index, n_slides))
    if learner == "linear":
        xs = [learner_features(crops), learner_features(test[0])]
        mu, sd = xs[0].mean(axis=0), xs[0].std(axis=0) + 1e-9
        x_pool, x_test = ((v - mu) / sd for v in xs)
    # what `cellclf label` trains: a default project (its init and schedule), this seed
    cfg = ProjectConfig(classes=classes, other_class="other", seed=seed, selection=method,
                        train_overrides=[f"train.seed={seed}", *overrides])
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(truth), bool)
    probs = extra_probs = None
    previous: Path | None = None
    rows = []
    for b in budgets:
        k = min(b, len(truth)) - int(chosen.sum())
        if active:
            pick = select_batch(p.features, k, chosen, probs, seed=seed, method=method)
        else:
            pick = rng.choice(np.flatnonzero(~chosen), size=k, replace=False)
        chosen[pick] = True
        t0 = time.perf_counter()
        idx = np.flatnonzero(chosen)
        if learner == "linear":
            w = fit_linear(x_pool[idx], truth[idx], len(classes))
            probs, test_probs = predict_linear(w, x_pool), predict_linear(w, x_test)
        else:
            from cellclf.model.engine import TorchEngine

            labels = Labels(idx, truth[idx], np.zeros(len(idx), bool))
            arm = f"{name}-{'act' if active else 'rnd'}-s{seed}-{b}"
            previous = train_round(cfg, p, labels, work / arm, previous)
            engine = TorchEngine(previous, device="cpu")
            probs, test_probs = (np.concatenate([engine.classify(c[s:s + 512])
                                                 for s in range(0, len(c), 512)])
                                 for c in (crops, test[0]))
            if extra is not None and len(extra):
                extra_probs = np.concatenate([engine.classify(extra[s:s + 512])
                                              for s in range(0, len(extra), 512)])
        f1 = holdout_metrics(test_probs.argmax(axis=1), test[1], classes)["macro_f1"]
        rows.append((int(chosen.sum()), float(f1), time.perf_counter() - t0))
        print(f"{name} seed {seed} {'active' if active else 'random'} {rows[-1][0]} labels: "
              f"macro-F1 {f1:.3f} ({rows[-1][2]:.1f} s)", flush=True)
    return rows, extra_probs


def labels_to_reach(rows: list[tuple[int, float, float]], goal: float) -> str:
    hit = [n for n, f1, _ in rows if f1 >= goal]
    return str(hit[0]) if hit else f"> {rows[-1][0]}"


def gate_needs(probs: np.ndarray, truth: np.ndarray, classes: list[str], holdout: float,
               seed: int, step: int = 100, alpha: float = 0.01,
               delta: float = 0.05) -> list[str]:
    """Per class, the held-aside labels (random order, growing by ``step``) at which the gate
    first certifies it — δ over the K error statements (no miss bound), and as ``cellclf
    calibrate`` fits it (miss bound β on: δ over 2K − 1) — and the computed floor
    min_cells_zero_errors(K) / share of cells predicted as the class."""
    from cellclf.calibration.bundle_gate import DEFAULT_BETA
    from cellclf.gate.thresholds import fit_gate, min_cells_zero_errors

    order = np.random.default_rng(seed).permutation(len(truth))
    p, y = probs[order], truth[order]
    first: dict[tuple[str, float | None], int | None] = {
        (c, beta): None for c in classes for beta in (None, DEFAULT_BETA)}
    for n in [*range(step, len(y), step), len(y)]:
        for beta in (None, DEFAULT_BETA):
            g = fit_gate(p[:n], y[:n], classes, alpha, delta, beta=beta, other_class="other")
            for c in classes:
                if first[c, beta] is None and g.thresholds[c] is not None:
                    first[c, beta] = n
    need = min_cells_zero_errors(alpha, delta, len(classes))
    need_b = min_cells_zero_errors(alpha, delta, 2 * len(classes) - 1)
    pred = p.argmax(axis=1)
    lines = [f"Gate certification with the full-pool model on {len(y)} calibration cells "
             f"disjoint from pool and test, added 100 at a time in random order: α = {alpha}, "
             f"δ = {delta} over the {len(classes)} error statements (≥ {need} zero-error cells "
             f"predicted as the class), and as `cellclf calibrate` fits it (miss bound β = "
             f"{DEFAULT_BETA} on, δ over {2 * len(classes) - 1} statements, ≥ {need_b}). The "
             f"loop holds aside {holdout:.0%} of its labels: total labels = held-aside / "
             f"{holdout}. Floor = {need} / share of cells predicted as the class (zero errors "
             "assumed).\n",
             "| class | calibration cells (true) | predicted as it | precision | held-aside labels "
             "when first certified (δ/K) | same, with β (calibrate) | total loop labels (δ/K) "
             "| floor: held-aside, total |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def shown(n: int | None, scale: float = 1.0) -> str:
        return str(int(np.ceil(n / scale))) if n is not None else f"> {int(len(y) / scale)}"

    for q, c in enumerate(classes):
        n_pred = int((pred == q).sum())
        prec = float((y[pred == q] == q).mean()) if n_pred else float("nan")
        floor = np.ceil(need / (n_pred / len(y))) if n_pred else float("inf")
        lines.append(f"| {c} | {int((y == q).sum())} | {n_pred} | {prec:.3f} | "
                     f"{shown(first[c, None])} | {shown(first[c, DEFAULT_BETA])} | "
                     f"{shown(first[c, None], holdout)} | {floor:.0f}, {floor / holdout:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[20, 40, 60, 80, 120, 160, 240, 320])
    ap.add_argument("--learner", choices=["linear", "cnn"], default="linear")
    ap.add_argument("--method", choices=list(SELECTION_METHODS), default="kmeans",
                    help="active selection's spreading step (cellclf label's default: kmeans)")
    ap.add_argument("--seeds", type=int, default=5, help="runs per point (seeds 0..N-1)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="start the seeds here (more seeds for an earlier run)")
    ap.add_argument("--synth-px", type=int, default=2048, help="side of each synthetic slide")
    ap.add_argument("--pbc-per-class", type=int, default=150)
    ap.add_argument("--gate", action="store_true",
                    help="cnn: labels the gate needs to certify each class (seed 0's full model)")
    ap.add_argument("--full-min-steps", type=int, default=0,
                    help="cnn: train the full-pool reference for at least this many steps "
                         "(default: the label loop's schedule, as every budget)")
    ap.add_argument("--arms", nargs="*", default=["active", "random"],
                    help="arms to run (none: only the full-pool reference)")
    ap.add_argument("--no-full", action="store_true",
                    help="skip the full-pool reference (extra budgets for an earlier run)")
    ap.add_argument("--sets", nargs="+", default=["synth", "pbc"])
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the synthetic slides (kept; default: a temporary one)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("CELLCLF_BENCH_THREADS", "2")))
    lines = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cellclf-labels-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.sets:
            if name == "pbc" and not PBC.is_dir():
                print(f"skipping pbc: {PBC} not found")
                continue
            if name == "synth":
                classes, pool, test = synth_data(work, args.synth_px)
                cal = test
            else:
                classes, pool, test, cal = pbc_data(args.pbc_per_class, 100, 0,
                                                    10**6 if args.gate else 0)
            curves: dict[str, list] = {"full": [], "active": [], "random": []}
            gate_lines: list[str] = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                a = (name, classes, pool, test)
                want_gate = args.gate and args.learner == "cnn" and seed == args.first_seed
                longer = ((f"train.min_steps={args.full_min_steps}",)
                          if args.full_min_steps else ())
                full_rows, cal_probs = (([(0, float("nan"), 0.0)], None) if args.no_full else
                                        run_arm(*a, [len(pool[1])], False, args.learner, seed,
                                                work, extra=cal[0] if want_gate else None,
                                                overrides=longer))
                curves["full"].append(full_rows[0][1])
                if want_gate and cal_probs is not None:
                    gate_lines = gate_needs(cal_probs, cal[1], classes,
                                            ProjectConfig().holdout_fraction, seed)
                    print("\n".join(gate_lines), flush=True)
                for arm in args.arms:
                    curves[arm].append([r[1] for r in run_arm(
                        *a, args.budgets, arm == "active", args.learner, seed, work,
                        args.method)[0]])
            full = float(np.mean(curves["full"]))
            if set(args.arms) != {"active", "random"}:
                lines += [f"**{name}**: pool {len(pool[1])} cells, full-pool macro-F1 "
                          + ", ".join(f"{v:.3f}" for v in curves["full"])
                          + (f" (min_steps {args.full_min_steps})" if args.full_min_steps
                             else "") + "\n", *gate_lines, ""]
                continue
            act, rnd = (np.mean(curves[k], axis=0) for k in ("active", "random"))
            sd_a, sd_r = (np.std(curves[k], axis=0) for k in ("active", "random"))
            counts = np.bincount(pool[1], minlength=len(classes))
            lines += [f"**{name}**: pool {len(pool[1])} cells ("
                      + ", ".join(f"{c} {n}" for c, n in zip(classes, counts, strict=True))
                      + f"), test {len(test[1])} cells; full pool macro-F1 {full:.3f}.\n",
                      "| labels | active macro-F1 | random macro-F1 |", "| ---: | ---: | ---: |"]
            lines += [f"| {b} | {a:.3f} ± {da:.3f} | {r:.3f} ± {dr:.3f} |"
                      for b, a, da, r, dr in zip(args.budgets, act, sd_a, rnd, sd_r,
                                                 strict=True)]
            goal = 0.95 * full
            lines.append(f"\nLabels to reach 95 % of the full-pool score ({goal:.3f}): active "
                         f"{labels_to_reach(list(zip(args.budgets, act, act, strict=True)), goal)}, random "
                         f"{labels_to_reach(list(zip(args.budgets, rnd, rnd, strict=True)), goal)}.\n")
            lines += [*gate_lines, ""] if gate_lines else []
    learner = ("class-balanced logistic regression on stain/size/colour features (measures the "
               "selection, not the network)" if args.learner == "linear" else
               "the CNN `cellclf label --next` trains (default project: fine-tune "
               "cellclf-synth-he-v1, regnet_y_400mf, then each budget the previous budget's "
               "bundle, ~150 steps a round, no validation split)")
    intro = [f"Simulated labeller answering with the truth. Learner: {learner}. Mean ± sd over "
             f"{args.seeds} seed(s). Active ({args.method}) = first batch spread over the pool "
             f"by {args.method}, then uncertainty (margin, top 5×) spread by {args.method}; labels "
             f"count training labels only. Wall time {time.perf_counter() - t_start:.0f} s.\n"]
    print("\n".join(intro + lines))
    if not args.no_write:
        append_section("Label efficiency (cellclf label)", intro + lines)


if __name__ == "__main__":
    main()
