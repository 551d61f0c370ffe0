"""Reconciliation pipelined (issue 17): the next page is fetched while the current one is
stored and planned, one page ahead and never more; Treez's limit still holds with the fetch
overlapping; planning in its own lane still fails the run when it fails."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from fakes.treez_api import TreezFake, most_in_window
from test_reconcile import DISPENSARY, in_process, run, store_rows, write_config

from connector import runner
from connector.config import load_config
from connector.reconcile import RunOptions, _ahead
from connector.runner import reconcile_now

WAIT = 5.0  # seconds a step may take before the test fails rather than hangs


class Source:
    """Items 0..n-1, each fetched until the test lets it go; records what happened."""

    def __init__(self, n: int, *, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.started: list[int] = []
        self.release = [asyncio.Event() for _ in range(n + 1)]
        self.started_event = [asyncio.Event() for _ in range(n + 1)]
        self.closed = False
        self.cancelled: list[int] = []

    async def items(self) -> AsyncGenerator[int, None]:
        try:
            for i in range(self.n + 1):
                self.started.append(i)
                self.started_event[i].set()
                try:
                    await self.release[i].wait()
                except asyncio.CancelledError:
                    self.cancelled.append(i)
                    raise
                if i == self.fail_at:
                    raise ValueError(f"page {i} failed")
                if i == self.n:
                    return
                yield i
        finally:
            self.closed = True


def test_the_next_item_is_fetched_while_the_current_one_is_handled_and_no_further() -> None:
    async def scenario() -> list[int]:
        source = Source(3)
        for event in source.release:
            event.set()
        got = []
        async for item in _ahead(source.items()):
            # while this item is handled, the next one's fetch is under way...
            await asyncio.wait_for(source.started_event[item + 1].wait(), WAIT)
            await asyncio.sleep(0.01)
            # ...and not the one after it
            assert source.started[-1] == item + 1
            got.append(item)
        assert source.closed
        return got

    assert asyncio.run(scenario()) == [0, 1, 2]


def test_a_failure_of_the_source_is_raised_where_its_item_would_come() -> None:
    async def scenario() -> list[int]:
        source = Source(3, fail_at=1)
        for event in source.release:
            event.set()
        got: list[int] = []

        async def consume() -> None:
            async for item in _ahead(source.items()):
                got.append(item)

        with pytest.raises(ValueError, match="page 1 failed"):
            await consume()
        assert source.closed
        return got

    assert asyncio.run(scenario()) == [0]


def test_leaving_early_cancels_the_fetch_under_way() -> None:
    async def scenario() -> None:
        source = Source(3)
        source.release[0].set()  # the second item never comes
        async with contextlib.aclosing(_ahead(source.items())) as items:
            async for _ in items:
                await asyncio.wait_for(source.started_event[1].wait(), WAIT)
                break
        assert source.cancelled == [1]
        assert source.closed

    asyncio.run(scenario())


def test_with_the_fetch_ahead_the_limit_still_holds(tmp_path: Path) -> None:
    """Over a dozen requests against the fake's 10 per sliding second: none refused, never
    more than 10 in any second of the fake's own clock, and every customer pulled."""
    fake = TreezFake.generate(600, seed=7, history_days=0.5)
    assert fake.rate_limit == 10
    config = load_config(write_config(tmp_path, fake.base_url))
    report = run(config, fake)
    assert report.outcome == "succeeded"
    assert report.counts["pulled"] == 600
    arrivals = [call.at for call in fake.calls]
    assert len(arrivals) > 12
    assert fake.counters["throttled"] == 0
    assert most_in_window(arrivals) <= 10


def test_a_planning_failure_fails_the_run(tmp_path: Path, monkeypatch: Any) -> None:
    fake = TreezFake.generate(120, seed=7, history_days=0.5, rate_limit=None)
    config = load_config(write_config(tmp_path, fake.base_url))

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("planning broke")

    monkeypatch.setattr(runner, "process_batch", broken)
    with pytest.raises(RuntimeError, match="planning broke"):
        asyncio.run(
            asyncio.wait_for(
                reconcile_now(
                    config,
                    DISPENSARY,
                    RunOptions(),
                    wait=True,
                    timeout=30,
                    echo=lambda _: None,
                    reconciler_options={"client_for": in_process(fake)},
                ),
                60,  # a swallowed failure would wait for the planning for ever
            )
        )
    assert store_rows(tmp_path, "select outcome from reconcile_runs") == [("failed",)]
