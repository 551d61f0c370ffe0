"""What every SQL adapter shares: the engine, transactions, reads, and the hooks through which
a dialect changes how a statement locks or inserts (SQLite and PostgreSQL override them)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from connector.errors import StoreError, StoreUnavailable
from connector.store._engine import STALE_FAULTS, fault_of, opening_now, reason_of


class SqlBase:
    """An open store: the engine and the transactions every port runs in."""

    dialect = "sql"
    # whether a thread may keep a connection between its transactions (hold_connection)
    holds_connections = False

    def __init__(self, url: str, engine: Engine, *, timeout: float = 5.0) -> None:
        self.url = url
        self.engine = engine
        self.timeout = timeout
        self._held = threading.local()  # the calling thread's kept connection, if it keeps one
        self._held_all: list[Connection] = []  # every thread's (closed with the store)
        self._held_busy: set[int] = set()  # the ids of those in a transaction now
        self._held_lock = threading.Lock()
        self.process_id = uuid.uuid4().hex  # this process, for its claims and leases
        self._listeners: dict[str, list[Callable[[str], None]]] = {}
        # the store's clock minus this host's (see _now); 0 where one host shares the store
        self._clock_offset = 0.0
        self.stale = False  # a write failed on the files: reopen them all (fresh_files)
        self._generation = 0  # of the pool's connections; fresh_files starts a new one
        event.listen(engine, "connect", self._born)
        event.listen(engine, "checkout", self._lent)

    def open(self) -> None:
        """Bring the schema up to date (nothing when it is current)."""
        from connector.store.migrate import ensure_current

        where = self.where
        try:
            ensure_current(self.engine)
        except StoreError as exc:  # a schema it must not touch: newer, foreign, half-made
            raise StoreError(f"{where}: {exc}") from None
        except DBAPIError as exc:  # one line naming the store, never a traceback
            fault = fault_of(exc)
            why = f"{fault}: {reason_of(exc)}" if fault else reason_of(exc)
            raise StoreError(f"{where}: the store cannot be opened ({why})") from None

    @property
    def where(self) -> str:
        """The store, for a message: a SQLite file's path, a PostgreSQL URL without its
        password."""
        url = self.engine.url
        if url.get_backend_name() == "sqlite":
            return url.database or ":memory:"
        return url.render_as_string(hide_password=True)

    def close(self) -> None:
        with self._held_lock:
            held, self._held_all = self._held_all, []
        for conn in held:
            with contextlib.suppress(Exception):
                conn.close()
        self.engine.dispose()

    # --- the connections of the store's threads ---

    def hold_connection(self) -> None:
        """The calling thread keeps a connection between its transactions, instead of taking
        one from the pool for each (where :attr:`holds_connections`, SQLite). For the store's
        own long-lived threads (:class:`~connector.store.AsyncStore`'s): a checkout, its
        events and its return cost more than a small transaction's statements, about a
        third of a claim's CPU on a cold cache (an event at a time)."""
        if self.holds_connections:
            self._held.wanted = True

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A connection for one transaction: the thread's kept one, if it keeps one and is
        not using it already (a transaction within another takes one from the pool), else
        one from the pool, returned after."""
        local = self._held
        if not getattr(local, "wanted", False) or getattr(local, "busy", False) or opening_now():
            with self.engine.connect() as lent:
                yield lent
            return
        kept: Connection | None = getattr(local, "conn", None)
        with self._held_lock:  # fresh_files closes the idle ones of every thread
            if kept is not None and (
                kept.closed or kept.invalidated or local.generation != self._generation
            ):
                # dropped after a fault, or opened before the files were reopened
                self._let_go(kept)
                kept = None
            if kept is not None:
                self._held_busy.add(id(kept))
        if kept is None:
            generation = self._generation
            kept = self.engine.connect()
            local.conn, local.generation = kept, generation
            with self._held_lock:
                self._held_all.append(kept)
                self._held_busy.add(id(kept))
        conn = kept
        local.busy = True
        try:
            yield conn
        except BaseException:
            if conn.invalidated:
                with self._held_lock:
                    self._let_go(conn)
            raise
        finally:
            local.busy = False
            if not conn.closed and conn.in_transaction():  # as a return to the pool would
                try:
                    conn.rollback()
                except Exception:
                    with self._held_lock:
                        self._let_go(conn)
            with self._held_lock:
                self._held_busy.discard(id(conn))

    def _let_go(self, conn: Connection) -> None:
        """Stop keeping ``conn`` and close it (the held lock is the caller's): the thread
        that kept it is lent another at its next transaction."""
        if getattr(self._held, "conn", None) is conn:
            self._held.conn = None
        if conn in self._held_all:
            self._held_all.remove(conn)
        self._held_busy.discard(id(conn))
        with contextlib.suppress(Exception):
            conn.close()

    def _let_go_idle(self) -> None:
        """Close every thread's kept connection that is not in a transaction now; the
        others are closed by their threads at their next transaction (a new generation)."""
        with self._held_lock:
            for conn in list(self._held_all):
                if id(conn) not in self._held_busy:
                    self._let_go(conn)

    # --- the cluster's clock ---

    def _now(self) -> float:
        """The time by which leases, claims, heartbeats and due times are written and judged:
        one process writes them and another judges them, so all of the cluster must read one
        clock. This host's clock, corrected by what :meth:`_sync_clock` measured."""
        return time.time() + self._clock_offset

    def _sync_clock(self, conn: Connection) -> None:
        """Measure this host's clock against the store's (a dialect whose processes may run on
        several hosts does; SQLite's share one host and its clock)."""

    # --- hooks a dialect overrides ---

    def _begin_write(self, conn: Connection, durable: bool) -> None:
        """Called on a write transaction's connection before it begins."""

    def _started_write(self, conn: Connection, durable: bool) -> None:
        """Called first in a write transaction."""

    def _notify(self, conn: Connection, channel: str, payload: str = "") -> None:
        """Tell the other processes of the cluster, on commit, that ``channel`` has work."""

    def on_commit(self, channel: str, callback: Callable[[str], None]) -> None:
        self._listeners.setdefault(channel, []).append(callback)

    # --- transactions ---

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Connection]:
        """A write transaction; a locked, full or unreachable database becomes
        :class:`StoreUnavailable`.

        ``durable=False`` (SQLite) commits without syncing the WAL to disk, for writes that
        can be lost in a power cut without losing anything: claims, delivery results and
        plans are all redone from what is durable (a lost "done" means one more delivery,
        which idempotency keys make harmless). Received events always commit durably.
        """
        self.fresh_files()
        try:
            with self._connection() as conn:
                self._begin_write(conn, durable)
                try:
                    with conn.begin():
                        self._started_write(conn, durable)
                        yield conn
                except DBAPIError as exc:
                    self._drop_if_stale(conn, exc)
                    raise
                finally:
                    conn.info.pop("immediate", None)
        except (OperationalError, _Gone, PoolTimeout) as exc:
            raise _unavailable("the store cannot take the write", exc) from None
        except DBAPIError as exc:
            if exc.connection_invalidated or fault_of(exc) is not None:
                raise _unavailable("the store cannot take the write", exc) from None
            raise

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read transaction: one consistent view of the store, and no write lock taken."""
        try:
            with self._connection() as conn:
                try:
                    with conn.begin():
                        yield conn
                except DBAPIError as exc:
                    self._drop_if_stale(conn, exc)
                    raise
        except (OperationalError, PoolTimeout) as exc:
            # PoolTimeout: every connection of the pool is busy (or stuck) past the timeout
            raise _unavailable("the store cannot be read", exc) from None
        except DBAPIError as exc:
            if exc.connection_invalidated or fault_of(exc) is not None:
                raise _unavailable("the store cannot be read", exc) from None
            raise

    def _drop_if_stale(self, conn: Connection, exc: BaseException) -> None:
        """After a fault on the store's files (see STALE_FAULTS) the connection is dropped,
        and the next write reopens every other one (:meth:`fresh_files`)."""
        if fault_of(exc) in STALE_FAULTS:
            if not conn.invalidated:
                conn.invalidate()
            self.stale = True

    def fresh_files(self) -> None:
        """Before a write, after one failed on the store's files: no connection of the pool
        opened before is used again (the idle ones are closed now, the others when next
        lent), so that the next ones open the files afresh. All of them, the readers' too:
        SQLite shares a file's state among a process's connections, and one opened while the
        folder was read-only keeps every new one read-only until it closes."""
        if self.stale:
            self.stale = False
            self._generation += 1
            self._let_go_idle()
            self.engine.pool.dispose()

    def _born(self, _dbapi_connection: Any, record: Any) -> None:
        record.info["generation"] = self._generation

    def _lent(self, _dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if record.info.get("generation", self._generation) != self._generation:
            raise DisconnectionError("opened before the store's files were reopened")

    def _read(self, statement: Any, params: Any = None) -> list[Any]:
        with self.snapshot() as conn:
            return list(conn.execute(statement, params).all())

    def query(self, statement: Any) -> list[Any]:
        """Run a read-only statement (tests)."""
        return self._read(statement)


def _unavailable(what: str, exc: BaseException) -> StoreUnavailable:
    fault = fault_of(exc) or "store unreachable"
    return StoreUnavailable(f"{what} ({reason_of(exc)})", reason=fault)


class _Gone(Exception):
    """Raised by an adapter when its connection to the database is gone mid-transaction."""
