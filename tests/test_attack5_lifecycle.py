"""Adversary (attack5) of ``connector reconcile``'s planning child: the parent killed or
interrupted mid-run (no process may linger), repeated runs in one process (no file
descriptor, thread or child piles up), tiny runs, Treez failing mid-pull, and the report's
counts against the in-process planner (``--no-wait``)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from fakes.treez_api import TreezFake
from test_attack5_child_faults import (
    active,
    command,
    config_for,
    everything_delivered_once,
    no_process_left,
    rows,
    run,
    upserted,
)
from test_reconcile import DISPENSARY, in_process, lines

from connector.config import Config, load_config
from connector.reconcile import RunOptions
from connector.runner import reconcile_now

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def test_repeated_runs_in_one_process_leave_no_fd_thread_or_child(
    tmp_path: Path, store_url: str
) -> None:
    fake = TreezFake.generate(120, seed=3, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, store_url, fake)
    fds: list[int] = []
    for i in range(4):
        fake.update(fake.customer_ids()[i], first_name=f"N{i}")
        report = run(config, fake)
        assert report.outcome == "succeeded"
        no_process_left()
        fds.append(len(os.listdir("/proc/self/fd")))
    assert fds[1:] == [fds[1]] * 3, fds


def test_a_failed_run_in_one_process_leaves_no_fd_or_child(tmp_path: Path, store_url: str) -> None:
    fake = TreezFake.generate(200, seed=3, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, store_url, fake)
    fds: list[int] = []
    for _ in range(4):
        fake.fail_next(500, 5, path="lastUpdated")
        with pytest.raises(Exception):  # noqa: B017, PT011
            run(config, fake)
        no_process_left()
        fds.append(len(os.listdir("/proc/self/fd")))
    assert fds[1:] == [fds[1]] * 3, fds


@pytest.mark.parametrize("customers", [0, 1])
def test_tiny_runs(tmp_path: Path, store_url: str, customers: int) -> None:
    fake = TreezFake.generate(customers, seed=3, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, store_url, fake)
    report = run(config, fake)
    assert report.outcome == "succeeded"
    assert report.counts["pulled"] == customers
    no_process_left()
    assert upserted(tmp_path).keys() == active(fake)
    assert set(upserted(tmp_path).values()) <= {1}
    assert {op["customer_id"] for op in lines(tmp_path)} == set(fake.customer_ids())


@pytest.mark.parametrize("failure", [500, 401, "timeout"])
def test_treez_failing_after_some_pages_then_a_rerun_delivers_everything(
    tmp_path: Path, store_url: str, failure: Any
) -> None:
    fake = TreezFake.generate(400, seed=4, history_days=0.5, rate_limit=None, timeout_hang=0.05)
    config = config_for(tmp_path, store_url, fake)
    served = [0]

    def hook(fake: TreezFake, _: Any) -> None:
        served[0] += 1
        if served[0] == 4:  # after three pages: every later request fails
            fake.fail_next(failure, 50)

    fake.on_page(hook)
    with pytest.raises(Exception):  # noqa: B017, PT011
        run(config, fake)
    no_process_left()
    assert rows(store_url, "select outcome from reconcile_runs") == [("failed",)]
    fake.clear_hooks()
    fake.reset_records()
    again = run(config, fake)
    assert again.outcome == "succeeded"
    everything_delivered_once(tmp_path, fake)


def test_counts_match_the_in_process_planner(tmp_path: Path, store_url: str) -> None:
    """The same population reconciled with the child (delivering) and with this process's
    planner (--no-wait), each into a fresh store: the same counts."""
    from conftest import fresh_schema

    def population() -> TreezFake:
        now = __import__("datetime").datetime.now(__import__("datetime").UTC)
        fake = TreezFake.generate(
            310, seed=21, history_days=0.5, rate_limit=None, now=now, clock=lambda: 0.0
        )
        fake.update(fake.customer_ids()[3], opt_out={"not": "a consent"})
        return fake

    child = tmp_path / "child"
    here = tmp_path / "here"
    child.mkdir()
    here.mkdir()
    first = run(config_for(child, store_url, population()), population())
    if store_url.startswith("sqlite"):
        other = f"sqlite:///{here}/c.db"
        second = run(config_for(here, other, population()), population(), wait=False)
    else:
        database = store_url.split("?", 1)[0]
        with fresh_schema(database) as other:
            second = run(config_for(here, other, population()), population(), wait=False)
    assert first.outcome == second.outcome == "succeeded"
    assert first.counts == second.counts


def test_a_run_stopped_while_its_client_is_built_is_recorded_failed_guard_pre(
    tmp_path: Path,
) -> None:
    """Control: a run cancelled once its client is built is recorded failed (the existing
    contract, test_perf3_reconcile_process)."""
    fake = TreezFake.generate(600, seed=7, history_days=0.5)
    config = config_for(tmp_path, f"sqlite:///{tmp_path}/c.db", fake)

    async def stopped() -> None:
        task = asyncio.create_task(command(config, fake))
        while len(fake.calls) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(stopped(), 60))
    assert rows(f"sqlite:///{tmp_path}/c.db", "select outcome from reconcile_runs") == [("failed",)]


def test_a_run_stopped_while_its_client_is_built_is_recorded_failed(tmp_path: Path) -> None:
    fake = TreezFake.generate(60, seed=3, history_days=0.5, rate_limit=None)
    url = f"sqlite:///{tmp_path}/c.db"
    config = config_for(tmp_path, url, fake)
    base = in_process(fake)

    def slow(dispensary: str, disp: Any) -> Any:
        time.sleep(1.0)  # a TLS context on a loaded machine, a large CA bundle
        return base(dispensary, disp)

    async def stopped(config: Config) -> None:
        task = asyncio.create_task(
            reconcile_now(
                config,
                DISPENSARY,
                RunOptions(),
                wait=True,
                timeout=30,
                echo=lambda _: None,
                reconciler_options={"client_for": slow},
            )
        )
        while True:
            await asyncio.sleep(0.01)
            try:
                if rows(url, "select count(*) from reconcile_runs") != [(0,)]:
                    break
            except Exception:
                continue
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(stopped(config), 60))
    no_process_left()
    assert rows(url, "select outcome from reconcile_runs") == [("failed",)]


@pytest.mark.parametrize(
    "url", ["postgresql://postgres@127.0.0.1:1/none", "sqlite:///{work}/no/such/dir/c.db"]
)
def test_a_store_that_cannot_open_after_the_fork_ends_the_child_at_once(
    tmp_path: Path, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = TreezFake.generate(10, seed=3, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, url.format(work=tmp_path), fake)
    path = tmp_path / "config.yaml"
    path.write_text(
        "server:\n  shutdown_grace_seconds: 0\nstore_timeout_seconds: 0.5\n" + path.read_text()
    )
    config = load_config(path)
    with pytest.raises(Exception):  # noqa: B017, PT011
        run(config, fake)
    no_process_left()
    assert "planning_process_killed" not in caplog.text
