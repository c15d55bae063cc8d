"""Benchmark: the realism gap between synthetic and real H&E (issue 14, item 3).

For each synthetic mode — ``v1`` (today's ``cellclf synth``), ``v2`` (``--style v2``) and
``hybrid`` (``cellclf synth-hybrid``: synthetic cells in real tissue) — a small CNN learns to
tell real from synthetic 64×64 px patches at a common 0.5 µm/px, trained and tested on
held-apart patches (different slide halves, tiles and seeds), and its test ROC AUC is reported:
0.5 = indistinguishable, 1.0 = trivially told apart. Patches are **cell-centred** (real nuclei
from the point annotations / classical detector; synthetic cells from the truth; for hybrid only
the synthetic cells, since everything else in it is real) and, for v1/v2, also random
**tissue** windows. Real: the CC0 CMU slide, bm_graz and crchisto (crchisto only here, in an
experiment), the same number of patches from each. Also reports haematoxylin / eosin optical
density (Ruifrok–Johnston deconvolution, each image's own glass) of the tissue pixels of the
test patches: mean, SD and percentiles, real vs each mode.

    python scripts/bench/realism.py              # ~ a few minutes on 2 CPU cores
    python scripts/bench/realism.py --no-record  # print only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append_section  # noqa: E402

from cellclf.synth import render_slide  # noqa: E402
from cellclf.synth.backgrounds import load_background  # noqa: E402
from cellclf.synth.hybrid import WINDOW_UM, blend, place_cells  # noqa: E402
from cellclf.synth.local_optics import (  # noqa: E402
    concentrations,
    glass_intensity,
    local_conditions,
    optical_density,
    reference_stains,
)

MPP = 0.5
PATCH = 64
SHARED = REPO.parent / "shared" if (REPO.parent / "shared").is_dir() else Path("/work/shared")
CMU = SHARED / "data" / "wsi" / "CMU-1-Small-Region.svs"
BM = SHARED / "data" / "real" / "bm_graz"
CRC = SHARED / "data" / "real" / "crchisto"
BG_MPP = {"bm_graz": 0.26, "crchisto": 0.55}


def _patches(rgb: np.ndarray, xy: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n (PATCH, PATCH, 3) windows centred on points that fit inside the image."""
    h, w = rgb.shape[:2]
    r = PATCH // 2
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    ok = (xy[:, 0] >= r) & (xy[:, 1] >= r) & (xy[:, 0] < w - r) & (xy[:, 1] < h - r)
    xy = xy[ok]
    pick = rng.permutation(len(xy))[:n]
    out = [rgb[int(y) - r:int(y) + r, int(x) - r:int(x) + r] for x, y in xy[pick]]
    return np.stack(out) if out else np.zeros((0, PATCH, PATCH, 3), np.uint8)


def _tissue_points(rgb: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random window centres whose window is mostly tissue."""
    h, w = rgb.shape[:2]
    od = optical_density(rgb[::8, ::8], glass_intensity(rgb)).sum(-1) > 0.15
    cand = rng.uniform([PATCH, PATCH], [w - PATCH, h - PATCH], (n * 20, 2))
    ok = od[(cand[:, 1] // 8).astype(int), (cand[:, 0] // 8).astype(int)]
    return cand[ok][:n]


def _split_real(name: str, bg) -> tuple[np.ndarray, np.ndarray]:
    """Bool masks (train, test) over the background's pixels' owner: by tile / slide half."""
    train_tiles = []
    for k, (tile, *_box) in enumerate(bg.tiles):
        if name == "crchisto":
            train_tiles.append("validation" not in tile)
        elif name == "bm_graz":
            train_tiles.append(k % 2 == 0)
        else:
            train_tiles.append(True)
    return np.asarray(train_tiles), ~np.asarray(train_tiles)


def _owner(bg, xy: np.ndarray) -> np.ndarray:
    """Index of the mosaic tile holding each point (the CMU slide is one tile: split by y)."""
    out = np.full(len(xy), -1)
    for k, (_, x0, y0, w, h) in enumerate(bg.tiles):
        inside = ((xy[:, 0] >= x0) & (xy[:, 0] < x0 + w) & (xy[:, 1] >= y0)
                  & (xy[:, 1] < y0 + h))
        out[inside] = k
    return out


def _real_and_hybrid(n_per: int, rng: np.random.Generator, seed: int) -> dict:
    """Per source: real cell patches, hybrid synthetic-cell patches and OD per split."""
    out = {"real_cell": {"train": [], "test": []}, "hybrid_cell": {"train": [], "test": []},
           "real_tissue": {"train": [], "test": []}, "glass": {}}
    for name, path in (("cmu", CMU), ("bm_graz", BM), ("crchisto", CRC)):
        t0 = time.perf_counter()
        bg = load_background(path, MPP, BG_MPP.get(name))
        cond = local_conditions(bg.rgb, round(WINDOW_UM / bg.mpp))
        cells, _ = place_cells(bg, cond, seed, 0.3, 400.0)
        hybrid = blend(bg, cond, cells, seed)
        syn_xy = np.column_stack([cells["x"], cells["y"]]) / bg.mpp
        tis_xy = _tissue_points(bg.rgb, 4 * n_per, rng)
        for kind, img, xy in (("real_cell", bg.rgb, bg.nuclei_xy),
                              ("hybrid_cell", hybrid, syn_xy), ("real_tissue", bg.rgb, tis_xy)):
            if name == "cmu":
                is_train = xy[:, 1] < bg.rgb.shape[0] / 2
            else:
                train_tiles, _ = _split_real(name, bg)
                own = _owner(bg, xy)
                is_train = (own >= 0) & train_tiles[np.maximum(own, 0)]
            for split, mask in (("train", is_train), ("test", ~is_train)):
                out[kind][split].append(_patches(img, xy[mask], n_per, rng))
        out["glass"][name] = glass_intensity(bg.rgb)
        print(f"  {name}: {bg.rgb.shape[1]}x{bg.rgb.shape[0]} px, {len(bg.nuclei_xy)} real "
              f"nuclei, {len(cells)} synthetic cells ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    return out


def _synthetic(style: str, n: int, rng: np.random.Generator, tmp: Path) -> dict:
    """v1/v2 cell and tissue patches: train from seed 101, test from seed 202."""
    import openslide

    out: dict = {"cell": {}, "tissue": {}}
    for split, seed in (("train", 101), ("test", 202)):
        slide, truth = render_slide(tmp / style, 4096, 4096, mpp=MPP, seed=seed,
                                    difficulty=0.3, workers=1, style=style)
        with openslide.OpenSlide(str(slide)) as s:
            rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3].copy()
        feats = json.loads(truth.read_text())["features"]
        xy = np.asarray([f["geometry"]["coordinates"] for f in feats], np.float64)
        out["cell"][split] = _patches(rgb, xy, n, rng)
        out["tissue"][split] = _patches(rgb, _tissue_points(rgb, 2 * n, rng), n, rng)
    return out


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties half (Mann–Whitney)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _train_auc(real: dict, syn: dict, epochs: int, seed: int) -> float:
    """Train a small CNN real (0) vs synthetic (1) on the train patches; test ROC AUC."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(2)

    def tensors(split: str):
        a, b = real[split], syn[split]
        n = min(len(a), len(b))
        x = np.concatenate([a[:n], b[:n]]).astype(np.float32) / 255.0
        y = np.concatenate([np.zeros(n), np.ones(n)]).astype(np.float32)
        return torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y)

    xtr, ytr = tensors("train")
    xte, yte = tensors("test")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            xb = xtr[idx]
            if torch.rand(1, generator=gen).item() < 0.5:
                xb = xb.flip(3)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xb)[:, 0], ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        score = torch.cat([net(xte[i:i + 256])[:, 0] for i in range(0, len(xte), 256)])
    return roc_auc(yte.numpy(), score.numpy())


def od_stats(patches: np.ndarray, glass: np.ndarray) -> dict[str, float]:
    """H and E amounts (reference Ruifrok–Johnston vectors) of tissue pixels: mean, SD, p5,
    p50, p95."""
    od = optical_density(patches.reshape(-1, 3), glass)
    od = od[od.sum(-1) > 0.15]
    conc = concentrations(od, reference_stains())
    out = {}
    for k, stain in ((0, "H"), (1, "E")):
        c = conc[:, k]
        p5, p50, p95 = np.percentile(c, [5, 50, 95])
        out.update({f"{stain} mean": c.mean(), f"{stain} SD": c.std(), f"{stain} p5": p5,
                    f"{stain} p50": p50, f"{stain} p95": p95})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=400, help="per source and split")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    print("real backgrounds and hybrid cells:", flush=True)
    real = _real_and_hybrid(args.patches, rng, args.seed)
    pool = {kind: {s: np.concatenate(real[kind][s]) for s in ("train", "test")}
            for kind in ("real_cell", "hybrid_cell", "real_tissue")}
    n_syn = 3 * args.patches
    rows, od_rows = [], []
    glass_real = np.median(np.stack(list(real["glass"].values())), axis=0)
    od_rows.append(("real (CMU + bm_graz + crchisto)", od_stats(pool["real_cell"]["test"],
                                                                glass_real)))
    with tempfile.TemporaryDirectory(prefix="bench-realism-") as tmp:
        for style in ("v1", "v2"):
            print(f"synthetic {style}:", flush=True)
            syn = _synthetic(style, n_syn, rng, Path(tmp))
            for kind in ("cell", "tissue"):
                auc = _train_auc(pool[f"real_{kind}"], syn[kind], args.epochs, args.seed)
                rows.append((style, kind, auc, len(syn[kind]["train"]), len(syn[kind]["test"])))
                print(f"  {style} {kind}: AUC {auc:.3f}", flush=True)
            glass = glass_intensity(np.concatenate(syn["tissue"]["test"]))
            od_rows.append((f"synth {style}", od_stats(syn["cell"]["test"], glass)))
    auc = _train_auc(pool["real_cell"], pool["hybrid_cell"], args.epochs, args.seed)
    rows.append(("hybrid", "cell", auc, len(pool["hybrid_cell"]["train"]),
                 len(pool["hybrid_cell"]["test"])))
    print(f"  hybrid cell: AUC {auc:.3f}", flush=True)
    od_rows.append(("hybrid (synthetic cells only)", od_stats(pool["hybrid_cell"]["test"],
                                                              glass_real)))
    seconds = time.perf_counter() - t_start
    lines = [f"Real-vs-synthetic patch classifier (3-layer CNN, {args.epochs} epochs, 64×64 px "
             f"at {MPP} µm/px, seed {args.seed}); test ROC AUC on held-apart patches "
             "(0.5 = indistinguishable). Real: CMU slide (top half train, bottom test), "
             "bm_graz (even/odd tiles), crchisto (train/validation), "
             f"{args.patches} patches per source and split; v1/v2: 4096² px slides, seed 101 "
             "train, 202 test; hybrid: 400 synthetic cells/mm² in the same real backgrounds, "
             f"split like them. Total {seconds:.0f} s.\n",
             "| synthetic mode | patches | AUC | synthetic train / test patches |",
             "| --- | --- | ---: | ---: |"]
    lines += [f"| {m} | {k}-centred | {a:.3f} | {ntr} / {nte} |" if k == "cell" else
              f"| {m} | random tissue | {a:.3f} | {ntr} / {nte} |" for m, k, a, ntr, nte in rows]
    keys = list(od_rows[0][1])
    lines += ["", "Optical density of the tissue pixels of the test cell patches (H, E amounts; "
              "Ruifrok–Johnston vectors, each image's own glass):", "",
              "| set | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
    lines += [f"| {name} | " + " | ".join(f"{st[k]:.3f}" for k in keys) + " |"
              for name, st in od_rows]
    print("\n".join(lines))
    if not args.no_record:
        append_section("Realism gap (real vs synthetic patches)", lines)


if __name__ == "__main__":
    main()
