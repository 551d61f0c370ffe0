"""Dialect details in one place: how a store URL becomes an engine that is safe to use, SQLite's
write lock taken without its busy handler's long sleeps, and a driver error in one line."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url


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


TEST_MAX_PAGES_ENV = "CONNECTOR_TEST_SQLITE_MAX_PAGES"


def max_pages_for_tests() -> int | None:
    """For tests only (tests/test_store_faults.py): ``CONNECTOR_TEST_SQLITE_MAX_PAGES`` caps
    every SQLite connection of the process at that many pages (``PRAGMA max_page_count``),
    a full disk without filling one. Unset in every deployment; not a setting."""
    value = os.environ.get(TEST_MAX_PAGES_ENV, "").strip()
    return int(value) if value.isdigit() else None


_FAULTS = (
    ("SQLITE_FULL", "store full"),
    ("SQLITE_READONLY", "store read-only"),
    ("SQLITE_BUSY", "store locked"),
    ("SQLITE_LOCKED", "store locked"),
    ("SQLITE_CORRUPT", "store corrupt"),
    ("SQLITE_NOTADB", "store corrupt"),
    ("SQLITE_CANTOPEN", "store cannot be opened"),
    ("SQLITE_IOERR", "store I/O error"),
    ("SQLITE_PERM", "store read-only"),
)
STALE_FAULTS = frozenset(
    {"store read-only", "store corrupt", "store cannot be opened", "store I/O error"}
)
"""Faults after which a SQLite connection is not used again: one opened read-only stays
read-only, and one that failed on its files may hold a stale view of them."""


def fault_of(exc: BaseException) -> str | None:
    """What a SQLite error says about the store, in a few words (for ``/readyz`` and the log);
    None for any other error. By the driver's extended result code (SQLITE_FULL,
    SQLITE_READONLY_*, SQLITE_BUSY_*...), or, for the "database is locked" this module raises
    itself when the time is up, by its text."""
    orig = getattr(exc, "orig", None) or exc
    if not isinstance(orig, sqlite3.Error):
        return None
    name = getattr(orig, "sqlite_errorname", None) or ""
    for prefix, fault in _FAULTS:
        if name == prefix or name.startswith(prefix + "_"):
            return fault
    if not name and ("locked" in str(orig) or "busy" in str(orig)):
        return "store locked"
    return None


def reason_of(exc: BaseException) -> str:
    """The driver's first line, never a statement or its parameters (customer values)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return (text[0][:160] if text else "") or orig.__class__.__name__


_OPENING_WAIT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "opening_wait", default=None
)


def opening_now() -> bool:
    """Whether a store is being opened in this context (:func:`opening`)."""
    return _OPENING_WAIT.get() is not None


def _wal(cursor: Any, seconds: float) -> None:
    """Switch a connection's file to WAL, waiting up to ``seconds`` for another process: on a
    new file the switch needs the file to itself, and SQLite answers "database is locked"
    at once, without its busy timeout, when it meets another connection doing the same (two
    processes creating one store at once)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


@contextlib.contextmanager
def opening(seconds: float) -> Iterator[None]:
    """While opening a store: a SQLite connection made meanwhile waits up to ``seconds``
    (not the store timeout) for its first lock, the one ``PRAGMA journal_mode=WAL`` takes.

    Another process opening the same new file (its switch to WAL) or closing the last
    connection to it (the checkpoint that folds the WAL back) holds the file exclusively
    across an fsync; on a loaded machine that outlasted the store timeout, and a process
    starting next to another failed "database is locked" before it reached the migration
    lock, which waits as long as a migration takes.
    """
    token = _OPENING_WAIT.set(seconds)
    try:
        yield
    finally:
        _OPENING_WAIT.reset(token)


WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
"""What the WAL file is truncated to after a checkpoint that reset it."""


def sqlite_engine(url: str, *, synchronous: str = "FULL", timeout: float = 5.0) -> Engine:
    """An engine for ``url``.

    SQLite: WAL, ``synchronous=FULL`` (an acknowledged event survives a power cut), a busy
    timeout so a second process (``connector reconcile``) waits instead of failing, and
    ``BEGIN IMMEDIATE`` for write transactions (:meth:`SqliteStore.transaction`) so that
    they take the write lock up front rather than failing when they upgrade; reads begin plainly
    (pysqlite's own transaction handling is switched off for that).
    """
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": timeout},
        # every transaction ends in an explicit commit or rollback: no reset on return
        pool_reset_on_return=None,
    )

    busy_ms = int(timeout * 1000)
    max_pages = max_pages_for_tests()
    busy_now: dict[int, int] = {}  # per driver connection: the busy timeout it has now

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            wait = _OPENING_WAIT.get()
            if wait is not None:
                cursor.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
            _wal(cursor, timeout if wait is None else wait)
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            busy_now[id(dbapi_connection)] = busy_ms
            cursor.execute("PRAGMA foreign_keys=ON")
            # a WAL that a long reader let grow is cut back to this after its next checkpoint
            # (SQLite keeps a grown WAL file at its size otherwise)
            cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
            if max_pages is not None:
                cursor.execute(f"PRAGMA max_page_count={max_pages}")
        finally:
            cursor.close()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        # while a store is being opened every statement waits as long as a migration (the
        # first read of the schema's version meets the same exclusive holds as the WAL
        # switch); after, the store timeout again. Set only when it changes.
        wait = _OPENING_WAIT.get()
        want = busy_ms if wait is None else int(wait * 1000)
        if busy_now.get(id(dbapi_connection)) != want:
            dbapi_connection.execute(f"PRAGMA busy_timeout={want}")
            busy_now[id(dbapi_connection)] = want

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # writes lock up front; reads (status, metrics, readiness) never block a writer
        raw = connection.connection.dbapi_connection
        if not connection.info.get("immediate"):
            try:
                raw.execute("BEGIN")  # the driver's own: SQLAlchemy's execution costs more
            except sqlite3.Error:
                connection.exec_driver_sql("BEGIN")  # once more: success, or the wrapped error
            return
        raw.execute("PRAGMA busy_timeout=0")
        try:
            # a migration waits for another process's as long as it takes (info "wait")
            begin_immediate_sa(connection, raw, connection.info.get("wait", timeout))
        finally:
            raw.execute(f"PRAGMA busy_timeout={busy_now.get(id(raw), busy_ms)}")

    return engine


log = logging.getLogger("connector.store")
POOL_SIZE = 3  # PostgreSQL connections a process keeps (a couple more at a peak)
POOL_OVERFLOW = 2


def psycopg_url(url: str) -> str:
    """``postgresql://`` and ``postgresql+psycopg://`` (and ``postgres://``) as SQLAlchemy's
    URL for psycopg 3."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def connection_settings(timeout: float) -> dict[str, Any]:
    """libpq's settings for every connection of a store: the pool's and the listener's."""
    return {
        "connect_timeout": max(1, round(timeout)),
        "application_name": "treez-connector",
        # a dead peer (a cut network) is noticed in seconds, not hours
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        # data sent and not acknowledged (a network dropping packets): given up after
        # this many ms, where the kernel's retransmissions would wait a quarter of an hour
        "tcp_user_timeout": int(max(10.0, 2 * timeout) * 1000),
    }


def postgres_engine(url: str, *, timeout: float = 5.0, pooled: bool = False) -> Engine:
    """An engine for a PostgreSQL store. ``pooled``: a pooler in transaction mode (PgBouncer)
    may stand between, so each transaction may land on another server session: nothing is
    set once per session (the lock timeout is set in every transaction) and nothing is
    prepared (psycopg prepares a statement run five times, on one session)."""
    settings = connection_settings(timeout)
    if pooled:
        settings["prepare_threshold"] = None
    engine = create_engine(
        psycopg_url(url),
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        pool_timeout=timeout,
        pool_pre_ping=True,  # a connection the server dropped is replaced, not used
        pool_recycle=1800,
        connect_args=settings,
    )
    # as SQLite's busy timeout: a statement waiting for a lock (a table another session
    # locked, a customer's advisory lock) fails after ``timeout`` (StoreUnavailable: the
    # receiver answers 503) instead of holding a webhook's request without end
    milliseconds = max(1, round(timeout * 1000))
    if pooled:
        set_local = f"SET LOCAL lock_timeout = {milliseconds}"

        @event.listens_for(engine, "begin")
        def _wait_no_longer_in_this_transaction(connection: Any) -> None:
            connection.exec_driver_sql(set_local)

    else:
        lock_timeout = f"SET lock_timeout = {milliseconds}"

        @event.listens_for(engine, "connect")
        def _wait_no_longer_than_the_timeout(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute(lock_timeout)
            dbapi_connection.commit()  # a SET in a rolled-back transaction would be undone

    # the pool's check of a connection before lending it, bounded: on a connection whose
    # server stopped answering (frozen, or behind a network that holds the bytes) the
    # ``SELECT 1`` would wait for ever, and so would the thread (a worker's, the receiver's)
    ping = engine.dialect.do_ping

    def bounded_ping(dbapi_connection: Any) -> bool:
        _WATCHDOG.arm(dbapi_connection, timeout)
        try:
            return bool(ping(dbapi_connection))
        finally:
            _WATCHDOG.disarm(dbapi_connection)

    engine.dialect.do_ping = bounded_ping  # type: ignore[method-assign]
    return engine


class _Watchdog:
    """Severs a connection still busy past its deadline: its socket is shut down, so the
    call waiting on it fails at once (the driver sees the connection broken, the pool
    replaces it). One thread for the process, looking every 0.1 s while a call is armed, and
    asleep while none is (an idle process is not woken ten times a second)."""

    def __init__(self) -> None:
        self._armed: dict[int, tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._busy = threading.Event()  # set when a call is armed

    def arm(self, dbapi_connection: Any, seconds: float) -> None:
        self._armed[id(dbapi_connection)] = (time.monotonic() + seconds, dbapi_connection)
        if not self._busy.is_set():
            self._busy.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._watch, name="store-watchdog", daemon=True
                    )
                    self._thread.start()

    def disarm(self, dbapi_connection: Any) -> None:
        self._armed.pop(id(dbapi_connection), None)

    def forked(self) -> None:
        """In a forked child: the parent's thread is not here, nor are its connections
        (the next arm starts a thread of this process's own)."""
        self._armed = {}
        self._lock = threading.Lock()
        self._thread = None
        self._busy = threading.Event()

    def _watch(self) -> None:
        while True:
            self._busy.clear()
            if not self._armed:  # armed after the clear: seen here, or its set ends the wait
                self._busy.wait()
                continue
            time.sleep(0.1)
            now = time.monotonic()
            for key, (deadline, conn) in list(self._armed.items()):
                if deadline <= now and self._armed.pop(key, None) is not None:
                    _sever(conn)


def _sever(dbapi_connection: Any) -> None:
    with contextlib.suppress(Exception):
        fd = os.dup(dbapi_connection.fileno())
        with socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    log.warning("store connection severed: no answer within the store timeout")


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.forked)


def engine_for(url: str, *, timeout: float = 5.0) -> Engine:
    """An engine for a store URL of either dialect (``connector migrate``)."""
    if url.startswith("sqlite"):
        return sqlite_engine(url, timeout=timeout)
    return postgres_engine(url, timeout=timeout)
