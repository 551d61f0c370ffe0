"""The database going away: PostgreSQL behind a TCP proxy (tests/proxy.py) that the test cuts,
hangs and restores. The receiver answers 503 with ``Retry-After`` (never a 500, never a 202
without a commit), ``/readyz`` says why, the loops back off, and everything resumes without a
restart when the database comes back.

PostgreSQL only (127.0.0.1:5432, or ``CONNECTOR_TEST_PG``): skipped when it is unreachable, unless
``CI`` is set. Each test works in a fresh database of its own, dropped after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import PG_SERVER
from fakes.http_sink import read_record, unique_ops
from fakes.treez_api import TreezFake
from proxy import TcpProxy
from sqlalchemy import text
from test_e2e import (
    DISPENSARY,
    HEADERS,
    MAPPING,
    TOKEN,
    Event,
    Procs,
    Server,
    procs,
    start_server,
    start_sink,
)
from test_reconcile import in_process

from connector.config import load_config
from connector.errors import StoreUnavailable
from connector.pipeline import Deployment, Processor, build_worker, process_batch
from connector.planner import instant_us
from connector.reconcile import Reconciler, RunReport
from connector.store import AsyncStore, NewEvent, open_store

psycopg = pytest.importorskip("psycopg")

ADMIN_URL = f"{PG_SERVER}/postgres"
STORE_TIMEOUT = 2.0
__all__ = ["procs"]  # the fixture, imported for its tests


def _admin() -> Any:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)


@pytest.fixture(scope="module")
def pg_server() -> tuple[str, int]:
    try:
        with _admin() as conn:
            host, port = conn.info.host, conn.info.port
    except psycopg.Error as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL unreachable at {ADMIN_URL} ({exc.__class__.__name__})")
    return str(host), int(port)


@pytest.fixture
def proxy(pg_server: tuple[str, int]) -> Iterator[TcpProxy]:
    host, port = pg_server
    with TcpProxy(port, host) as running:
        yield running


@pytest.fixture
def store_url(proxy: TcpProxy) -> Iterator[str]:
    """A fresh database, reached through the proxy; dropped after the test."""
    name = f"h_dbgone_{uuid.uuid4().hex[:10]}"
    with _admin() as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}"
    finally:
        proxy.restore()
        with _admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def write_config(folder: Path, store: str, sink_url: str) -> Path:
    (folder / "http.yaml").write_bytes(MAPPING.read_bytes())
    config = {
        "store": store,
        "store_timeout_seconds": STORE_TIMEOUT,
        "server": {"host": "127.0.0.1", "shutdown_grace_seconds": 2.0},
        "dispensaries": {
            DISPENSARY: {
                "webhook_token": TOKEN,
                "destinations": [
                    {
                        "name": "sink",
                        "type": "http",
                        "url": sink_url,
                        "mapping": "http.yaml",
                        "concurrency": 2,
                        "retry": {
                            "initial_seconds": 0.1,
                            "max_seconds": 1,
                            "min_attempts": 50,
                            "min_elapsed_seconds": 0,
                        },
                    }
                ],
            }
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def post(client: httpx.Client, server: Server, event: Event) -> httpx.Response:
    return client.post(server.webhook, content=event.body, headers=HEADERS)


def wait_for(predicate: Any, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def delivered_customers(record: Path) -> Counter[str]:
    if not record.exists():
        return Counter()
    ops = unique_ops(read_record(record))
    return Counter(str(op["customer_id"]) for op in ops if op["op"] == "upsert")


def check_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text)
    assert response.headers.get("retry-after", "").isdigit()
    assert response.json()["error"] == "store_unavailable"


def test_the_receiver_and_the_workers_outlive_a_cut(
    tmp_path: Path, procs: Procs, store_url: str, proxy: TcpProxy
) -> None:
    # a slow sink: operations are still pending (and claimed) when the database goes
    sink = start_sink(procs, "sink", "--delay", "0.3")
    server = start_server(procs, write_config(tmp_path, store_url, sink.url), "serve")
    pid = server.proc.pid
    before = [Event(str(50000 + i), 1) for i in range(20)]
    during = [Event(str(60000 + i), 1) for i in range(5)]
    after = [Event(str(70000 + i), 1) for i in range(10)]
    with httpx.Client(timeout=STORE_TIMEOUT + 10) as client:
        assert wait_for(lambda: client.get(f"{server.base}/readyz").status_code == 200, 20)
        for event in before:
            assert post(client, server, event).status_code == 202
        assert wait_for(lambda: delivered_customers(sink.record), 20)  # deliveries under way
        proxy.cut()
        cut_at = time.monotonic()
        for event in during:
            started = time.monotonic()
            check_unavailable(post(client, server, event))
            assert time.monotonic() - started < STORE_TIMEOUT + 3
        ready = client.get(f"{server.base}/readyz")
        assert ready.status_code == 503
        assert any("store" in p for p in ready.json()["problems"]), ready.json()
        time.sleep(max(0.0, 5.0 - (time.monotonic() - cut_at)))  # a 5 s outage
        lines_at_restore = len(server.proc.log_lines())
        proxy.restore()
        restored_at = time.monotonic()
        assert wait_for(lambda: client.get(f"{server.base}/readyz").status_code == 200, 15)
        for event in after:
            response = post(client, server, event)
            while response.status_code == 503 and time.monotonic() - restored_at < 15:
                time.sleep(0.2)
                response = post(client, server, event)
            assert response.status_code == 202, response.text
        owed = {e.customer_id for e in before + after}
        assert wait_for(lambda: owed <= set(delivered_customers(sink.record)), 60), sorted(
            owed - set(delivered_customers(sink.record))
        )
    assert server.proc.running()  # no restart
    assert server.proc.pid == pid
    counts = delivered_customers(sink.record)
    assert not {e.customer_id for e in during} & set(counts)  # answered 503: not stored
    # backing off, not a tight loop: a handful of failures per loop during the 5 s outage
    logged = server.proc.log_lines()[:lines_at_restore]
    failures = Counter(line.get("event") for line in logged if line.get("level") != "info")
    for name in ("delivery_loop_failed", "planning_failed", "heartbeat_failed"):
        assert failures[name] <= 8, failures


def test_a_hung_database_is_answered_503_within_the_store_timeout(
    tmp_path: Path, procs: Procs, store_url: str, proxy: TcpProxy
) -> None:
    sink = start_sink(procs, "sink")
    server = start_server(procs, write_config(tmp_path, store_url, sink.url), "serve")
    with httpx.Client(timeout=60) as client:
        assert wait_for(lambda: client.get(f"{server.base}/readyz").status_code == 200, 20)
        assert post(client, server, Event("50001", 1)).status_code == 202
        proxy.hang()
        for customer_id in ("50002", "50003"):
            started = time.monotonic()
            response = post(client, server, Event(customer_id, 1))
            waited = time.monotonic() - started
            check_unavailable(response)
            assert waited < STORE_TIMEOUT + 2.5, waited
        started = time.monotonic()
        assert client.get(f"{server.base}/readyz").status_code == 503
        assert time.monotonic() - started < STORE_TIMEOUT + 2.5
        started = time.monotonic()  # the counters, without the queues the store would give
        assert client.get(f"{server.base}/metrics").status_code == 200
        assert time.monotonic() - started < STORE_TIMEOUT + 2.5
        proxy.restore()
        deadline = time.monotonic() + 20
        response = post(client, server, Event("50004", 1))
        while response.status_code != 202 and time.monotonic() < deadline:
            time.sleep(0.2)
            response = post(client, server, Event("50004", 1))
        assert response.status_code == 202, response.text
        assert wait_for(lambda: client.get(f"{server.base}/readyz").status_code == 200, 20)
        assert wait_for(lambda: {"50001", "50004"} <= set(delivered_customers(sink.record)), 60)


def reconcile_config(work: Path, store: str, api_url: str) -> Path:
    (work / "m.yaml").write_text(
        "first_name: first_name\nlast_name: last_name\nemail: email\n"
        "external_id: {template: 'treez-{dispensary}-{customer_id}'}\n"
    )
    path = work / "config.yaml"
    path.write_text(
        f"""
store: {store}
store_timeout_seconds: {STORE_TIMEOUT}
dispensaries:
  {DISPENSARY}:
    webhook_token: tok
    treez:
      api_url: {api_url}
      client_id: treez_test_client
      api_key: treez_test_apikey
    reconcile:
      redrive_after_minutes: 0
    destinations:
      - name: file
        type: jsonl
        path: {work}/out.jsonl
        mapping: m.yaml
"""
    )
    return path


def test_a_reconciliation_cut_mid_run_resumes_from_its_checkpoint(
    tmp_path: Path, store_url: str, proxy: TcpProxy
) -> None:
    """As in ``serve``: one reconciler and its workers; the store is cut on the fourth page
    request (the run asks for each page while the one before is stored: by then the second
    page and its checkpoint are committed), the run fails with the store's error, and the
    next run, once it is back, picks up from the checkpoint the first one left."""
    fake = TreezFake.generate(230, seed=7, history_days=0.5, rate_limit=None)
    config = load_config(reconcile_config(tmp_path, store_url, fake.base_url))

    def cut_on_fourth(_faked: TreezFake, request: Any) -> None:
        if request.number == 4:
            proxy.cut()

    async def runs() -> tuple[RunReport, int | None]:
        store = open_store(store_url, timeout=STORE_TIMEOUT, listen=False)
        astore = AsyncStore(store)
        deployment = Deployment.from_config(config)
        workers = {
            (DISPENSARY, d.name): build_worker(astore, DISPENSARY, d, idle_poll=0.2)
            for d in config.dispensaries[DISPENSARY].destinations
        }
        stopping = asyncio.Event()
        tasks = [asyncio.create_task(w.run(stopping)) for w in workers.values()]

        async def plan() -> None:
            while (await astore.call(process_batch, store, deployment, 256)).events:
                for worker in workers.values():
                    worker.wake.set()

        destinations = {key: w.destination for key, w in workers.items()}
        reconciler = Reconciler(
            config,
            astore,
            deployment,
            plan=plan,
            client_for=in_process(fake),
            destinations=destinations,
        )
        try:
            fake.on_page(cut_on_fourth)
            with pytest.raises(StoreUnavailable):
                await reconciler.run(DISPENSARY)
            fake.clear_hooks()
            proxy.restore()
            checkpoint = await astore.call(store.checkpoint, DISPENSARY)
            report = await reconciler.run(DISPENSARY)
            deadline = time.monotonic() + 60
            while await astore.call(store.open_operations, DISPENSARY, report.high_water):
                assert time.monotonic() < deadline, "delivery did not finish"
                await asyncio.sleep(0.1)
            return report, checkpoint
        finally:
            stopping.set()
            await asyncio.gather(*tasks)
            await reconciler.aclose()
            astore.close()

    report, checkpoint = asyncio.run(runs())
    assert report.outcome == "succeeded"
    assert checkpoint is not None  # the pages committed before the cut are done
    assert report.checkpoint_before_us == checkpoint
    store = open_store(store_url, listen=False)
    try:
        rows = store.query(text("SELECT outcome, error FROM reconcile_runs ORDER BY id"))
    finally:
        store.close()
    assert [r[0] for r in rows] == ["interrupted", "succeeded"], rows
    sent = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    upserts = Counter(op["customer_id"] for op in sent if op["op"] == "upsert")
    listed = fake.ids_after(datetime.now(UTC) - timedelta(hours=24))
    active = {c for c in listed if (fake.customer(c) or {}).get("status") != "DEACTIVATED"}
    assert set(upserts) == active  # nothing lost
    assert set(upserts.values()) == {1}  # nothing sent twice


def received(events: list[Event]) -> list[NewEvent]:
    return [
        NewEvent(
            DISPENSARY,
            "webhook",
            "CUSTOMER",
            e.customer_id,
            instant_us(datetime.fromisoformat(e.last_update)),
            e.body.decode(),
        )
        for e in events
    ]


def probe_failures(astore: AsyncStore) -> asyncio.Event:
    """Set once a call through ``astore`` is refused."""
    failed = asyncio.Event()
    original = astore.call

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(fn, *args, **kwargs)
        except StoreUnavailable:
            failed.set()
            raise

    astore.call = call  # type: ignore[method-assign]
    return failed


def test_a_worker_backing_off_resumes_as_soon_as_it_is_woken(
    tmp_path: Path, store_url: str, proxy: TcpProxy
) -> None:
    """A worker that failed backs off (seconds, growing), but a wake-up (the listener
    reconnecting, the planner enqueuing: the database is back) ends the back-off: after a
    long outage delivery does not wait out the last back-off."""
    config = load_config(reconcile_config(tmp_path, store_url, "http://127.0.0.1:9/v2.0"))
    out = tmp_path / "out.jsonl"
    events = [Event(str(50000 + i), 1) for i in range(3)]

    async def scenario() -> None:
        store = open_store(store_url, timeout=STORE_TIMEOUT, listen=False)
        astore = AsyncStore(store)
        (dest,) = config.dispensaries[DISPENSARY].destinations
        # idle_poll 10 s: a first failure backs off 20 s
        worker = build_worker(astore, DISPENSARY, dest, idle_poll=10.0)
        stopping = asyncio.Event()
        task = None
        try:
            store.add_events(received(events))
            process_batch(store, Deployment.from_config(config), 64)
            proxy.cut()
            failed = probe_failures(astore)
            task = asyncio.create_task(worker.run(stopping))
            await asyncio.wait_for(failed.wait(), 10)
            await asyncio.sleep(0.5)  # into the back-off
            proxy.restore()
            restored = time.monotonic()
            worker.wake.set()
            while not out.exists() or len(out.read_text().splitlines()) < len(events):
                assert time.monotonic() - restored < 12, "still backing off"
                await asyncio.sleep(0.1)
        finally:
            stopping.set()
            if task is not None:
                await task
            await worker.destination.aclose()
            astore.close()

    asyncio.run(scenario())


def test_the_planner_backing_off_resumes_as_soon_as_it_is_woken(
    tmp_path: Path, store_url: str, proxy: TcpProxy
) -> None:
    """As for a worker: the receiver's next commit (or the listener) wakes the planner out
    of its back-off."""
    config = load_config(reconcile_config(tmp_path, store_url, "http://127.0.0.1:9/v2.0"))
    events = [Event(str(50000 + i), 1) for i in range(3)]
    pending = text("SELECT count(*) FROM inbox WHERE status = 'pending'")

    async def scenario() -> None:
        store = open_store(store_url, timeout=STORE_TIMEOUT, listen=False)
        astore = AsyncStore(store)
        processor = Processor(
            astore, Deployment.from_config(config), on_enqueued=lambda _: None, idle_poll=10.0
        )
        stopping = asyncio.Event()
        task = None
        try:
            store.add_events(received(events))
            proxy.cut()
            failed = probe_failures(astore)
            task = asyncio.create_task(processor.run(stopping))
            await asyncio.wait_for(failed.wait(), 10)
            await asyncio.sleep(0.5)  # into the back-off (20 s)
            proxy.restore()
            restored = time.monotonic()
            processor.wake.set()
            while (await astore.call(store.query, pending))[0][0]:
                assert time.monotonic() - restored < 12, "still backing off"
                await asyncio.sleep(0.1)
        finally:
            stopping.set()
            if task is not None:
                await task
            astore.close()

    asyncio.run(scenario())


def test_a_pooled_connection_that_hangs_is_given_up_within_the_timeout(
    store_url: str, proxy: TcpProxy
) -> None:
    """The pool checks a connection before lending it (a ``SELECT 1``): on a connection
    whose server stopped answering, that check is bounded too, so no thread of the store
    (a worker's, /metrics') waits for an answer that never comes."""
    store = open_store(store_url, timeout=1.0, listen=False)
    try:
        store.ping()  # one connection in the pool
        proxy.hang()
        outcome: list[BaseException | None] = []

        def ping() -> None:
            try:
                store.ping()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=ping, daemon=True)
        thread.start()
        thread.join(10.0)
        assert outcome, "the ping is still waiting"
        assert isinstance(outcome[0], StoreUnavailable), outcome
        proxy.restore()
        store.ping()  # a new connection, once the database answers again
    finally:
        proxy.restore()
        store.close()


def test_a_pool_with_no_connection_free_is_store_unavailable(store_url: str) -> None:
    """Every connection of the pool busy (each held by a thread waiting on a database that
    stopped answering): the next caller waits the store timeout and is told the store is
    unavailable, as for any other outage, not handed SQLAlchemy's own error."""
    store = open_store(store_url, timeout=0.5, listen=False)
    held = []
    try:
        with contextlib.ExitStack() as stack:
            for _ in range(8):
                try:
                    held.append(stack.enter_context(store.engine.connect()))
                except Exception:
                    break
            with pytest.raises(StoreUnavailable, match="store"):
                store.ping()
            with pytest.raises(StoreUnavailable, match="store"):
                store.heartbeat()
    finally:
        store.close()
    assert len(held) >= 1


def test_a_round_whose_results_could_not_be_recorded_is_recorded_once_the_store_is_back(
    tmp_path: Path, store_url: str, proxy: TcpProxy
) -> None:
    """The store goes while a round is at the destination: its results cannot be recorded.
    The worker keeps them and records them first thing once the store answers again; its
    claims (which the heartbeat keeps renewing) are not left in flight for ever, and what
    was sent is not sent again."""
    config = load_config(reconcile_config(tmp_path, store_url, "http://127.0.0.1:9/v2.0"))
    out = tmp_path / "out.jsonl"
    events = [Event(str(50000 + i), 1) for i in range(3)]

    async def scenario() -> None:
        store = open_store(store_url, timeout=STORE_TIMEOUT, listen=False)
        astore = AsyncStore(store)
        (dest,) = config.dispensaries[DISPENSARY].destinations
        worker = build_worker(astore, DISPENSARY, dest, idle_poll=0.2)
        sending, cut = asyncio.Event(), asyncio.Event()
        send = worker.destination.send

        async def send_during_the_cut(deliveries: Any) -> Any:
            sending.set()
            await cut.wait()
            return await send(deliveries)

        worker.destination.send = send_during_the_cut  # type: ignore[method-assign]
        stopping = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []

        async def heartbeat() -> None:
            while not stopping.is_set():
                with contextlib.suppress(StoreUnavailable):
                    await astore.call(store.heartbeat)
                await asyncio.sleep(0.5)

        try:
            await astore.call(store.register_process)
            store.add_events(received(events))
            process_batch(store, Deployment.from_config(config), 64)
            tasks = [asyncio.create_task(worker.run(stopping)), asyncio.create_task(heartbeat())]
            await asyncio.wait_for(sending.wait(), 10)
            proxy.cut()
            cut.set()
            await asyncio.sleep(1.0)  # the round's results are refused
            proxy.restore()
            worker.wake.set()
            deadline = time.monotonic() + 15
            settled = text("SELECT count(*) FROM outbox WHERE status != 'done'")
            while (await astore.call(store.query, settled))[0][0]:
                assert time.monotonic() < deadline, "operations left in flight"
                await asyncio.sleep(0.1)
        finally:
            stopping.set()
            await asyncio.gather(*tasks)
            await worker.destination.aclose()
            astore.close()

    asyncio.run(scenario())
    sent = Counter(json.loads(line)["customer_id"] for line in out.read_text().splitlines())
    assert sent == {e.customer_id: 1 for e in events}
