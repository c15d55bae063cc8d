"""The review queue: the gated cells waiting for a pathologist, their claims, labels and audit.

Data flow: batch inference (``cellclf infer``) → :meth:`ReviewStore.add_items` → the web app
(:mod:`cellclf.review.app`) claims cells under a lease and records labels → :mod:`export` (training
annotations) and :mod:`finalize` (final per-slide counts) read :meth:`ReviewStore.final_labels`.

One API over SQLite (default; WAL, busy timeout, ``BEGIN IMMEDIATE`` claims) and PostgreSQL
(``SELECT … FOR UPDATE SKIP LOCKED``), through SQLAlchemy Core. Rules:
- a cell is held by at most one reviewer at a time (a lease, ``lease_s`` seconds); an expired
  lease returns the cell to the queue;
- every label is an append-only row in ``labels`` (reviewer, time, label, previous label); undo
  appends a row too; a reviewer's current label for a cell is their latest row;
- with double review (``required_reviews`` = N) a cell stays in the queue until N different
  reviewers have labelled it; nobody is served a cell twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cellclf.model.config import DEFAULT_CLASSES  # a new store's classes when none are given
from cellclf.review import schema as S
from cellclf.review.queries import StoreQueries
from cellclf.review.schema import ReviewStoreError
from cellclf.review.types import (
    CANT_TELL,
    MODES,
    NOT_A_CELL,
    REASONS,
    FinalLabel,
    Item,
    LeaseError,
    ReviewItem,
    check_class_list,
    check_item,
    consensus,
    labels_for,
)

__all__ = ["CANT_TELL", "DEFAULT_CLASSES", "NOT_A_CELL", "REASONS", "FinalLabel", "Item", "LeaseError",
           "ReviewItem", "ReviewStore", "ReviewStoreError", "consensus", "open_store"]


class ReviewStore(StoreQueries):
    """The queue database. ``url``: a path, ``sqlite:///PATH`` or ``postgresql+psycopg://…``."""

    def __init__(self, url: str, classes: Sequence[str] | None = None,
                 required_reviews: int | None = None, clock: Callable[[], float] = time.time):
        self.url = url
        self.clock = clock
        self._stmts: dict[tuple, tuple[Any, Any]] = {}
        self.engine = S.make_engine(url)
        self.dialect = self.engine.dialect.name
        try:
            S.migrate(self.engine)
        except sa.exc.DatabaseError as exc:  # locked, unreachable, or not a database at all
            raise ReviewStoreError(f"cannot open review store {url}: {exc.orig}; give the path of "
                                   "a review store (cellclf infer writes OUT/review.sqlite) or "
                                   "create one with `cellclf review init`") from exc
        with self._tx(write=True) as c:
            if self.dialect == "postgresql":  # serialise first-time set-up across processes
                c.execute(sa.text("SELECT pg_advisory_xact_lock(74110223)"))
            stored = dict(c.execute(sa.select(S.meta.c.key, S.meta.c.value)).all())
            if "classes" not in stored:
                cls = list(classes or DEFAULT_CLASSES)
                check_class_list(cls)
                c.execute(sa.insert(S.meta).values(key="classes", value=json.dumps(cls)))
                stored["classes"] = json.dumps(cls)
            if required_reviews is not None:
                if required_reviews < 1:
                    raise ReviewStoreError("required_reviews must be at least 1")
                self._set_meta(c, "required_reviews", str(int(required_reviews)))
                c.execute(sa.update(S.items).values(needs_review=sa.case(
                    (S.items.c.n_labels < int(required_reviews), 1), else_=0)))
                stored["required_reviews"] = str(required_reviews)
        self.classes: list[str] = json.loads(stored["classes"])
        if classes is not None and list(classes) != self.classes:
            raise ReviewStoreError(
                f"review store {url} holds classes {self.classes}, not {list(classes)}; use a new "
                "store for a model with other classes")
        self.required_reviews = int(stored.get("required_reviews", "1"))
        self.mode: str = stored.get("mode", "review")
        self.labels: list[str] = labels_for(self.classes, self.mode)

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if write:
                conn = conn.execution_options(cellclf_write=True)
            with conn.begin():
                yield conn

    def _set_meta(self, c: Connection, key: str, value: str) -> None:
        if c.execute(sa.select(S.meta.c.key).where(S.meta.c.key == key)).first():
            c.execute(sa.update(S.meta).where(S.meta.c.key == key).values(value=value))
        else:
            c.execute(sa.insert(S.meta).values(key=key, value=value))

    def set_mode(self, mode: str) -> None:
        """``review`` (gated cells of inference) or ``labelling`` (``cellclf label`` projects:
        cells chosen for labelling, with the extra label ``not_a_cell``)."""
        if mode not in MODES:
            raise ReviewStoreError(f"unknown review store mode {mode!r}: use one of {MODES}")
        with self._tx(write=True) as c:
            self._set_meta(c, "mode", mode)
        self.mode = mode
        self.labels = labels_for(self.classes, mode)

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    def set_classes(self, classes: Sequence[str]) -> None:
        """Set the class order of a store that holds no cells yet (no-op when unchanged)."""
        cls = list(classes)
        if cls == self.classes:
            return
        check_class_list(cls)
        with self._tx(write=True) as c:
            if c.execute(sa.select(S.items.c.id).limit(1)).first() is not None:
                raise ReviewStoreError(
                    f"review store {self.url} already holds cells for classes {self.classes}; "
                    f"use a new store for classes {cls}")
            self._set_meta(c, "classes", json.dumps(cls))
        self.classes = cls
        self.labels = labels_for(cls, self.mode)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ filling

    def add_items(self, items: Iterable[ReviewItem], batch: int = 1000) -> int:
        """Queue cells; one transaction per ``batch``; already queued cells are skipped.

        Returns the number of cells newly queued.
        """
        added = 0
        chunk: list[ReviewItem] = []
        for it in items:
            check_item(it, self.classes)
            chunk.append(it)
            if len(chunk) >= batch:
                added += self._add_chunk(chunk)
                chunk = []
        if chunk:
            added += self._add_chunk(chunk)
        return added

    def _add_chunk(self, chunk: list[ReviewItem]) -> int:
        now = self.clock()
        unique = {(it.slide_id, int(it.cell_id)): it for it in chunk}
        rows = [dict(slide_id=it.slide_id, cell_id=int(it.cell_id), x=float(it.x), y=float(it.y),
                     predicted=it.predicted, probs=json.dumps({k: float(v) for k, v in
                                                               it.probs.items()}),
                     conformal_set=json.dumps(list(it.conformal_set)), reason=it.reason,
                     priority=float(it.priority), slide_path=it.slide_path, created_at=now,
                     n_labels=0, needs_review=1, audit=int(it.audit),
                     blind=int(it.blind or it.audit), site=it.site,
                     image_mpp=_float_or_none(it.image_mpp), slide_mpp=_float_or_none(it.slide_mpp))
                for it in unique.values()]
        imgs = [dict(slide_id=it.slide_id, cell_id=int(it.cell_id), crop_png=bytes(it.crop_png),
                     context_png=bytes(it.context_image)) for it in unique.values()]
        with self._tx(write=True) as c:
            added = c.execute(self._insert(S.items).on_conflict_do_nothing(
                index_elements=["slide_id", "cell_id"]).returning(S.items.c.id), rows).all()
            c.execute(self._insert(S.images).on_conflict_do_nothing(
                index_elements=["slide_id", "cell_id"]), imgs)
            return len(added)

    # ------------------------------------------------------------------ reading

    def _item(self, row: Any, label: str | None = None) -> Item:
        return Item(id=row.id, slide_id=row.slide_id, cell_id=row.cell_id, x=row.x, y=row.y,
                    predicted=row.predicted, probs=json.loads(row.probs),
                    conformal_set=json.loads(row.conformal_set), reason=row.reason,
                    priority=row.priority, slide_path=row.slide_path, claimed_by=row.claimed_by,
                    lease_until=row.lease_until, n_labels=row.n_labels, label=label,
                    blind=bool(getattr(row, "blind", 0)),
                    image_mpp=getattr(row, "image_mpp", None),
                    slide_mpp=getattr(row, "slide_mpp", None))

    def get(self, item_id: int, reviewer: str | None = None) -> Item | None:
        """One item by id (with ``reviewer``'s current label), or None."""
        with self._tx() as c:
            row = c.execute(sa.select(S.items).where(S.items.c.id == item_id)).first()
            if row is None:
                return None
            label = self._current(c, item_id, reviewer) if reviewer else None
            return self._item(row, label)

    def image(self, item_id: int, kind: str) -> bytes | None:
        """The stored bytes (PNG or JPEG) of an item's ``crop`` or ``context`` image; None if
        missing or empty."""
        col = {"crop": S.images.c.crop_png, "context": S.images.c.context_png}[kind]
        q = (sa.select(col).select_from(S.images.join(S.items, sa.and_(
            S.items.c.slide_id == S.images.c.slide_id, S.items.c.cell_id == S.images.c.cell_id)))
            .where(S.items.c.id == item_id))
        with self._tx() as c:
            return c.execute(q).scalar() or None

    _current_q = (sa.select(S.labels.c.label)
                  .where(S.labels.c.item_id == sa.bindparam("item_id"),
                         S.labels.c.reviewer == sa.bindparam("reviewer"))
                  .order_by(S.labels.c.id.desc()).limit(1))
    _set_claim = (sa.update(S.items).where(S.items.c.id == sa.bindparam("item_id"))
                  .values(claimed_by=sa.bindparam("reviewer"),
                          lease_until=sa.bindparam("until")))
    _lock_q = sa.select(S.items).where(S.items.c.id == sa.bindparam("item_id")).with_for_update(
        of=S.items)

    _insert_label = sa.insert(S.labels)
    _update_item = sa.update(S.items).where(S.items.c.id == sa.bindparam("_id"))

    def _current(self, c: Connection, item_id: int, reviewer: str) -> str | None:
        """``reviewer``'s current label of a cell: the label of their latest audit row."""
        return c.execute(self._current_q, {"item_id": item_id, "reviewer": reviewer}).scalar()

    # ------------------------------------------------------------------ claiming

    def _claim_queries(self, slide: bool, predicted: bool, exclude: bool) -> tuple[Any, Any]:
        """(my held cell, the best free cell) statements for a filter combination, built once."""
        key = (slide, predicted, exclude, self.required_reviews)
        if key in self._stmts:
            return self._stmts[key]
        it, bp = S.items, sa.bindparam
        q = sa.select(it).where(it.c.needs_review == 1)
        if slide:
            q = q.where(it.c.slide_id == bp("slide"))
        if predicted:  # a class filter would reveal blind cells' model label: they are left out
            q = q.where(it.c.predicted == bp("predicted"), it.c.blind == 0)
        if exclude:
            q = q.where(it.c.id.not_in(bp("exclude", expanding=True)))
        order = (it.c.priority.desc(), it.c.id)
        mine = (q.where(it.c.claimed_by == bp("reviewer"), it.c.lease_until >= bp("now"))
                .order_by(*order).limit(1))
        free = q.where(sa.or_(it.c.claimed_by.is_(None), it.c.lease_until < bp("now")))
        if self.required_reviews > 1:
            # not a cell whose latest audit row by this reviewer carries a label
            l1, l2 = S.labels.alias("l1"), S.labels.alias("l2")
            later = sa.select(l2.c.id).where(l2.c.item_id == l1.c.item_id,
                                             l2.c.reviewer == bp("reviewer"), l2.c.id > l1.c.id)
            done_by_me = sa.select(l1.c.id).where(
                l1.c.item_id == it.c.id, l1.c.reviewer == bp("reviewer"),
                l1.c.label.is_not(None), ~sa.exists(later))
            free = free.where(~sa.exists(done_by_me))
        free = free.order_by(*order).limit(1).with_for_update(skip_locked=True, of=it)
        self._stmts[key] = (mine, free)
        return mine, free

    def claim(self, reviewer: str, slide_id: str | None = None, predicted: str | None = None,
              lease_s: float = 300, exclude: Iterable[int] = ()) -> Item | None:
        """Take the most doubtful free cell for ``reviewer`` under a lease; None if none is left.

        A cell the reviewer already holds (live lease) is returned first, so a reload does not
        strand it. Atomic: ``BEGIN IMMEDIATE`` on SQLite, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL.
        """
        now = self.clock()
        excl = [int(i) for i in exclude]
        mine, free = self._claim_queries(slide_id is not None, predicted is not None, bool(excl))
        params: dict[str, Any] = {"reviewer": reviewer, "now": now}
        if slide_id is not None:
            params["slide"] = slide_id
        if predicted is not None:
            params["predicted"] = predicted
        if excl:
            params["exclude"] = excl
        with self._tx(write=True) as c:
            row = c.execute(mine, params).first()
            label = self._current(c, row.id, reviewer) if row is not None else None
            if row is None:  # a free cell: by the queue rules this reviewer has no label on it
                row = c.execute(free, params).first()
            if row is None:
                return None
            c.execute(self._set_claim, {"item_id": row.id, "reviewer": reviewer,
                                        "until": now + lease_s})
        item = self._item(row, label)
        return Item(**{**item.__dict__, "claimed_by": reviewer, "lease_until": now + lease_s})

    def release(self, reviewer: str, item_id: int) -> bool:
        """Give a held cell back to the queue (e.g. the reviewer skipped it)."""
        with self._tx(write=True) as c:
            res = c.execute(sa.update(S.items).where(S.items.c.id == item_id,
                                                     S.items.c.claimed_by == reviewer)
                            .values(claimed_by=None, lease_until=None))
            return res.rowcount > 0

    # ------------------------------------------------------------------ labelling

    def _lock_item(self, c: Connection, item_id: int) -> Any:
        row = c.execute(self._lock_q, {"item_id": item_id}).first()
        if row is None:
            raise ReviewStoreError(f"review item {item_id} does not exist")
        return row

    _any_label_q = (sa.select(S.labels.c.id)
                    .where(S.labels.c.item_id == sa.bindparam("item_id"),
                           S.labels.c.reviewer == sa.bindparam("reviewer")).limit(1))

    def label(self, reviewer: str, item_id: int, label: str, lease_s: float = 0,
              blind_all: bool = False) -> int:
        """Record ``reviewer``'s label for a cell (append-only); returns the audit row id.

        Allowed when the reviewer holds the cell's lease, or corrects their own earlier label of a
        cell nobody else holds. Releases the lease (or renews it for ``lease_s`` > 0). The row's
        ``blind`` says whether the reviewer answered without having seen the model's answer: the
        cell is blind (or the app hides the model for all cells, ``blind_all``) and this is the
        reviewer's first answer on it (the answer is revealed after it).
        """
        if label not in self.labels:
            raise ReviewStoreError(f"label {label!r} is not one of {self.labels}")
        now = self.clock()
        with self._tx(write=True) as c:
            row = self._lock_item(c, item_id)
            previous = self._current(c, item_id, reviewer)
            held_by_me = row.claimed_by == reviewer and (row.lease_until or 0) >= now
            held_by_other = (row.claimed_by not in (None, reviewer)
                             and (row.lease_until or 0) >= now)
            if not held_by_me and (previous is None or held_by_other):
                who = f"held by {row.claimed_by}" if held_by_other else "not claimed by you"
                raise LeaseError(f"cell {item_id} is {who} (or your lease expired); "
                                 "claim it again from the queue")
            if previous is None and row.n_labels >= self.required_reviews:
                raise LeaseError(f"cell {item_id} already has its {self.required_reviews} "
                                 "label(s); claim another cell")
            first = c.execute(self._any_label_q, {"item_id": item_id,
                                                  "reviewer": reviewer}).first() is None
            res = c.execute(self._insert_label, dict(
                item_id=item_id, reviewer=reviewer, at=now, label=label,
                previous_label=previous, action="label", undoes=None,
                blind=int(bool(row.blind or blind_all) and first)))
            n = row.n_labels + (1 if previous is None else 0)
            keep = lease_s > 0
            c.execute(self._update_item, dict(
                _id=item_id, n_labels=n, needs_review=int(n < self.required_reviews),
                claimed_by=reviewer if keep else None,
                lease_until=now + lease_s if keep else None))
            return int(res.inserted_primary_key[0])

    def undo(self, reviewer: str, lease_s: float = 300) -> Item | None:
        """Revert ``reviewer``'s most recent label that is not yet undone (an audit row too).

        The cell's label goes back to what it was before; the cell is held again by the reviewer
        (when nobody else holds it) so the UI can show it. Returns the cell, or None if there is
        nothing to undo.
        """
        L = S.labels
        now = self.clock()
        with self._tx(write=True) as c:
            undone = sa.select(L.c.undoes).where(L.c.reviewer == reviewer, L.c.undoes.is_not(None))
            last = c.execute(sa.select(L).where(L.c.reviewer == reviewer, L.c.action == "label",
                                                L.c.id.not_in(undone))
                             .order_by(L.c.id.desc()).limit(1)).first()
            if last is None:
                return None
            row = self._lock_item(c, last.item_id)
            current = self._current(c, last.item_id, reviewer)
            restored = last.previous_label
            c.execute(sa.insert(L).values(item_id=last.item_id, reviewer=reviewer, at=now,
                                          label=restored, previous_label=current, action="undo",
                                          undoes=last.id))
            n = row.n_labels - (1 if current is not None and restored is None else 0)
            values: dict[str, Any] = {"n_labels": n,
                                      "needs_review": int(n < self.required_reviews)}
            free = row.claimed_by in (None, reviewer) or (row.lease_until or 0) < now
            if free:
                values.update(claimed_by=reviewer, lease_until=now + lease_s)
            c.execute(sa.update(S.items).where(S.items.c.id == last.item_id).values(**values))
            row = c.execute(sa.select(S.items).where(S.items.c.id == last.item_id)).first()
            return self._item(row, restored)


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def open_store(store: ReviewStore | str, classes: Sequence[str] | None = None,
               required_reviews: int | None = None) -> ReviewStore:
    """``store`` itself, or a :class:`ReviewStore` opened (created, upgraded) from a URL/path."""
    if isinstance(store, ReviewStore):
        return store
    return ReviewStore(store, classes=classes, required_reviews=required_reviews)
