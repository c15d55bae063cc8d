"""A throwaway local PostgreSQL server for tests, benchmarks and trying the review store.

Not part of the inference flow: it starts a private cluster (``initdb`` + ``pg_ctl`` from the
Debian ``postgresql`` package, found under ``/usr/lib/postgresql/*/bin``) in a temporary folder,
listening only on a unix socket there, and hands out ``postgresql+psycopg://`` URLs for fresh
databases. When run as root the server runs as the ``postgres`` user (PostgreSQL refuses root).
Durability is switched off (``fsync=off``): never point it at data you want to keep.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from cellclf.errors import CellclfError


class PostgresUnavailable(CellclfError):
    """PostgreSQL server binaries are not installed (install the Debian ``postgresql`` package)."""


def find_pg_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl`` (newest version first)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                        reverse=True)
    which = shutil.which("initdb")
    if which:
        candidates.append(Path(which).resolve().parent)
    for cand in candidates:
        if (cand / "initdb").is_file() and (cand / "pg_ctl").is_file():
            return cand
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install them with "
        "`apt-get install -y postgresql` or run scripts/ci_services.sh")


class ThrowawayPostgres:
    """``with ThrowawayPostgres() as pg: url = pg.new_database("t1")`` — removed on exit."""

    def __init__(self, user: str = "cellclf") -> None:
        self.bin = find_pg_bin()
        self.user = user
        self.root = Path(tempfile.mkdtemp(prefix="cellclf-pg-"))
        self.data = self.root / "data"
        self.started = False
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresUnavailable("running as root and no `postgres` user exists to run "
                                          "the server; install the postgresql package") from exc
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        cmd = [*self._run_as, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise PostgresUnavailable(f"`{' '.join(args)}` failed ({res.returncode}): "
                                      f"{res.stderr.strip() or res.stdout.strip()}")

    def start(self) -> ThrowawayPostgres:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
                  "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        opts = (f"-k {self.root} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=100")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.root / "server.log"), "-o", opts, "-w", "-t", "60", "start")
        self.started = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@/{database}?host={self.root}"

    def new_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its SQLAlchemy URL."""
        import psycopg

        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and _ only")
        with psycopg.connect(host=str(self.root), user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.started:
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                          "-w", "stop")
            finally:
                self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
