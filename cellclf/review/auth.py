"""Reviewer accounts and browser sessions for the review web app.

Sits beside :mod:`cellclf.review.store` (same database, tables ``users`` and ``sessions``) and under
:mod:`cellclf.review.app`. Passwords are hashed with argon2id (argon2-cffi); a session is a random
token kept by the browser in an HttpOnly cookie and stored here only as its SHA-256, with a
per-session CSRF token that every state-changing request must echo back.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import sqlalchemy as sa

from cellclf.review import schema as S
from cellclf.review.schema import ReviewStoreError
from cellclf.review.store import ReviewStore, open_store

SESSION_S = 12 * 3600
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


@dataclass(frozen=True)
class Session:
    user: str
    is_admin: bool
    csrf: str
    expires_at: float


def _hasher():  # type: ignore[no-untyped-def]
    from argon2 import PasswordHasher

    return PasswordHasher()


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_user(store: ReviewStore | str, name: str, password: str, admin: bool = False,
             replace: bool = False) -> None:
    """Create a reviewer account (or, with ``replace``, reset its password and role)."""
    store = open_store(store)
    if not _NAME.match(name):
        raise ReviewStoreError(f"user name {name!r}: use 1-64 letters, digits, or _ . @ -")
    if len(password) < 8:
        raise ReviewStoreError(f"password for {name!r} is too short: use at least 8 characters")
    digest = _hasher().hash(password)
    with store._tx(write=True) as c:
        exists = c.execute(sa.select(S.users.c.name).where(S.users.c.name == name)).first()
        if exists and not replace:
            raise ReviewStoreError(f"user {name!r} already exists; pass --replace to reset the "
                                   "password")
        if exists:
            c.execute(sa.update(S.users).where(S.users.c.name == name)
                      .values(password_hash=digest, is_admin=admin))
            c.execute(sa.delete(S.sessions).where(S.sessions.c.user == name))
        else:
            c.execute(sa.insert(S.users).values(name=name, password_hash=digest, is_admin=admin,
                                                created_at=store.clock()))


def list_users(store: ReviewStore) -> list[tuple[str, bool]]:
    with store._tx() as c:
        q = sa.select(S.users.c.name, S.users.c.is_admin).order_by(S.users.c.name)
        return [(n, bool(a)) for n, a in c.execute(q)]


_DUMMY_HASH: str | None = None


def verify_password(store: ReviewStore, name: str, password: str) -> bool:
    """True when ``name`` exists and ``password`` matches (same work whether or not it exists)."""
    from argon2.exceptions import InvalidHashError, VerificationError

    global _DUMMY_HASH
    with store._tx() as c:
        row = c.execute(sa.select(S.users.c.password_hash).where(S.users.c.name == name)).first()
    hasher = _hasher()
    if row is None:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = hasher.hash(secrets.token_hex(16))
        # spend the same time as a real check, so timing does not reveal user names
        with contextlib.suppress(VerificationError):
            hasher.verify(_DUMMY_HASH, password)
        return False
    try:
        return hasher.verify(row.password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def create_session(store: ReviewStore, name: str, ttl_s: float = SESSION_S) -> tuple[str, str]:
    """Open a session for ``name``; returns ``(cookie token, csrf token)``."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = store.clock()
    with store._tx(write=True) as c:
        c.execute(sa.delete(S.sessions).where(S.sessions.c.expires_at < now))
        c.execute(sa.insert(S.sessions).values(token_sha256=_sha(token), user=name, csrf=csrf,
                                               created_at=now, expires_at=now + ttl_s))
    return token, csrf


def get_session(store: ReviewStore, token: str | None) -> Session | None:
    """The live session behind a cookie token, or None (unknown, expired or missing)."""
    if not token:
        return None
    q = (sa.select(S.sessions.c.user, S.sessions.c.csrf, S.sessions.c.expires_at,
                   S.users.c.is_admin)
         .join(S.users, S.users.c.name == S.sessions.c.user)
         .where(S.sessions.c.token_sha256 == _sha(token)))
    with store._tx() as c:
        row = c.execute(q).first()
    if row is None or row.expires_at < store.clock():
        return None
    return Session(row.user, bool(row.is_admin), row.csrf, row.expires_at)


def end_session(store: ReviewStore, token: str | None) -> None:
    if token:
        with store._tx(write=True) as c:
            c.execute(sa.delete(S.sessions).where(S.sessions.c.token_sha256 == _sha(token)))


def csrf_ok(expected: str, given: str | None) -> bool:
    """Constant-time comparison of the session's CSRF token with the one a request carried."""
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())
