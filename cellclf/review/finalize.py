"""Final per-slide counts: machine-accepted cells plus the pathologists' labels of queued cells.

Data flow: ``results/<slide_id>/summary.json`` (written by :mod:`cellclf.outputs.results`, with
``counts: {class: {accepted, review, total}}``) + review store → the same summary with a ``final``
section, rewritten atomically → ``report.html`` rebuilt by :func:`cellclf.outputs.report.write_report`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cellclf.errors import AnnotationError
from cellclf.outputs.atomic import atomic_write_json
from cellclf.outputs.clinical_call import calls_after_review
from cellclf.outputs.report import write_report
from cellclf.review.store import CANT_TELL, FinalLabel, ReviewStore, ReviewStoreError, open_store


def final_section(counts: dict[str, dict[str, int]], finals: Sequence[FinalLabel],
                  updated_at: str) -> dict[str, Any]:
    """The ``final`` block of a summary (pure).

    ``counts[c] = accepted[c] + cells reviewed as c``; ``reviewed`` = cells with a class label,
    ``cant_tell`` = cells labelled "can't tell", ``pending`` = queued cells without an agreed
    label (not yet labelled or reviewers disagree). When the summary says more cells went to
    review than the store holds, the missing ones count as pending.
    """
    reviewed_as: dict[str, int] = {}
    n_cant = n_pending = 0
    for f in finals:
        if f.status != "done":
            n_pending += 1
        elif f.label == CANT_TELL:
            n_cant += 1
        else:
            reviewed_as[f.label] = reviewed_as.get(f.label, 0) + 1  # type: ignore[index]
    reviewed = sum(reviewed_as.values())
    to_review = sum(int(c.get("review", 0)) for c in counts.values())
    pending = max(n_pending, to_review - reviewed - n_cant)
    names = list(counts) + [c for c in reviewed_as if c not in counts]
    final_counts = {c: int(counts.get(c, {}).get("accepted", 0)) + reviewed_as.get(c, 0)
                    for c in names}
    return {"counts": final_counts, "reviewed": reviewed, "pending": pending,
            "cant_tell": n_cant, "reviewed_as": reviewed_as, "complete": pending == 0,
            "updated_at": updated_at}


def _update_clinical_call(slide_dir: Path, summary: dict[str, Any],
                          finals: Sequence[FinalLabel]) -> None:
    """Recompute the clinical call with the agreed labels (the call at inference time is kept
    as ``clinical_call_at_inference``); needs the slide's cells.parquet."""
    cells_path = slide_dir / "cells.parquet"
    if not summary.get("clinical_call") or not cells_path.is_file():
        return
    import pyarrow.parquet as pq

    cells = pq.read_table(cells_path, columns=["cell_id", "x", "y", "class",
                                                "decision"]).to_pydict()
    done = {f.cell_id: f.label for f in finals if f.status == "done" and f.label}
    summary.setdefault("clinical_call_at_inference", summary["clinical_call"])
    summary["clinical_call"] = calls_after_review(summary, cells, done)


def finalize_results(store: ReviewStore | str, results_dir: str | Path,
                     report: bool = True) -> dict[str, dict[str, Any]]:
    """Add ``final`` to every ``results_dir/<slide_id>/summary.json``; returns them by slide id.

    ``report``: rebuild each slide's ``report.html`` with :func:`cellclf.outputs.report.write_report`.
    """
    st = open_store(store)
    root = Path(results_dir)
    if not root.is_dir():
        raise ReviewStoreError(f"results folder {root} does not exist; give the --out folder of "
                               "`cellclf infer`")
    summaries = sorted(p for p in root.glob("*/summary.json") if not p.parent.name.startswith("."))
    if not summaries:
        raise ReviewStoreError(f"no <slide>/summary.json under {root}; is this the output folder "
                               "of `cellclf infer`?")
    known = set(st.slides())
    checked = []  # every slide checked before any file is written
    for path in summaries:
        try:
            summary = json.loads(path.read_text())
            counts = summary["counts"]
            sent = sum(int(c.get("review", 0)) for c in counts.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AnnotationError(f"{path}: not a cellclf summary ({exc}); re-run `cellclf infer` "
                                  "for this slide") from exc
        slide_id = str(summary.get("slide_id") or path.parent.name)
        finals = st.final_labels(slide_id) if slide_id in known else []
        if sent != len(finals):  # another run's store (or another run's results)
            raise ReviewStoreError(
                f"{path}: {sent} cells of slide {slide_id} went to review but the store "
                f"{st.url} holds {len(finals)} for it: give the review store of the same "
                "`cellclf infer` run (by default RESULTS/review.sqlite); nothing was written")
        checked.append((path, summary, slide_id, finals))
    out: dict[str, dict[str, Any]] = {}
    for path, summary, slide_id, finals in checked:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        summary["final"] = final_section(summary["counts"], finals, now)
        _update_clinical_call(path.parent, summary, finals)
        atomic_write_json(path, summary)
        if report:
            write_report(path.parent)
        out[slide_id] = summary["final"]
    return out
