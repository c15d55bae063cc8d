"""Benchmark the classify step. CPU rows: torch eager fp32, onnxruntime fp32 (the bundle's
``model.onnx``, the default export) and onnxruntime int8 (``model.int8.onnx``, when the card has an
``int8`` section), each in cells/s with its ratio to torch eager at the same batch, measured side by
side in one run: the engines take turns pass by pass, best pass kept, so a load change on a shared
machine hits all of them alike. On a CUDA machine also torch bf16 (host→device copies included) vs
that model's pure forward ceiling (inputs already on the GPU).

    python scripts/bench/classify.py [--model models/cellclf-synth-he-v1] [--batch 256] [--n 4096]
                                     [--threads 0] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, append_section  # noqa: E402


def timed(fn, crops, repeats: int) -> float:
    fn(crops[: min(len(crops), 256)])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(crops)
        best = min(best, time.perf_counter() - t0)
    return len(crops) / best


def timed_side_by_side(fns: dict, crops, repeats: int) -> dict:
    """cells/s of each function, best of ``repeats`` passes, the functions taking turns."""
    for fn in fns.values():
        fn(crops[: min(len(crops), 256)])  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(crops)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: len(crops) / t for name, t in best.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cellclf-synth-he-v1")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n", type=int, default=4096, help="crops per timed pass")
    ap.add_argument("--gpu-batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch and onnxruntime (0 = their defaults)")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()

    import numpy as np
    import torch

    from cellclf.card import load_card
    from cellclf.model.engine import OnnxEngine, TorchEngine

    card = load_card(a.model)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (a.n, card.crop_px, card.crop_px, 3), dtype=np.uint8)
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    rows = []
    engines = {"torch eager, CPU fp32": TorchEngine(a.model, device="cpu", batch=a.batch),
               "onnxruntime, CPU fp32": OnnxEngine(a.model, device="cpu", batch=a.batch,
                                                   threads=a.threads)}
    if card.get("int8"):
        engines["onnxruntime, CPU int8"] = OnnxEngine(a.model, device="cpu", batch=a.batch,
                                                      precision="int8", threads=a.threads)
    else:
        print(f"{a.model} has no int8 model (cellclf export --int8): no int8 row")
    rates = timed_side_by_side({k: e.classify for k, e in engines.items()}, crops, a.repeats)
    t_cpu = rates["torch eager, CPU fp32"]
    rows += [(name, a.batch, rate, rate / t_cpu) for name, rate in rates.items()]
    if torch.cuda.is_available():
        tg = TorchEngine(a.model, device="cuda", batch=a.gpu_batch)
        g_crops = np.concatenate([crops] * max(1, (8 * a.gpu_batch) // len(crops)))
        with_copies = timed(tg.classify, g_crops, a.repeats)
        x = torch.from_numpy(g_crops[: a.gpu_batch]).cuda()
        model = tg.model

        def forward(_):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _i in range(8):
                    model(x)
            torch.cuda.synchronize()

        ceiling = timed(forward, g_crops[: 8 * a.gpu_batch], a.repeats)
        rows.append(("torch bf16, CUDA, pure forward (ceiling)", a.gpu_batch, ceiling, None))
        rows.append(("torch bf16, CUDA, classify() incl. H2D copies", a.gpu_batch, with_copies,
                     with_copies / ceiling))
    arch = card.architecture.get("backbone")
    print(f"{arch}, {card.crop_px}² crops, torch threads {threads}")
    for name, b, rate, ratio in rows:
        print(f"{name:48s} batch {b:5d} {rate:10,.0f} cells/s  ratio {f'{ratio:.2f}' if ratio else '-'}")
    if not a.no_record:
        lines = [f"Model {a.model.name} ({arch}, {card.crop_px}² uint8 crops), {a.n} random crops "
                 f"per pass, best of {a.repeats} (CPU engines taking turns); torch CPU threads {threads}. "
                 "Ratio: CPU rows vs torch eager CPU at the same batch; the GPU row vs the "
                 "pure-forward ceiling.\n",
                 "| backend | batch | cells/s | ratio |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {n} | {b} | {r:,.0f} | {'' if q is None else f'{q:.2f}'} |"
                  for n, b, r, q in rows]
        append_section("Classify", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
