"""Adversarial end-to-end tests of the whole delivery path of the ``http`` destination over
real HTTP with the lean HTTP/1.1 client (connector/delivery/_h1.py) underneath: the delivery
worker, retries and dead letters, the identity map, per-customer order, batches, concurrency,
shutdown and header privacy, against raw asyncio endpoints that misbehave on purpose.

tests/test_attack_h1.py covers the client's framing and parsing; this file drives the worker
and a real SQLite store, and checks what the outbox, the dead letters, the identity map and
the endpoint saw."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import random
import shutil
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from connector.delivery.retry import RetryPolicy
from connector.delivery.worker import DeliveryWorker
from connector.destinations.http import HttpDestination, HttpSink
from connector.logs import configure_logging
from connector.planner import Operation
from connector.runner import dlq_lines
from connector.store import AsyncStore, Store, open_store
from connector.store.schema import dead_letters, outbox

ROOT = Path(__file__).resolve().parent.parent
HTTP_MAPPING = ROOT / "mappings" / "http.yaml"
DISPENSARY = "d"
DEST = "hook"
SECRET = "Zq9-sEcReT-hdr-7731"

# quick retries: 0.05 s, 0.1 s, ... dead only after 8 attempts (a stale connection must never
# be the reason for a dead letter, so give retries room)
PATIENT = RetryPolicy(
    initial_seconds=0.05, max_seconds=0.3, jitter_seconds=0.0, min_attempts=8, min_elapsed_seconds=0
)


# ---- a raw endpoint --------------------------------------------------------------------------


@dataclass
class Request:
    conn: int
    method: str
    head: bytes
    body: bytes
    at: float

    @property
    def ops(self) -> list[dict[str, Any]]:
        data = json.loads(self.body) if self.body else None
        return data if isinstance(data, list) else [data] if isinstance(data, dict) else []

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.decode("latin-1").partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


# what an endpoint does with one request: the bytes to answer (None: none), then what to do
# with the connection: "keep", "close" (FIN), "rst" (reset), "hang" (never answer)
Answer = tuple[bytes | None, str]
Respond = Callable[["Endpoint", Request], Awaitable[Answer]]


@dataclass
class Endpoint:
    respond: Respond
    requests: list[Request] = field(default_factory=list)
    delivered: list[dict[str, Any]] = field(default_factory=list)  # ops answered with a 2xx
    connections: int = 0
    live: int = 0
    max_live: int = 0
    port: int = 0
    _server: Any = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _timers: list[asyncio.TimerHandle] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def __aenter__(self) -> Endpoint:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for timer in self._timers:
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0.01)

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        conn = self.connections
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                method = head.split(b" ", 1)[0].decode()
                request = Request(conn, method, head, body, time.monotonic())
                self.requests.append(request)
                answer, then = await self.respond(self, request)
                if then == "hang":
                    await asyncio.sleep(3600)
                if answer is not None:
                    writer.write(answer)
                    await writer.drain()
                    if b" 2" in answer[:12]:
                        self.delivered.extend(request.ops)
                if then == "close":
                    return
                if then == "rst":
                    rst(writer)
                    return
                if then.startswith("rst-after:"):
                    delay = float(then.partition(":")[2])
                    later = asyncio.get_running_loop().call_later(delay, rst, writer)
                    self._timers.append(later)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.live -= 1
            writer.close()
            self._tasks.discard(task)


def rst(writer: asyncio.StreamWriter) -> None:
    if writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def answer(
    status: int = 200,
    body: bytes = b"",
    *,
    reason: str = "OK",
    headers: Sequence[str] = (),
    framing: str = "length",
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", *headers]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        parts = [body[i : i + 7] for i in range(0, len(body), 7)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    else:  # "close": framed by the end of the connection
        lines.append("Connection: close")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def contact_answer(request: Request, **options: Any) -> bytes:
    """200 with ``{"contact_id": "c-<customer>"}`` (an array of them for a batch)."""
    ids = [{"contact_id": f"c-{op['customer_id']}"} for op in request.ops]
    body = json.dumps(ids if request.body.startswith(b"[") else ids[0]).encode()
    return answer(200, body, **options)


async def healthy(_: Endpoint, request: Request) -> Answer:
    return contact_answer(request), "keep"


# ---- store, operations, worker -----------------------------------------------------------------


@pytest.fixture
def mapping_dir(tmp_path: Path) -> Path:
    shutil.copy(HTTP_MAPPING, tmp_path / "http.yaml")
    return tmp_path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    opened.register_process()
    try:
        yield opened
    finally:
        opened.close()


def sink(base: Path, url: str, name: str = DEST, **extra: Any) -> HttpSink:
    data = {"name": name, "type": "http", "url": url, "mapping": "http.yaml", **extra}
    return HttpSink(HttpDestination.model_validate(data, context={"base_dir": base}))


def make_op(customer: str, n: int, destination: str = DEST) -> Operation:
    body = {
        "op": "upsert",
        "dispensary": DISPENSARY,
        "customer_id": customer,
        "fields": {"email": f"{customer}@example.com", "n": n},
    }
    return Operation(
        destination, customer, customer, "upsert", body, f"k-{destination}-{customer}-{n}"
    )


def enqueue(store: Store, ops: Sequence[Operation]) -> None:
    with store.transaction() as conn:
        store.enqueue(conn, DISPENSARY, ops)


def plan(store: Store, customers: int, versions: int, destination: str = DEST) -> list[Operation]:
    """``versions`` operations for each of ``customers`` customers, enqueued version by version."""
    ops = [
        make_op(f"c{c}", n, destination) for n in range(1, versions + 1) for c in range(customers)
    ]
    enqueue(store, ops)
    return ops


def rows(store: Store, destination: str = DEST) -> list[Any]:
    statement = select(outbox).where(outbox.c.destination == destination).order_by(outbox.c.id)
    return store.query(statement)


def dead(store: Store) -> list[Any]:
    return store.query(select(dead_letters).order_by(dead_letters.c.id))


def open_count(store: Store, destination: str = DEST) -> int:
    return sum(1 for r in rows(store, destination) if r.status in ("pending", "inflight"))


@asynccontextmanager
async def running(
    store: Store, destination: HttpSink, **options: Any
) -> AsyncIterator[tuple[DeliveryWorker, asyncio.Task[None], asyncio.Event]]:
    astore = AsyncStore(store)
    settings = {"retry": PATIENT, "idle_poll": 0.05, **options}
    worker = DeliveryWorker(astore, DISPENSARY, destination, **settings)
    stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(stopping))
    try:
        yield worker, task, stopping
    finally:
        stopping.set()
        try:
            if not task.done():
                await asyncio.wait_for(task, 15)
        finally:
            await destination.aclose()
            astore.close()


async def wait_until(cond: Callable[[], bool], task: asyncio.Task[None], timeout: float = 8.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if task.done():
            task.result()
            raise AssertionError("the worker stopped before the condition held")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the worker")
        await asyncio.sleep(0.01)


async def drain(store: Store, destination: HttpSink, **options: Any) -> None:
    async with running(store, destination, **options) as (_, task, _s):
        await wait_until(lambda: open_count(store, destination.name) == 0, task)


def check_delivered_in_order(store: Store, ops: Sequence[Operation], endpoint: Endpoint) -> None:
    """Every operation done, none dead, each key reached the endpoint with a 2xx answer, and
    each customer's first accepted copies came in version order."""
    statuses = {r.idempotency_key: r.status for r in rows(store)}
    assert statuses == {op.idempotency_key: "done" for op in ops}
    assert dead(store) == []
    accepted = [op["idempotency_key"] for op in endpoint.delivered]
    assert set(accepted) == {op.idempotency_key for op in ops}
    seen: dict[str, list[int]] = {}
    for op in endpoint.delivered:
        versions = seen.setdefault(op["customer_id"], [])
        if op["fields"]["n"] not in versions:
            versions.append(op["fields"]["n"])
    for customer, versions in seen.items():
        assert versions == sorted(versions), customer


# ---- 1. connections the endpoint closes ---------------------------------------------------------


def close_every(n: int, how: str, announce: bool) -> Respond:
    """Answer, then end the connection after its n-th answer (FIN or reset); ``announce``
    says so with ``Connection: close``."""

    async def respond(ep: Endpoint, request: Request) -> Answer:
        served = sum(1 for r in ep.requests if r.conn == request.conn)
        last = served % n == 0
        headers = ["Connection: close"] if last and announce else []
        return contact_answer(request, headers=headers), how if last else "keep"

    return respond


@pytest.mark.parametrize(
    ("n", "how", "announce"),
    [
        (1, "close", True),
        (1, "close", False),
        (3, "close", False),
        (1, "rst", False),
        (2, "rst", False),
    ],
)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_endpoint_closing_kept_alive_connections_loses_nothing(
    store: Store, mapping_dir: Path, n: int, how: str, announce: bool, batch_size: int
) -> None:
    async def main() -> None:
        async with Endpoint(close_every(n, how, announce)) as ep:
            ops = plan(store, customers=8, versions=3)
            destination = sink(mapping_dir, ep.url, concurrency=3, batch_size=batch_size)
            await drain(store, destination, concurrency=3)
            check_delivered_in_order(store, ops, ep)
            assert all(r.attempts >= 1 for r in rows(store))

    asyncio.run(main())


def test_endpoint_resetting_idle_connections_at_random_loses_nothing(
    store: Store, mapping_dir: Path
) -> None:
    """Connections are reset a random moment after an answer: the next request on one may be
    written before the reset arrives (a stale connection), and must be sent again."""
    rng = random.Random(7)

    async def respond(_: Endpoint, request: Request) -> Answer:
        if rng.random() < 0.5:
            return contact_answer(request), f"rst-after:{rng.choice([0.0, 0.001, 0.01, 0.05])}"
        return contact_answer(request), "keep"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            ops = plan(store, customers=10, versions=4)
            destination = sink(mapping_dir, ep.url, concurrency=4)
            await drain(store, destination, concurrency=4)
            check_delivered_in_order(store, ops, ep)

    asyncio.run(main())


# ---- 2. redirects -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_dead_lettered_with_its_status_and_never_followed(
    store: Store, mapping_dir: Path, status: int
) -> None:
    async def respond(ep: Endpoint, request: Request) -> Answer:
        if request.method != "POST":
            return contact_answer(request), "keep"
        return answer(status, b"moved", reason="Moved", headers=[f"Location: {ep.url}2"]), "keep"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            plan(store, customers=2, versions=2)
            await drain(store, sink(mapping_dir, ep.url))
            assert {r.method for r in ep.requests} == {"POST"}
            assert {r.status for r in rows(store)} == {"dead"}
            letters = dead(store)
            assert len(letters) == 4
            assert {d.status_code for d in letters} == {status}
            assert all(d.attempts == 1 for d in letters)
            assert store.contact_ids(DISPENSARY, DEST, ["c0", "c1"]) == {}
            lines = "\n".join(dlq_lines(store))
            assert f"status {status}" in lines

    asyncio.run(main())


# ---- 3. contact ids through every framing --------------------------------------------------------


def framed(framing: str, coding: str | None) -> Respond:
    async def respond(_: Endpoint, request: Request) -> Answer:
        ids = [{"contact_id": f"c-{op['customer_id']}"} for op in request.ops]
        body = json.dumps(ids if request.body.startswith(b"[") else ids[0]).encode()
        headers = []
        if coding == "gzip":
            body = gzip.compress(body)
            headers.append("Content-Encoding: gzip")
        return answer(200, body, headers=headers, framing=framing), (
            "close" if framing == "close" else "keep"
        )

    return respond


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("coding", [None, "gzip"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_contact_ids_are_recorded_whatever_the_framing(
    store: Store, mapping_dir: Path, framing: str, coding: str | None, batch_size: int
) -> None:
    async def main() -> None:
        async with Endpoint(framed(framing, coding)) as ep:
            ops = plan(store, customers=6, versions=2)
            destination = sink(mapping_dir, ep.url, concurrency=2, batch_size=batch_size)
            await drain(store, destination, concurrency=2)
            check_delivered_in_order(store, ops, ep)
            customers = [f"c{c}" for c in range(6)]
            assert store.contact_ids(DISPENSARY, DEST, customers) == {
                c: f"c-{c}" for c in customers
            }
            # the second version of each customer carried the id learnt from the first
            second = [op for op in ep.delivered if op["fields"]["n"] == 2]
            assert {op["customer_id"]: op["contact_id"] for op in second} == {
                c: f"c-{c}" for c in customers
            }

    asyncio.run(main())


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"\xff\xfe\x00garbage", b'{"contact_id": ""}', b'{"contact_id": true}', b"[]"],
)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_garbled_2xx_body_records_no_contact_id_and_loses_nothing(
    store: Store, mapping_dir: Path, body: bytes, batch_size: int
) -> None:
    async def respond(_: Endpoint, request: Request) -> Answer:
        return answer(200, body), "keep"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            ops = plan(store, customers=4, versions=2)
            await drain(store, sink(mapping_dir, ep.url, batch_size=batch_size))
            check_delivered_in_order(store, ops, ep)
            assert store.contact_ids(DISPENSARY, DEST, [f"c{c}" for c in range(4)]) == {}

    asyncio.run(main())


def test_gzip_answer_that_does_not_decode_is_retried_not_delivered(
    store: Store, mapping_dir: Path
) -> None:
    """A 2xx whose gzip body is garbage: the client raises H1Error (retriable); once the
    endpoint answers properly, the operation is delivered and its contact id recorded."""
    calls = {"n": 0}

    async def respond(_: Endpoint, request: Request) -> Answer:
        calls["n"] += 1
        if calls["n"] <= 2:
            return answer(200, b"garbage!", headers=["Content-Encoding: gzip"]), "keep"
        return contact_answer(request), "keep"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            ops = plan(store, customers=1, versions=1)
            await drain(store, sink(mapping_dir, ep.url))
            check_delivered_in_order(store, ops, ep)
            assert store.contact_ids(DISPENSARY, DEST, ["c0"]) == {"c0": "c-c0"}
            [row] = rows(store)
            assert row.attempts == 3

    asyncio.run(main())


# ---- 4. slow endpoint beyond the timeout -------------------------------------------------------


def test_slow_endpoint_is_retried_then_delivered(store: Store, mapping_dir: Path) -> None:
    started = time.monotonic()

    async def respond(_: Endpoint, request: Request) -> Answer:
        if time.monotonic() - started < 1.5:
            await asyncio.sleep(1.0)  # beyond the 0.3 s timeout
        return contact_answer(request), "keep"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            ops = plan(store, customers=3, versions=2)
            destination = sink(mapping_dir, ep.url, concurrency=2, timeout_seconds=0.3)
            policy = RetryPolicy(
                initial_seconds=0.1,
                max_seconds=0.4,
                jitter_seconds=0.0,
                min_attempts=20,
                min_elapsed_seconds=0,
            )
            await drain(store, destination, concurrency=2, retry=policy)
            check_delivered_in_order(store, ops, ep)
            assert any(r.attempts > 1 for r in rows(store))  # the slow phase was met
            contacts = store.contact_ids(DISPENSARY, DEST, ["c0", "c1", "c2"])
            assert contacts == {"c0": "c-c0", "c1": "c-c1", "c2": "c-c2"}
            # each key accepted with a 2xx once per successful attempt only: the timed-out
            # ones got no 2xx written (their connections were gone)
            for op in ops:
                keys = [r for r in ep.requests if r.header("idempotency-key") == op.idempotency_key]
                assert keys, op.idempotency_key

    asyncio.run(main())


def test_a_timed_out_attempt_is_retried_not_dead_lettered_at_once(
    store: Store, mapping_dir: Path
) -> None:
    """With the default-like policy (min_attempts 3) one timeout leaves the op pending."""

    async def respond(_: Endpoint, request: Request) -> Answer:
        return None, "hang"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            plan(store, customers=1, versions=1)
            destination = sink(mapping_dir, ep.url, timeout_seconds=0.3)
            policy = RetryPolicy(initial_seconds=5, max_seconds=5, jitter_seconds=0, min_attempts=3)
            async with running(store, destination, retry=policy) as (_, task, _s):
                await wait_until(lambda: rows(store)[0].attempts >= 1, task)
            [row] = rows(store)
            assert row.status == "pending"
            assert dead(store) == []
            assert "TimeoutError" in (row.last_error or "")

    asyncio.run(main())


# ---- 5. a hanging endpoint does not hold up a healthy destination ---------------------------


def test_hanging_endpoint_does_not_hold_up_a_healthy_destination(
    store: Store, mapping_dir: Path
) -> None:
    async def hang(_: Endpoint, request: Request) -> Answer:
        return None, "hang"

    async def main() -> None:
        async with Endpoint(hang) as stuck, Endpoint(healthy) as good:
            plan(store, customers=6, versions=2, destination="stuck")
            ops = plan(store, customers=6, versions=2)
            slow = sink(mapping_dir, stuck.url, name="stuck", timeout_seconds=30, concurrency=2)
            fast = sink(mapping_dir, good.url, concurrency=2)
            began = time.monotonic()
            async with (
                running(store, slow, concurrency=2) as (_, slow_task, _s),
                running(store, fast, concurrency=2) as (_, fast_task, _f),
            ):
                await wait_until(lambda: open_count(store) == 0, fast_task, timeout=6)
                took = time.monotonic() - began
                assert stuck.requests  # the stuck endpoint was reached and is hanging
                assert open_count(store, "stuck") == 12
                # stop the stuck worker without waiting its 30 s: cancel it
                slow_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await slow_task
            check_delivered_in_order(store, ops, good)
            assert took < 5

    asyncio.run(main())


# ---- 6. concurrency ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2])
def test_concurrency_2_never_opens_more_than_2_connections(
    store: Store, mapping_dir: Path, batch_size: int
) -> None:
    async def respond(_: Endpoint, request: Request) -> Answer:
        await asyncio.sleep(0.02)
        return contact_answer(request), "keep"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            ops = plan(store, customers=30, versions=2)
            destination = sink(mapping_dir, ep.url, concurrency=2, batch_size=batch_size)
            await drain(store, destination, concurrency=2)
            check_delivered_in_order(store, ops, ep)
            assert ep.max_live <= 2
            assert ep.connections <= 2  # kept alive: no churn on a healthy endpoint

    asyncio.run(main())


def test_concurrency_2_with_connections_closed_after_each_answer(
    store: Store, mapping_dir: Path
) -> None:
    async def respond(_: Endpoint, request: Request) -> Answer:
        await asyncio.sleep(0.01)
        return contact_answer(request, headers=["Connection: close"]), "close"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            ops = plan(store, customers=20, versions=1)
            destination = sink(mapping_dir, ep.url, concurrency=2)
            await drain(store, destination, concurrency=2)
            check_delivered_in_order(store, ops, ep)
            # in flight at once, by the requests' own timing: at most 2 unanswered
            assert ep.max_live <= 3  # a closing one may linger a moment on the server's side

    asyncio.run(main())


# ---- 7. shutdown with requests in flight ---------------------------------------------------------


def test_stopping_with_requests_in_flight_loses_nothing(store: Store, mapping_dir: Path) -> None:
    slow = {"on": True}

    async def respond(_: Endpoint, request: Request) -> Answer:
        if slow["on"]:
            await asyncio.sleep(0.8)
        return contact_answer(request), "keep"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            ops = plan(store, customers=8, versions=2)
            destination = sink(mapping_dir, ep.url, concurrency=4, timeout_seconds=5)
            async with running(store, destination, concurrency=4) as (_, task, stopping):
                await wait_until(lambda: len(ep.requests) >= 2, task)
                stopping.set()
                await asyncio.wait_for(task, 10)
            statuses = {r.status for r in rows(store)}
            assert statuses <= {"pending", "done"}  # nothing left in flight, nothing dead
            assert dead(store) == []
            slow["on"] = False
            await drain(store, sink(mapping_dir, ep.url, concurrency=4), concurrency=4)
            check_delivered_in_order(store, ops, ep)

    asyncio.run(main())


def test_sink_closed_under_requests_in_flight_loses_nothing(
    store: Store, mapping_dir: Path
) -> None:
    """The sink's pool is closed while calls are out (what a stop does after its grace): the
    calls end one way or the other, nothing is lost, and a restart delivers the rest."""
    slow = {"on": True}

    async def respond(_: Endpoint, request: Request) -> Answer:
        if slow["on"]:
            await asyncio.sleep(0.5)
        return contact_answer(request), "keep"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            ops = plan(store, customers=8, versions=2)
            destination = sink(mapping_dir, ep.url, concurrency=4, timeout_seconds=5)
            async with running(store, destination, concurrency=4) as (_, task, _s):
                await wait_until(lambda: len(ep.requests) >= 2, task)
                await destination.aclose()
                await asyncio.sleep(0.7)
            assert dead(store) == []
            slow["on"] = False
            await drain(store, sink(mapping_dir, ep.url, concurrency=4), concurrency=4)
            check_delivered_in_order(store, ops, ep)

    asyncio.run(main())


# ---- 8. header privacy -------------------------------------------------------------------------


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(level="debug", stream=stream)
    try:
        yield stream
    finally:
        configure_logging()


def echo_headers(status: int) -> Respond:
    async def respond(_: Endpoint, request: Request) -> Answer:
        body = json.dumps({"error": "bad", "you_sent": request.head.decode("latin-1")})
        return answer(status, body.encode(), reason="Nope"), "keep"

    return respond


@pytest.mark.parametrize("status", [400, 302])
def test_secret_header_never_in_logs_reasons_or_dlq_list(
    store: Store, mapping_dir: Path, log_stream: io.StringIO, status: int
) -> None:
    calls = {"n": 0}
    final = echo_headers(status)
    retry = echo_headers(500)

    async def respond(ep: Endpoint, request: Request) -> Answer:
        calls["n"] += 1
        return await (retry if calls["n"] == 1 else final)(ep, request)

    async def main() -> None:
        async with Endpoint(respond) as ep:
            plan(store, customers=1, versions=1)
            destination = sink(mapping_dir, ep.url, headers={"X-Api-Key": SECRET})
            await drain(store, destination)
            assert all(SECRET.encode() in r.head for r in ep.requests)  # it was sent
            [letter] = dead(store)
            assert letter.status_code == status
            assert SECRET not in letter.reason
            [row] = rows(store)
            assert SECRET not in (row.last_error or "")
            assert SECRET not in "\n".join(dlq_lines(store))
            assert SECRET not in log_stream.getvalue()
            assert "delivery_failed" in log_stream.getvalue()

    asyncio.run(main())


def test_secret_from_env_in_config_is_sent_and_never_shown(
    tmp_path: Path, mapping_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``${SECRET}`` in a config's headers: expanded when loaded, sent, never in the repr."""
    from connector.config import load_config

    monkeypatch.setenv("HOOK_SECRET", SECRET)
    config_file = mapping_dir / "config.yaml"
    config_file.write_text(
        f"""
store: sqlite:///{tmp_path / "cfg.db"}
dispensaries:
  {DISPENSARY}:
    webhook_token: a-token-of-some-length-123
    destinations:
      - name: {DEST}
        type: http
        url: http://127.0.0.1:9/hook
        mapping: http.yaml
        headers:
          X-Api-Key: "${{HOOK_SECRET}}"
""",
        encoding="utf-8",
    )
    try:
        config = load_config(config_file)
    except Exception as exc:  # the layout of a config is not this test's subject
        pytest.skip(f"config layout differs: {exc.__class__.__name__}")
    text = repr(config) + str(config)
    assert SECRET not in text
    [destination] = config.dispensaries[DISPENSARY].destinations
    assert destination.headers["X-Api-Key"].get_secret_value() == SECRET


# ---- more: Retry-After, silent drops of reused connections, short batch answers -------------


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_header_read_through_the_lean_client(
    store: Store, mapping_dir: Path, status: int
) -> None:
    calls = {"n": 0}

    async def respond(_: Endpoint, request: Request) -> Answer:
        calls["n"] += 1
        if calls["n"] == 1:
            return answer(status, b"{}", reason="Later", headers=["RETRY-AFTER: 1"]), "keep"
        return contact_answer(request), "keep"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            ops = plan(store, customers=1, versions=1)
            # Retry-After is honoured up to max_seconds: give it room
            policy = RetryPolicy(initial_seconds=0.05, max_seconds=5, jitter_seconds=0)
            await drain(store, sink(mapping_dir, ep.url), retry=policy)
            check_delivered_in_order(store, ops, ep)
            first, second = ep.requests
            assert second.at - first.at >= 0.9  # the header was honoured

    asyncio.run(main())


def test_reused_connection_dropped_after_reading_the_request_is_resent(
    store: Store, mapping_dir: Path
) -> None:
    """The endpoint takes every second request of a connection (it may have processed it)
    and drops the connection without answering: sent again on a new one, same key; at most
    two copies of a key, nothing dead."""

    async def respond(ep: Endpoint, request: Request) -> Answer:
        served = sum(1 for r in ep.requests if r.conn == request.conn)
        if served == 2:
            return None, "close"
        return contact_answer(request), "keep"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            ops = plan(store, customers=6, versions=3)
            await drain(store, sink(mapping_dir, ep.url, concurrency=2), concurrency=2)
            check_delivered_in_order(store, ops, ep)
            keys = [r.header("idempotency-key") for r in ep.requests]
            assert max(keys.count(k) for k in set(keys)) <= 2
            assert all(r.attempts == 1 for r in rows(store))  # a resend is no new attempt

    asyncio.run(main())


def test_batch_answer_shorter_than_the_batch(store: Store, mapping_dir: Path) -> None:
    async def respond(_: Endpoint, request: Request) -> Answer:
        first = request.ops[0]["customer_id"]
        return answer(200, json.dumps([{"contact_id": f"c-{first}"}, 5]).encode()), "keep"

    async def main() -> None:
        async with Endpoint(respond) as ep:
            ops = plan(store, customers=3, versions=1)
            await drain(store, sink(mapping_dir, ep.url, batch_size=3))
            check_delivered_in_order(store, ops, ep)
            [request] = ep.requests
            first = request.ops[0]["customer_id"]
            customers = ["c0", "c1", "c2"]
            assert store.contact_ids(DISPENSARY, DEST, customers) == {first: f"c-{first}"}

    asyncio.run(main())
