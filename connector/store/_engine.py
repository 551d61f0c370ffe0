"""SQLite's write lock, taken without its own busy handler's long sleeps."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any


def begin_immediate_sa(connection: Any, raw: Any, timeout: float) -> None:
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
