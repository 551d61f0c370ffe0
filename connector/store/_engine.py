"""Dialect details in one place: how a store URL becomes an engine that is safe to use."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
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

        busy_ms = int(timeout * 1000)

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            # writes lock up front; reads (status, metrics, readiness) never block a writer
            if not connection.info.get("immediate"):
                connection.exec_driver_sql("BEGIN")
                return
            raw = connection.connection.dbapi_connection
            raw.execute("PRAGMA busy_timeout=0")
            try:
                _begin_immediate(connection, raw, timeout)
            finally:
                raw.execute(f"PRAGMA busy_timeout={busy_ms}")

        return engine
    return create_engine(url, pool_pre_ping=True)


def _begin_immediate(connection: Any, raw: Any, timeout: float) -> None:
    """``BEGIN IMMEDIATE`` on a SQLAlchemy connection (see :func:`begin_immediate`); a last
    failure is raised through SQLAlchemy, wrapped."""
    try:
        if begin_immediate(raw, timeout):
            return
    except sqlite3.OperationalError:
        pass
    connection.exec_driver_sql("BEGIN IMMEDIATE")  # once more: success, or the wrapped error


def begin_immediate(raw: sqlite3.Connection, timeout: float) -> bool:
    """``BEGIN IMMEDIATE`` on a driver connection whose busy timeout is 0, waiting up to
    ``timeout`` for a writer in another process: True once begun, False when the time is up
    (another error is raised as it is). See :func:`when_unlocked`."""
    return when_unlocked(lambda: raw.execute("BEGIN IMMEDIATE"), timeout)


def when_unlocked(write: Callable[[], object], timeout: float) -> bool:
    """Run ``write``, a statement that takes SQLite's write lock on a connection whose busy
    timeout is 0, again while the lock is held elsewhere, up to ``timeout``: True once it ran,
    False when the time is up (another error is raised as it is).

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20 ms... between tries: with the
    receiver and the pipeline process both committing every few milliseconds, each would
    sleep far longer than the other holds the lock. Polling every 0.2-2 ms takes the lock
    soon after it is free; the sleeps release the interpreter lock.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while True:
        try:
            write()
            return True
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() + delay > deadline:
                return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.002)
