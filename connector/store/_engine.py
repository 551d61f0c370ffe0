"""Dialect details in one place: how a store URL becomes an engine that is safe to use."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event


def make_engine(url: str, *, synchronous: str = "FULL", timeout: float = 5.0) -> Engine:
    """An engine for ``url``.

    SQLite: WAL, ``synchronous=FULL`` (an acknowledged event survives a power cut), a busy
    timeout so a second process (``connector reconcile``) waits instead of failing, and
    ``BEGIN IMMEDIATE`` for write transactions (``Store.transaction``) so that they take the
    write lock up front rather than failing when they upgrade; reads begin plainly
    (pysqlite's own transaction handling is switched off for that).
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": timeout},
            # every transaction ends in an explicit commit or rollback: no reset on return
            pool_reset_on_return=None,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            # writes lock up front; reads (status, metrics, readiness) never block a writer
            immediate = connection.info.get("immediate")
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True)
