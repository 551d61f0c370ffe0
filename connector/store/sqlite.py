"""The SQLite adapter: the embedded default, one host.

WAL, ``synchronous=FULL`` (an acknowledged event survives a power cut), ``BEGIN IMMEDIATE``
for write transactions, the receiver's driver-level inbox insert (:class:`InboxWriter`), and a
registered process whose pid no longer runs on this host released at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from connector.errors import StoreError, StoreUnavailable
from connector.store._engine import (
    STALE_FAULTS,
    begin_immediate,
    fault_of,
    max_pages_for_tests,
    sqlite_engine,
    when_unlocked,
)
from connector.store.abc import NewEvent, Rejected
from connector.store.operator import OperatorSql

DISK_ROOM_BYTES = 1024 * 1024
"""Free space on the store's file system that an allocating write probe asks for."""


class SqliteStore(OperatorSql):
    dialect = "sqlite"
    holds_connections = True  # a PostgreSQL connection is pinged when lent: not kept

    def __init__(self, url: str, *, synchronous: str = "FULL", timeout: float = 5.0) -> None:
        super().__init__(
            url, sqlite_engine(url, synchronous=synchronous, timeout=timeout), timeout=timeout
        )
        self._synchronous = synchronous
        self._sync_levels: dict[int, str] = {}  # per driver connection: what it is set to
        from connector.store.migrate import store_problem

        # a file that is not ours is refused before a connection switches it to WAL
        problem = store_problem(url)
        if problem is not None:
            raise StoreError(problem)
        self.open()

    def probe_write(self, *, allocate: bool = False) -> None:
        if allocate:
            # the probe's row is rolled back before it reaches the WAL: room on the disk is
            # told by the file system (enough for a commit's pages and its WAL frames)
            database = self.engine.url.database
            if database and database != ":memory:":
                folder = os.path.dirname(os.path.abspath(database))
                try:
                    stat = os.statvfs(folder)
                except OSError:
                    stat = None
                if stat is not None and stat.f_bavail * stat.f_frsize < DISK_ROOM_BYTES:
                    raise StoreUnavailable(
                        f"the store's file system has less than {DISK_ROOM_BYTES} bytes free",
                        reason="store full",
                    )
        super().probe_write(allocate=allocate)

    def _begin_write(self, conn: Connection, durable: bool) -> None:
        level = self._synchronous if durable else "NORMAL"
        raw = conn.connection.dbapi_connection
        if raw is not None and self._sync_levels.get(id(raw)) != level:
            raw.execute(f"PRAGMA synchronous={level}")
            self._sync_levels[id(raw)] = level
        conn.info["immediate"] = True  # take the write lock up front (see _engine.sqlite_engine)

    def _insert_inbox(self, conn: Connection, events: Sequence[NewEvent], now: float) -> None:
        # the driver's executemany, without SQLAlchemy's per-row parameter processing (a
        # third of the cost of a webhook)
        conn.exec_driver_sql(_INSERT_INBOX_SQL, [_inbox_row(e, now) for e in events])

    def inbox_writer(self) -> InboxWriter:
        return InboxWriter(self)

    def _gone_here(self, row: Any, host: str) -> bool:
        import socket

        if not row.host == host == socket.gethostname():
            return False
        # its pid runs no more, or runs a process started after it registered: a container
        # restarted gives its entry point the pid (and host name) its predecessor had, which
        # held the destinations' leases until they lapsed
        return not _pid_alive(row.pid) or _pid_started_after(row.pid, float(row.started_at))


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie does not: in a container without an init that reaps,
    a killed connector stays one, and its claims must be released all the same."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rpartition(")")[2].split()[:1]
    except OSError:
        return True  # no /proc (macOS): trust the signal
    return state != ["Z"]


PID_START_SLACK = 2.0  # /proc gives a start time within a second or so (boot time in seconds)


def _pid_started_after(pid: int, moment: float) -> bool:
    """Whether the process running as ``pid`` started after ``moment`` (seconds since the
    epoch): a process registered at ``moment`` with that pid is another one, gone (the pid
    was used again). False when it cannot be told (no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rpartition(")")[2].split()
        with open("/proc/stat", encoding="ascii", errors="replace") as system:
            boot = next(float(line.split()[1]) for line in system if line.startswith("btime "))
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return started > moment + PID_START_SLACK


def _inbox_row(event: NewEvent, now: float) -> tuple[Any, ...]:
    """An inbox row in the column order of :data:`_INSERT_INBOX_VALUES`."""
    e = event
    return (
        e.dispensary,
        e.source,
        e.event_type,
        e.customer_id,
        e.last_update_us,
        now,
        e.body,
        e.status,
        None if e.status == "pending" else now,
        e.run_id,
    )


_INBOX_COLUMNS = 10


@functools.lru_cache(maxsize=128)
def _inbox_insert(rows: int) -> str:
    """The ``INSERT`` of ``rows`` inbox rows (:func:`_inbox_row`)."""
    return _INSERT_INBOX_VALUES + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)


class InboxWriter:
    """Commits the receiver's batches of events: what :meth:`SqliteStore.add_events` does, faster.

    With SQLite it owns a driver connection. A batch is one multi-row ``INSERT`` in
    autocommit mode: a single statement is its own transaction, so SQLite takes the write
    lock, inserts and commits (``synchronous`` as the store's: FULL by default) in one step,
    and the thread running it gives the interpreter lock up and must win it back from a busy
    event loop once a batch. SQLAlchemy's path (pragmas around the begin, a step per row, the
    pool) took it back a dozen times, and ``BEGIN IMMEDIATE``, ``INSERT``, ``COMMIT`` three
    times; each could wait a switch interval. A batch with more values than the SQLite build
    takes in one statement is written in chunks between ``BEGIN IMMEDIATE`` and ``COMMIT``.
    A batch with refused bodies, and every other database, goes through
    :meth:`SqliteStore.add_events`. One thread only: the one that commits the receiver's batches.
    """

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self._raw: sqlite3.Connection | None = None
        self._variables = 0  # the most values one statement takes (SQLITE_LIMIT_VARIABLE_NUMBER)
        database = store.engine.url.database
        self._path = database if database and database != ":memory:" else None

    def add(self, events: Sequence[NewEvent], rejected: Sequence[Rejected] = ()) -> None:
        """Commit ``events`` (and ``rejected``) in one transaction, or raise
        :class:`StoreUnavailable` having committed none of them."""
        if self._path is None or rejected or not events:
            self.store.add_events(events, rejected)
            return
        try:
            self._add(events)
        except sqlite3.Error as exc:
            self.close()  # a fresh connection for the next batch
            if fault_of(exc) in STALE_FAULTS:  # and the pool's reopened (fresh_files)
                self.store.stale = True
            # the driver's text only, never the statement's parameters (customer values)
            reason = str(exc).splitlines()[0][:120] or exc.__class__.__name__
            raise StoreUnavailable(
                f"the store cannot take the write ({reason})",
                reason=fault_of(exc) or "store unavailable",
            ) from None

    def _connect(self) -> sqlite3.Connection:
        raw = self._raw
        if raw is None:
            assert self._path is not None
            self.store.fresh_files()
            raw = sqlite3.connect(
                self._path, timeout=0, isolation_level=None, check_same_thread=False
            )
            try:
                raw.execute(f"PRAGMA synchronous={self.store._synchronous}")
                if (pages := max_pages_for_tests()) is not None:
                    raw.execute(f"PRAGMA max_page_count={pages}")
                self._variables = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            except BaseException:
                raw.close()
                raise
            self._raw = raw
        return raw

    def _add(self, events: Sequence[NewEvent]) -> None:
        raw = self._connect()
        if len(events) * _INBOX_COLUMNS <= self._variables:
            statement = _inbox_insert(len(events))

            def write() -> None:
                now = time.time()  # at each try: the arrival, just before the write lock
                raw.execute(statement, [value for e in events for value in _inbox_row(e, now)])

            if not when_unlocked(write, self.store.timeout):
                raise sqlite3.OperationalError("database is locked")
            return
        if not begin_immediate(raw, self.store.timeout):
            raise sqlite3.OperationalError("database is locked")
        try:
            now = time.time()  # under the write lock: arrival times follow the ids
            rows = [_inbox_row(e, now) for e in events]
            per_statement = max(1, self._variables // _INBOX_COLUMNS)
            for start in range(0, len(rows), per_statement):
                chunk = rows[start : start + per_statement]
                raw.execute(_inbox_insert(len(chunk)), [value for row in chunk for value in row])
            raw.execute("COMMIT")
        except BaseException:
            if raw.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    raw.execute("ROLLBACK")
            raise

    def close(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(sqlite3.Error):
                raw.close()


_INSERT_INBOX_VALUES = (
    "INSERT INTO inbox (dispensary, source, event_type, customer_id, last_update_us,"
    " received_at, body, status, processed_at, run_id) VALUES "
)
_INSERT_INBOX_SQL = _INSERT_INBOX_VALUES + "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
