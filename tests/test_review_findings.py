"""Defects found by a review of the store's split into ports and its PostgreSQL adapter: each
test failed before its fix (see the commit that follows it)."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy import insert, select, update

from connector.cli import main
from connector.config import display_url
from connector.store import CLAIM_SECONDS, NewEvent, Rejected, Store, open_store
from connector.store.schema import inbox, locks, outbox, processes, quarantine, schedule_ticks

DISPENSARY = "shop1"
DEST = "aiq"
SECRET = "s3cret"


# --- secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u@127.0.0.1:5999/x?password={SECRET}",
        f"postgresql://u@127.0.0.1:5999/x?sslmode=require&password={SECRET}&application_name=a",
        f"postgresql://u@127.0.0.1:5999/x?sslpassword={SECRET}",
        f"postgresql://u:{SECRET}@127.0.0.1:5999/x?password={SECRET}",
    ],
)
def test_a_password_given_as_a_query_parameter_is_hidden(url: str) -> None:
    """libpq takes ``password`` (and ``sslpassword``) in the URL's query as well as in its
    user part: ``store_display`` (serve's start line, check, migrate) showed it."""
    shown = display_url(url)
    assert SECRET not in shown
    assert "127.0.0.1:5999/x" in shown


def test_check_never_prints_a_store_password_given_in_the_query(tmp_path: Path) -> None:
    (tmp_path / "mappings").mkdir()
    shutil.copy(Path(__file__).parent.parent / "mappings" / "http.yaml", tmp_path / "mappings")
    path = tmp_path / "config.yaml"
    path.write_text(
        f"store: postgresql://u@127.0.0.1:5999/x?password={SECRET}\n"
        "dispensaries:\n"
        "  shop1:\n"
        "    webhook_token: a-real-token\n"
        "    destinations:\n"
        "      - {name: first, type: jsonl, path: out.jsonl, mapping: mappings/http.yaml}\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert "127.0.0.1:5999" in result.output, result.output
    assert SECRET not in result.output


# --- clocks ---------------------------------------------------------------------------------


@pytest.fixture
def pg_store(store_url: str) -> Iterator[Store]:
    store = open_store(store_url, listen=False)
    yield store
    store.close()


def _one_operation(store: Store) -> None:
    now = time.time()
    with store.transaction() as conn:
        conn.execute(
            insert(outbox).values(
                dispensary=DISPENSARY,
                destination=DEST,
                order_key="c1",
                customer_id="c1",
                op="upsert",
                payload="{}",
                idempotency_key="k1",
                status="pending",
                attempts=0,
                created_at=now,
                next_attempt_at=now,
            )
        )


SKEW = 60.0  # another host's clock, this far ahead (NTP not running there)


@pytest.mark.postgresql_only
def test_a_replica_whose_clock_runs_ahead_takes_no_live_lease_nor_claim(
    pg_store: Store, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases and claims are judged by the time of the database, not by each host's clock:
    a replica whose clock runs a minute ahead took a live lease at once and claimed the
    operations another replica had in flight (``claimed_until`` of the holder's clock), so
    both delivered one destination, and one operation twice, at the same time."""
    first = pg_store
    lease = f"deliver:{DISPENSARY}/{DEST}"
    assert first.acquire(lease, first.process_id, 20.0)
    _one_operation(first)
    assert len(first.claim(DISPENSARY, DEST, 10)) == 1

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + SKEW)
    second = open_store(store_url, listen=False)
    try:
        second.register_process()
        assert not second.acquire(lease, second.process_id, 20.0)
        assert second.claim(DISPENSARY, DEST, 10) == []
        assert second.pending_count(DISPENSARY, DEST) == 0  # still in flight, with its holder
    finally:
        second.close()
    assert SKEW > CLAIM_SECONDS


# --- the listener ---------------------------------------------------------------------------


@pytest.mark.postgresql_only
def test_the_listener_connects_with_the_pools_keepalives(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listening thread's connection only ever reads: on a network that drops it
    silently (a NAT's idle timeout, a failed-over database address) it saw no error, stayed
    "connected" and heard nothing for good, every wake-up of the cluster lost. Its connection
    takes the keepalives and TCP timeout the pool's connections have."""
    from connector.store import postgres

    seen: list[dict[str, object]] = []

    def connect(*_args: object, **kwargs: object) -> None:
        seen.append(kwargs)
        raise psycopg.OperationalError("refused by the test")

    store = open_store(store_url, listen=True)
    monkeypatch.setattr(postgres.psycopg, "connect", connect)
    try:
        store.on_commit("inbox", lambda _payload: None)
        assert wait_until(lambda: bool(seen), 10.0)
    finally:
        store.close()
    assert seen[0].get("keepalives") == 1
    assert "tcp_user_timeout" in seen[0]


# --- PgBouncer in transaction mode ----------------------------------------------------------


@pytest.mark.postgresql_only
def test_polling_only_a_transaction_has_the_lock_timeout_whatever_session_it_lands_on(
    store_url: str,
) -> None:
    """``store_listen: false`` is for PgBouncer in transaction mode (README), where a
    transaction lands on any server session: a ``SET`` made once at connect is not there (a
    locked table held a webhook's request without end, no 503) and psycopg's prepared
    statements are not either. Each transaction sets its own lock timeout, and nothing is
    prepared."""
    store = open_store(store_url, listen=False, timeout=5.0)
    try:
        with store.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            raw.execute("RESET lock_timeout")  # another session's settings: none of ours
            raw.commit()
            with conn.begin():
                assert conn.exec_driver_sql("SHOW lock_timeout").scalar_one() == "5s"
            assert getattr(raw, "prepare_threshold", 0) is None
    finally:
        store.close()


# --- scheduled ticks ------------------------------------------------------------------------


@pytest.fixture
def any_store(store_url: str) -> Iterator[Store]:
    store = open_store(store_url, listen=False)
    yield store
    store.close()


def test_purge_forgets_scheduled_ticks_long_past(any_store: Store) -> None:
    """One row per scheduled tick, kept for good: a schedule every minute wrote half a
    million rows a year and dispensary. A tick is claimed within the scheduler's misfire
    grace (600 s) or never: retention forgets those older than delivered operations."""
    now = time.time()
    assert any_store.claim_tick("reconcile:shop1", now - 10 * 86_400, "a")
    assert any_store.claim_tick("reconcile:shop1", now - 60, "a")
    with any_store.transaction() as conn:
        conn.execute(update(schedule_ticks).values(claimed_at=schedule_ticks.c.tick_at))

    any_store.purge(raw_before=now - 30 * 86_400, delivered_before=now - 7 * 86_400)

    left = [row.tick_at for row in any_store.query(select(schedule_ticks.c.tick_at))]
    assert left == [now - 60]
    assert not any_store.claim_tick("reconcile:shop1", now - 60, "b")


# --- a restarted process --------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_a_restart_with_the_predecessors_pid_takes_its_lease_at_once(store_url: str) -> None:
    """A container restarted gives its entry point the pid (and host name) its predecessor
    had: the predecessor counted as alive, and its lease held every destination until it
    lapsed (up to LEASE_SECONDS; its claims up to CLAIM_SECONDS)."""
    store = open_store(store_url)
    now = time.time()
    lease = f"deliver:{DISPENSARY}/{DEST}"
    try:
        with store.transaction() as conn:
            conn.execute(
                insert(processes).values(
                    id="predecessor",
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=now - 3600,  # before this process started
                    heartbeat_at=now - 1,
                )
            )
            conn.execute(
                insert(locks).values(name=lease, holder="predecessor", expires_at=now + 19)
            )
        store.register_process()
        assert store.acquire(lease, store.process_id, 20.0)
    finally:
        store.close()


# --- NOTIFY ---------------------------------------------------------------------------------


@pytest.mark.postgresql_only
def test_a_batch_touching_many_destinations_still_commits_and_wakes_them(store_url: str) -> None:
    """A planned batch names every destination it queued for in its NOTIFY, and PostgreSQL
    refuses a payload of 8000 bytes or more: a batch of events from a few hundred
    dispensaries' destinations failed to commit, again at every try, and planning stopped.
    Such a batch wakes every worker instead (an empty payload)."""
    store = open_store(store_url, listen=True)
    heard: list[str] = []
    try:
        store.on_commit("outbox", heard.append)

        assert wait_until(lambda: store.listening, 10.0)
        heard.clear()
        touched = " ".join(f"dispensary{n:04}/klaviyo" for n in range(400))
        with store.transaction(durable=False) as conn:
            store._notify(conn, "outbox", touched)  # as a planned batch's commit does
        assert wait_until(lambda: bool(heard), 10.0)
        assert heard == [""]
    finally:
        store.close()


# --- column lengths PostgreSQL enforces (SQLite does not) -----------------------------------


def test_a_refused_body_with_a_long_content_type_is_quarantined(any_store: Store) -> None:
    """A request's Content-Type, as sent, goes to quarantine.content_type, VARCHAR(255): on
    PostgreSQL a longer one failed the group commit it was in (every other request of the
    batch answered 503), and the refused body was never kept."""
    content_type = "text/plain; " + "x" * 400
    any_store.add_events(
        [NewEvent(DISPENSARY, "webhook", "CUSTOMER", "c1", 1, "{}")],
        [Rejected(DISPENSARY, 415, "content type must be application/json", content_type, b"x")],
    )
    kept = any_store.query(select(quarantine.c.content_type))
    assert len(kept) == 1
    assert content_type.startswith(kept[0].content_type)
    assert len(any_store.query(select(inbox.c.id))) == 1


@pytest.mark.parametrize(
    ("dispensary", "destination"),
    [("d" * 129, "sink"), ("shop1", "s" * 129), ("d" * 80, "s" * 80)],
)
def test_names_longer_than_the_store_takes_are_refused(
    tmp_path: Path, dispensary: str, destination: str
) -> None:
    """Dispensary and destination names are stored in VARCHAR(128) columns and the delivery
    lease ``deliver:DISPENSARY/DESTINATION`` in a VARCHAR(160) one. PostgreSQL enforces them
    (SQLite does not): with longer names every webhook of the dispensary, or every lease
    taken for the destination, failed (so nothing was delivered). The configuration refuses
    them."""
    from connector.config import load_config
    from connector.errors import ConfigError

    (tmp_path / "mappings").mkdir()
    shutil.copy(Path(__file__).parent.parent / "mappings" / "http.yaml", tmp_path / "mappings")
    path = tmp_path / "config.yaml"
    path.write_text(
        "dispensaries:\n"
        f"  {dispensary}:\n"
        "    webhook_token: a-real-token\n"
        "    destinations:\n"
        f"      - {{name: {destination}, type: jsonl, path: o.jsonl,"
        " mapping: mappings/http.yaml}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="characters"):
        load_config(path)


def test_a_customer_id_longer_than_the_store_takes_is_refused_by_the_receiver() -> None:
    import json

    from connector.errors import EventValidationError
    from connector.treez import check_event_json

    body = {
        "event_type": "CUSTOMER",
        "data": {"customer_id": "c" * 129, "last_update": "2026-05-01T10:00:00.000-07:00"},
    }
    with pytest.raises(EventValidationError):
        check_event_json(json.dumps(body))


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
