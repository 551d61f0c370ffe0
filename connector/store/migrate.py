"""Bringing a store's schema up to date (to be replaced by Alembic revisions)."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, insert, select, text, update

from connector.errors import StoreError
from connector.store.schema import MIGRATIONS, SCHEMA_VERSION, meta, metadata

MIGRATION_LOCK = 7224130  # PostgreSQL advisory lock key: one migrating process at a time


def ensure_current(engine: Engine) -> None:
    """Under the write lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock), so
    two processes opening an old store at once do not both run its migration steps."""
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        conn.info["immediate"] = sqlite
        with conn.begin():
            if not sqlite:
                conn.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            _migrate_in(conn)


def _migrate_in(conn: Connection) -> None:
    metadata.create_all(conn)
    found = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version"))
    version = found.scalar_one_or_none()
    if version is None:
        conn.execute(insert(meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
        return
    if int(version) > SCHEMA_VERSION:
        raise StoreError(
            f"the store's schema is version {version}, newer than this connector knows "
            f"({SCHEMA_VERSION}): upgrade the connector"
        )
    for step in range(int(version), SCHEMA_VERSION):
        for statement in MIGRATIONS[step]:
            conn.execute(text(statement))
    if int(version) < SCHEMA_VERSION:
        conn.execute(
            update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION))
        )
