"""Adversary (attack5): the store failing while ``connector reconcile`` pulls and its child
plans: PostgreSQL's sessions terminated (a failover, an admin), SQLite locked by another
writer for longer than the store timeout. The run fails with the store named, or goes on;
either way no process is left and a rerun delivers every active customer once."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from fakes.treez_api import TreezFake
from test_attack5_child_faults import (
    config_for,
    everything_delivered_once,
    no_process_left,
    rows,
    run,
)

from connector.config import Config, load_config


def _short_timeout(config: Config, work: Path) -> Config:
    path = work / "config.yaml"
    path.write_text("store_timeout_seconds: 0.5\n" + path.read_text())
    return load_config(path)


def _outage(store_url: str, work: Path) -> None:
    if store_url.startswith("sqlite"):
        conn = sqlite3.connect(work / "c.db", timeout=10, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        time.sleep(2.0)  # four store timeouts
        conn.execute("COMMIT")
        conn.close()
        return
    database = store_url.split("?", 1)[0]
    with psycopg.connect(database, autocommit=True) as conn:
        for _ in range(3):  # the sessions reopened meanwhile too
            conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where datname = current_database() and pid <> pg_backend_pid()"
            )
            time.sleep(0.1)


def test_a_store_outage_mid_run_loses_nothing(tmp_path: Path, store_url: str) -> None:
    fake = TreezFake.generate(900, seed=6, history_days=0.5)  # paced: ~2 s of pulling
    config = _short_timeout(config_for(tmp_path, store_url, fake), tmp_path)
    threads: list[threading.Thread] = []

    def hook(fake: TreezFake, request: Any) -> None:
        if request.number == 6:
            thread = threading.Thread(target=_outage, args=(store_url, tmp_path))
            thread.start()
            threads.append(thread)

    fake.on_page(hook)
    failure: Exception | None = None
    try:
        report = run(config, fake)
    except Exception as exc:
        failure = exc
    for thread in threads:
        thread.join()
    assert threads
    no_process_left()
    if failure is None:
        assert report.outcome == "succeeded"
    else:
        outcome = rows(store_url, "select outcome from reconcile_runs order by id")
        assert outcome[-1:] in ([("failed",)], [("running",)]), outcome
    fake.clear_hooks()
    fake.reset_records()
    time.sleep(1.0)  # the lock of a run cut off from its store may outlive it: its TTL
    again = _rerun(config, fake, store_url)
    assert again.outcome == "succeeded"
    no_process_left()
    everything_delivered_once(tmp_path, fake)


def _rerun(config: Config, fake: TreezFake, store_url: str) -> Any:
    from connector.reconcile import ReconcileBusy

    try:
        return run(config, fake)
    except ReconcileBusy:
        # the failed run could not release its lock (the store was gone): it lapses
        engine_rows = rows(store_url, "select count(*) from locks")
        assert engine_rows
        from sqlalchemy import create_engine, text

        engine = create_engine(store_url)
        with engine.begin() as conn:
            conn.execute(text("delete from locks"))
        engine.dispose()
        return run(config, fake)
