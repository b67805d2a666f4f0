"""Opening a ledger database: URL resolution, SQLite settings, migrations, write retries.

SQLite (the default) runs in WAL mode so readers never block the writer, with a busy
timeout so writers wait for each other instead of failing. Every write transaction starts
with BEGIN IMMEDIATE: it takes the write lock up front, so two processes can never both
read, then both try to upgrade to writing (the one case a busy timeout cannot resolve).
PostgreSQL needs none of this; the same ORM code runs on both.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Callable, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from quantatlas.atlas.errors import LedgerError

DEFAULT_URL = "sqlite:///runs/atlas.db"
BUSY_TIMEOUT_S = 60.0
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "atlas_schema_version"     # not alembic_version: a shared database may hold another app's

T = TypeVar("T")


def resolve_url(url: str | None) -> str:
    """`url`, else $QUANTATLAS_DB, else sqlite:///runs/atlas.db (relative to the working directory)."""
    return url or os.environ.get("QUANTATLAS_DB") or DEFAULT_URL


def _parse(url: str):
    try:
        u = make_url(url)
    except ArgumentError:
        raise LedgerError(f"--db {url!r} is not a database URL (try sqlite:///runs/atlas.db or "
                         f"postgresql://user@host/dbname)") from None
    if u.drivername == "postgresql":       # prefer psycopg 3 (the `postgres` extra) when psycopg2 is absent
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            u = u.set(drivername="postgresql+psycopg")
    return u


def _sqlite_engine(u, immediate: bool) -> Engine:
    memory = u.database in (None, "", ":memory:")
    if not memory:
        folder = Path(u.database).expanduser().resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LedgerError(f"--db sqlite:///{u.database}: cannot create folder {folder}: {e.strerror}") from None
    kw = {"poolclass": StaticPool} if memory else {}
    engine = create_engine(u, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}, **kw)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None       # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if not memory:
            cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")   # a committed run survives a crash of the machine too
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def open_engines(url: str) -> tuple[Engine, Engine, str]:
    """(write engine, read engine, dialect name). Raises ValueError for a bad or unreachable URL."""
    u = _parse(url)
    try:
        if u.get_backend_name() == "sqlite":
            if u.database in (None, "", ":memory:"):
                engine = _sqlite_engine(u, immediate=True)
                write, read = engine, engine
            else:
                write, read = _sqlite_engine(u, immediate=True), _sqlite_engine(u, immediate=False)
        else:
            write = create_engine(u, pool_pre_ping=True)
            read = write
        with read.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as e:
        raise LedgerError(f"--db {url!r}: no driver for {u.drivername!r} ({e}); for PostgreSQL install "
                         f"quantatlas[postgres]") from None
    except DBAPIError as e:       # unreachable server, unwritable folder, a file that is not a database
        raise LedgerError(f"--db {url!r}: cannot open the database: {e.orig}") from None
    return write, read, u.get_backend_name()


def _alembic_config(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def migrate(write: Engine, read: Engine) -> None:
    """Bring the schema to the newest migration; a no-op (one read) when it is already there.

    Runs inside one write transaction, so two processes opening a fresh ledger at once
    serialise: the second finds the schema made and does nothing.
    """
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    script = ScriptDirectory.from_config(_alembic_config(None))
    current = current_revision(read)
    if current == script.get_current_head():
        return
    if current is not None:
        try:
            script.get_revision(current)
        except CommandError:
            raise LedgerError(f"the ledger's schema is at revision {current!r}, which this version of quantatlas "
                             f"does not know (written by a newer version?)") from None
    with write.begin() as conn:
        command.upgrade(_alembic_config(conn), "head")


def _locked(e: OperationalError) -> bool:
    msg = str(e.orig).lower() if e.orig is not None else str(e).lower()
    return "locked" in msg or "busy" in msg


def write_transaction(engine: Engine, fn: Callable[[Session], T], deadline_s: float = 600.0) -> T:
    """Run `fn(session)` in one transaction, committed on return; retried from scratch when the
    database is busy (SQLite) or a concurrent writer inserted the same row first."""
    t0, attempt = time.monotonic(), 0
    while True:
        attempt += 1
        try:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                return fn(session)
        except OperationalError as e:
            if not _locked(e) or time.monotonic() - t0 > deadline_s:
                raise
        except IntegrityError:
            if attempt >= 5:
                raise
        time.sleep(min(1.0, 0.01 * 2 ** min(attempt, 7)) * (0.5 + random.random()))
