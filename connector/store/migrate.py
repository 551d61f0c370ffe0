"""Bringing a store's schema up to date: Alembic revisions in :mod:`.migrations`.

:func:`ensure_current` runs whenever a store opens (every replica, every command). When the
store is current that is one read of ``alembic_version`` and nothing else: no DDL, no lock, so
a read-only ``status`` works and replicas starting together do not queue. Otherwise, under the
migration lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a transaction advisory lock) and in
that one transaction, it looks again (another process may have upgraded meanwhile) and:

- ``alembic_version`` older than head: upgrade;
- a store from before Alembic (``connector_meta.schema_version`` 1-3): its old steps to 3
  (:mod:`.migrations.legacy`), stamp the baseline, upgrade;
- no connector table at all (an empty database): create the schema at head;
- a revision this code does not know (a newer connector wrote it): :class:`StoreError`.

``connector migrate --sql`` prints the same upgrade as DDL instead (:func:`upgrade_sql`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError

from connector.errors import StoreError
from connector.store._engine import engine_for, opening, postgres_engine, reason_of
from connector.store.migrations import legacy
from connector.store.schema import meta, metadata

MIGRATION_WAIT = "15min"  # the longest a process waits for another's migration
MIGRATION_WAIT_SECONDS = 15 * 60.0
MIGRATION_LOCK = 7224130  # PostgreSQL advisory lock key: one migrating process at a time
MIGRATIONS = Path(__file__).parent / "migrations"
_CURRENT = text("SELECT version_num FROM alembic_version")


@dataclass(frozen=True, slots=True)
class Migrated:
    """What an upgrade did: from which revision (None: an empty database; ``legacy N``: a
    store from before Alembic at schema version N) to which."""

    before: str | None
    after: str

    def __str__(self) -> str:
        return f"upgraded the store from {self.before or 'an empty database'} to {self.after}"


def alembic_config(**attributes: object) -> Config:
    """Alembic's configuration for the schema, built in code (no ``alembic.ini``);
    ``attributes`` reach ``env.py`` (``connection``, or ``dialect_name`` offline)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("file_template", "r%%(rev)s_%%(slug)s")
    config.attributes.update(attributes)
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision this code knows."""
    found = _scripts().get_current_head()
    assert found is not None
    return found


def ensure_current(engine: Engine) -> Migrated | None:
    """Bring the store at ``engine`` to head; None when it already was (one read)."""
    with opening(MIGRATION_WAIT_SECONDS):  # see connector.store._engine.opening
        return _ensure_current(engine)


def _ensure_current(engine: Engine) -> Migrated | None:
    with engine.connect() as conn:
        try:
            current = list(conn.execute(_CURRENT).scalars())
        except (OperationalError, ProgrammingError):
            current = []  # no alembic_version: looked at again under the lock
    if current == [head()]:
        return None
    _check_known(current)
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        conn.info["immediate"] = sqlite  # see connector.store._engine.sqlite_engine
        # SQLite: wait as long as another process's migration takes, not the store's busy
        # timeout (a loaded machine creating the schema took longer than 5 s)
        conn.info["wait"] = MIGRATION_WAIT_SECONDS
        try:
            with conn.begin():
                if not sqlite:
                    # wait as long as another replica's migration takes (the store's
                    # lock_timeout is for requests, not for this)
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{MIGRATION_WAIT}'")
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                    )
                return _upgrade_in(conn)
        finally:
            conn.info.pop("immediate", None)
            conn.info.pop("wait", None)


def _check_known(revisions: list[str]) -> None:
    for revision in revisions:
        try:
            known = _scripts().get_revision(revision)
        except CommandError:  # "No such revision"
            known = None
        if known is None:
            raise StoreError(
                f"the store's schema is at revision {revision}, newer than this connector "
                f"knows (its newest is {head()}): upgrade the connector"
            )


def _upgrade_in(conn: Connection) -> Migrated | None:
    tables = set(inspect(conn).get_table_names())
    stamp: str | None = None
    if "alembic_version" in tables:
        current = list(conn.execute(_CURRENT).scalars())
        if current == [head()]:
            return None  # another process upgraded it while this one waited for the lock
        _check_known(current)
        before: str | None = current[0] if current else None
    elif meta.name in tables:
        version = conn.execute(
            select(meta.c.value).where(meta.c.key == "schema_version")
        ).scalar_one_or_none()
        stamp = legacy.to_baseline(conn, version, tables)
        before = f"legacy schema version {version}"
    elif tables & set(metadata.tables):
        raise StoreError(
            "the database has connector tables but no schema version: it was not written by "
            "a connector (use an empty database)"
        )
    else:
        _refuse_foreign(conn.dialect.name, tables)
        before = None
    config = alembic_config(connection=conn)
    if stamp is not None:
        command.stamp(config, stamp)
    command.upgrade(config, "head")
    return Migrated(before, head())


def migrate_url(url: str, *, timeout: float = 5.0) -> Migrated | None:
    """:func:`ensure_current` for the store at ``url`` (``connector migrate``); a database
    that cannot be reached is a :class:`StoreError` naming the driver's reason."""
    engine = engine_for(url, timeout=timeout)
    try:
        return ensure_current(engine)
    except SQLAlchemyError as exc:
        raise StoreError(f"the store cannot be opened ({reason_of(exc)})") from None
    finally:
        engine.dispose()


def upgrade_sql(url: str, *, timeout: float = 5.0) -> str:
    """The DDL that would bring the store at ``url`` to head, from its current revision (or
    from an empty database), for a DBA to read or run: the store is read, never written."""
    sqlite = url.startswith("sqlite")
    try:
        current = _current_sqlite(url) if sqlite else _current_pg(url, timeout)
    except SQLAlchemyError as exc:
        raise StoreError(f"the store cannot be opened ({reason_of(exc)})") from None
    if current == head():
        return f"-- the store is already current (revision {head()})\n"
    if current is not None:
        _check_known([current])
    out = io.StringIO()
    config = alembic_config(dialect_name="sqlite" if sqlite else "postgresql")
    config.output_buffer = out
    command.upgrade(config, f"{current}:head" if current else "head", sql=True)
    return out.getvalue()


def _current_sqlite(url: str) -> str | None:
    database = make_url(url).database
    if not database or not Path(database).exists():
        return None  # a new store: nothing created by looking
    with sqlite3.connect(f"{Path(database).resolve().as_uri()}?mode=ro", uri=True) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if "alembic_version" in names:
            return str(db.execute("SELECT version_num FROM alembic_version").fetchone()[0])
        _refuse_legacy(names)
    return None


def _current_pg(url: str, timeout: float) -> str | None:
    engine = postgres_engine(url, timeout=timeout)
    try:
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
            if "alembic_version" in names:
                return str(conn.execute(_CURRENT).scalar_one())
            _refuse_legacy(names)
        return None
    finally:
        engine.dispose()


def _refuse_foreign(dialect: str, tables: set[str]) -> None:
    """A SQLite file with tables and no connector schema is another application's database:
    refused, never migrated into (a store path that points at the wrong file). A PostgreSQL
    database may be shared with other applications' tables, so it is not judged so."""
    foreign = sorted(t for t in tables if not t.startswith("sqlite_"))
    if dialect == "sqlite" and foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise StoreError(
            f"the file is a SQLite database of another application (tables {shown}; no "
            "connector schema): refused, not migrated into; point store at a new file"
        )


def store_problem(url: str) -> str | None:
    """What keeps the SQLite store at ``url`` from opening, read without writing anything
    (``connector check``): a file that is not a SQLite database, or another application's
    database; None when it would open (or does not exist yet: ``serve`` creates it), and for
    PostgreSQL (nothing leaves the machine here)."""
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    if not database or database == ":memory:" or not Path(database).exists():
        return None
    path = Path(database)
    try:
        with path.open("rb") as file:
            header = file.read(16)
        if header and header != b"SQLite format 3\x00":
            return f"{path}: the store is not a SQLite database (file is not a database)"
        if not header:
            return None  # empty: created at the first start
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            if "alembic_version" in names and not names & set(metadata.tables):
                # Alembic's table alone, none of ours: another application's schema
                _refuse_foreign("sqlite", names - {"alembic_version"})
            if "alembic_version" in names:
                current = [str(r[0]) for r in db.execute("SELECT version_num FROM alembic_version")]
                _check_known(current)
            elif meta.name not in names:
                if names & set(metadata.tables):
                    raise StoreError("the database has connector tables but no schema version")
                _refuse_foreign("sqlite", names)
    except StoreError as exc:
        return f"{path}: {exc}"
    except (OSError, sqlite3.Error) as exc:
        if _read_only(path):
            return (
                f"{path}: store read-only: its folder is not writable (a read-only file "
                f"system or permissions), and a store in WAL mode cannot even be read without "
                f"writing beside it ({reason_of(exc)})"
            )
        return f"{path}: the store cannot be opened ({reason_of(exc)})"
    return None  # a read-only store that opens is served, answering 503 until writable


def store_warning(url: str) -> str | None:
    """What ``connector check`` warns of in a SQLite store that opens: a file or folder that
    cannot be written (served, but every webhook is answered 503 until it can)."""
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    path = Path(database)
    if not path.exists():
        path = path.resolve().parent  # created at the first start: its folder must take it
        if path.exists() and _read_only_folder(path):
            return f"{database}: store read-only: the folder cannot be written"
        return None
    if _read_only(path):
        return f"{path}: store read-only: webhooks are answered 503 until it can be written"
    return None


def _read_only_folder(folder: Path) -> bool:
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return False
    return not os.access(folder, os.W_OK)


def _read_only(path: Path) -> bool:
    """Whether the store file or its folder cannot be written (a read-only mount, or
    permissions; root passes permission checks, not a read-only mount)."""
    return _read_only_folder(path.resolve().parent) or not os.access(path, os.W_OK)


def _refuse_legacy(names: set[str]) -> None:
    if meta.name in names:
        raise StoreError(
            "the store predates the connector's Alembic revisions: upgrade it with "
            "`connector migrate` (without --sql), which runs its old steps first"
        )
    if names & set(metadata.tables):
        raise StoreError("the database has connector tables but no schema version")
