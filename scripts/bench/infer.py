"""The whole job against the pipeline it wraps, side by side: `run_slide` alone and `cellclf infer`
(run_batch: run_slide + cells.parquet / cells.geojson / summary / overlay / report + the gated and
audited cells with their JPEG views in the SQLite review store) on the same synthetic 40× slide,
with onnxruntime fp32 and int8, each run in a fresh process (peak RSS per run), ``--rounds``
rounds with the runs interleaved; min / median seconds, cells/s and the job / run_slide ratio of
each round. ``--profile`` samples one more whole-job run with py-spy (all threads, active samples
only) and prints where the time goes.

    python scripts/bench/infer.py --width 20480 --height 20480 --rounds 3 --profile
    python scripts/bench/infer.py --width 100000 --height 80000 --rounds 1 --runs infer:fp32
    python scripts/bench/infer.py --base-src /tmp/main-tree --runs base/infer:fp32,infer:fp32
        # before/after in one run: base/KIND runs a `git archive` of another commit
    python scripts/bench/infer.py --child infer:fp32 --slide S.tif --out DIR   # one run (JSON)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, append_section  # noqa: E402

MODEL = REPO / "models" / "cellclf-synth-he-v1"
RUNS = ("run_slide:fp32", "infer:fp32", "run_slide:int8", "infer:int8")


def child(kind: str, slide: Path, out: Path, model: Path, backend: str = "onnx") -> dict:
    """One run in this process: ``run_slide:PREC`` or ``infer:PREC``; seconds include loading the
    engine (run_batch loads it too). ``CELLCLF_BENCH_SRC``: the cellclf source tree to run (a
    baseline checkout, for before/after in one run); default this checkout."""
    sys.path.insert(0, os.environ.get("CELLCLF_BENCH_SRC") or str(REPO))
    from cellclf.model.engine import load_engine
    from cellclf.pipeline.batch import run_batch
    from cellclf.pipeline.run_slide import run_slide

    what, precision = kind.split(":")
    shutil.rmtree(out, ignore_errors=True)
    spy = _start_py_spy(Path(os.environ["CELLCLF_BENCH_PYSPY"])) \
        if os.environ.get("CELLCLF_BENCH_PYSPY") else None
    t0, cpu0 = time.perf_counter(), _cpu_s()
    if what == "run_slide":
        engine = load_engine(model, backend=backend, precision=precision)
        result = run_slide(slide, engine, engine.card, slide_id=slide.stem)
        cells, queued, timings = result.n_cells, int((~result.accept).sum()), result.timings_s
    else:
        from rich.console import Console

        report = run_batch([str(slide)], model, out, backend=backend, precision=precision,
                           console=Console(stderr=True, quiet=True))
        if report.exit_code:
            raise SystemExit(f"infer failed: see {out / 'manifest.csv'}")
        summary = json.loads((out / slide.stem / "summary.json").read_text())
        cells = summary["n_cells"]
        queued = sum(v["review"] for v in summary["counts"].values())
        timings = summary["timings_s"]
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    if spy is not None:  # SIGINT: py-spy writes its file and exits
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "seconds": wall, "cpu_s": cpu, "cells": cells, "queued": queued,
            "peak_rss_mb": peak_mb, "timings": {k: round(v, 2) for k, v in timings.items()}}


def _cpu_s() -> float:
    """CPU seconds of this process, every thread."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _start_py_spy(output: Path) -> subprocess.Popen:
    """py-spy sampling this process (every thread, running samples only) from now on: the
    profile covers the timed run, not the imports before it."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    proc = subprocess.Popen([spy, "record", "--threads", "--rate", "50", "--format", "raw",
                             "--output", str(output), "--pid", str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the clock starts
    return proc


def run_child(kind: str, slide: Path, out: Path, model: Path, profile: Path | None = None,
              base: Path | None = None, backend: str = "onnx") -> dict:
    """``kind`` in a fresh process; a ``base/`` prefix runs the source tree ``base`` instead."""
    src = None
    if kind.startswith("base/"):
        if base is None:
            raise SystemExit(f"{kind}: pass --base-src DIR (a checkout of the baseline commit)")
        kind, src = kind.removeprefix("base/"), str(base)
    cmd = [sys.executable, __file__, "--child", kind, "--slide", str(slide), "--out", str(out),
           "--model", str(model), "--backend", backend]
    env = {**os.environ, **({"CELLCLF_BENCH_PYSPY": str(profile)} if profile else {}),
           **({"CELLCLF_BENCH_SRC": src, "PYTHONPATH": src} if src else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])


WAITING = "thread pools waiting (locks, queues)"
# where a sample's time goes: the first category (in this order) with a frame of the stack
# containing one of its markers ("function (path" as py-spy writes frames)
CATEGORIES = (
    ("importing modules", ("_find_and_load",)),
    ("classify: onnxruntime Session.run", ("Session.run (",)),
    ("review views: JPEG encode", ("jpeg_bytes (",)),
    ("review store: SQL inserts", ("ReviewStore.add_items (", "ReviewStore._add_chunk (")),
    ("review items: build (Python)", ("review_items (", "_send_for_review (")),
    ("slide guard + stain sample", ("cellclf/gate/slide_guard.py", "cellclf/detect/stain.py",
                                    "tissue_sample (")),
    ("tissue mask + thumbnails", ("cellclf/wsi/tissue.py", "overlay_thumbnail (")),
    ("read tiles: decode + reduce + assemble", ("cellclf/wsi/tile_reader.py",
                                                "cellclf/wsi/jpeg_tiles.py")),
    ("detect cells", ("cellclf/detect/",)),
    ("cut crops", ("cut_crops (",)),
    ("gate + conformal + audit", ("cellclf/gate/",)),
    ("outputs: parquet", ("write_cells_parquet (",)),
    ("outputs: geojson", ("write_cells_geojson (",)),
    ("outputs: overlay + report + summary", ("write_overlay (", "write_report (",
                                             "build_summary (")),
    ("engine + store setup", ("load_engine (", "open_store (", "ReviewStore.__init__ (")),
    (WAITING, ("Condition.wait (", "_worker (", "Event.wait (",
                                              "Queue.get (")),
)


def profile_table(raw: Path) -> tuple[list[str], int]:
    """py-spy raw stacks → (markdown rows: share of active samples per category of work and per
    thread), total samples."""
    by_cat: collections.Counter[str] = collections.Counter()
    by_thread: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0].split("): ", 1)[1] if "): " in frames[0] else "(unnamed)"
        by_thread[thread.rstrip("_0123456789").rstrip("-")] += n
        body = frames[1:]
        cat = next((c for c, marks in CATEGORIES if any(m in f for f in body for m in marks)),
                   "other Python" if body else "native / no Python frame")
        if cat == WAITING and not any(
                m in body[-1] for m in CATEGORIES[-1][1]):
            cat = "other Python"  # a waiting frame that is not the innermost one
        by_cat[cat] += n
        total += n
    waiting = by_cat.pop(WAITING, 0)
    busy = max(1, total - waiting)
    rows = ["| where (py-spy, all threads; idle pool threads left out) | share of busy samples |",
            "| --- | ---: |"]
    rows += [f"| {k} | {100 * v / busy:.1f} % |" for k, v in by_cat.most_common()]
    rows += [f"\nBusy samples {busy} of {total} ({WAITING}: {waiting}; py-spy counts a thread "
             "blocked in a pool's queue as running).\n",
             "| thread (busy and waiting samples) | share of all samples |", "| --- | ---: |"]
    rows += [f"| {k} | {100 * v / total:.1f} % |" for k, v in by_thread.most_common()]
    return rows, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=20480)
    ap.add_argument("--height", type=int, default=20480)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", default=",".join(RUNS),
                    help="comma list of " + ", ".join(RUNS) + " (base/KIND: the --base-src tree)")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cellclf-bench-e2e"))
    ap.add_argument("--backend", default="onnx",
                    help="onnx (default: the CPU deployment) or auto (torch on CUDA on a GPU "
                         "machine); int8 runs need onnx")
    ap.add_argument("--profile", action="store_true", help="one more infer:fp32 run under py-spy")
    ap.add_argument("--base-src", type=Path,
                    help="a baseline source tree (git archive of a commit): runs named base/KIND "
                         "run it, side by side with this checkout")
    ap.add_argument("--note", default="", help="a sentence added to the recorded section")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.slide, a.out, a.model, a.backend)))
        return 0

    sys.path.insert(0, str(REPO))
    from cellclf.synth import render_slide

    a.work.mkdir(parents=True, exist_ok=True)
    name = f"e2e_{a.width}x{a.height}"
    slide = a.work / f"{name}.tif"
    if not slide.exists():
        render_slide(a.work, a.width, a.height, mpp=0.25, seed=77, difficulty=0.3, name=name,
                     progress=True)
    with slide.open("rb") as fh:  # page cache warm for every run alike
        while fh.read(1 << 24):
            pass
    kinds = [k.strip() for k in a.runs.split(",") if k.strip()]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    loads = []
    for r in range(a.rounds):
        for kind in kinds:
            res = run_child(kind, slide, a.work / f"out-{kind.replace(':', '-').replace('/', '-')}",
                            a.model, base=a.base_src, backend=a.backend)
            res["load"] = os.getloadavg()[0]
            loads.append(res["load"])
            results[kind].append(res)
            print(f"round {r + 1} {kind}: {res['seconds']:.2f} s (CPU {res['cpu_s']:.1f} s), "
                  f"{res['cells']} cells, "
                  f"{res['cells'] / res['seconds']:,.0f} cells/s, {res['queued']} to review, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB, load {res['load']:.1f}; "
                  f"{res['timings']}", flush=True)
    prof_rows: list[str] = []
    if a.profile:
        raw = a.work / "infer-fp32.pyspy.txt"
        res = run_child("infer:fp32", slide, a.work / "out-profiled", a.model, profile=raw,
                        backend=a.backend)
        prof_rows, total = profile_table(raw)
        print(f"profiled infer:fp32 run: {res['seconds']:.2f} s, {total} active samples at 50/s")
        print("\n".join(prof_rows))

    table = ["| run | min s | median s | cells | cells/s (median) | CPU ms per cell | to review | "
             "peak RSS MB (max) | load avg |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, rs in results.items():
        secs = [x["seconds"] for x in rs]
        med = statistics.median(secs)
        table.append(f"| {kind} | {min(secs):.2f} | {med:.2f} | {rs[0]['cells']} | "
                     f"{rs[0]['cells'] / med:,.0f} | "
                     f"{1e3 * statistics.median(x['cpu_s'] for x in rs) / rs[0]['cells']:.2f} | "
                     f"{rs[0]['queued']} | "
                     f"{max(x['peak_rss_mb'] for x in rs):.0f} | "
                     f"{min(x['load'] for x in rs):.1f}–{max(x['load'] for x in rs):.1f} |")
    ratios = []
    for pre in ("", "base/"):
        for prec in ("fp32", "int8"):
            job, pipe = results.get(f"{pre}infer:{prec}"), results.get(f"{pre}run_slide:{prec}")
            if job and pipe:
                per_round = [j["seconds"] / p["seconds"] for j, p in zip(job, pipe, strict=True)]
                ratios.append(f"{pre}{prec}: " + ", ".join(f"{x:.2f}" for x in per_round)
                              + f" (median {statistics.median(per_round):.2f})")
    print("\n".join(table))
    if ratios:
        print("infer / run_slide per round:", "; ".join(ratios))
    if not a.no_record:
        gp = a.width * a.height / 1e9
        lines = [f"Synthetic slide {a.width}×{a.height} px at 0.25 µm/px ({gp:.2f} GP, "
                 f"`cellclf synth` seed 77, d 0.3), model {a.model.name}, backend {a.backend}; each "
                 f"run a fresh process (seconds include loading the engine), {a.rounds} round(s), "
                 "runs interleaved. run_slide = the pipeline alone (no review callback, no files); "
                 "infer = `cellclf infer` (run_batch): outputs + SQLite review store. Command: "
                 f"`python scripts/bench/infer.py --width {a.width} --height {a.height} "
                 f"--rounds {a.rounds} --runs {','.join(kinds)}{' --profile' if a.profile else ''}"
                 f"{'' if a.backend == 'onnx' else ' --backend ' + a.backend}"
                 "`." + (f" {a.note}" if a.note else "") + "\n", *table]
        if ratios:
            lines.append("\ninfer / run_slide, each round side by side: " + "; ".join(ratios))
        first = next(iter(results.values()))[0]
        lines.append(f"\nStage timings of the first {first['kind']} run (s): {first['timings']}")
        if prof_rows:
            lines += ["\nWhere the whole job's time goes (py-spy, infer:fp32, all threads, "
                      "samples of running threads at 50 Hz):\n", *prof_rows]
        append_section("Whole job vs pipeline (cellclf infer vs run_slide)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
