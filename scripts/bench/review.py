"""Benchmark the review queue: label round-trip latency (label → next cell) with a big queue.

Fills a SQLite review store with 100k queued cells, starts the real web app
(``cellclf review serve``) in a subprocess, logs in over HTTP and times, with httpx:
- the round trip a reviewer waits for after each key press (POST label, which returns the next
  claimed cell), ≥ 500 operations;
- fetching the next cell's two images;
- the same label + claim in-process on the store (no HTTP) for comparison.
Prints one table and appends it to docs/benchmarks.md with the machine, date and commit.
Goal (issue "Pathologist review queue"): p95 round trip ≤ 100 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cellclf.review.auth import add_user  # noqa: E402
from cellclf.review.store import ReviewItem, ReviewStore  # noqa: E402

CLASSES = ["eosinophil", "neutrophil", "mast_cell", "other"]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import commit as git_commit  # noqa: E402


def png(size: int, seed: int) -> bytes:
    """A smooth stained-looking patch: small, like the crops, so 100k cells stay ~0.5 GB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([200 + 30 * np.sin(xx / 9), 150 + 40 * np.cos(yy / 7),
                     190 + 20 * np.sin((xx + yy) / 11)], -1)
    base += rng.normal(0, 0.1, base.shape)  # faint noise keeps the PNGs small
    buf = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def fill(store: ReviewStore, n: int, crop: bytes, context: bytes) -> float:
    rng = np.random.default_rng(0)
    pri = rng.random(n)
    pred = rng.integers(0, 4, n)

    def items():
        for i in range(n):
            c = CLASSES[pred[i]]
            yield ReviewItem(f"slide_{i % 40:02d}", i, float(i % 5000), float(i // 5000), c,
                             {c: 0.6, "other" if c != "other" else "eosinophil": 0.4}, [c],
                             "low_confidence", float(pri[i]), crop, context)

    t0 = time.perf_counter()
    store.add_items(items(), batch=5000)
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q))




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=100_000, help="queued cells")
    ap.add_argument("--ops", type=int, default=600, help="timed label round trips (≥ 500)")
    ap.add_argument("--no-append", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()

    import httpx
    from rich.console import Console
    from rich.table import Table

    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="cellclf-bench-review-"))
    db = str(tmp / "review.sqlite")
    crop, context = png(64, 1), png(128, 2)
    console.print(f"[dim]crop {len(crop) / 1e3:.1f} kB, context {len(context) / 1e3:.1f} kB[/]")
    store = ReviewStore(db)
    console.print(f"[dim]filling {args.cells:,} cells …[/]")
    fill_s = fill(store, args.cells, crop, context)
    add_user(store, "bench", "bench-password")

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cellclf.cli", "review", "serve", "--db", db,
                               "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    base = f"http://127.0.0.1:{port}"
    try:
        c = httpx.Client(base_url=base, timeout=30)
        for _ in range(300):
            try:
                form = c.get("/login")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        tok = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        c.post("/login", data={"username": "bench", "password": "bench-password",
                               "csrf_token": tok})
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)
        h = {"X-CSRF-Token": csrf}
        item = c.post("/api/claim", json={}, headers=h).json()["item"]
        rt, img = [], []
        warm = 20
        for k in range(args.ops + warm):
            t0 = time.perf_counter()
            r = c.post(f"/api/items/{item['id']}/label", json={"label": CLASSES[k % 4]},
                       headers=h)
            t1 = time.perf_counter()
            r.raise_for_status()
            item = r.json()["item"]
            c.get(item["crop_url"]).raise_for_status()
            c.get(item["context_url"]).raise_for_status()
            t2 = time.perf_counter()
            if k >= warm:
                rt.append(t1 - t0)
                img.append(t2 - t1)
    finally:
        server.terminate()
        server.wait(timeout=30)

    local = []
    it = store.claim("local")
    for k in range(args.ops):
        t0 = time.perf_counter()
        store.label("local", it.id, CLASSES[k % 4])
        it = store.claim("local")
        local.append(time.perf_counter() - t0)
    prog = store.progress()
    assert prog["done"] == 2 * args.ops + warm, prog
    store.close()
    shutil.rmtree(tmp, ignore_errors=True)

    title = (f"review: label round trip with {args.cells:,} queued cells (SQLite, "
             f"`cellclf review serve`, httpx, one reviewer, sequential); {len(rt)} timed ops; "
             f"queue filled in {fill_s:.1f} s ({args.cells / fill_s:,.0f} cells/s; PNGs of "
             f"{len(crop) / 1e3:.0f} + {len(context) / 1e3:.0f} kB per cell)")
    table = Table(title=title)
    cols = ("operation", "p50 ms", "p95 ms", "p99 ms", "ops/s")
    for col in cols:
        table.add_column(col, justify="left" if col == "operation" else "right")
    rows = []
    for name, xs in [("HTTP: POST label → next cell claimed (the round trip)", rt),
                     ("HTTP: GET crop + context PNG of the next cell", img),
                     ("in-process: store.label + store.claim (no HTTP)", local)]:
        rows.append((name, f"{pct(xs, 50):.1f}", f"{pct(xs, 95):.1f}", f"{pct(xs, 99):.1f}",
                     f"{len(xs) / sum(xs):.0f}"))
        table.add_row(*rows[-1])
    console.print(table)
    ok = pct(rt, 95) <= 100
    console.print(f"goal p95 ≤ 100 ms: {'met' if ok else 'NOT met'}")
    if args.no_append:
        return
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"{platform.system()} {platform.release()}")
    lines = [f"\n## Review queue — {dt.datetime.now().isoformat(timespec='minutes')}, commit "
             f"{git_commit()}\n", f"Machine: {machine}. {title}. Goal p95 ≤ 100 ms: "
             f"{'met' if ok else 'not met'}.\n",
             "| " + " | ".join(cols) + " |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    bench = REPO / "docs" / "benchmarks.md"
    with open(bench, "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    console.print(f"appended to {bench}")


if __name__ == "__main__":
    main()
