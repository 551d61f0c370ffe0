"""Reconciliation's per-dispensary lock (``reconcile:DISPENSARY``) covers dry runs too, and a
run it refuses touches nothing of delivery.

* A dry run pulls from Treez as a run does: beside another run of the same dispensary (a
  scheduled one in ``serve``, a command in another shell) the two together went past Treez's
  10 requests a second per store, each process pacing only itself. Now a dry run takes the
  lock (refused, as a run is, with who holds it), starts a second after the previous run
  ended, and leaves a second after its own last request before the next run may start.
* ``connector reconcile`` started its delivery workers before asking for the lock: a refused
  run took the destination's delivery lease (``deliver:DISPENSARY/DESTINATION``) when it was
  free, and the process that really delivers looked again only 5 s later.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fakes.treez_api import PageRequest, TreezFake, most_in_window
from test_attack5_child_faults import config_for, no_process_left, rows
from test_reconcile import DISPENSARY, in_process, lines, write_config

from connector.cli import main as cli
from connector.config import Config, load_config
from connector.pipeline import Deployment, process_batch
from connector.reconcile import ReconcileBusy, Reconciler, RunOptions
from connector.runner import reconcile_now
from connector.store import AsyncStore, open_store
from connector.store.processes import ProcessesSql

SMALL_PAGES = "      page_size: 10"  # 23 pages of the 230 customers: over two seconds paced


def _fake() -> TreezFake:
    # the fake enforces Treez's limit (10 requests in any second per store)
    return TreezFake.generate(230, seed=7, history_days=0.5, rate_limit=10)


def _in_window(fake: TreezFake) -> int:
    return most_in_window([c.at for c in fake.calls])


async def _reconcilers(config: Config, fake: TreezFake, n: int) -> list[Reconciler]:
    """``n`` reconcilers each with its own store connection and Treez client: ``n`` processes
    (two shells, or a shell and ``serve``), each pacing only its own requests."""
    deployment = Deployment.from_config(config)
    found = []
    for _ in range(n):
        astore = AsyncStore(open_store(config.store))

        async def plan(astore: AsyncStore = astore) -> None:
            while (await astore.call(process_batch, astore.store, deployment)).events:
                pass

        found.append(Reconciler(config, astore, deployment, plan=plan, client_for=in_process(fake)))
    return found


async def _close(reconcilers: list[Reconciler]) -> None:
    for reconciler in reconcilers:
        await reconciler.aclose()
        reconciler.astore.close()


def _holder_named(message: str) -> None:
    """The refusal names the dispensary and who holds its lock (which run, where)."""
    assert DISPENSARY in message
    assert f"pid {os.getpid()}" in message
    assert socket.gethostname()[:32] in message


def test_a_dry_run_beside_a_run_of_the_same_dispensary_is_refused(tmp_path: Path) -> None:
    fake = _fake()
    config = load_config(write_config(tmp_path, fake.base_url, extra=SMALL_PAGES))

    async def both() -> list[Any]:
        reconcilers = await _reconcilers(config, fake, 2)
        try:
            return await asyncio.gather(
                reconcilers[0].run(DISPENSARY, RunOptions(trigger="schedule")),
                reconcilers[1].run(DISPENSARY, RunOptions(dry_run=True)),
                return_exceptions=True,
            )
        finally:
            await _close(reconcilers)

    results = asyncio.run(asyncio.wait_for(both(), 60))
    busy = [r for r in results if isinstance(r, ReconcileBusy)]
    assert len(busy) == 1, results
    _holder_named(str(busy[0]))
    held_by = "dry run" if isinstance(results[0], ReconcileBusy) else "scheduled run"
    assert held_by in str(busy[0])
    assert fake.counters["throttled"] == 0
    assert _in_window(fake) <= 10


def test_a_run_while_a_dry_run_pulls_is_refused_naming_the_dry_run(tmp_path: Path) -> None:
    fake = _fake()
    config = load_config(write_config(tmp_path, fake.base_url, extra=SMALL_PAGES))
    first_page = threading.Event()

    def seen(_: TreezFake, request: PageRequest) -> None:
        first_page.set()

    fake.on_page(seen)

    async def go() -> tuple[Any, BaseException | None]:
        dry, real = await _reconcilers(config, fake, 2)
        try:
            pulling = asyncio.create_task(dry.run(DISPENSARY, RunOptions(dry_run=True)))
            while not first_page.is_set():
                await asyncio.sleep(0.01)
            refused = None
            try:
                await real.run(DISPENSARY, RunOptions(trigger="command"))
            except ReconcileBusy as exc:
                refused = exc
            return await pulling, refused
        finally:
            await _close([dry, real])

    report, refused = asyncio.run(asyncio.wait_for(go(), 60))
    assert report.outcome == "dry run"
    assert report.counts["pulled"] == 230
    assert refused is not None
    _holder_named(str(refused))
    assert "dry run" in str(refused)
    # the dry run released its lock, stored no run and changed nothing
    assert rows(config.store, "select count(*) from locks") == [(0,)]
    for table in ("inbox", "outbox", "customers", "reconcile_runs", "checkpoints"):
        assert rows(config.store, f"select count(*) from {table}") == [(0,)], table


def test_runs_and_dry_runs_one_after_the_other_keep_to_treez_limit(tmp_path: Path) -> None:
    """Each process paces itself; one after another in other processes, a run waits a second
    after the previous one ended (its end is stored): a dry run, whose end nothing stored,
    must neither start sooner after a run nor let the next run start sooner after it."""
    fake = _fake()
    config = load_config(write_config(tmp_path, fake.base_url, extra=SMALL_PAGES))

    async def go() -> list[str]:
        a, b, c = await _reconcilers(config, fake, 3)
        try:
            outcomes = [(await a.run(DISPENSARY, RunOptions(full=True))).outcome]
            outcomes.append((await b.run(DISPENSARY, RunOptions(full=True, dry_run=True))).outcome)
            outcomes.append((await c.run(DISPENSARY, RunOptions(full=True))).outcome)
            return outcomes
        finally:
            await _close([a, b, c])

    assert asyncio.run(asyncio.wait_for(go(), 60)) == ["succeeded", "dry run", "succeeded"]
    assert fake.counters["throttled"] == 0
    assert _in_window(fake) <= 10


def test_the_dry_run_command_refused_names_the_holder_and_calls_no_one(tmp_path: Path) -> None:
    fake = _fake()
    path = write_config(tmp_path, fake.base_url)
    config = load_config(path)
    store = open_store(config.store)
    try:
        holder = f"0123456789ab schedule {socket.gethostname()[:32]} {os.getpid()}"
        assert store.acquire(f"reconcile:{DISPENSARY}", holder, 60)
        result = CliRunner().invoke(cli, ["reconcile", "--config", str(path), "--dry-run"])
        assert result.exit_code == 1
        assert f"reconcile {DISPENSARY}:" in result.output
        assert "already running" in result.output
        assert "scheduled run" in result.output
        _holder_named(result.output)
        # the holder's lock is its own still
        assert [(lease.name, lease.holder) for lease in store.leases()] == [
            (f"reconcile:{DISPENSARY}", holder)
        ]
    finally:
        store.close()
    assert fake.calls == []


def test_a_refused_run_touches_no_delivery_lease(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command refused (another run holds the dispensary's lock) never asks for the
    destination's lease: taken, even for a moment, it kept the process that delivers for the
    destination from claiming until that one looked again, 5 s later."""
    fake = _fake()
    config = config_for(tmp_path, store_url, fake)
    asked: list[str] = []
    acquire = ProcessesSql.acquire

    def recording(self: ProcessesSql, name: str, holder: str, ttl: float) -> bool:
        asked.append(name)
        return acquire(self, name, holder, ttl)

    other = open_store(store_url)
    try:
        assert other.acquire(f"reconcile:{DISPENSARY}", "another-run", 60)
        monkeypatch.setattr(ProcessesSql, "acquire", recording)

        async def refused() -> None:
            await reconcile_now(
                config,
                DISPENSARY,
                RunOptions(),
                wait=True,
                timeout=30,
                echo=lambda _: None,
                reconciler_options={"client_for": in_process(fake)},
            )

        with pytest.raises(ReconcileBusy) as caught:
            asyncio.run(asyncio.wait_for(refused(), 60))
        assert DISPENSARY in str(caught.value)
        assert asked == [f"reconcile:{DISPENSARY}"]
        assert [lease.name for lease in other.leases()] == [f"reconcile:{DISPENSARY}"]
        assert other.registered_processes() == []
    finally:
        other.close()
    no_process_left()
    assert fake.calls == []
    assert lines(tmp_path) == []
