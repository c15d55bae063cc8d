"""Stratified train / calibration / test split of the PBC blood-smear crops, as symlink folders.

``python scripts/real/pbc_split.py PBC OUT [--seed 0] [--fractions 0.3,0.5,0.2]`` writes
``OUT/{train,cal,test}/<class>/``
with one symbolic link per image (nothing is copied). Per source class (eosinophil, neutrophil,
basophil, lymphocyte, monocyte, ig, erythroblast, platelet) the images, sorted by name, are
shuffled with the seed and cut by ``--fractions`` (train, cal, test; 30 % / 50 % / 20 % by default;
``scripts/real/pbc.sh`` uses 25 / 60 / 15): the calibration split is the largest because
the gate certifies α = 0.01 at δ = 0.05 only for a class with ≥ 437 calibration cells predicted
as it (zero errors; ⌈ln(0.05/4) / ln(0.99)⌉), and the rarest target class (basophil) has 968
images in all. The source class folders are kept; training maps the non-target ones to `other`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FRACTIONS = {"train": 0.3, "cal": 0.5, "test": 0.2}
EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def split(pbc: Path, out: Path, seed: int = 0,
          fractions: dict[str, float] = FRACTIONS) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {s: {} for s in fractions}
    for k, cls_dir in enumerate(sorted(p for p in pbc.iterdir() if p.is_dir())):
        files = sorted(f for f in cls_dir.iterdir() if f.suffix.lower() in EXTS)
        order = np.random.default_rng(seed + k).permutation(len(files))
        n_train = round(fractions["train"] * len(files))
        n_cal = round(fractions["cal"] * len(files))
        parts = {"train": order[:n_train], "cal": order[n_train:n_train + n_cal],
                 "test": order[n_train + n_cal:]}
        for name, idx in parts.items():
            d = out / name / cls_dir.name
            d.mkdir(parents=True, exist_ok=True)
            for i in idx:
                link = d / files[i].name
                if not link.exists():
                    link.symlink_to(files[i].resolve())
            counts[name][cls_dir.name] = len(idx)
    (out / "split.json").write_text(json.dumps({"seed": seed, "fractions": fractions,
                                                "counts": counts}, indent=1))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pbc", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fractions", default="0.3,0.5,0.2",
                    help="train,cal,test shares per source class (default 0.3,0.5,0.2)")
    args = ap.parse_args()
    shares = [float(v) for v in args.fractions.split(",")]
    if len(shares) != 3 or min(shares) <= 0 or abs(sum(shares) - 1) > 1e-6:
        ap.error(f"--fractions needs three positive shares summing to 1, got {args.fractions!r}")
    fractions = dict(zip(FRACTIONS, shares, strict=True))
    for name, c in split(args.pbc, args.out, args.seed, fractions).items():
        print(f"{name}: {sum(c.values())} images  " + ", ".join(f"{k} {v}" for k, v in c.items()))


if __name__ == "__main__":
    main()
