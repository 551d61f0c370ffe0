"""A run cancelled while its row is being stored is still recorded failed.

``start_run`` runs in the store's thread: a cancel that reaches the run after that thread has
committed the row, but before the call returns, left the row ``running`` (a full CI run caught
it: ``test_attack5_lifecycle``). The next run's ``close_interrupted`` closed it, but until
then the console and ``connector status`` showed a run going that had stopped. The store call
is now shielded and the run recorded failed once it returns; these tests hold the thread in
that window on purpose, so the race is met every time, not by chance.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from fakes.treez_api import TreezFake
from test_reconcile import DISPENSARY, in_process, write_config

from connector.config import load_config
from connector.errors import StoreUnavailable
from connector.pipeline import Deployment, process_batch
from connector.reconcile import Reconciler, RunOptions
from connector.store import AsyncStore, open_store


def _outcomes(astore: AsyncStore) -> list[str]:
    return [run["outcome"] for run in astore.store.runs(DISPENSARY, 10)]


def _stopped_while_stored(tmp_path: Path, cancels: int, fail: bool = False) -> list[str]:
    fake = TreezFake.generate(30, seed=3, history_days=0.5, rate_limit=None)
    config = load_config(write_config(tmp_path, fake.base_url))
    deployment = Deployment.from_config(config)
    astore = AsyncStore(open_store(config.store))
    stored = threading.Event()
    release = threading.Event()
    start_run = astore.store.start_run

    def held(*args: Any, **kwargs: Any) -> Any:
        if fail:  # the write fails once the cancel has come: no row
            stored.set()
            release.wait(10)
            raise StoreUnavailable("the store failed (OperationalError)", reason="gone")
        run_id = start_run(*args, **kwargs)  # committed
        stored.set()
        release.wait(10)
        return run_id

    astore.store.start_run = held  # type: ignore[method-assign]

    async def plan() -> None:
        while (await astore.call(process_batch, astore.store, deployment)).events:
            pass

    async def go() -> None:
        reconciler = Reconciler(config, astore, deployment, plan=plan, client_for=in_process(fake))
        task = asyncio.create_task(reconciler.run(DISPENSARY, RunOptions()))
        while not stored.is_set():
            await asyncio.sleep(0.005)
        for _ in range(cancels):
            task.cancel()
            await asyncio.sleep(0.02)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await reconciler.aclose()

    try:
        asyncio.run(asyncio.wait_for(go(), 30))
        return _outcomes(astore)
    finally:
        release.set()
        astore.close()


def test_a_run_cancelled_after_its_row_is_committed_is_recorded_failed(tmp_path: Path) -> None:
    assert _stopped_while_stored(tmp_path, cancels=1) == ["failed"]


def test_a_run_cancelled_twice_while_its_row_is_stored_is_recorded_failed(
    tmp_path: Path,
) -> None:
    assert _stopped_while_stored(tmp_path, cancels=3) == ["failed"]


def test_a_cancel_is_not_turned_into_the_store_error_that_follows_it(tmp_path: Path) -> None:
    """The store's write failing after the cancel: the run still ends cancelled (what the
    caller asked for), and no run is recorded."""
    assert _stopped_while_stored(tmp_path, cancels=1, fail=True) == []
