"""``connector reconcile`` plans in a process of its own (issue 17, connector/reconcile_child.py):
the planning runs in a forked child while the command pulls and delivers; ``--no-wait`` plans
here as before; a child that dies, or a run stopped half-way (Ctrl-C), fails the run, leaves
no process behind and loses nothing: a second run delivers every customer."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fakes.treez_api import TreezFake
from test_reconcile import DISPENSARY, in_process, lines, run, store_rows, write_config

from connector import runner
from connector.config import load_config
from connector.reconcile import RunOptions
from connector.reconcile_child import PlanningProcessError
from connector.runner import reconcile_now

WAIT = 60.0  # seconds a run may take before the test fails rather than hangs


@pytest.fixture
def planned_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file each planning batch appends its process id to (the fork carries the patch)."""
    path = tmp_path / "planned-in"
    real = runner.process_batch

    def noting(*args: Any, **kwargs: Any) -> Any:
        with path.open("a") as out:
            out.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "process_batch", noting)
    return path


def _pids(path: Path) -> set[int]:
    return {int(line) for line in path.read_text().split()} if path.exists() else set()


def _active(fake: TreezFake) -> set[str]:
    listed = fake.ids_after(datetime.now(UTC) - timedelta(hours=24))
    return {c for c in listed if (fake.customer(c) or {}).get("status") != "DEACTIVATED"}


def _upserted(work: Path) -> Counter[str]:
    return Counter(op["customer_id"] for op in lines(work) if op["op"] == "upsert")


def test_the_command_plans_in_a_child_and_delivers_each_customer_once(
    tmp_path: Path, planned_in: Path
) -> None:
    fake = TreezFake.generate(230, seed=7, history_days=0.5, rate_limit=None)
    config = load_config(write_config(tmp_path, fake.base_url))
    report = run(config, fake)
    assert report.outcome == "succeeded"
    assert report.counts["pulled"] == 230
    planners = _pids(planned_in)
    assert planners
    assert os.getpid() not in planners
    upserts = _upserted(tmp_path)
    assert set(upserts) == _active(fake)
    assert set(upserts.values()) == {1}
    assert not multiprocessing.active_children()
    # the child released what it held: no process is left registered, nothing in flight
    assert store_rows(tmp_path, "select count(*) from processes") == [(0,)]
    assert store_rows(tmp_path, "select count(*) from outbox where status = 'inflight'") == [(0,)]


def test_without_delivery_this_process_plans(tmp_path: Path, planned_in: Path) -> None:
    fake = TreezFake.generate(120, seed=7, history_days=0.5, rate_limit=None)
    config = load_config(write_config(tmp_path, fake.base_url))
    report = asyncio.run(
        reconcile_now(
            config,
            DISPENSARY,
            RunOptions(),
            wait=False,
            timeout=30,
            echo=lambda _: None,
            reconciler_options={"client_for": in_process(fake)},
        )
    )
    assert report.outcome == "succeeded"
    assert _pids(planned_in) == {os.getpid()}
    assert not lines(tmp_path)  # delivery left to serve
    assert not multiprocessing.active_children()


def test_a_planning_process_that_dies_fails_the_run_and_the_next_run_delivers_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = TreezFake.generate(230, seed=7, history_days=0.5, rate_limit=None)
    config = load_config(write_config(tmp_path, fake.base_url))
    parent = os.getpid()
    real = runner.process_batch

    def dying(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() != parent:  # the child: killed as the OOM killer would
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "process_batch", dying)
    with pytest.raises(PlanningProcessError, match="planning process ended"):
        asyncio.run(asyncio.wait_for(_command(config, fake), WAIT))
    assert store_rows(tmp_path, "select outcome from reconcile_runs") == [("failed",)]
    assert not multiprocessing.active_children()
    monkeypatch.setattr(runner, "process_batch", real)
    again = run(config, fake)
    assert again.outcome == "succeeded"
    upserts = _upserted(tmp_path)
    assert set(upserts) == _active(fake)
    assert set(upserts.values()) == {1}


def test_a_run_stopped_half_way_stops_its_child_and_the_next_run_delivers_everything(
    tmp_path: Path,
) -> None:
    """As Ctrl-C does (the command's task cancelled) while the run pulls, paced by Treez's
    limit: the child stops, and what was stored is planned and delivered by the next run."""
    fake = TreezFake.generate(600, seed=7, history_days=0.5)
    assert fake.rate_limit == 10  # 12 pages: more than a second
    config = load_config(write_config(tmp_path, fake.base_url))

    async def stopped() -> None:
        command = asyncio.create_task(_command(config, fake))
        while not fake.calls or len(fake.calls) < 4:  # a few pages in
            await asyncio.sleep(0.01)
        command.cancel()
        with pytest.raises(asyncio.CancelledError):
            await command

    asyncio.run(asyncio.wait_for(stopped(), WAIT))
    assert not multiprocessing.active_children()
    assert store_rows(tmp_path, "select outcome from reconcile_runs") == [("failed",)]
    assert store_rows(tmp_path, "select count(*) from processes") == [(0,)]
    again = run(config, fake)
    assert again.outcome == "succeeded"
    upserts = _upserted(tmp_path)
    assert set(upserts) == _active(fake)
    assert set(upserts.values()) == {1}


async def _command(config: Any, fake: TreezFake) -> Any:
    return await reconcile_now(
        config,
        DISPENSARY,
        RunOptions(),
        wait=True,
        timeout=30,
        echo=lambda _: None,
        reconciler_options={"client_for": in_process(fake)},
    )
