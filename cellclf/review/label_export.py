"""Export reviewed labels as per-slide QuPath GeoJSON: the loop back from review to training.

Data flow: review store (:meth:`ReviewStore.final_labels`) → ``OUT/<slide_id>.geojson`` (Point
detections at level-0 x, y, ``classification.name`` = the reviewed label, written with
:func:`~cellclf.annotations.geojson.write_points`, which :func:`~.read_points` and the training
code read back as annotations) + ``OUT/export.json`` (what was written and what was left out).

Cells whose review is not finished (pending, or reviewers disagree) and cells labelled "can't
tell" carry no trustworthy class: they are left out, or with ``include_uncertain`` written
*unclassified* with a ``review_status`` property, so training never learns a class from them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cellclf.annotations.geojson import write_points
from cellclf.outputs.atomic import atomic_write_json
from cellclf.review.store import CANT_TELL, FinalLabel, ReviewStore, ReviewStoreError, open_store

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slide_file_stem(slide_id: str) -> str:
    """A file name for a slide id: unsafe characters become ``_``; never hidden, never ``..``.

    ``"case 7/A.svs"`` → ``"case_7_A.svs"``; ``"../x"`` → ``"_.._x"``.
    """
    stem = _SAFE.sub("_", slide_id).strip()
    if not stem or stem.startswith("."):
        stem = "_" + stem
    return stem[:200]


def _props(f: FinalLabel, status: str) -> dict[str, Any]:
    return {"measurements": {"cell_id": f.cell_id}, "cell_id": f.cell_id,
            "predicted": f.predicted, "review_status": status,
            "reviewers": sorted(f.votes), "votes": dict(sorted(f.votes.items()))}


def export_labels(store: ReviewStore | str, out_dir: str | Path,
                  include_uncertain: bool = False) -> dict[str, dict[str, Any]]:
    """Write ``out_dir/<slide>.geojson`` for every slide in the store; returns the per-slide tally.

    Tally per slide: ``{file, written, labelled, cant_tell, pending, disputed}``.
    """
    st = open_store(store)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReviewStoreError(f"cannot create export folder {out}: {exc}") from exc
    tally: dict[str, dict[str, Any]] = {}
    used: dict[str, str] = {}
    for slide_id in st.slides():
        stem = slide_file_stem(slide_id)
        if stem in used:
            raise ReviewStoreError(
                f"slides {used[stem]!r} and {slide_id!r} map to the same export file "
                f"{stem}.geojson; rename one slide id in the store")
        used[stem] = slide_id
        finals = st.final_labels(slide_id, include_audit=True)  # audit cells are labelled too
        points = []
        t = {"file": f"{stem}.geojson", "written": 0, "labelled": 0, "cant_tell": 0,
             "pending": 0, "disputed": 0}
        for f in finals:
            if f.status == "done" and f.label != CANT_TELL:
                t["labelled"] += 1
                points.append((f.x, f.y, f.label, _props(f, "done")))
                continue
            status = CANT_TELL if f.status == "done" else f.status
            t[status] += 1
            if include_uncertain:
                points.append((f.x, f.y, None, _props(f, status)))
        t["written"] = write_points(out / f"{stem}.geojson", points)
        tally[slide_id] = t
    atomic_write_json(out / "export.json", {
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "classes": st.classes, "required_reviews": st.required_reviews,
        "include_uncertain": include_uncertain, "slides": tally})
    return tally
