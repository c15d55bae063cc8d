"""The main job end to end: `cellclf infer` (run_batch) on synthetic 40× slides with the shipped model
and the default SQLite review store, as a lab would run it: per-slide seconds, cells/s, cells queued,
what the outputs weigh. Unlike `e2e.py` it includes writing cells.parquet / cells.geojson / report and
the gated cells' crops (PNG) into the review store.

    python scripts/bench/infer.py --width 100000 --height 80000          # one 8-GP slide (GPU)
    python scripts/bench/infer.py --width 16000 --height 12000 --slides 2  # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, append_section  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=16000)
    ap.add_argument("--height", type=int, default=12000)
    ap.add_argument("--slides", type=int, default=1)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cellclf-synth-he-v1")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cellclf-bench-e2e"))
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()

    from cellclf.pipeline.batch import run_batch
    from cellclf.synth import render_slide

    a.work.mkdir(parents=True, exist_ok=True)
    slides = []
    for k in range(a.slides):
        name = f"e2e_{a.width}x{a.height}" + (f"_{k}" if k else "")
        path = a.work / f"{name}.tif"
        if not path.exists():
            render_slide(a.work, a.width, a.height, mpp=0.25, seed=77 + k, difficulty=0.3,
                         name=name, progress=True)
        slides.append(path)
    out = a.work / "infer-out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = run_batch([str(s) for s in slides], a.model, out, backend=a.backend, device=a.device)
    wall = time.perf_counter() - t0
    import csv

    with (out / "manifest.csv").open() as fh:
        seconds = {r["slide_id"]: r["seconds"] for r in csv.DictReader(fh)}
    rows = []
    for s in slides:
        summary = json.loads((out / s.stem / "summary.json").read_text())
        counts = summary["counts"]
        total = sum(v["total"] for v in counts.values())
        queued = sum(v["review"] for v in counts.values())
        secs = seconds.get(s.stem)
        size_mb = sum(f.stat().st_size for f in (out / s.stem).iterdir()) / 1e6
        rows.append((s.stem, total, queued, secs, size_mb,
                     {k: round(v, 2) for k, v in summary["timings_s"].items()}))
    store_mb = sum(f.stat().st_size for f in out.glob("review.sqlite*")) / 1e6
    print(f"{len(slides)} slide(s) in {wall:.1f} s (exit code {report.exit_code}); review store "
          f"{store_mb:.0f} MB")
    for name, total, queued, secs, size_mb, timings in rows:
        print(f"  {name}: {total} cells, {queued} queued, {secs} s in the slide; outputs "
              f"{size_mb:.0f} MB; timings {timings}")
    if not a.no_record:
        total = sum(r[1] for r in rows)
        lines = [f"`cellclf infer` (run_batch) on {len(slides)} synthetic slide(s) of {a.width}×"
                 f"{a.height} px at 0.25 µm/px, model {a.model.name}, backend {a.backend}, "
                 f"device {a.device}, review store SQLite. Whole batch {wall:.1f} s wall, "
                 f"{total / wall:,.0f} cells/s; review store {store_mb:.0f} MB.\n",
                 "| slide | cells | queued for review | s per slide (manifest) | outputs MB |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {n} | {t} | {q} | {s} | {m:.0f} |" for n, t, q, s, m, _ in rows]
        lines += [f"\nTimings of the first slide (s): {rows[0][5]}"]
        append_section("Batch inference (cellclf infer)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
