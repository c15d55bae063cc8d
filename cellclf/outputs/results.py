"""Per-slide outputs: ``DIR/<slide_id>/`` with cells.parquet, cells.geojson, summary.json, overlay.png
and report.html — written into a temporary folder and renamed into place, so a killed run never
leaves a half-written result.

Sits at the end of the flow: :func:`cellclf.pipeline.run_slide.run_slide` returns a :class:`SlideResult`
(arrays, no files); this module is the only place that turns it into files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cellclf.annotations.geojson import class_color, write_features, write_points
from cellclf.card import Card
from cellclf.outputs.atomic import atomic_write_json
from cellclf.outputs.clinical_call import Rule, clinical_calls, load_rules
from cellclf.outputs.hpf import DEFAULT_HPF_AREA_MM2, density_per_mm2, peak_hpf
from cellclf.outputs.report import write_overlay, write_report
from cellclf.outputs.slide_result import SlideResult


def count_table(result: SlideResult) -> dict[str, dict[str, int]]:
    """``{class: {accepted, review, total}}`` by predicted class."""
    pred = result.pred
    out = {}
    for k, name in enumerate(result.classes):
        is_k = pred == k
        acc = int((is_k & result.accept).sum())
        tot = int(is_k.sum())
        out[name] = {"accepted": acc, "review": tot - acc, "total": tot}
    return out


def audit_summary(result: SlideResult) -> dict:
    """The slide's running-audit state: rate, and per predicted class the auto-accepted cells
    and how many of them were sent to the review queue as audit items."""
    audited = result.audited if result.audited is not None else np.zeros(result.n_cells, bool)
    pred = result.pred
    per_class = {name: {"accepted": int((result.accept & (pred == k)).sum()),
                        "audited": int((audited & (pred == k)).sum())}
                 for k, name in enumerate(result.classes)}
    return {"rate": result.audit_rate, "n_audited": int(audited.sum()), "per_class": per_class,
            "note": "audited cells are a reproducible random sample of the auto-accepted cells, "
                    "queued for review like any other; `cellclf audit --db URL` reports their "
                    "errors and the bound on the accepted error"}


def build_summary(result: SlideResult, card: Card, params: dict, versions: dict,
                  hpf_area_mm2: float = DEFAULT_HPF_AREA_MM2,
                  rules: list[Rule] | None = None) -> dict:
    counts = count_table(result)
    pred = result.pred
    per_mm2: dict[str, dict[str, float | None]] = {}
    hotspots: dict[str, dict] = {}
    for k, name in enumerate(result.classes):
        per_mm2[name] = {
            "accepted": density_per_mm2(counts[name]["accepted"], result.tissue_area_mm2),
            "total": density_per_mm2(counts[name]["total"], result.tissue_area_mm2),
        }
        if name != result.other_class:
            hotspots[name] = peak_hpf(result.xy0[pred == k], result.mpp, hpf_area_mm2).to_dict()
    reasons, reason_counts = np.unique(result.reason.astype(str), return_counts=True)
    n = result.n_cells
    calls, skipped = clinical_calls(load_rules() if rules is None else rules, result.xy0, pred,
                                    result.accept, list(result.classes), card.get("gate"),
                                    result.mpp, hpf_area_mm2)
    return {
        "slide_id": result.slide_id,
        "clinical_call": calls,
        **({"clinical_call_skipped": skipped} if skipped else {}),
        "slide": {"path": result.path, "mpp": result.mpp, "width": result.width,
                  "height": result.height, "vendor": result.vendor},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "n_cells": n,
        "counts": counts,
        "tissue_area_mm2": result.tissue_area_mm2,
        "per_mm2": per_mm2,
        "hpf_area_mm2": hpf_area_mm2,
        "peak_hpf": hotspots,
        "gate": {
            "automation_rate": float(result.accept.mean()) if n else None,
            "reasons": {str(r): int(c) for r, c in zip(reasons, reason_counts, strict=True)},
            "ood": result.ood,
        },
        "audit": audit_summary(result),
        "timings_s": result.timings_s,
        "versions": versions,
        "parameters": params,
        "model_card": card.to_dict(),
        **({"extra": result.extra} if result.extra else {}),
    }


def write_cells_parquet(path: Path, result: SlideResult, batch: int = 100_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    classes = result.classes
    pred = result.pred
    schema = pa.schema(
        [("cell_id", pa.int64()), ("x", pa.float64()), ("y", pa.float64()), ("class", pa.string())]
        + [(f"p_{c}", pa.float32()) for c in classes]
        + [("decision", pa.string()), ("reason", pa.string()), ("conformal_set", pa.string()),
           ("audit", pa.bool_())]
    )
    audited = result.audited if result.audited is not None else np.zeros(result.n_cells, bool)
    names = np.asarray(classes, dtype=object)
    with pq.ParquetWriter(path, schema) as writer:
        for s in range(0, max(result.n_cells, 1), batch):
            sl = slice(s, min(s + batch, result.n_cells))
            ids = np.arange(sl.start, sl.stop, dtype=np.int64)
            conf_sets = conformal_strings(result.conformal[sl], classes).tolist()
            cols = [pa.array(ids), pa.array(result.xy0[sl, 0]), pa.array(result.xy0[sl, 1]),
                    pa.array(names[pred[sl]].astype(str) if len(ids) else [], pa.string())]
            cols += [pa.array(result.probs[sl, k].astype(np.float32)) for k in range(len(classes))]
            cols += [pa.array(np.where(result.accept[sl], "accepted", "review").astype(str)),
                     pa.array(result.reason[sl].astype(str)), pa.array(conf_sets, pa.string()),
                     pa.array(audited[sl].astype(bool), pa.bool_())]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))


def conformal_strings(conformal: np.ndarray, classes: list[str]) -> np.ndarray:
    """Each row's conformal set as "a|b" (card order), through a table of the 2^K sets."""
    k = len(classes)
    if k > 16:
        return np.array(["|".join(c for c, m in zip(classes, row, strict=True) if m)
                         for row in conformal], dtype=object)
    table = np.array(["|".join(c for j, c in enumerate(classes) if code >> j & 1)
                      for code in range(1 << k)], dtype=object)
    return table[np.asarray(conformal, bool) @ (1 << np.arange(k))]


def write_cells_geojson(path: Path, result: SlideResult) -> int:
    """cells.geojson: one QuPath detection per cell (class, probabilities, decision, reason).
    Rendered by :func:`_cell_features`, byte for byte what :func:`write_points` writes (the
    generic path is kept for non-finite numbers, which it writes as null)."""
    if np.isfinite(result.probs).all() and np.isfinite(result.xy0).all():
        return write_features(path, _cell_features(result))
    return write_points(path, _cell_points(result))


def _cell_features(result: SlideResult) -> Iterator[str]:
    """The cells' GeoJSON features as compact JSON, formatted directly (~6× json.dumps)."""
    dumps = json.dumps
    classes = result.classes
    cls_json = [dumps({"name": c, "color": list(class_color(c))}, separators=(",", ":"))
                for c in classes]
    keys = [dumps(f"p_{c}") for c in classes]
    reasons = {r: dumps(r) for r in {str(x) for x in set(result.reason.tolist())}}
    head = '{"type":"Feature","geometry":{"type":"Point","coordinates":['
    pred = result.pred
    for s in range(0, result.n_cells, _CHUNK_CELLS):  # Python objects for a chunk at a time
        sl = slice(s, s + _CHUNK_CELLS)
        for i, (x, y, k, probs, ok, reason) in enumerate(zip(
                result.xy0[sl, 0].tolist(), result.xy0[sl, 1].tolist(), pred[sl].tolist(),
                result.probs[sl].tolist(), result.accept[sl].tolist(),
                result.reason[sl].astype(str).tolist(), strict=True), start=s):
            measurements = ",".join([f"{key}:{p!r}" for key, p in zip(keys, probs, strict=True)])
            yield (f'{head}{x!r},{y!r}]}},"properties":{{"objectType":"detection",'
                   f'"classification":{cls_json[k]},"measurements":{{{measurements},'
                   f'"cell_id":{i}}},"decision":"{"accepted" if ok else "review"}",'
                   f'"reason":{reasons[reason]}}}}}')


_CHUNK_CELLS = 16384  # cells rendered per chunk of cells.geojson (memory flat in cell count)


def _cell_points(result: SlideResult) -> Iterator[tuple]:
    """The cells as :func:`write_points` items (the generic path)."""
    classes = result.classes
    pred = result.pred

    def features():
        for i in range(result.n_cells):
            name = classes[pred[i]]
            props = {
                "measurements": {f"p_{c}": float(result.probs[i, k]) for k, c in enumerate(classes)}
                | {"cell_id": i},
                "decision": "accepted" if result.accept[i] else "review",
                "reason": str(result.reason[i]),
            }
            yield float(result.xy0[i, 0]), float(result.xy0[i, 1]), name, props

    return features()


def write_slide_results(out_dir: Path, result: SlideResult, card: Card, params: dict,
                        versions: dict, hpf_area_mm2: float = DEFAULT_HPF_AREA_MM2,
                        rules: list[Rule] | None = None) -> Path:
    """Write every output of one slide into ``out_dir/<slide_id>/`` atomically (temp dir + rename)."""
    final = Path(out_dir) / result.slide_id
    for stale in Path(out_dir).glob(f".tmp-{result.slide_id}-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(out_dir) / f".tmp-{result.slide_id}-{os.getpid()}"
    tmp.mkdir(parents=True)
    from concurrent.futures import ThreadPoolExecutor

    try:
        with ThreadPoolExecutor(3, thread_name_prefix="cellclf-write") as pool:  # pyarrow, zlib
            jobs = [pool.submit(write_cells_parquet, tmp / "cells.parquet", result),  # and numpy
                    pool.submit(write_cells_geojson, tmp / "cells.geojson", result)]  # overlap
            summary = build_summary(result, card, params, versions, hpf_area_mm2, rules)
            jobs.append(pool.submit(write_overlay, tmp / "overlay.png", result, summary))
            atomic_write_json(tmp / "summary.json", summary)
            for job in jobs:
                job.result()
        write_report(tmp)
    except BaseException:  # e.g. a full disk: no partial slide folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
