r"""Reproduce the shipped models: ``models/cellclf-he-v2/`` (the default; ``--recipe v2``: synthetic
slides plus hybrid slides, synthetic targets rendered into real tissue that may train a shipped
model) and its predecessor ``models/cellclf-synth-he-v1/`` (``--recipe v1``, synthetic only).

The v2 command, fine-tuning v1 (2-core CPU: about 30 minutes; needs ../shared/data):
    python scripts/make_shipped_model.py --recipe v2 --hybrid-train cmu,os1 \
        --name cellclf-he-v2 --out models/cellclf-he-v2 --work runs/ship-v2 --train-slides 8 --eval-slides 4 \
        --cal-slides 16 --size-um 2048 --epochs 7 --backbone regnet_y_400mf --v2-slides 4 \
        --hybrid-seeds 4 --workers 2 data.max_other_ratio=3 train.balance=none \
        train.batch_size=128 train.num_workers=2 train.patience=4 \
        train.init=models/cellclf-synth-he-v1
Hybrid backgrounds (``hybrid_backgrounds``): training and calibration use tissue that does not
overlap; each calibration background is used once (its real nuclei are not repeated).

v1:

Renders training slides (seeds 1000+, a mix of 0.25 and 0.5 µm/px, TIFF and SVS, difficulty
spread around 0.3), trains with configs/train.yaml, evaluates on unseen slides (seeds 5000+; the
test fixtures use seeds < 100) and writes the bundle with fp16 weights (small enough to commit),
its card saying plainly that it is a synthetic-data demo, not a clinical model.

Full run (GPU recommended; the lead runs it):
    python scripts/make_shipped_model.py --train-slides 24 --eval-slides 6 --size-um 2048
Tiny end-to-end check (CPU, about a minute):
    python scripts/make_shipped_model.py --tiny --out /tmp/ship --work /tmp/ship-work
Recalibrate the shipped weights only (no training; model.pt stays byte-identical), e.g. after a
change to the gate — what produced the committed card (CPU, about 5 minutes):
    python scripts/make_shipped_model.py --skip-train --train-slides 16 --eval-slides 4 \
        --cal-slides 8 --size-um 2048 --epochs 6 --backbone regnet_y_400mf --work runs/ship-work \
        data.max_other_ratio=3 train.balance=none train.batch_size=128 train.num_workers=2 \
        train.patience=4
The gate is fitted with α = 0.01 per class and the miss bound β = 0.01 per target class (δ = 0.05
over all 7 statements); EVALUATION.md gets the gate table and the counts after review.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
TRAIN_SEED0, CAL_SEED0, EVAL_SEED0 = 1000, 3000, 5000
V2_STYLE_SEED0, HYBRID_TRAIN_SEED0, HYBRID_CAL_SEED0 = 1100, 1500, 3500
HYBRID_PER_MM2 = 1500.0      # synthetic targets per mm² of real tissue (a dense hotspot)
BM_GRAZ_CAL_TILES = ("BM_GRAZ_HE_0007_01", "BM_GRAZ_HE_0008_01", "BM_GRAZ_HE_0020_01")
CMU_SPLIT_Y = 2000           # CMU rows above: training backgrounds; below: calibration
REAL_TISSUE_TERMS = {        # what the v2 recipe's real backgrounds are and the terms they carry
    "CMU-1-Small-Region.svs": "H&E skin, Carnegie Mellon University via OpenSlide test data; CC0 1.0",
    "bm_graz": "bone-marrow trephine H&E, Kainz et al., MICCAI 2015 (cite); Apache-2.0; "
               "calibration backgrounds (training ones only with --hybrid-train ...,bmgraz)",
    "OS-1-detail.ome.tif": "H&E tumour crop of OpenSlide test slide OS-1.ndpi; 'free to use and "
                           "distribute, with or without modification'",
    "not used": "crchisto, cpm15 (research/evaluation only), pbc (licence unverified), the TCGA "
                "slide (no explicit licence)",
}


def render_set(out: Path, n: int, seed0: int, size_um: float, difficulty: float,
               workers: int, jitter: float = 0.1, style: str = "v1") -> None:
    """n slides, alternating 0.25 µm/px TIFF and 0.5 µm/px SVS, difficulty ±jitter around the mean."""
    import numpy as np

    from cellclf.synth import render_slide

    rng = np.random.default_rng(seed0)
    for i in range(n):
        mpp, fmt = (0.25, "tiff") if i % 2 == 0 else (0.5, "svs")
        side = int(round(size_um / mpp))
        diff = float(np.clip(difficulty + rng.uniform(-jitter, jitter), 0.0, 1.0))
        name = f"synth-{seed0 + i:05d}" + ("" if style == "v1" else f"-{style}")
        if (out / f"{name}.geojson").is_file():
            continue  # resumable: keep slides rendered by an earlier run
        render_slide(out, side, side, mpp=mpp, seed=seed0 + i, difficulty=round(diff, 3),
                     fmt=fmt, name=name, workers=workers, style=style)
        print(f"rendered {name} ({side}² px at {mpp} µm/px, difficulty {diff:.2f})", flush=True)


def _tile_folder(out: Path, images: list[Path], points_csv: Path | None) -> Path:
    """A background tile folder holding ``images`` (links) and their rows of ``points_csv``."""
    import csv

    (out / "images").mkdir(parents=True, exist_ok=True)
    stems = {p.stem for p in images}
    for p in images:
        link = out / "images" / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    if points_csv is not None:
        with points_csv.open(newline="") as f, (out / "points.csv").open("w", newline="") as g:
            rows = csv.DictReader(f)
            w = csv.DictWriter(g, fieldnames=rows.fieldnames)
            w.writeheader()
            w.writerows(r for r in rows if r["image"] in stems)
    return out


def hybrid_backgrounds(shared: Path, work: Path) -> dict[str, list[tuple[str, Path, dict]]]:
    """Real tissue the v2 model may learn from (licences in the card), split into training and
    calibration backgrounds that share no tissue: the CC0 CMU skin slide (rows above / below
    CMU_SPLIT_Y), bm_graz bone marrow (Apache-2.0; 8 tiles / 3 tiles of other patients) and the
    OpenSlide OS-1 tumour crop ("free to use and distribute"; top / bottom half)."""
    import numpy as np
    import tifffile
    from PIL import Image

    cmu = shared / "wsi" / "CMU-1-Small-Region.svs"
    bm = shared / "real" / "bm_graz"
    for need in (cmu, bm / "points.csv", shared / "wsi" / "OS-1-detail.ome.tif"):
        if not need.exists():
            raise SystemExit(f"{need} is missing: the v2 recipe needs ../shared/data beside the "
                             "repository (pass --shared DIR)")
    tiles = sorted((bm / "images").glob("*.jpg"))
    bm_train = _tile_folder(work / "bg" / "bm_graz_train",
                            [p for p in tiles if p.stem not in BM_GRAZ_CAL_TILES],
                            bm / "points.csv")
    bm_cal = [_tile_folder(work / "bg" / f"bm_graz_cal_{p.stem}", [p], bm / "points.csv")
              for p in tiles if p.stem in BM_GRAZ_CAL_TILES]
    os1 = np.asarray(tifffile.imread(shared / "wsi" / "OS-1-detail.ome.tif"))
    half = os1.shape[0] // 2
    os1_dirs = []
    for part, rgb in (("top", os1[:half]), ("bottom", os1[half:])):
        d = work / "bg" / f"os1_{part}" / "images"
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "os1.png").is_file():
            Image.fromarray(rgb).save(d / "os1.png")
        os1_dirs.append(d.parent)
    from cellclf.wsi.slide import Slide

    with Slide(cmu) as slide:
        w, h = slide.width, slide.height
    return {
        "train": [("cmu", cmu, {"region": (0, 0, w, CMU_SPLIT_Y)}),
                  ("bmgraz", bm_train, {"background_mpp": 0.26}),
                  ("os1", os1_dirs[0], {"background_mpp": 0.227})],
        "cal": [("cmu-left", cmu, {"region": (0, CMU_SPLIT_Y, w // 2, h - CMU_SPLIT_Y)}),
                ("cmu-right", cmu, {"region": (w // 2, CMU_SPLIT_Y, w - w // 2, h - CMU_SPLIT_Y)}),
                *[(f"bmgraz-{d.name[-7:]}", d, {"background_mpp": 0.26}) for d in bm_cal],
                ("os1", os1_dirs[1], {"background_mpp": 0.227})],
    }


def render_hybrid_set(out: Path, backgrounds: list[tuple[str, Path, dict]], seeds_each: int,
                      seed0: int, difficulty: float) -> None:
    """``seeds_each`` hybrid slides per background (new synthetic cells each seed)."""
    from cellclf.synth.hybrid import render_hybrid

    seed = seed0
    for label, path, kw in backgrounds:
        for _ in range(seeds_each):
            name = f"hybrid-{label}-{seed:05d}"
            if not (out / f"{name}.geojson").is_file():
                res = render_hybrid(out, path, seed=seed, difficulty=difficulty,
                                    per_mm2=HYBRID_PER_MM2, name=name, **kw)
                print(f"rendered {name}: {res.n_synthetic} synthetic cells, {res.n_real} real "
                      f"nuclei ({res.nucleus_source})", flush=True)
            seed += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "models" / "cellclf-synth-he-v1")
    ap.add_argument("--name", default="cellclf-synth-he-v1", help="model name in the card")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "ship-work",
                    help="where slides, crop cache, logs and the evaluation go (not committed)")
    ap.add_argument("--train-slides", type=int, default=24)
    ap.add_argument("--eval-slides", type=int, default=6)
    ap.add_argument("--cal-slides", type=int, default=8,
                    help="calibration slides (seeds 3000+, never trained on) for the gate")
    ap.add_argument("--skip-train", action="store_true",
                    help="reuse WORK/run from an earlier run (calibrate, export, evaluate only)")
    ap.add_argument("--size-um", type=float, default=2048.0, help="side of each slide in µm")
    ap.add_argument("--difficulty", type=float, default=0.3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "train.yaml")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.01, help="gate: error bound per class")
    ap.add_argument("--beta", type=float, default=0.01,
                    help="gate: miss bound per target class (share auto-accepted as other); 0 = off")
    ap.add_argument("--no-int8", action="store_true",
                    help="skip model.int8.onnx (int8 export with its own gate, on the cal slides)")
    ap.add_argument("--recipe", choices=("v1", "v2"), default="v1",
                    help="v1: synthetic slides only; v2: adds --v2-slides of the v2 renderer and "
                         "hybrid slides (synthetic targets in real tissue: CMU, bm_graz, OS-1) "
                         "to training and calibration")
    ap.add_argument("--v2-slides", type=int, default=4, help="v2 recipe: v2-style slides")
    ap.add_argument("--hybrid-seeds", type=int, default=6,
                    help="v2 recipe: hybrid training slides per real background")
    ap.add_argument("--hybrid-train", default="cmu,os1",
                    help="v2 recipe: which real backgrounds the hybrid training slides use "
                         "(comma-separated of cmu, bmgraz, os1). bmgraz is left out by default: "
                         "marrow is full of real granulocytes, and labelled `other` they taught "
                         "the model to auto-accept real eosinophils and neutrophils as `other` "
                         "(docs/shipped-model.md)")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data",
                    help="the shared data folder (v2 recipe: real backgrounds)")
    ap.add_argument("--tiny", action="store_true",
                    help="a quick CPU check: 2+1 small slides, 1 epoch, train-tiny.yaml")
    ap.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    a = ap.parse_args(argv)

    from cellclf.card import HYBRID_NOTICE, SYNTHETIC_NOTICE, load_card, save_card
    from cellclf.evaluation.evaluate import evaluate
    from cellclf.model.config import load_config
    from cellclf.model.training import fit

    if a.tiny:
        a.train_slides, a.eval_slides, a.cal_slides, a.size_um, a.epochs = 2, 1, 1, 384.0, 1
        a.config = REPO / "configs" / "train-tiny.yaml"
    train_dir, eval_dir = a.work / "train", a.work / "eval"
    render_set(train_dir, a.train_slides, TRAIN_SEED0, a.size_um, a.difficulty, a.workers)
    render_set(eval_dir, a.eval_slides, EVAL_SEED0, a.size_um, a.difficulty, a.workers, jitter=0.0)
    cal_dir = a.work / "cal"
    render_set(cal_dir, a.cal_slides, CAL_SEED0, a.size_um, a.difficulty, a.workers, jitter=0.0)
    if a.recipe == "v2":
        render_set(train_dir, a.v2_slides, V2_STYLE_SEED0, a.size_um, a.difficulty, a.workers,
                   style="v2")
        backgrounds = hybrid_backgrounds(a.shared, a.work)
        chosen = set(a.hybrid_train.split(","))
        unknown = chosen - {label for label, _, _ in backgrounds["train"]}
        if unknown:
            raise SystemExit(f"--hybrid-train: unknown backgrounds {sorted(unknown)}; choose from "
                             "cmu, bmgraz, os1")
        render_hybrid_set(train_dir, [b for b in backgrounds["train"] if b[0] in chosen],
                          a.hybrid_seeds, HYBRID_TRAIN_SEED0, a.difficulty)
        render_hybrid_set(cal_dir, backgrounds["cal"], 1, HYBRID_CAL_SEED0, a.difficulty)

    name = a.name
    notice = HYBRID_NOTICE if a.recipe == "v2" else SYNTHETIC_NOTICE
    cfg = load_config(a.config, [f"model.name={name}", f"model.backbone={a.backbone}",
                                 f"train.epochs={a.epochs}", "train.save_ckpt=false",
                                 *a.overrides])
    run_dir = a.work / "run"
    if not a.skip_train:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        fit(cfg, train_dir, run_dir, cache_dir=a.work / "cache", notice=notice,
            weights_dtype="float16")
    from cellclf.calibration.bundle_gate import calibrate_bundle
    from cellclf.evaluation.gate_metrics import gate_report_md
    from cellclf.model.onnx_export import export_onnx

    if not (run_dir / "model.onnx").is_file():
        export_onnx(run_dir)  # calibrate_bundle re-exports it with the fitted temperature
    calibrate_bundle(run_dir, cal_dir, workers=a.workers, progress=not a.tiny, alpha=a.alpha,
                     beta=a.beta if a.beta > 0 else None)
    if load_card(run_dir).name != name:  # a run trained under another name (the report shows it)
        save_card(load_card(run_dir).replace(name=name), run_dir)
    _, metrics = evaluate(run_dir, eval_dir, a.work / "eval-out", workers=a.workers,
                          progress=not a.tiny)
    card = load_card(run_dir)
    test = {k: metrics[k] for k in ("macro_f1", "balanced_accuracy", "accuracy", "per_class",
                                    "n", "n_slides")}
    test["count_error_mean_abs"] = metrics["count_error"]["mean_abs"]
    test["detection_recall"] = metrics["detection"]["recall"]
    test["eval_seeds"] = [EVAL_SEED0 + i for i in range(a.eval_slides)]
    test["note"] = "on unseen synthetic slides (cellclf evaluate); macro_f1 etc. are ungated"
    for key in ("ece_before", "ece_after", "gate", "no_gate"):
        if key in metrics:
            test[key] = metrics[key]
    if "counts_after_review" in metrics:
        test["counts_after_review"] = {k: v for k, v in metrics["counts_after_review"].items()
                                       if k != "per_slide"}
    args = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--skip-train"]
    training = {**card.training, "train_seeds": [TRAIN_SEED0 + i for i in range(a.train_slides)],
                "slide_size_um": a.size_um, "difficulty": a.difficulty, "recipe": a.recipe,
                **({"real_tissue": REAL_TISSUE_TERMS} if a.recipe == "v2" else {}),
                "reproduce": "python scripts/make_shipped_model.py " + " ".join(args)}
    card = card.replace(name=name, metrics={**card.metrics, "synthetic_test": test},
                        training=training, description=notice,
                        intended_use=notice)
    save_card(card, run_dir)
    a.out.mkdir(parents=True, exist_ok=True)
    for f in ("card.json", card.weights_file):
        shutil.copyfile(run_dir / f, a.out / f)
    export_onnx(a.out)  # the ONNX metadata carries the final card; card.json gets its sha256
    if not a.no_int8:
        from cellclf.calibration.int8 import export_int8

        export_int8(a.out, data=cal_dir, quant_data=train_dir, workers=a.workers,
                    progress=not a.tiny)
    report = (a.work / "eval-out" / "report.md").read_text()
    (a.out / "EVALUATION.md").write_text(report.rstrip("\n") + "\n\n"
                                         + gate_report_md(metrics, card.gate or {}))
    for f in ("confusion.png", "reliability.png", "risk_coverage.png"):
        if (a.work / "eval-out" / f).is_file():
            shutil.copyfile(a.work / "eval-out" / f, a.out / f)
    size_mb = sum(f.stat().st_size for f in a.out.iterdir()) / 1e6
    print(json.dumps({"bundle": str(a.out), "size_mb": round(size_mb, 1),
                      "val_macro_f1": (card.metrics.get("val") or {}).get("macro_f1"),
                      "test_macro_f1": test["macro_f1"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
