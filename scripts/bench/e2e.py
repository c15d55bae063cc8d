"""End-to-end slide benchmark: seconds per slide and cells/s for `run_slide` on a synthetic 40×
slide, against the decode floor (every tissue tile read and decoded, nothing else) measured on the
same machine in the same run; GPU utilisation sampled with nvidia-smi when present.

    python scripts/bench/e2e.py --width 100000 --height 80000      # the 8-gigapixel target (GPU)
    python scripts/bench/e2e.py --width 16000 --height 12000        # a CPU-sized run
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, append_section  # noqa: E402


class GpuSampler(threading.Thread):
    """Mean GPU utilisation (%) from nvidia-smi every 0.2 s while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True,
                                     text=True, timeout=5).stdout.split()
                self.samples.append(float(out[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            time.sleep(0.2)

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def _device_decode_floor(reader, tiles: list, engine, per_batch: int) -> float | None:
    """Seconds to decode every tile window on the GPU (None without CUDA or a readable level)."""
    if getattr(engine, "backend", "") != "torch" or engine.device.type != "cuda":
        return None
    import torch

    from cellclf.pipeline.device_stage import consecutive_batches
    from cellclf.wsi.device_decode import DeviceTileReader, device_readable, plan_key

    if not device_readable(reader, tiles):
        return None
    with DeviceTileReader(reader, engine.device, io_workers=reader.workers) as dr:
        batches = list(consecutive_batches(tiles, per_batch, lambda t: plan_key(reader, t)))
        dr.read_batch(batches[0])  # warm-up (nvJPEG handles)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for batch in batches:
            dr.read_batch(batch)
        torch.cuda.synchronize()
        return time.perf_counter() - t0


def _warm_up(engine, card: dict) -> None:
    """First calls pay for lazy CUDA/cuDNN initialisation: make them before the clocks start."""
    import numpy as np

    crop = int(card["crop_px"])
    engine.classify(np.full((64, crop, crop, 3), 200, np.uint8))
    if getattr(engine, "backend", "") == "torch" and engine.device.type == "cuda":
        from cellclf.detect.classical_torch import TorchDetector

        TorchDetector(device=engine.device).detect([np.full((600, 600, 3), 220, np.uint8)],
                                                   float(card["mpp"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=16000)
    ap.add_argument("--height", type=int, default=12000)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cellclf-synth-he-v1")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cellclf-bench-e2e"))
    ap.add_argument("--stage", default="auto", choices=("auto", "device", "host"),
                    help="where detect/crop/classify run (auto: the device for torch on CUDA)")
    ap.add_argument("--tiles-per-batch", type=int, default=8)
    ap.add_argument("--device-decode", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--compare-decode", action="store_true",
                    help="also run with the tiles decoded on the CPU (device stage)")
    ap.add_argument("--profile", action="store_true",
                    help="profile the first run (cProfile, calling thread) and print the top entries")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()

    from cellclf.card import load_card
    from cellclf.model.engine import load_engine
    from cellclf.pipeline.run_slide import RunParams, run_slide
    from cellclf.synth import render_slide
    from cellclf.wsi.slide import Slide
    from cellclf.wsi.tile_reader import TileReader
    from cellclf.wsi.tiling import tile_grid
    from cellclf.wsi.tissue import tissue_mask, tissue_thumbnail_px

    name = f"e2e_{a.width}x{a.height}"
    slide = a.work / f"{name}.tif"
    t0 = time.perf_counter()
    if not slide.exists():
        render_slide(a.work, a.width, a.height, mpp=0.25, seed=77, difficulty=0.3, name=name,
                     workers=a.workers, progress=True)
    t_render = time.perf_counter() - t0
    card = load_card(a.model)
    engine = load_engine(a.model, backend=a.backend, device=a.device)
    _warm_up(engine, card)
    # decode floor: read every tissue tile at the model's mpp, as the pipeline does, nothing else
    reader = TileReader(slide, card["mpp"], workers=a.workers)
    with Slide(slide) as s:
        small, small_ds = reader.thumbnail(tissue_thumbnail_px(s.width, s.height, s.mpp))
        tiles = tile_grid(s.width, s.height, s.mpp, card["mpp"], 512.0, 30.0,
                          tissue_mask(small, small_ds, s.mpp))
    t0 = time.perf_counter()
    mp = 0.0
    for _, rgb in reader.iter_tiles(tiles):
        mp += rgb.shape[0] * rgb.shape[1] / 1e6
    t_floor = time.perf_counter() - t0
    t_gpu_floor = _device_decode_floor(reader, tiles, engine, a.tiles_per_batch)
    reader.close()
    runs = [("run_slide", a.device_decode)]
    if a.compare_decode and t_gpu_floor is not None:
        runs.append(("run_slide, tiles decoded on the CPU", "off"))
    rows, results = [], []
    for label, decode in runs:
        sampler = GpuSampler() if shutil.which("nvidia-smi") else None
        if sampler:
            sampler.start()
        t0 = time.perf_counter()
        params = RunParams(workers=a.workers, stage=a.stage, tiles_per_batch=a.tiles_per_batch,
                           device_decode=decode)
        if a.profile and not results:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            result = prof.runcall(run_slide, slide, engine, card, slide_id=name, params=params)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        else:
            result = run_slide(slide, engine, card, slide_id=name, params=params)
        t_run = time.perf_counter() - t0
        if sampler:
            sampler.stop.set()
        gpu = sampler.mean() if sampler else None
        results.append(result)
        cells = result.n_cells
        label = f"{label} (stage {result.extra['stage']}, decode on {result.extra['decode']})"
        rows.append(f"| {label} | {t_run:.2f} | {cells / t_run:,.0f} | {t_run / t_floor:.2f} | "
                    f"{'n/a' if gpu is None else f'{gpu:.0f}%'} |")
        print(f"{label}: {t_run:.2f} s ({t_run / t_floor:.2f}× CPU decode floor); {cells} cells, "
              f"{cells / t_run:,.0f} cells/s; GPU util {gpu if gpu is None else round(gpu)}%")
        print("  stage timings:", {k: round(v, 2) for k, v in result.timings_s.items()})
    gp = a.width * a.height / 1e9
    print(f"slide {a.width}×{a.height} ({gp:.2f} GP at 0.25 µm/px), {len(tiles)} tiles, "
          f"{mp:.0f} MP read at {card['mpp']} µm/px; rendered in {t_render:.1f} s; CPU decode floor "
          f"{t_floor:.2f} s; device decode floor {t_gpu_floor}")
    if not a.no_record:
        result = results[0]
        lines = [f"Synthetic slide {a.width}×{a.height} px at 0.25 µm/px ({gp:.2f} GP), "
                 f"{len(tiles)} tissue tiles read at {card['mpp']} µm/px ({mp:.0f} MP), rendered by "
                 f"`cellclf synth` in {t_render:.0f} s ({'cached' if t_render < 1 else 'this run'}); "
                 f"model {a.model.name}, backend {engine.backend}, {a.tiles_per_batch} tiles per "
                 f"device batch, reader workers {a.workers or 'all'}; {result.n_cells} cells found.\n",
                 "| what | seconds | cells/s | × CPU decode floor | GPU util |",
                 "| --- | ---: | ---: | ---: | ---: |",
                 f"| CPU decode floor (read + decode + resize all tissue tiles, reader threads) | "
                 f"{t_floor:.2f} | | 1.00 | |"]
        if t_gpu_floor is not None:
            lines.append(f"| device decode floor (JPEG bytes → nvJPEG → windows at the working mpp) "
                         f"| {t_gpu_floor:.2f} | | {t_gpu_floor / t_floor:.2f} | |")
        lines += rows
        lines += [f"\nStage timings (s), first run: "
                  f"{({k: round(v, 2) for k, v in result.timings_s.items()})}"]
        append_section("End to end", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
