"""Adversary for the SQLite store faults (issue 16, item 3): what tests/test_store_faults.py
does not try. Each break found is a strict xfail (the reason says what and where); attacks
that held stay as ordinary tests.

Found:

- a delivery round whose result cannot be written while the store is locked (or full, or
  read-only: any fault that leaves reads working) is dropped after one retry, and its
  operations stay ``inflight``, renewed by the heartbeat, until the process ends: the
  customer's later operations wait behind them for good;
- a fault on the inbox alone (a corrupt page of the inbox table): ``/readyz`` probes another
  table, says 200 while every webhook is 503, and the log says ``store_fault`` and
  ``store_recovered`` again at every probe;
- a refused body while the store takes no write is answered its 4xx (Treez will not send it
  again) and never stored, with an error line per request;
- a store on a read-only folder after a clean stop (no ``-wal``/``-shm`` left): ``serve``
  exits 1 "cannot be opened (unable to open database file)" instead of serving 503 with
  ``/readyz`` naming "store read-only" and recovering;
- a SQLite database of another application that has its own ``alembic_version`` table is
  called "newer than this connector knows: upgrade the connector";
- a full store freed while no webhook comes stays 503 on ``/readyz`` (a full store is never
  probed): behind a balancer that sends only to ready replicas it never comes back.

Held: a lock in the middle of a stream of concurrent webhooks (every 202 has its row, one
``store_fault`` and one ``store_recovered`` line, no customer value or token in the output).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_e2e import (
    HEADERS,
    TOKEN,
    Event,
    Procs,
    connector_command,
    procs,
    start_server,
    start_sink,
)
from test_store_faults import (
    bind_mount,
    delivered,
    fill,
    mount,
    post,
    ready,
    wait_for,
    write_config,
)

from connector.store import open_store
from connector.store._engine import TEST_MAX_PAGES_ENV

__all__ = ["bind_mount", "procs"]  # the fixtures, imported for its tests


def ro_db(store: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True)


def outbox_statuses(store: Path, customer_id: str) -> list[str]:
    with contextlib.closing(ro_db(store)) as db:
        rows = db.execute(
            "SELECT status FROM outbox WHERE customer_id = ? ORDER BY id", (customer_id,)
        )
        return [str(r[0]) for r in rows]


# --- a delivery round whose result cannot be written ----------------------------------------


def test_a_round_finished_while_the_store_is_locked_is_not_stranded(
    tmp_path: Path, procs: Procs
) -> None:
    store = tmp_path / "store.sqlite"
    sink = start_sink(procs, "sink", "--delay", "2")
    server = start_server(procs, write_config(tmp_path, store, sink.url), "serve")
    holder = sqlite3.connect(store, isolation_level=None, check_same_thread=False)
    try:
        with httpx.Client(timeout=20) as client:
            assert wait_for(lambda: ready(client, server).status_code == 200, 30)
            assert post(client, server, Event("900", 1)).status_code == 202
            # claimed and sent: the sink holds the request for 2 s
            assert wait_for(lambda: outbox_statuses(store, "900") == ["inflight"], 20)
            holder.execute("BEGIN EXCLUSIVE")  # another program's long write transaction
            # the sink answers; the result cannot be written, the worker backs off and tries
            # again (its back-off is 2 s after one failure): long enough for both
            lines = len(server.proc.log_lines())
            assert wait_for(
                lambda: any(
                    line.get("event") == "delivery_loop_failed"
                    for line in server.proc.log_lines()[lines:]
                ),
                20,
            ), server.proc.tail()
            time.sleep(5.0)
            holder.execute("COMMIT")
            # the store is writable again: a newer version of the same customer
            assert post(client, server, Event("900", 2)).status_code == 202
            assert wait_for(lambda: "inflight" not in outbox_statuses(store, "900"), 30), (
                outbox_statuses(store, "900"),
                [
                    line
                    for line in server.proc.log_lines()
                    if line.get("event", "").startswith("delivery")
                ],
            )
            assert wait_for(lambda: outbox_statuses(store, "900") == ["done", "done"], 20)
    finally:
        holder.close()


# --- a fault on the inbox alone: readiness probes another table ------------------------------


def corrupt_table(store: Path, table: str) -> None:
    """Overwrite the root page of ``table`` with bytes that are no b-tree page (a closed
    store: no WAL left)."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        root = int(
            db.execute(
                "SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()[0]
        )
    assert root > 1
    with store.open("r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * page_size)


def test_a_corrupt_inbox_keeps_readyz_503_and_one_fault_line(tmp_path: Path, procs: Procs) -> None:
    store = tmp_path / "store.sqlite"
    open_store(f"sqlite:///{store}").close()
    corrupt_table(store, "inbox")
    sink = start_sink(procs, "sink")
    server = start_server(procs, write_config(tmp_path, store, sink.url), "serve")
    answers, readiness = [], []
    with httpx.Client(timeout=20) as client:
        for n in range(3):
            response = post(client, server, Event(str(800 + n), 1))
            answers.append(response.status_code)
            readiness.append(ready(client, server).status_code)
    assert answers == [503, 503, 503]  # held: refused, never a 2xx or a 500
    lines = server.proc.log_lines()
    faults = [line.get("reason") for line in lines if line.get("event") == "store_fault"]
    assert faults[:1] == ["store corrupt"], faults
    assert readiness == [503, 503, 503], readiness
    assert len(faults) == 1, faults


# --- a refused body while the store takes no write ----------------------------------------------


def quarantined(store: Path) -> int:
    with contextlib.closing(ro_db(store)) as db:
        return int(db.execute("SELECT count(*) FROM quarantine").fetchone()[0])


def test_a_refused_body_during_a_fault_is_kept_or_answered_503(
    tmp_path: Path, procs: Procs
) -> None:
    store = tmp_path / "store.sqlite"
    sink = start_sink(procs, "sink")
    server = start_server(procs, write_config(tmp_path, store, sink.url), "serve")
    holder = sqlite3.connect(store, isolation_level=None, check_same_thread=False)
    owed = 0
    try:
        with httpx.Client(timeout=20) as client:
            assert wait_for(lambda: ready(client, server).status_code == 200, 30)
            lines = len(server.proc.log_lines())
            holder.execute("BEGIN EXCLUSIVE")
            for n in range(3):
                response = client.post(server.webhook, content=b"{not json %d" % n, headers=HEADERS)
                assert response.status_code in (400, 503), response.text
                owed += response.status_code == 400
            holder.execute("COMMIT")
            logged = server.proc.log_lines()[lines:]
    finally:
        holder.close()
    errors = [line for line in logged if line.get("level") in ("error", "critical")]
    assert quarantined(store) >= owed, (owed, quarantined(store))
    assert len(errors) <= 1, errors


# --- a read-only store after a clean stop ---------------------------------------------------------


def read_only_after_a_clean_stop(folder: Path) -> Path:
    """A store made and closed cleanly (no -wal, no -shm left), its folder then read-only."""
    store = folder / "store.sqlite"
    open_store(f"sqlite:///{store}").close()
    assert not Path(f"{store}-wal").exists()
    mount("-o", "remount,bind,ro", str(folder))
    return store


@pytest.mark.xfail(
    strict=True,
    reason="left for later: a read-only store without -wal/-shm (a clean stop before) cannot "
    "even be read in WAL mode (SQLite must create -shm): `serve` exits 1 naming the file "
    "and 'store read-only' (a supervisor's restart recovers once it is writable) instead of "
    "serving 503 and recovering in place (what it does when a crash left -shm)",
)
def test_a_read_only_store_after_a_clean_stop_is_served_503_and_recovers(
    bind_mount: Path, tmp_path: Path, procs: Procs
) -> None:
    store = read_only_after_a_clean_stop(bind_mount)
    sink = start_sink(procs, "sink")
    server = start_server(procs, write_config(tmp_path, store, sink.url), "serve")
    with httpx.Client(timeout=20) as client:
        answer = ready(client, server)
        assert answer.status_code == 503, answer.text
        assert any(p.startswith("store read-only") for p in answer.json()["problems"])
        assert post(client, server, Event("700", 1)).status_code == 503
        mount("-o", "remount,bind,rw", str(bind_mount))
        assert wait_for(lambda: ready(client, server).status_code == 200, 15)
        assert post(client, server, Event("701", 1)).status_code == 202
        assert wait_for(lambda: "701" in delivered(sink.record), 30)


def test_check_on_a_read_only_store_says_read_only(bind_mount: Path, tmp_path: Path) -> None:
    store = read_only_after_a_clean_stop(bind_mount)
    config = write_config(tmp_path, store, "http://127.0.0.1:9/")
    done = subprocess.run(
        [*connector_command(), "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stdout + done.stderr  # held
    said = [line for line in done.stderr.splitlines() if str(store) in line]
    assert len(said) == 1, done.stderr  # held: one line naming the file
    assert "read-only" in said[0], said


# --- another application's database with an alembic_version table of its own ------------------


def test_a_foreign_alembic_database_is_called_foreign(tmp_path: Path) -> None:
    store = tmp_path / "store.sqlite"
    with contextlib.closing(sqlite3.connect(store)) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        db.execute("INSERT INTO alembic_version VALUES ('ae1027a6acf')")
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.commit()
    original = store.read_bytes()
    config = write_config(tmp_path, store, "http://127.0.0.1:9/")
    done = subprocess.run(
        [*connector_command(), "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1  # held: refused
    assert store.read_bytes() == original  # held: untouched
    said = [line for line in done.stderr.splitlines() if str(store) in line]
    assert len(said) == 1, done.stderr
    assert "another application" in said[0], said
    assert "upgrade the connector" not in said[0], said


# --- a full store that is freed while no webhook comes -------------------------------------------


def full_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, int]:
    """A store and a page cap for the server (the test-only env var), little room left."""
    store = tmp_path / "store.sqlite"
    open_store(f"sqlite:///{store}").close()
    with contextlib.closing(sqlite3.connect(store)) as db:
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    limit = pages + 100
    monkeypatch.setenv(TEST_MAX_PAGES_ENV, str(limit))
    return store, limit


def test_a_freed_store_is_ready_again_without_a_webhook(
    tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, limit = full_store(tmp_path, monkeypatch)
    sink = start_sink(procs, "sink")
    server = start_server(procs, write_config(tmp_path, store, sink.url), "serve")
    filler = sqlite3.connect(store, isolation_level=None, check_same_thread=False)
    filler.execute(f"PRAGMA max_page_count={limit}")
    try:
        with httpx.Client(timeout=20) as client:
            assert wait_for(lambda: ready(client, server).status_code == 200, 30)
            fill(filler)
            answers = [post(client, server, Event(str(400 + n), 1)).status_code for n in range(5)]
            assert answers[-1] == 503, answers  # held
            assert ready(client, server).status_code == 503  # held
            filler.execute("DROP TABLE filler")  # the disk is freed; the balancer sends nothing
            assert wait_for(lambda: ready(client, server).status_code == 200, 15), ready(
                client, server
            ).text
    finally:
        filler.close()


# --- a fault in the middle of a stream of concurrent webhooks: held ------------------------------


def test_no_202_without_its_row_when_the_store_locks_mid_stream(
    tmp_path: Path, procs: Procs
) -> None:
    """Ten clients posting webhooks without pause, the store locked by another program while
    they post and freed before they stop: every answer is 202 or 503 (never a 500), every
    202 has its row, and the sink gets each acknowledged event. Held."""
    store = tmp_path / "store.sqlite"
    sink = start_sink(procs, "sink")
    server = start_server(procs, write_config(tmp_path, store, sink.url), "serve")
    holder = sqlite3.connect(store, isolation_level=None, check_same_thread=False)
    answers: dict[str, int] = {}
    stop = threading.Event()

    def send(n: int) -> None:
        with httpx.Client(timeout=20) as client:
            for k in range(1000):
                if stop.is_set():
                    return
                event = Event(str(100_000 + 1000 * n + k), 1)
                answers[event.customer_id] = post(client, server, event).status_code

    def count(status: int) -> int:
        return list(answers.values()).count(status)

    try:
        with httpx.Client(timeout=20) as client:
            assert wait_for(lambda: ready(client, server).status_code == 200, 30)
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            sent = [pool.submit(send, n) for n in range(10)]
            try:
                assert wait_for(lambda: count(202) >= 20, 20)
                holder.execute("BEGIN EXCLUSIVE")
                assert wait_for(lambda: count(503) >= 10, 20)
                holder.execute("COMMIT")
                after = count(202)
                assert wait_for(lambda: count(202) >= after + 20, 20)
            finally:
                stop.set()
            for future in sent:
                future.result()
    finally:
        holder.close()
    assert set(answers.values()) <= {202, 503}, answers
    acked = {cid for cid, status in answers.items() if status == 202}
    assert 503 in answers.values(), answers
    assert acked, answers
    with contextlib.closing(ro_db(store)) as db:
        rows = [str(r[0]) for r in db.execute("SELECT customer_id FROM inbox")]
    assert acked <= set(rows), sorted(acked - set(rows))
    assert wait_for(lambda: acked <= delivered(sink.record), 60), sorted(
        acked - delivered(sink.record)
    )
    lines = server.proc.log_lines()
    said = [
        (line["event"], line.get("reason"))
        for line in lines
        if line.get("event") in ("store_fault", "store_recovered")
    ]
    assert said == [("store_fault", "store locked"), ("store_recovered", "store locked")], said
    # what the log and /readyz say of the fault carries no customer's value, no token
    output = server.proc.out_path.read_text() + server.proc.err_path.read_text()
    assert "@example.com" not in output
    assert TOKEN not in output


def test_readiness_checks_asked_at_once_share_one_check() -> None:
    """On a locked store one check takes up to the store timeout; checks asked for while it
    runs wait for its answer rather than queueing their own behind it on the store's thread."""
    from types import SimpleNamespace

    from connector.service import Service

    calls = 0
    release = asyncio.Event()

    async def check() -> list[str]:
        nonlocal calls
        calls += 1
        await release.wait()
        return [f"store locked (check {calls})"]

    async def many() -> list[list[str]]:
        stub = SimpleNamespace(_readiness=None, _check_readiness=check)
        asked = [asyncio.ensure_future(Service.readiness(stub)) for _ in range(8)]  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        release.set()
        answers = await asyncio.gather(*asked)
        answers.append(await Service.readiness(stub))  # type: ignore[arg-type]  # a new check
        return answers

    answers = asyncio.run(many())
    assert answers[:8] == [["store locked (check 1)"]] * 8
    assert answers[8] == ["store locked (check 2)"]
    assert calls == 2


def test_sqlite_connections_cap_the_wal_after_a_checkpoint(tmp_path: Path) -> None:
    """A WAL grown behind a long reader is cut back after its next checkpoint (SQLite keeps a
    grown WAL at its size unless journal_size_limit is set)."""
    from connector.store._engine import WAL_SIZE_LIMIT_BYTES

    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        with store.engine.connect() as conn:
            limit = conn.exec_driver_sql("PRAGMA journal_size_limit").scalar()
        assert limit == WAL_SIZE_LIMIT_BYTES
    finally:
        store.close()


def test_check_warns_of_a_store_folder_it_cannot_write(bind_mount: Path, tmp_path: Path) -> None:
    """A store still to be created in a read-only folder: `check` warns, naming it (serve
    would answer every webhook 503); --strict makes the warning an error."""
    mount("-o", "remount,bind,ro", str(bind_mount))
    store = bind_mount / "new.sqlite"
    config = write_config(tmp_path, store, "http://127.0.0.1:9/")
    for strict, code in (([], 0), (["--strict"], 1)):
        command = [*connector_command(), "check", "--config", str(config), *strict]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        lines = (done.stdout + done.stderr).splitlines()
        said = [line for line in lines if str(store) in line and "read-only" in line]
        assert len(said) == 1, done.stdout + done.stderr
        assert done.returncode == code, done.stdout + done.stderr
