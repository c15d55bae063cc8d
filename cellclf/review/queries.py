"""Read-only views of the review store: the queue, history, progress, votes, final labels, audit.

Mixed into :class:`cellclf.review.store.ReviewStore`; used by the web app's queue and admin pages,
by :mod:`cellclf.review.label_export` and :mod:`cellclf.review.finalize`. Writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cellclf.review import schema as S
from cellclf.review.types import FinalLabel, Item, consensus


class StoreQueries:
    """Queries over the queue and the audit; needs ``_tx``, ``_item``, ``clock`` and
    ``required_reviews`` from the store."""

    required_reviews: int
    classes: list[str]
    clock: Callable[[], float]
    _tx: Callable[..., AbstractContextManager[Connection]]
    _item: Callable[..., Item]

    def queue(self, slide_id: str | None = None, predicted: str | None = None,
              limit: int = 50, offset: int = 0) -> list[Item]:
        """Cells still needing labels, most doubtful first (for the queue page)."""
        q = (sa.select(S.items).where(S.items.c.needs_review == 1)
             .order_by(S.items.c.priority.desc(), S.items.c.id).limit(limit).offset(offset))
        if slide_id is not None:
            q = q.where(S.items.c.slide_id == slide_id)
        if predicted is not None:  # blind cells never show up under a class filter
            q = q.where(S.items.c.predicted == predicted, S.items.c.blind == 0)
        with self._tx() as c:
            return [self._item(r) for r in c.execute(q)]

    def slides(self) -> list[str]:
        with self._tx() as c:
            q = sa.select(S.items.c.slide_id).distinct().order_by(S.items.c.slide_id)
            return list(c.execute(q).scalars())

    def history(self, reviewer: str, limit: int = 100) -> list[Item]:
        """Cells ``reviewer`` labelled, most recent first, with their current label."""
        L = S.labels
        latest = (sa.select(L.c.item_id, sa.func.max(L.c.id).label("last_id"))
                  .where(L.c.reviewer == reviewer).group_by(L.c.item_id).subquery())
        q = (sa.select(S.items, L.c.label.label("my_label"))
             .select_from(latest.join(L, L.c.id == latest.c.last_id)
                          .join(S.items, S.items.c.id == latest.c.item_id))
             .where(L.c.label.is_not(None)).order_by(latest.c.last_id.desc()).limit(limit))
        with self._tx() as c:
            return [self._item(r, r.my_label) for r in c.execute(q)]

    def progress(self, slide_id: str | None = None,
                 predicted: str | None = None) -> dict[str, int]:
        """``{total, done, pending, claimed}`` for one slide or the whole store, optionally only
        the cells predicted as ``predicted`` (the reviewer's filter).

        Three index range counts rather than one scan, so it stays cheap with 10⁵ queued cells.
        """
        it = S.items
        scope = [it.c.slide_id == slide_id] if slide_id is not None else []
        if predicted is not None:
            scope += [it.c.predicted == predicted, it.c.blind == 0]
        count = sa.select(sa.func.count()).select_from(it)
        # Held cells are few: read them through the claimed_by index (`> ''` is a range SQLite
        # can use; `needs_review + 0` keeps the planner off the much larger queue index).
        held = sa.select(it.c.slide_id, it.c.predicted, it.c.blind).where(
            it.c.claimed_by > "", (it.c.needs_review + 0) == 1, it.c.lease_until >= self.clock())
        with self._tx() as c:
            total = c.execute(count.where(*scope)).scalar_one()
            done = c.execute(count.where(*scope, it.c.needs_review == 0)).scalar_one()
            claimed = sum((slide_id is None or s == slide_id)
                          and (predicted is None or (p == predicted and not b))
                          for s, p, b in c.execute(held).all())
        return {"total": int(total), "done": int(done), "pending": int(total) - int(done),
                "claimed": int(claimed)}

    def item_keys(self) -> list[tuple[str, int, str]]:
        """``(slide_id, cell_id, reason)`` of every queued cell, labelled or not."""
        it = S.items
        with self._tx() as c:
            return [(r[0], int(r[1]), r[2]) for r in
                    c.execute(sa.select(it.c.slide_id, it.c.cell_id, it.c.reason))]

    def progress_by_slide(self) -> list[dict[str, Any]]:
        it = S.items
        done = sa.func.sum(sa.case((it.c.needs_review == 0, 1), else_=0))
        q = (sa.select(it.c.slide_id, sa.func.count(), done).group_by(it.c.slide_id)
             .order_by(it.c.slide_id))
        with self._tx() as c:
            return [{"slide_id": s, "total": int(t), "done": int(d or 0),
                     "pending": int(t) - int(d or 0)} for s, t, d in c.execute(q)]

    def current_votes(self, slide_id: str | None = None) -> dict[int, dict[str, str]]:
        """``{item_id: {reviewer: current label}}`` (reviewers whose label is set)."""
        L = S.labels
        latest = sa.select(sa.func.max(L.c.id).label("last_id")).group_by(L.c.item_id,
                                                                          L.c.reviewer)
        if slide_id is not None:
            latest = latest.where(L.c.item_id.in_(
                sa.select(S.items.c.id).where(S.items.c.slide_id == slide_id)))
        sub = latest.subquery()
        q = (sa.select(L.c.item_id, L.c.reviewer, L.c.label)
             .join(sub, L.c.id == sub.c.last_id).where(L.c.label.is_not(None)))
        out: dict[int, dict[str, str]] = {}
        with self._tx() as c:
            for item_id, reviewer, label in c.execute(q):
                out.setdefault(item_id, {})[reviewer] = label
        return out

    def final_labels(self, slide_id: str, include_audit: bool = False) -> list[FinalLabel]:
        """Every queued cell of ``slide_id`` with its review outcome (see :func:`consensus`).

        Audit items (auto-accepted cells sampled for the running audit) are already counted as
        accepted; they are left out unless ``include_audit``."""
        votes = self.current_votes(slide_id)
        q = sa.select(S.items).where(S.items.c.slide_id == slide_id)
        if not include_audit:
            q = q.where(S.items.c.audit == 0)
        with self._tx() as c:
            rows = c.execute(q.order_by(S.items.c.cell_id)).all()
        out = []
        for r in rows:
            v = votes.get(r.id, {})
            label, status = consensus(list(v.values()), self.required_reviews)
            out.append(FinalLabel(r.id, r.slide_id, r.cell_id, r.x, r.y, r.predicted, label,
                                  status, v))
        return out

    def audited_cells(self, site: str | None = None) -> list[dict[str, Any]]:
        """The running audit's cells with their review outcome: ``slide_id``, ``site``,
        ``predicted`` and ``label``/``status`` (from :func:`consensus`); ``site`` filters."""
        it = S.items
        q = sa.select(it.c.id, it.c.slide_id, it.c.site, it.c.predicted).where(it.c.audit == 1)
        if site is not None:
            q = q.where(it.c.site == site)
        votes = self.current_votes()
        with self._tx() as c:
            rows = c.execute(q.order_by(it.c.id)).all()
        out = []
        for r in rows:
            label, status = consensus(list(votes.get(r.id, {}).values()), self.required_reviews)
            out.append({"slide_id": r.slide_id, "site": r.site, "predicted": r.predicted,
                        "label": label, "status": status})
        return out

    def labelled_cells(self) -> list[dict[str, Any]]:
        """Every queued cell with an agreed class label (status done, not can't-tell): its
        slide, stored probabilities, label and whether it was an audit item — the data path for
        refitting the gate from review (audit cells stand for the auto-accepted cells, weight
        1 / audit rate; gated cells for themselves)."""
        import json

        it = S.items
        votes = self.current_votes()
        with self._tx() as c:
            rows = c.execute(sa.select(it.c.id, it.c.slide_id, it.c.probs, it.c.audit,
                                       it.c.site).order_by(it.c.id)).all()
        out = []
        for r in rows:
            label, status = consensus(list(votes.get(r.id, {}).values()), self.required_reviews)
            if status == "done" and label in (self.classes or []):
                out.append({"slide_id": r.slide_id, "probs": json.loads(r.probs),
                            "label": label, "audit": bool(r.audit), "site": r.site})
        return out

    def first_answers(self, site: str | None = None) -> list[dict[str, Any]]:
        """Each reviewer's first answer per cell: ``reviewer``, ``label``, ``predicted``,
        ``blind`` (answered without seeing the model; None before schema v3) and ``audit``."""
        L, it = S.labels, S.items
        first = (sa.select(sa.func.min(L.c.id).label("id")).where(L.c.action == "label")
                 .group_by(L.c.item_id, L.c.reviewer).subquery())
        q = (sa.select(L.c.reviewer, L.c.label, L.c.blind, it.c.predicted, it.c.audit)
             .select_from(first.join(L, L.c.id == first.c.id).join(it, it.c.id == L.c.item_id)))
        if site is not None:
            q = q.where(it.c.site == site)
        with self._tx() as c:
            return [{"reviewer": r.reviewer, "label": r.label, "predicted": r.predicted,
                     "blind": None if r.blind is None else bool(r.blind),
                     "audit": bool(r.audit)} for r in c.execute(q)]

    def audit(self, reviewer: str | None = None) -> list[dict[str, Any]]:
        """All audit rows (oldest first), optionally for one reviewer."""
        q = sa.select(S.labels).order_by(S.labels.c.id)
        if reviewer is not None:
            q = q.where(S.labels.c.reviewer == reviewer)
        with self._tx() as c:
            return [dict(r._mapping) for r in c.execute(q)]
