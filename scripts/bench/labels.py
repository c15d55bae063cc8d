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

Active = the project's selection (:mod:`cellclf.labelling.selection`): k-center greedy first
batch, then the most uncertain ×5 under the current model narrowed by k-center greedy; random =
uniform draws. Both train the same network with the same settings through
:func:`cellclf.labelling.rounds.train_round` (a crop folder → ``fit``) at each budget; the full
pool gives the reference score. Budgets count training labels only (the held-aside share that
``cellclf label`` also queues for estimates and calibration is left out of both arms).

    python scripts/bench/labels.py --budgets 40 80 160 320 --epochs 15
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

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
    cell_features,
    k_center_greedy,
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
        slide, truth = render_slide(work, size_px, size_px, mpp=0.25, seed=seed, difficulty=0.3,
                                    name=f"bench{seed}", workers=2)
        xy0 = detect_slide(slide, work_mpp=0.5, workers=2, progress=False)
        pts = read_points(truth)
        d, j = cKDTree([(p.x, p.y) for p in pts]).query(xy0)
        names = [pts[i].name if (dist * 0.25 <= 4.0 and pts[i].name in TARGETS) else "other"
                 for dist, i in zip(d, j, strict=True)]
        labels = np.array([classes.index(n) for n in names])
        parts.append((extract_crops(slide, xy0, 0.5, 64, workers=2), labels, np.full(len(xy0), k)))
    pool = tuple(np.concatenate([p[i] for p in parts[:2]]) for i in range(3))
    return classes, pool, parts[2][:2]


def pbc_data(per_class: int, test_per_class: int, seed: int) -> tuple[list[str], tuple, tuple]:
    from PIL import Image

    from cellclf.annotations.crop_folder import fit_crop

    classes = ["eosinophil", "neutrophil", "basophil", "other"]
    others = ["lymphocyte", "monocyte", "ig", "erythroblast", "platelet"]
    rng = np.random.default_rng(seed)
    pool, test = ([], []), ([], [])
    for q, c in enumerate(classes):
        files = sorted(f for d in ([c] if c != "other" else others)
                       for f in (PBC / d).glob("*.jpg"))
        files = [files[i] for i in rng.permutation(len(files))[:per_class + test_per_class]]
        for n, f in enumerate(files):
            with Image.open(f) as im:
                crop = fit_crop(np.asarray(im.convert("RGB")), 0.1, 0.5, 64)
            dst = pool if n < per_class else test
            dst[0].append(crop)
            dst[1].append(q)
    p = (np.stack(pool[0]), np.array(pool[1]), np.zeros(len(pool[1]), int))
    return classes, p, (np.stack(test[0]), np.array(test[1]))


def run_arm(name: str, classes: list[str], pool: tuple, test: tuple, budgets: list[int],
            active: bool, epochs: int, seed: int, work: Path) -> list[tuple[int, float, float]]:
    """(labels, macro-F1 on the test set, seconds) per budget."""
    from cellclf.model.engine import TorchEngine

    crops, truth, slide_index = pool
    n_slides = int(slide_index.max()) + 1
    p = Pool(slide_index=slide_index, cell_id=np.arange(len(truth)),
             xy0=np.zeros((len(truth), 2)), crops=crops,
             features=pool_features(cell_features(crops), slide_index, n_slides))
    cfg = ProjectConfig(classes=classes, other_class="other", seed=seed,
                        train_config=str(REPO / "configs" / "train-tiny.yaml"),
                        train_overrides=[f"train.epochs={epochs}", "data.val_fraction=0",
                                         f"train.seed={seed}"])
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(truth), bool)
    probs = None
    rows = []
    for b in budgets:
        k = min(b, len(truth)) - int(chosen.sum())
        if active and probs is None:
            pick = k_center_greedy(p.features, k, np.flatnonzero(~chosen), seed=seed)
        elif active:
            pick = select_batch(p.features, k, chosen, probs, seed=seed)
        else:
            pick = rng.choice(np.flatnonzero(~chosen), size=k, replace=False)
        chosen[pick] = True
        t0 = time.perf_counter()
        idx = np.flatnonzero(chosen)
        labels = Labels(idx, truth[idx], np.zeros(len(idx), bool))
        bundle = train_round(cfg, p, labels, work / f"{name}-{'act' if active else 'rnd'}-{b}")
        engine = TorchEngine(bundle, device="cpu")
        probs = np.concatenate([engine.classify(crops[s:s + 512])
                                for s in range(0, len(crops), 512)])
        pred = np.concatenate([engine.classify(test[0][s:s + 512]).argmax(axis=1)
                               for s in range(0, len(test[0]), 512)])
        f1 = holdout_metrics(pred, test[1], classes)["macro_f1"]
        rows.append((int(chosen.sum()), float(f1), time.perf_counter() - t0))
        print(f"{name} {'active' if active else 'random'} {rows[-1][0]} labels: macro-F1 "
              f"{f1:.3f} ({rows[-1][2]:.0f} s)", flush=True)
    return rows


def labels_to_reach(rows: list[tuple[int, float, float]], goal: float) -> str:
    hit = [n for n, f1, _ in rows if f1 >= goal]
    return str(hit[0]) if hit else f"> {rows[-1][0]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[40, 80, 160, 320])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synth-px", type=int, default=3072, help="side of each synthetic slide")
    ap.add_argument("--pbc-per-class", type=int, default=300)
    ap.add_argument("--sets", nargs="+", default=["synth", "pbc"])
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    lines = []
    with tempfile.TemporaryDirectory(prefix="cellclf-labels-") as tmp:
        work = Path(tmp)
        for name in args.sets:
            if name == "pbc" and not PBC.is_dir():
                print(f"skipping pbc: {PBC} not found")
                continue
            classes, pool, test = (synth_data(work, args.synth_px) if name == "synth"
                                   else pbc_data(args.pbc_per_class, 100, args.seed))
            full = run_arm(name, classes, pool, test, [len(pool[1])], False, args.epochs,
                           args.seed, work)[0]
            act = run_arm(name, classes, pool, test, args.budgets, True, args.epochs,
                          args.seed, work)
            rnd = run_arm(name, classes, pool, test, args.budgets, False, args.epochs,
                          args.seed, work)
            counts = np.bincount(pool[1], minlength=len(classes))
            lines += [f"**{name}**: pool {len(pool[1])} cells ("
                      + ", ".join(f"{c} {n}" for c, n in zip(classes, counts, strict=True))
                      + f"), test {len(test[1])} cells; full pool macro-F1 {full[1]:.3f}.\n",
                      "| labels | active macro-F1 | random macro-F1 |", "| ---: | ---: | ---: |"]
            lines += [f"| {a[0]} | {a[1]:.3f} | {r[1]:.3f} |" for a, r in zip(act, rnd,
                                                                               strict=True)]
            goal = 0.95 * full[1]
            lines.append(f"\nLabels to reach 95 % of the full-pool score ({goal:.3f}): active "
                         f"{labels_to_reach(act, goal)}, random {labels_to_reach(rnd, goal)}.\n")
    intro = [f"Simulated labeller answering with the truth; resnet18 from scratch, "
             f"configs/train-tiny.yaml with {args.epochs} epochs, no validation split, seed "
             f"{args.seed}, one run per point (expect ±0.05 noise between seeds). Active = "
             "k-center greedy first batch, then uncertainty (margin, top 5×) + k-center; "
             "labels count training labels only.\n"]
    print("\n".join(intro + lines))
    if not args.no_write:
        append_section("Label efficiency (cellclf label)", intro + lines)


if __name__ == "__main__":
    main()
