"""Are two `cellclf infer` output folders the same job's answer? Compares, slide by slide, every
column of cells.parquet, summary.json's counts / gate / audit / clinical call, and the review
store's items (every column but the row id and created_at) and images (crop and context bytes).
Exit 0 when identical, 1 with the differences listed.

    python scripts/bench/same_outputs.py OUT_BEFORE OUT_AFTER
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

SUMMARY_KEYS = ("n_cells", "counts", "per_mm2", "peak_hpf", "gate", "audit", "clinical_call")
VOLATILE = {"id", "created_at"}


def parquet_diff(a: Path, b: Path) -> list[str]:
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    if ta.schema != tb.schema:
        return [f"{a.parent.name}: cells.parquet schemas differ"]
    return [f"{a.parent.name}: cells.parquet column {name} differs" for name in ta.column_names
            if not ta.column(name).equals(tb.column(name))]


def summary_diff(a: Path, b: Path) -> list[str]:
    sa, sb = json.loads(a.read_text()), json.loads(b.read_text())
    return [f"{a.parent.name}: summary.json {k} differs" for k in SUMMARY_KEYS
            if sa.get(k) != sb.get(k)]


def store_rows(db: Path, table: str) -> tuple[list[str], list[tuple]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        cols = [r[1] for r in con.execute(f"PRAGMA table_info({table})")
                if r[1] not in VOLATILE]
        rows = con.execute(f"SELECT {', '.join(cols)} FROM {table} "
                           "ORDER BY slide_id, cell_id").fetchall()
    return cols, rows


def store_diff(a: Path, b: Path) -> list[str]:
    out = []
    for table in ("items", "images"):
        (ca, ra), (cb, rb) = store_rows(a, table), store_rows(b, table)
        if ca != cb:
            out.append(f"review store: {table} columns differ")
        elif len(ra) != len(rb):
            out.append(f"review store: {table} has {len(ra)} vs {len(rb)} rows")
        else:
            bad = {ca[k] for x, y in zip(ra, rb, strict=True) for k in range(len(ca))
                   if x[k] != y[k]}
            out += [f"review store: {table}.{c} differs" for c in sorted(bad)]
    return out


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    slides = sorted(p.name for p in a.iterdir() if (p / "summary.json").exists())
    if not slides:
        print(f"{a}: no slide results")
        return 2
    diffs = []
    for s in slides:
        if not (b / s / "summary.json").exists():
            diffs.append(f"{s}: missing in {b}")
            continue
        diffs += parquet_diff(a / s / "cells.parquet", b / s / "cells.parquet")
        diffs += summary_diff(a / s / "summary.json", b / s / "summary.json")
    diffs += store_diff(a / "review.sqlite", b / "review.sqlite")
    _, items = store_rows(a / "review.sqlite", "items")
    print(f"{len(slides)} slide(s), {len(items)} review items compared: "
          + ("identical" if not diffs else "DIFFERENT"))
    for d in diffs:
        print("  " + d)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
