"""An event at a time costs what each wake-up touches (issue 17, "cost at a trickle"): a store
lane keeps its SQLite connection between transactions, the loops wait for the first of their
events on one future, and the planner's linger runs no timer after a lone batch."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from sqlalchemy import Connection

from connector.delivery._wait import Signal, first_of
from connector.store import AsyncStore, open_store
from connector.store.sqlite import SqliteStore

# --- first_of -----------------------------------------------------------------------------


def test_first_of_returns_when_a_signal_is_set_and_leaves_no_future_behind() -> None:
    async def scenario() -> None:
        a, b = Signal(), Signal()
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, b.set)
        started = loop.time()
        await first_of([a, b], 5.0)
        assert b.is_set()
        assert not a.is_set()
        assert loop.time() - started < 4.0
        assert a._futures == []
        assert b._futures == []

    asyncio.run(scenario())


def test_first_of_times_out_and_returns_at_once_when_one_is_set() -> None:
    async def scenario() -> None:
        a = Signal()
        await first_of([a], 0.01)  # the timeout
        assert not a.is_set()
        assert a._futures == []
        a.set()
        await first_of([a, Signal()], 5.0)  # set already: no wait

    asyncio.run(scenario())


def test_first_of_waits_for_a_plain_event_too() -> None:
    async def scenario() -> None:
        plain, signal = asyncio.Event(), Signal()
        asyncio.get_running_loop().call_later(0.01, plain.set)
        await asyncio.wait_for(first_of([signal, plain], 5.0), 4.0)
        assert plain.is_set()

    asyncio.run(scenario())


def test_first_of_cancelled_forgets_its_future() -> None:
    async def scenario() -> None:
        a = Signal()
        task = asyncio.ensure_future(first_of([a], 5.0))
        await asyncio.sleep(0)
        assert len(a._futures) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a._futures == []
        a.set()  # nothing left to resolve

    asyncio.run(scenario())


def test_a_signal_set_twice_and_cleared_wakes_each_wait_once() -> None:
    async def scenario() -> None:
        a = Signal()
        waits = [asyncio.ensure_future(first_of([a], 5.0)) for _ in range(3)]
        await asyncio.sleep(0)
        a.set()
        a.set()
        await asyncio.wait_for(asyncio.gather(*waits), 4.0)
        a.clear()
        await first_of([a], 0.01)  # cleared: waits again (its timeout)

    asyncio.run(scenario())


# --- a store lane keeps its connection -------------------------------------------------------


def _store(tmp_path: Path) -> SqliteStore:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    assert isinstance(store, SqliteStore)
    return store


def test_a_lane_keeps_one_connection_between_transactions(tmp_path: Path) -> None:
    store = _store(tmp_path)
    astore = AsyncStore(store)
    try:

        def driver() -> int:
            with store.transaction(durable=False) as conn:
                conn.exec_driver_sql("SELECT 1").all()
                return id(conn.connection.dbapi_connection)

        async def scenario() -> list[int]:
            return [await astore.call(driver) for _ in range(3)]

        ids = asyncio.run(scenario())
        assert len(set(ids)) == 1
        assert len(store._held_all) == 1
    finally:
        astore.close()
    assert store._held_all == []


def test_a_thread_that_does_not_ask_takes_from_the_pool(tmp_path: Path) -> None:
    store = _store(tmp_path)
    try:
        with store.transaction(durable=False) as conn:
            conn.exec_driver_sql("SELECT 1").all()
        assert store._held_all == []
    finally:
        store.close()


def test_a_transaction_within_another_takes_another_connection(tmp_path: Path) -> None:
    store = _store(tmp_path)
    found: list[bool] = []

    def lane() -> None:
        store.hold_connection()
        with store.snapshot() as outer:
            with store.snapshot() as inner:
                found.append(outer is not inner)
                inner.exec_driver_sql("SELECT 1").all()
            outer.exec_driver_sql("SELECT 1").all()
        with store.transaction() as conn:
            found.append(conn is outer)  # the kept one again

    try:
        thread = threading.Thread(target=lane)
        thread.start()
        thread.join(30)
        assert found == [True, True]
    finally:
        store.close()


def test_reopened_files_close_every_idle_kept_connection(tmp_path: Path) -> None:
    """After a write fails on the files (read-only, I/O error), every connection opened
    before is closed before the next write: SQLite shares a file's state among a process's
    connections, so one kept open would keep the new ones read-only."""
    store = _store(tmp_path)
    kept: list[Connection] = []
    ready, go = threading.Event(), threading.Event()

    def lane() -> None:
        store.hold_connection()
        with store.transaction(durable=False) as conn:
            kept.append(conn)
        ready.set()
        go.wait(30)
        with store.transaction(durable=False) as conn:
            kept.append(conn)

    try:
        thread = threading.Thread(target=lane)
        thread.start()
        assert ready.wait(30)
        first = kept[0]
        store.stale = True  # as _drop_if_stale leaves it
        with store.transaction(durable=False) as conn:  # another thread's write
            conn.exec_driver_sql("SELECT 1").all()
        assert first.closed
        go.set()
        thread.join(30)
        assert kept[1] is not first
        assert not kept[1].closed
    finally:
        store.close()


def test_a_failed_transaction_leaves_the_kept_connection_usable(tmp_path: Path) -> None:
    store = _store(tmp_path)
    results: list[object] = []

    def lane() -> None:
        store.hold_connection()
        with store.transaction(durable=False) as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER PRIMARY KEY)")

        def failing() -> None:
            with store.transaction(durable=False) as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (1)")
                raise RuntimeError("a bug")

        with pytest.raises(RuntimeError):
            failing()
        with store.transaction(durable=False) as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")  # the first was rolled back
            results.append(conn.exec_driver_sql("SELECT count(*) FROM t").scalar())
            results.append(conn.in_transaction())
        results.append(conn.in_transaction())

    try:
        thread = threading.Thread(target=lane)
        thread.start()
        thread.join(30)
        assert results == [1, True, False]
    finally:
        store.close()
