"""The group committer's watch of a hanging commit (connector/intake.py ``_watch``) sleeps
while nobody waits for a commit, and still answers 503 when a commit hangs after a long idle,
and lets callers in again once the hung commit ends."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from connector.errors import StoreUnavailable
from connector.intake import GroupCommitter
from connector.store.abc import NewEvent, Rejected


class _Writer:
    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.batches = 0

    def add(self, events: Sequence[NewEvent], rejected: Sequence[Rejected] = ()) -> None:
        self.batches += 1
        self.gate.wait(10)  # a hung database until the test opens the gate

    def close(self) -> None:
        pass


class _Store:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.writer = _Writer(self.gate)

    def inbox_writer(self) -> _Writer:
        return self.writer


def _event(n: int) -> NewEvent:
    return NewEvent("d", "webhook", "CUSTOMER", str(n), n, "{}")


def test_the_watch_sleeps_while_idle_and_still_catches_a_hung_commit() -> None:
    store = _Store()
    committer = GroupCommitter(store, timeout=0.2)  # type: ignore[arg-type]
    looks = 0
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float) -> None:
        nonlocal looks
        looks += 1
        await real_sleep(delay)

    async def scenario() -> None:
        stopping = asyncio.Event()
        task = asyncio.create_task(committer.run(stopping))
        await real_sleep(0.3)  # idle: the watch parks
        assert committer._watch_wake is not None
        asyncio_sleep, asyncio.sleep = asyncio.sleep, counting_sleep  # type: ignore[assignment]
        try:
            await real_sleep(0.5)
            idle_looks = looks
            # a commit hangs: its caller and a later one are answered 503 within the timeout
            first = asyncio.ensure_future(committer.submit(_event(1)))
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(first, 2)
            with pytest.raises(StoreUnavailable):
                await committer.submit(_event(2))  # refused at once while the commit hangs
            await real_sleep(0.3)  # nobody waits now, and the commit still hangs
            store.gate.set()  # the database answers again
            for _ in range(200):
                if not committer._stuck:
                    break
                await real_sleep(0.01)
            assert not committer._stuck
            await asyncio.wait_for(committer.submit(_event(3)), 2)
        finally:
            asyncio.sleep = asyncio_sleep  # type: ignore[assignment]
        assert idle_looks == 0
        stopping.set()
        await task

    asyncio.run(scenario())
