"""Adversary (attack5) of the planning child of ``connector reconcile``
(connector/reconcile_child.py): the child killed at different moments, its planning failing,
on SQLite and PostgreSQL. Whatever happens, no process is left, the run fails or succeeds
honestly, and a rerun delivers every active customer exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fakes.treez_api import TreezFake
from sqlalchemy import create_engine, text
from test_reconcile import DISPENSARY, in_process, lines, write_config

from connector import runner
from connector.config import Config, load_config
from connector.reconcile import RunOptions
from connector.runner import reconcile_now

WAIT = 60.0
SECRET = "zz-attack5-secret@example.com"


def config_for(work: Path, store_url: str, fake: TreezFake, extra: str = "") -> Config:
    path = write_config(work, fake.base_url, extra=extra)
    path.write_text(path.read_text().replace(f"sqlite:///{work}/c.db", store_url))
    return load_config(path)


async def command(config: Config, fake: TreezFake, *, wait: bool = True) -> Any:
    return await reconcile_now(
        config,
        DISPENSARY,
        RunOptions(),
        wait=wait,
        timeout=30,
        echo=lambda _: None,
        reconciler_options={"client_for": in_process(fake)},
    )


def run(config: Config, fake: TreezFake, *, wait: bool = True) -> Any:
    return asyncio.run(asyncio.wait_for(command(config, fake, wait=wait), WAIT))


def rows(store_url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def active(fake: TreezFake) -> set[str]:
    listed = fake.ids_after(datetime.now(UTC) - timedelta(hours=24))
    return {c for c in listed if (fake.customer(c) or {}).get("status") != "DEACTIVATED"}


def upserted(work: Path) -> Counter[str]:
    return Counter(op["customer_id"] for op in lines(work) if op["op"] == "upsert")


def no_process_left(besides: frozenset[int] = frozenset()) -> None:
    assert not multiprocessing.active_children()
    kids = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    for kid in kids:
        if int(kid) in besides:
            continue
        stat = Path(f"/proc/{kid}/stat").read_text()
        comm = stat.split("(", 1)[1].split(")", 1)[0]
        assert "python" not in comm, stat
        assert "connector" not in comm, stat


def everything_delivered_once(work: Path, fake: TreezFake) -> None:
    upserts = upserted(work)
    assert set(upserts) == active(fake)
    assert set(upserts.values()) == {1}


def killing(when: str) -> Any:
    """A process_batch that, in the child only, SIGKILLs it ``when``: ``first`` (before its
    first batch), ``second`` (before its second batch: mid-run), ``committed`` (after a
    batch that planned everything pending committed, before the child says "planned")."""
    parent = os.getpid()
    real = runner.process_batch
    calls = [0]

    def batch(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() == parent:
            return real(*args, **kwargs)
        calls[0] += 1
        if when == "first" or (when == "second" and calls[0] == 2):
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if when == "committed" and result.events and result.events < runner.PLAN_LIMIT:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return batch


@pytest.mark.parametrize("when", ["first", "second", "committed"])
def test_a_child_killed_at_any_moment_loses_nothing(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    fake = TreezFake.generate(230, seed=5, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, store_url, fake)
    monkeypatch.setattr(runner, "process_batch", killing(when))
    try:
        report = run(config, fake)
    except Exception as exc:
        assert "planning process ended" in str(exc)
        outcome = "failed"
    else:
        outcome = report.outcome
    no_process_left()
    assert rows(store_url, "select outcome from reconcile_runs") == [(outcome,)]
    assert rows(store_url, "select count(*) from processes") == [(0,)]
    assert rows(store_url, "select count(*) from outbox where status = 'inflight'") == [(0,)]
    monkeypatch.undo()
    again = run(config, fake)
    assert again.outcome == "succeeded"
    no_process_left()
    everything_delivered_once(tmp_path, fake)


def test_a_child_killed_before_it_read_anything_fails_the_run_not_hangs(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child dies right after the fork (the OOM killer), before the parent connects."""
    from connector import reconcile_child

    fake = TreezFake.generate(120, seed=5, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, store_url, fake)
    real = reconcile_child._die_with_parent

    def die(parent: int) -> None:
        real(parent)
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(reconcile_child, "_die_with_parent", die)
    with pytest.raises(reconcile_child.PlanningProcessError):
        run(config, fake)
    no_process_left()
    monkeypatch.undo()
    assert run(config, fake).outcome == "succeeded"
    everything_delivered_once(tmp_path, fake)


def test_a_planning_failure_in_the_child_fails_the_run_without_a_customer_value(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure outside the per-event guard (the store's plan-commit, a mapping bug in the
    batch's reading) whose message quotes a customer value: the run fails, its record and
    its report name the failure without the value, and the rerun delivers everything."""
    fake = TreezFake.generate(120, seed=5, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, store_url, fake)
    parent = os.getpid()
    real = runner.process_batch

    def failing(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() != parent:
            raise ValueError(f"mapping failed on {SECRET}")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "process_batch", failing)
    with pytest.raises(ValueError, match="mapping failed"):
        run(config, fake)
    no_process_left()
    [(outcome, error)] = rows(store_url, "select outcome, error from reconcile_runs")
    assert outcome == "failed"
    assert SECRET not in (error or "")
    assert "ValueError" in (error or "")
    monkeypatch.undo()
    assert run(config, fake).outcome == "succeeded"
    everything_delivered_once(tmp_path, fake)


class _Unpicklable(Exception):
    def __init__(self, what: str, handle: Any) -> None:
        super().__init__(what)
        self.handle = handle


def test_a_failure_that_cannot_cross_is_named_by_its_class_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = TreezFake.generate(60, seed=5, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, f"sqlite:///{tmp_path}/c.db", fake)
    parent = os.getpid()
    real = runner.process_batch

    def failing(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() != parent:
            raise _Unpicklable(f"bad {SECRET}", lambda: None)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "process_batch", failing)
    from connector.reconcile_child import PlanningProcessError

    with pytest.raises(PlanningProcessError) as caught:
        run(config, fake)
    assert SECRET not in str(caught.value)
    assert "_Unpicklable" in str(caught.value)
    no_process_left()


def test_dry_run_and_no_wait_never_fork(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from connector import reconcile_child

    def no_fork(self: Any) -> None:
        raise AssertionError("forked")

    monkeypatch.setattr(reconcile_child.PlanningProcess, "start", no_fork)
    fake = TreezFake.generate(80, seed=5, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, f"sqlite:///{tmp_path}/c.db", fake)
    dry = asyncio.run(
        reconcile_now(
            config,
            DISPENSARY,
            RunOptions(dry_run=True),
            wait=True,
            timeout=30,
            echo=lambda _: None,
            reconciler_options={"client_for": in_process(fake)},
        )
    )
    assert dry.outcome == "dry run"
    assert not lines(tmp_path)
    assert run(config, fake, wait=False).outcome == "succeeded"
    assert not lines(tmp_path)
    no_process_left()


def _watched(path: Path) -> Any:
    """A process_batch noting, in the child, whether its store's watchdog thread runs."""
    from connector.store import _engine

    parent = os.getpid()
    real = runner.process_batch

    def batch(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() != parent:
            thread = _engine._WATCHDOG._thread
            alive = thread is not None and thread.is_alive()
            with path.open("a") as out:
                out.write(f"{alive}\n")
        return real(*args, **kwargs)

    return batch


@pytest.mark.postgresql_only
def test_the_child_of_a_second_run_in_one_process_has_a_store_watchdog(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = TreezFake.generate(120, seed=5, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, store_url, fake)
    assert run(config, fake).outcome == "succeeded"  # this process's watchdog now runs
    noted = tmp_path / "watched"
    monkeypatch.setattr(runner, "process_batch", _watched(noted))
    fake.update(fake.customer_ids()[0], first_name="Again")
    assert run(config, fake).outcome == "succeeded"
    seen = set(noted.read_text().split())
    assert seen == {"True"}, seen


def _failing_in(where: str) -> Any:
    real = runner.process_batch
    parent = os.getpid()

    def failing_batch_of_a_bug(*args: Any, **kwargs: Any) -> Any:
        if where == "any" or os.getpid() != parent:
            raise ValueError("a bug in planning")
        return real(*args, **kwargs)

    return failing_batch_of_a_bug


def _where(exc: BaseException, caplog: pytest.LogCaptureFixture) -> bool:
    import traceback

    # the traceback, a cause or a note carrying the child's (as multiprocessing.pool's
    # RemoteTraceback does), or a log line in this process
    told = "".join(traceback.format_exception(exc))
    return "failing_batch_of_a_bug" in told or "failing_batch_of_a_bug" in caplog.text


def test_control_in_process_planning_failure_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--no-wait plans here: the failure propagates with its traceback (where it failed)."""
    fake = TreezFake.generate(60, seed=5, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, f"sqlite:///{tmp_path}/c.db", fake)
    monkeypatch.setattr(runner, "process_batch", _failing_in("any"))
    with pytest.raises(ValueError, match="a bug in planning") as caught:
        run(config, fake, wait=False)
    assert _where(caught.value, caplog)


def test_a_planning_failure_in_the_child_says_where_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = TreezFake.generate(60, seed=5, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, f"sqlite:///{tmp_path}/c.db", fake)
    monkeypatch.setattr(runner, "process_batch", _failing_in("child"))
    with pytest.raises(ValueError, match="a bug in planning") as caught:
        run(config, fake)
    no_process_left()
    assert _where(caught.value, caplog)


@pytest.mark.parametrize("when", ["second", "committed"])
def test_an_opt_out_is_never_delivered_subscribed_whatever_the_child_does(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    fake = TreezFake.generate(400, seed=8, history_days=0.5, rate_limit=None)
    config = config_for(tmp_path, store_url, fake)
    assert run(config, fake).outcome == "succeeded"
    subscribed = sorted(
        c for c in active(fake) if (fake.customer(c) or {}).get("opt_out") == "false"
    )[:60]
    for c in subscribed:
        fake.update(c, opt_out="true")
    for c in sorted(active(fake))[-200:]:
        fake.touch(c)  # more than one batch of changes
    before = len(lines(tmp_path))
    monkeypatch.setattr(runner, "process_batch", killing(when))
    with contextlib.suppress(Exception):
        run(config, fake)
    no_process_left()
    monkeypatch.undo()
    assert run(config, fake).outcome == "succeeded"
    after = lines(tmp_path)[before:]
    for c in subscribed:
        consent = [op["op"] for op in after if op["customer_id"] == c]
        consent = [op for op in consent if op in ("subscribe", "unsubscribe")]
        assert consent == ["unsubscribe"], (c, consent)
    keys = Counter(op["idempotency_key"] for op in lines(tmp_path))
    assert set(keys.values()) == {1}
