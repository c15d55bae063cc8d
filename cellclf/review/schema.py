"""Review-store schema: table definitions, engine set-up and ordered, versioned migrations.

Sits under :mod:`cellclf.review.store` (the queue API) and :mod:`cellclf.review.auth` (accounts):
both talk to the database only through the tables defined here, with SQLAlchemy Core, so the same
code runs on SQLite (the zero-set-up default) and PostgreSQL (a lab server).

Versioning: a one-row ``schema_version`` table holds the version; :data:`MIGRATIONS` are ordered
steps ``(version, description, function)`` that each move the schema one version up inside one
transaction. :func:`migrate` applies the missing ones (under ``BEGIN IMMEDIATE`` on SQLite and an
advisory lock on PostgreSQL, so two processes opening a new store at once do not race).

Version history:
1. queue: ``meta`` (classes), ``items`` with claim/lease columns, ``images`` (PNG crops), ``labels``
   (append-only audit: reviewer, time, label, previous label).
2. accounts and double review: ``users``, ``sessions``; ``items.n_labels`` (number of reviewers
   whose current label is set, back-filled from the audit) and ``items.needs_review`` (1 while
   the cell needs more labels), ``labels.action`` / ``labels.undoes`` (undo is itself an audit
   row) and the indexes the queue (priority order per filter) and the audit lookups need.
3. running audit and blind review: ``items.audit`` (1: an auto-accepted cell sampled by
   ``cellclf infer --audit-rate``; it looks like any other item to the reviewer), ``items.blind``
   (1: the model's answer is hidden until the reviewer has answered), ``items.site`` (site or
   scanner tag for ``cellclf audit``) and ``labels.blind`` (1: this label was given without
   seeing the model's answer, 0: after seeing it, NULL: undo rows and labels from before v3).
4. native-resolution review: ``items.image_mpp`` (µm per pixel of the stored crop and context
   images) and ``items.slide_mpp`` (the slide's level-0 µm per pixel as inference read it, so the
   app can cut native-resolution views from the slide); NULL for cells queued before version 4.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cellclf.errors import CellclfError

SCHEMA_VERSION = 4


class ReviewStoreError(CellclfError):
    """The review store (database) is missing, malformed, or was given bad input."""


metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, nullable=False),
)
meta = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
items = sa.Table(
    "items", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("slide_id", sa.String(512), nullable=False),
    sa.Column("cell_id", sa.BigInteger, nullable=False),
    sa.Column("x", sa.Float, nullable=False),
    sa.Column("y", sa.Float, nullable=False),
    sa.Column("predicted", sa.String(64), nullable=False),
    sa.Column("probs", sa.Text, nullable=False),           # JSON {class: p}
    sa.Column("conformal_set", sa.Text, nullable=False),   # JSON [class, ...]
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("priority", sa.Float, nullable=False),
    sa.Column("slide_path", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),     # epoch seconds
    sa.Column("claimed_by", sa.String(128), nullable=True),
    sa.Column("lease_until", sa.Float, nullable=True),     # epoch seconds
    sa.Column("n_labels", sa.Integer, nullable=False, server_default="0"),
    sa.Column("needs_review", sa.Integer, nullable=False, server_default="1"),  # 1: in the queue
    sa.Column("audit", sa.Integer, nullable=False, server_default="0"),  # 1: audit sample
    sa.Column("blind", sa.Integer, nullable=False, server_default="0"),  # 1: model hidden first
    sa.Column("site", sa.String(128), nullable=True),                    # site / scanner tag
    sa.Column("image_mpp", sa.Float, nullable=True),       # µm/px of the stored images
    sa.Column("slide_mpp", sa.Float, nullable=True),       # the slide's level-0 µm/px
    sa.UniqueConstraint("slide_id", "cell_id", name="uq_items_slide_cell"),
)
images = sa.Table(
    "images", metadata,
    sa.Column("slide_id", sa.String(512), primary_key=True),
    sa.Column("cell_id", sa.BigInteger, primary_key=True),
    sa.Column("crop_png", sa.LargeBinary, nullable=False),
    sa.Column("context_png", sa.LargeBinary, nullable=False),
)
labels = sa.Table(
    "labels", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), nullable=False),
    sa.Column("reviewer", sa.String(128), nullable=False),
    sa.Column("at", sa.Float, nullable=False),              # epoch seconds
    sa.Column("label", sa.String(64), nullable=True),       # None: the undo restored "unlabelled"
    sa.Column("previous_label", sa.String(64), nullable=True),
    sa.Column("action", sa.String(16), nullable=False, server_default="label"),  # label | undo
    sa.Column("undoes", sa.Integer, nullable=True),         # audit id this undo row reverts
    sa.Column("blind", sa.Integer, nullable=True),          # 1: given without seeing the model
)
users = sa.Table(
    "users", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
)
sessions = sa.Table(
    "sessions", metadata,
    sa.Column("token_sha256", sa.String(64), primary_key=True),
    sa.Column("user", sa.String(128), sa.ForeignKey("users.name"), nullable=False),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)
# The queue is read in priority order among open cells; each filter has its own ordered index.
_ORDER = (items.c.needs_review, items.c.priority.desc(), items.c.id)
sa.Index("ix_items_queue", *_ORDER)
sa.Index("ix_items_slide", items.c.slide_id, *_ORDER)
sa.Index("ix_items_predicted", items.c.predicted, *_ORDER)
sa.Index("ix_items_claimed", items.c.claimed_by, *_ORDER)
sa.Index("ix_labels_item_reviewer", labels.c.item_id, labels.c.reviewer, labels.c.id)
sa.Index("ix_labels_reviewer", labels.c.reviewer, labels.c.id)


# ------------------------------------------------------------------------------ engine


def normalise_url(url: str) -> str:
    """``sqlite:///…`` / ``postgresql+psycopg://…`` unchanged; a plain path becomes a SQLite URL."""
    if "://" in url:
        if url.startswith(("postgresql://", "postgres://")):
            return "postgresql+psycopg://" + url.split("://", 1)[1]
        return url
    path = Path(url).expanduser().resolve()
    if not path.parent.is_dir():
        raise ReviewStoreError(
            f"review store {url}: folder {path.parent} does not exist; create it or give another "
            "path (or a postgresql+psycopg:// URL)")
    return f"sqlite:///{path}"


def make_engine(url: str) -> Engine:
    """An engine for the store: SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` for writes.

    A connection opened with ``execution_options(cellclf_write=True)`` begins its transaction with
    ``BEGIN IMMEDIATE`` on SQLite (the write lock is taken up front, so a read-then-write claim is
    atomic and never fails half way with "database is locked"); plain reads use ``BEGIN``.
    """
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("cellclf_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    if url.startswith("postgresql"):
        # no pre-ping (a round trip per checkout); a dropped connection invalidates the pool
        return sa.create_engine(url, pool_recycle=3600)
    raise ReviewStoreError(
        f"review store URL {url!r}: only sqlite:///PATH, a plain file path or "
        "postgresql+psycopg://USER@HOST/DB are supported")


# ------------------------------------------------------------------------------ migrations


def _v1(conn: Connection) -> None:
    """Version 1 as it shipped: queue tables without accounts or double-review columns."""
    md = sa.MetaData()
    sa.Table("meta", md, sa.Column("key", sa.String(64), primary_key=True),
             sa.Column("value", sa.Text, nullable=False))
    sa.Table(
        "items", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("slide_id", sa.String(512), nullable=False),
        sa.Column("cell_id", sa.BigInteger, nullable=False),
        sa.Column("x", sa.Float, nullable=False), sa.Column("y", sa.Float, nullable=False),
        sa.Column("predicted", sa.String(64), nullable=False),
        sa.Column("probs", sa.Text, nullable=False),
        sa.Column("conformal_set", sa.Text, nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("priority", sa.Float, nullable=False),
        sa.Column("slide_path", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("claimed_by", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=True),
        sa.UniqueConstraint("slide_id", "cell_id", name="uq_items_slide_cell"),
    )
    sa.Table(
        "images", md,
        sa.Column("slide_id", sa.String(512), primary_key=True),
        sa.Column("cell_id", sa.BigInteger, primary_key=True),
        sa.Column("crop_png", sa.LargeBinary, nullable=False),
        sa.Column("context_png", sa.LargeBinary, nullable=False),
    )
    sa.Table(
        "labels", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), nullable=False),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("label", sa.String(64), nullable=True),
        sa.Column("previous_label", sa.String(64), nullable=True),
    )
    md.create_all(conn)


def _v2(conn: Connection) -> None:
    """Accounts, sessions, double-review bookkeeping and the queue indexes."""
    users.create(conn)
    sessions.create(conn)
    conn.exec_driver_sql("ALTER TABLE items ADD COLUMN n_labels INTEGER NOT NULL DEFAULT 0")
    conn.exec_driver_sql("ALTER TABLE items ADD COLUMN needs_review INTEGER NOT NULL DEFAULT 1")
    conn.exec_driver_sql(
        "ALTER TABLE labels ADD COLUMN action VARCHAR(16) NOT NULL DEFAULT 'label'")
    conn.exec_driver_sql("ALTER TABLE labels ADD COLUMN undoes INTEGER")
    for index in (*items.indexes, *labels.indexes):
        index.create(conn)
    # Back-fill n_labels: reviewers whose latest audit row for the item carries a label.
    latest = (
        sa.select(labels.c.item_id, sa.func.max(labels.c.id).label("last_id"))
        .group_by(labels.c.item_id, labels.c.reviewer).subquery()
    )
    counts = (
        sa.select(latest.c.item_id, sa.func.count().label("n"))
        .select_from(latest.join(labels, labels.c.id == latest.c.last_id))
        .where(labels.c.label.is_not(None)).group_by(latest.c.item_id)
    )
    for item_id, n in conn.execute(counts).all():
        conn.execute(sa.update(items).where(items.c.id == item_id)
                     .values(n_labels=n, needs_review=0))  # version 1 had single review only


def _v3(conn: Connection) -> None:
    """Running audit and blind review: items.audit, items.blind, items.site, labels.blind."""
    conn.exec_driver_sql("ALTER TABLE items ADD COLUMN audit INTEGER NOT NULL DEFAULT 0")
    conn.exec_driver_sql("ALTER TABLE items ADD COLUMN blind INTEGER NOT NULL DEFAULT 0")
    conn.exec_driver_sql("ALTER TABLE items ADD COLUMN site VARCHAR(128)")
    conn.exec_driver_sql("ALTER TABLE labels ADD COLUMN blind INTEGER")
    conn.exec_driver_sql("CREATE INDEX ix_items_audit ON items (audit, predicted)")


def _v4(conn: Connection) -> None:
    """The pixel sizes the app needs for scale bars and native-resolution views."""
    conn.exec_driver_sql("ALTER TABLE items ADD COLUMN image_mpp FLOAT")
    conn.exec_driver_sql("ALTER TABLE items ADD COLUMN slide_mpp FLOAT")


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "queue, images, append-only label audit", _v1),
    (2, "accounts, sessions, double review, queue indexes", _v2),
    (3, "running audit, blind review, site tag", _v3),
    (4, "pixel sizes of the review images and of the slide", _v4),
]


def current_version(conn: Connection) -> int:
    """The schema version of the database behind ``conn`` (0 for an empty database)."""
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    row = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    return int(row or 0)


def migrate(engine: Engine, target: int = SCHEMA_VERSION) -> int:
    """Apply the missing migration steps up to ``target``, one transaction; return the version."""
    with engine.connect() as conn:
        conn = conn.execution_options(cellclf_write=True)
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(74110223)"))
            version = current_version(conn)
            if version > SCHEMA_VERSION:
                raise ReviewStoreError(
                    f"review store {engine.url.render_as_string(hide_password=True)} has schema "
                    f"version {version}, newer than this cellclf ({SCHEMA_VERSION}); upgrade cellclf")
            if version == 0:
                schema_version.create(conn)
                conn.execute(sa.insert(schema_version).values(version=0))
            for step, _description, fn in MIGRATIONS:
                if version < step <= target:
                    fn(conn)
                    conn.execute(sa.update(schema_version).values(version=step))
                    version = step
    return version
