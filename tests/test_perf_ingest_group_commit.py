"""The group committer's idle writer is woken once the event loop has run what was ready
(connector/intake.py): submissions made in the same turn of the loop share one commit."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from connector.intake import GroupCommitter
from connector.store.abc import NewEvent, Rejected


class _Writer:
    def __init__(self, batches: list[int]) -> None:
        self.batches = batches

    def add(self, events: Sequence[NewEvent], rejected: Sequence[Rejected] = ()) -> None:
        self.batches.append(len(events) + len(rejected))

    def close(self) -> None:
        pass


class _Store:
    def __init__(self) -> None:
        self.batches: list[int] = []

    def inbox_writer(self) -> _Writer:
        return _Writer(self.batches)


def _event(n: int) -> NewEvent:
    return NewEvent("d", "webhook", "CUSTOMER", str(n), n, "{}")


def test_submissions_of_one_turn_share_the_idle_writers_commit() -> None:
    store = _Store()
    committer = GroupCommitter(store)  # type: ignore[arg-type]

    async def scenario() -> None:
        stopping = asyncio.Event()
        task = asyncio.create_task(committer.run(stopping))
        for _ in range(1000):  # the writer thread waits for work
            if committer._idle:
                break
            await asyncio.sleep(0.001)
        assert committer._idle
        seen: list[bool] = []

        async def probe() -> None:  # runs after the twenty submissions of this turn
            seen.append(committer._kicked)

        # ready in the same turn: twenty submissions, then the probe
        ready = [asyncio.ensure_future(committer.submit(_event(n))) for n in range(20)]
        ready.append(asyncio.ensure_future(probe()))
        await asyncio.gather(*ready)
        # the writer was not woken during the turn: the loop wakes it after running them
        assert seen == [True]
        stopping.set()
        await task

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the writer would win the interpreter lock at once
    try:
        asyncio.run(scenario())
    finally:
        sys.setswitchinterval(switch)
    assert store.batches == [20]
