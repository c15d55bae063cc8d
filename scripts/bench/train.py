"""Training throughput: crops/s with the real loader (crop cache → DataLoader → augmentation).

Renders one synthetic slide (reused between runs), builds its crop cache, then times side by side:
the loader alone, a training step on a fixed in-memory batch (the compute ceiling), training fed
by the loader with albumentations on CPU workers, and training fed by the loader with
``gpu_augment`` (flips/rot90 + HED jitter in torch on the device). On CUDA it samples the GPU
utilisation during each run. Prints one table and appends it to docs/benchmarks.md with the
machine, date and commit.

    python scripts/bench/train.py --steps 20 --batch 64            # CPU, short
    python scripts/bench/train.py --steps 200 --batch 512 --workers 12   # GPU machine
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[2]




class GpuSampler:
    """Samples ``torch.cuda.utilization()`` every 0.2 s in a thread (None without CUDA)."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if self.cuda:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self) -> None:
        import torch

        while not self._stop.wait(0.2):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # no pynvml / nvidia-smi: give up quietly
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join()

    @property
    def mean(self) -> str:
        return f"{sum(self.samples) / len(self.samples):.0f}%" if self.samples else "n/a"


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_MD, append_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=2048, help="synthetic slide side, px at 0.5 µm/px")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cellclf-bench-train"))
    ap.add_argument("--no-append", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()

    import dataclasses

    import torch
    from rich.console import Console
    from rich.table import Table

    from cellclf.annotations.labelled_data import discover
    from cellclf.model.augment import gpu_augment
    from cellclf.model.config import load_config
    from cellclf.model.dataset import build_datasets
    from cellclf.model.training import CellDataModule, CellLitModule
    from cellclf.synth import render_slide

    console = Console()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slides = args.cache / "slides"
    if not (slides / "bench.geojson").is_file():
        render_slide(slides, args.size, args.size, mpp=0.5, seed=777, difficulty=0.3, name="bench")
    t0 = time.perf_counter()
    cfg = load_config(REPO / "configs" / "train.yaml",
                      ["data.val_fraction=0", f"train.batch_size={args.batch}",
                       f"train.num_workers={args.workers}", f"model.backbone={args.backbone}"])
    data = build_datasets(discover(slides), cfg, cache_dir=args.cache / "crops")
    cache_s = time.perf_counter() - t0
    n_crops = len(data.splits["train"])
    console.print(f"{n_crops} crops in the cache ({'hit' if data.cache_hits else 'built'} in "
                  f"{cache_s:.1f} s); device {dev}")

    m = cfg.model
    module = CellLitModule(m.backbone, list(data.classes), list(m.mean), list(m.std))
    model = module.model.to(dev).train()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    bf16 = dev.type == "cuda"

    def step(x: torch.Tensor, y: torch.Tensor, gpu_aug: bool) -> None:
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        if gpu_aug:
            x = gpu_augment(x)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def batches(gpu_aug: bool):
        c = cfg.replace(augment=dataclasses.replace(cfg.augment, gpu_augment=gpu_aug))
        loader = CellDataModule(data, c).train_dataloader()
        while True:
            yield from loader

    def timed(name: str, fn, n_batches: int) -> tuple[str, float, str]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with GpuSampler() as gs:
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t
        return name, n_batches * args.batch / sec, gs.mean

    results = []
    it = batches(False)
    next(it)  # start the workers
    results.append(timed("loader only (albumentations on CPU workers)",
                         lambda: [next(it) for _ in range(args.steps)], args.steps))
    fixed = next(it)
    for _ in range(max(3, args.steps // 4)):  # warm-up: the first CPU steps are several × slower
        step(*fixed, False)
    results.append(timed("train step, fixed batch (compute ceiling)",
                         lambda: [step(*fixed, False) for _ in range(args.steps)], args.steps))
    results.append(timed("train with loader, CPU augmentation",
                         lambda: [step(*next(it), False) for _ in range(args.steps)], args.steps))
    it_gpu = batches(True)
    step(*next(it_gpu), True)
    results.append(timed("train with loader, gpu_augment on the device",
                         lambda: [step(*next(it_gpu), True) for _ in range(args.steps)],
                         args.steps))
    # the ceiling again: a drift between the two says the machine was busy (shared CPUs)
    results.append(timed("train step, fixed batch (again, drift check)",
                         lambda: [step(*fixed, False) for _ in range(args.steps)], args.steps))

    ceiling = results[1][1]
    table = Table(title=f"training throughput, {args.backbone}, batch {args.batch}, "
                        f"{args.steps} steps, {args.workers} loader workers, {dev}")
    for col in ("run", "crops/s", "× ceiling", "GPU util"):
        table.add_column(col, justify="left" if col == "run" else "right")
    rows = [(n, f"{v:,.0f}", f"{v / ceiling:.2f}", g) for n, v, g in results]
    for r in rows:
        table.add_row(*r)
    console.print(table)
    if args.no_append:
        return
    append_section("Training", [
        f"torch {torch.__version__}; {args.backbone}, 64 px crops, batch {args.batch}, "
        f"{args.steps} steps per row, {args.workers} DataLoader workers, crops from the on-disk "
        f"cache ({n_crops} crops, {'bf16-mixed' if bf16 else 'fp32'}).\n",
        "| run | crops/s | × ceiling | GPU util |", "| --- | ---: | ---: | ---: |",
        *(f"| {' | '.join(r)} |" for r in rows)])
    bench = BENCH_MD
    console.print(f"appended to {bench}")


if __name__ == "__main__":
    main()
