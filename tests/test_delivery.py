"""Delivery (issue 3, item 4; design.md contract 4 and the at-least-once rules): the retry
policy, Retry-After, the sliding-window limiter, response classification, the http and jsonl
destinations, and the worker against a real SQLite store and the fake of the user's service
over real HTTP."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import types
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from fakes.http_sink import Attempt
from fakes.http_sink import HttpSink as FakeService
from sqlalchemy import func, insert, select, update

from connector.config_base import Rate
from connector.delivery import ratelimit
from connector.delivery._http import classify, transport_error
from connector.delivery.base import Delivery, Result, Sent
from connector.delivery.ratelimit import SlidingWindowLimiter
from connector.delivery.retry import RetryPolicy, parse_retry_after
from connector.delivery.worker import DeliveryWorker
from connector.destinations.http import HttpDestination, HttpSink
from connector.destinations.jsonl import JsonlDestination, JsonlSink
from connector.errors import FatalDelivery, RetriableDelivery
from connector.planner import Operation, payload_hash
from connector.store import CLAIM_SECONDS, AsyncStore, Store, open_store
from connector.store.schema import contacts, dead_letters, outbox, processes

ROOT = Path(__file__).resolve().parent.parent
HTTP_MAPPING = ROOT / "mappings" / "http.yaml"
DISPENSARY = "d"
DEST = "hook"
URL = "https://hooks.example.com/treez/ops"

# Fast retries for the worker tests: 0.05 s, 0.1 s...; dead after 3 attempts. A Retry-After
# is honoured up to max_seconds: the fake service's 1 s is.
FAST = RetryPolicy(
    initial_seconds=0.05, max_seconds=2.0, jitter_seconds=0.0, min_attempts=3, min_elapsed_seconds=0
)


# ---- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def mapping_dir(tmp_path: Path) -> Path:
    shutil.copy(HTTP_MAPPING, tmp_path / "http.yaml")
    return tmp_path


def http_config(base: Path, url: str = URL, **extra: Any) -> HttpDestination:
    data = {"name": DEST, "type": "http", "url": url, "mapping": "http.yaml", **extra}
    return HttpDestination.model_validate(data, context={"base_dir": base})


def make_delivery(customer: str, n: int = 1, outbox_id: int = 1) -> Delivery:
    key = f"k-{customer}-{n}"
    body = {
        "op": "upsert",
        "dispensary": DISPENSARY,
        "customer_id": customer,
        "contact_id": None,
        "fields": {"email": f"{customer}@example.com", "n": n},
        "idempotency_key": key,
    }
    return Delivery(outbox_id, key, body)


def make_op(customer: str, n: int = 1, *, order_key: str | None = None) -> Operation:
    body = {
        "op": "upsert",
        "dispensary": DISPENSARY,
        "customer_id": customer,
        "fields": {"email": f"{customer}@example.com", "n": n},
    }
    return Operation(DEST, customer, order_key or customer, "upsert", body, f"k-{customer}-{n}")


def enqueue(store: Store, ops: Sequence[Operation]) -> None:
    with store.transaction() as conn:
        store.enqueue(conn, DISPENSARY, ops)


def outbox_rows(store: Store) -> dict[str, Any]:
    """Outbox rows by idempotency key."""
    return {r.idempotency_key: r for r in store.query(select(outbox).order_by(outbox.c.id))}


def open_ops(store: Store) -> int:
    statement = (
        select(func.count()).select_from(outbox).where(outbox.c.status.in_(("pending", "inflight")))
    )
    return int(store.query(statement)[0][0])


def dead_rows(store: Store) -> list[Any]:
    return store.query(select(dead_letters).order_by(dead_letters.c.id))


def key_of(attempt: Attempt) -> str | None:
    return attempt.idempotency_key


def max_in_window(times: Sequence[float], width: float) -> int:
    """The most events in any half-open window [t, t + width)."""
    return max((sum(1 for u in times if t <= u < t + width) for t in times), default=0)


@asynccontextmanager
async def running_worker(
    store: Store, destination: Any, **options: Any
) -> AsyncIterator[tuple[DeliveryWorker, asyncio.Task[None]]]:
    """A DeliveryWorker running as a task; stopped, its sink and store thread closed on exit."""
    astore = AsyncStore(store)
    settings = {"retry": FAST, "idle_poll": 0.05, **options}
    worker = DeliveryWorker(astore, DISPENSARY, destination, **settings)
    stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(stopping))
    try:
        yield worker, task
    finally:
        stopping.set()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            await destination.aclose()
            astore.close()


async def wait_until(
    condition: Callable[[], bool], task: asyncio.Task[None], timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if task.done():
            task.result()  # a crashed worker fails the test with its own error
            raise AssertionError("the worker stopped before the condition held")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the worker")
        await asyncio.sleep(0.01)


async def drain(store: Store, destination: Any, **options: Any) -> None:
    """Run a worker until the outbox has no pending or in-flight operation."""
    async with running_worker(store, destination, **options) as (_, task):
        await wait_until(lambda: open_ops(store) == 0, task)


@pytest.fixture(scope="module")
def shared_service() -> Iterator[FakeService]:
    with FakeService() as service:
        yield service


@pytest.fixture
def service(shared_service: FakeService) -> FakeService:
    """The module's fake of the user's service, with default behaviour and no records."""
    shared_service.configure(
        fail_500=0.0, fail_429=0.0, fail_400=0.0, retry_after=1, delay=0.0, strict=False
    )
    shared_service.reset(seed=0)
    return shared_service


# ---- RetryPolicy.next_delay ------------------------------------------------------------------


def test_backoff_grows_exponentially_from_initial_with_bounded_jitter() -> None:
    policy = RetryPolicy(initial_seconds=1.0, max_seconds=600.0, jitter_seconds=1.0)
    for attempts in range(1, 8):
        base = 1.0 * 2 ** (attempts - 1)
        samples = [policy.next_delay(attempts, 0.0, None) for _ in range(50)]
        assert all(s is not None and base <= s <= base + 1.0 for s in samples), (attempts, samples)
        assert len(set(samples)) > 1, "jitter is applied"


def test_backoff_without_jitter_is_exact_and_capped_at_max() -> None:
    policy = RetryPolicy(initial_seconds=1.0, max_seconds=10.0, jitter_seconds=0.0)
    delays = [policy.next_delay(n, 0.0, None) for n in range(1, 8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    jittered = RetryPolicy(initial_seconds=1.0, max_seconds=10.0, jitter_seconds=5.0)
    assert all(jittered.next_delay(7, 0.0, None) == 10.0 for _ in range(20))  # jitter capped too


def test_custom_initial_delay_scales_the_backoff_without_warnings() -> None:
    policy = RetryPolicy(initial_seconds=0.5, max_seconds=600.0, jitter_seconds=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delays = [policy.next_delay(n, 0.0, None) for n in range(1, 5)]
    assert delays == [0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize(
    ("attempts", "elapsed", "gives_up"),
    [
        (1, 0.0, False),
        (8, 100.0, False),  # enough attempts, not yet 30 minutes
        (3, 4000.0, False),  # long enough, not yet 8 attempts
        (7, 1799.0, False),
        (8, 1800.0, True),  # both hold: dead-letter
        (12, 5000.0, True),
    ],
)
def test_gives_up_only_after_min_attempts_and_min_elapsed(
    attempts: int, elapsed: float, gives_up: bool
) -> None:
    policy = RetryPolicy()  # defaults: 8 attempts and 1800 s
    assert policy.min_attempts == 8
    assert policy.min_elapsed_seconds == 1800.0
    delay = policy.next_delay(attempts, elapsed, None)
    if gives_up:
        assert delay is None
    else:
        assert delay is not None
        assert delay > 0


def test_retry_after_longer_than_backoff_wins_shorter_does_not_shorten() -> None:
    policy = RetryPolicy(initial_seconds=1.0, max_seconds=600.0, jitter_seconds=0.0)
    assert policy.next_delay(1, 0.0, 30.0) == 30.0
    assert policy.next_delay(3, 0.0, 30.0) == 30.0
    assert policy.next_delay(3, 0.0, 0.5) == 4.0
    assert policy.next_delay(3, 0.0, 0.0) == 4.0
    assert policy.next_delay(1, 0.0, 600.0) == 600.0


YEAR = 365 * 86_400
FAR_RETRY_AFTERS = ["31536000", "Fri, 31 Dec 9999 23:59:59 GMT"]


@pytest.mark.parametrize("header", FAR_RETRY_AFTERS)
def test_defect_10_a_retry_after_is_honoured_up_to_max_seconds_only(header: str) -> None:
    asked = parse_retry_after(header, NOW)
    assert asked is not None
    assert asked >= YEAR
    policy = RetryPolicy(initial_seconds=1.0, max_seconds=600.0, jitter_seconds=0.0)
    assert policy.next_delay(1, 0.0, asked) == 600.0
    assert policy.next_delay(1, 0.0, 1200.0) == 600.0
    assert policy.next_delay(5, 0.0, 50.0) == 50.0  # within the bound: honoured


def test_defect_10_capped_waits_count_toward_the_dead_letter_horizon() -> None:
    """An operation answered a year-long Retry-After every time is dead-lettered once the
    policy's attempts and elapsed time are both reached, each wait being max_seconds."""
    policy = RetryPolicy()  # 8 attempts and 30 minutes, waits of at most 600 s
    attempts, elapsed = 1, 0.0
    while (delay := policy.next_delay(attempts, elapsed, float(YEAR))) is not None:
        assert delay <= policy.max_seconds
        attempts, elapsed = attempts + 1, elapsed + delay
    assert attempts == policy.min_attempts
    assert elapsed <= (policy.min_attempts - 1) * policy.max_seconds


# ---- parse_retry_after -----------------------------------------------------------------------

NOW = 1_700_000_000.0


def http_date(at: float, *, usegmt: bool = True) -> str:
    return format_datetime(datetime.fromtimestamp(at, UTC), usegmt=usegmt)


@pytest.mark.parametrize(("value", "expected"), [("120", 120.0), (" 5 ", 5.0), ("0", 0.0)])
def test_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_http_date() -> None:
    assert parse_retry_after(http_date(NOW + 90), NOW) == 90.0
    assert parse_retry_after(http_date(NOW + 90, usegmt=False), NOW) == 90.0  # "+0000" form
    assert parse_retry_after("Tue, 14 Nov 2023 22:15:20 GMT", NOW) == 120.0


@pytest.fixture
def pacific_time() -> Iterator[None]:
    """The process's local time zone set to one that is not UTC."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "America/Los_Angeles"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.usefixtures("pacific_time")
@pytest.mark.parametrize(
    "value",
    [
        "Tue, 14 Nov 2023 22:15:20 GMT",  # IMF-fixdate
        "Tuesday, 14-Nov-23 22:15:20 GMT",  # obsolete RFC 850 form
        "Tue Nov 14 22:15:20 2023",  # obsolete asctime form: no zone written, GMT all the same
    ],
)
def test_retry_after_http_date_forms_are_gmt_whatever_the_local_zone(value: str) -> None:
    assert time.localtime(NOW).tm_gmtoff != 0
    assert parse_retry_after(value, NOW) == 120.0


def test_retry_after_past_date_is_zero() -> None:
    assert parse_retry_after(http_date(NOW - 3600), NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "Wed, 99 Foo 2015 07:28:00 GMT", "nan", "inf", "Infinity", "1e400"],
)
def test_retry_after_garbage_is_ignored(value: str | None) -> None:
    # RFC 9110: delay-seconds is 1*DIGIT; "inf" must not park an operation forever.
    assert parse_retry_after(value, NOW) is None


# ---- SlidingWindowLimiter --------------------------------------------------------------------


class FakeTime:
    """A clock for the limiter that moves only when the limiter (or the test) sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.sleeps.append(delay)
        self.now += max(delay, 0.0)
        await _real_sleep(0)
        return result


_real_sleep = asyncio.sleep


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    clock = FakeTime()
    patched = types.SimpleNamespace(
        Lock=asyncio.Lock, sleep=clock.sleep, get_running_loop=asyncio.get_running_loop
    )
    monkeypatch.setattr(ratelimit, "asyncio", patched)
    return clock


def acquire_times(limiter: SlidingWindowLimiter, clock: FakeTime, count: int) -> list[float]:
    async def go() -> list[float]:
        times = []
        for _ in range(count):
            await limiter.acquire()
            times.append(clock.now)
        return times

    return asyncio.run(go())


def test_limiter_allows_a_burst_then_paces_3_per_second(fake_time: FakeTime) -> None:
    limiter = SlidingWindowLimiter([Rate(3, 1.0)], clock=fake_time)
    times = acquire_times(limiter, fake_time, 10)
    assert max_in_window(times, 1.0) <= 3
    start = 1000.0
    assert times[:3] == [start] * 3  # the burst goes at once
    assert times == pytest.approx([start] * 3 + [start + 1] * 3 + [start + 2] * 3 + [start + 3])


def test_limiter_steady_pace_below_the_limit_does_not_wait(fake_time: FakeTime) -> None:
    limiter = SlidingWindowLimiter([Rate(3, 1.0)], clock=fake_time)

    async def go() -> list[float]:
        times = []
        for _ in range(3):  # a burst
            await limiter.acquire()
            times.append(fake_time.now)
        for _ in range(8):  # then one every 0.5 s: 2 per second, under the limit
            fake_time.now += 0.5
            await limiter.acquire()
            times.append(fake_time.now)
        return times

    times = asyncio.run(go())
    assert max_in_window(times, 1.0) <= 3
    # only the first request after the burst waits (for the burst to leave the window)
    assert fake_time.sleeps == [pytest.approx(0.5)]
    assert times[3] == pytest.approx(1001.0)
    assert [b - a for a, b in itertools.pairwise(times[3:])] == pytest.approx([0.5] * 7)


def test_limiter_honours_every_rate_of_a_list(fake_time: FakeTime) -> None:
    limiter = SlidingWindowLimiter([Rate(5, 1.0), Rate(8, 2.0)], clock=fake_time)
    times = acquire_times(limiter, fake_time, 24)
    assert max_in_window(times, 1.0) <= 5
    assert max_in_window(times, 2.0) <= 8
    # and no slower than both allow: 5 at 0 s, 3 at 1 s, 5 at 2 s, 3 at 3 s, 5 at 4 s, 3 at 5 s
    assert times[-1] == pytest.approx(1005.0)


def test_limiter_concurrent_acquirers_share_the_window(fake_time: FakeTime) -> None:
    limiter = SlidingWindowLimiter([Rate(3, 1.0)], clock=fake_time)
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(fake_time.now)

    async def go() -> None:
        await asyncio.gather(*(one() for _ in range(12)))

    asyncio.run(go())
    assert len(times) == 12
    assert max_in_window(times, 1.0) <= 3


def test_limiter_without_rates_never_waits(fake_time: FakeTime) -> None:
    limiter = SlidingWindowLimiter([], clock=fake_time)
    assert not limiter.enabled
    times = acquire_times(limiter, fake_time, 500)
    assert fake_time.sleeps == []
    assert set(times) == {1000.0}


# ---- classify --------------------------------------------------------------------------------


def response(status: int, text: str = "", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status, text=text, headers=headers or {}, request=httpx.Request("POST", URL)
    )


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_classify_2xx_is_ok(status: int) -> None:
    assert classify(response(status)) is None


def test_classify_429_with_retry_after_seconds() -> None:
    with pytest.raises(RetriableDelivery) as caught:
        classify(response(429, '{"error":"slow down"}', {"Retry-After": "7"}))
    assert caught.value.status_code == 429
    assert caught.value.retry_after == 7.0
    assert caught.value.body == '{"error":"slow down"}'


def test_classify_429_with_retry_after_http_date() -> None:
    when = http_date(time.time() + 120)
    with pytest.raises(RetriableDelivery) as caught:
        classify(response(429, headers={"Retry-After": when}))
    assert caught.value.retry_after is not None
    assert 117.0 < caught.value.retry_after <= 120.0


def test_classify_429_without_retry_after() -> None:
    with pytest.raises(RetriableDelivery) as caught:
        classify(response(429))
    assert caught.value.retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_classify_5xx_and_408_are_retriable(status: int) -> None:
    with pytest.raises(RetriableDelivery) as caught:
        classify(response(status, "oops"))
    assert not isinstance(caught.value, FatalDelivery)
    assert caught.value.status_code == status
    assert caught.value.body == "oops"


def test_classify_503_keeps_its_retry_after() -> None:
    with pytest.raises(RetriableDelivery) as caught:
        classify(response(503, headers={"Retry-After": "30"}))
    assert caught.value.retry_after == 30.0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_classify_other_4xx_are_fatal_with_the_response(status: int) -> None:
    body = json.dumps({"error": f"no good ({status})"})
    with pytest.raises(FatalDelivery) as caught:
        classify(response(status, body))
    assert not isinstance(caught.value, RetriableDelivery)
    assert caught.value.status_code == status
    assert caught.value.body == body


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectTimeout("t"),
        httpx.ReadTimeout("t"),
        httpx.ConnectError("refused"),
        httpx.RemoteProtocolError("closed"),
    ],
)
def test_transport_errors_are_retriable(error: httpx.HTTPError, mapping_dir: Path) -> None:
    assert isinstance(transport_error(error), RetriableDelivery)

    async def go() -> None:
        with respx.mock(assert_all_called=True, using="httpx") as router:
            router.post(URL).mock(side_effect=error)
            sink = HttpSink(http_config(mapping_dir), client=httpx.AsyncClient())
            try:
                with pytest.raises(RetriableDelivery) as caught:
                    await sink.send([make_delivery("c1")])
            finally:
                await sink.aclose()
        assert caught.value.status_code is None

    asyncio.run(go())


def test_refused_connection_is_retriable_through_the_default_client(mapping_dir: Path) -> None:
    # the default path (connector.delivery._h1, no httpx client given) against a port nobody
    # listens on
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = HttpSink(http_config(mapping_dir, url=f"http://127.0.0.1:{port}/ops"))

    async def go() -> RetriableDelivery:
        try:
            with pytest.raises(RetriableDelivery) as caught:
                await sink.send([make_delivery("c1")])
            return caught.value
        finally:
            await sink.aclose()

    error = asyncio.run(go())
    assert error.status_code is None
    assert "no response" in str(error)


# ---- HttpSink (respx) ------------------------------------------------------------------------


def contact_ids(results: list[Result]) -> list[str | None]:
    """The contact id of each accepted operation (the sinks here accept all or none)."""
    assert all(isinstance(r, Sent) for r in results), results
    return [r.contact_id for r in results if isinstance(r, Sent)]


def send_with(
    config: HttpDestination, deliveries: list[Delivery], answer: httpx.Response
) -> tuple[list[str | None], list[httpx.Request]]:
    async def go() -> tuple[list[str | None], list[httpx.Request]]:
        with respx.mock(assert_all_called=True, using="httpx") as router:
            route = router.post(URL).mock(return_value=answer)
            sink = HttpSink(config, client=httpx.AsyncClient())
            try:
                ids = contact_ids(await sink.send(deliveries))
            finally:
                await sink.aclose()
            return ids, [call.request for call in route.calls]

    return asyncio.run(go())


def test_http_sink_posts_one_operation(mapping_dir: Path) -> None:
    config = http_config(
        mapping_dir, headers={"Authorization": "Bearer s3cret", "X-Tenant": "north-7"}
    )
    assert "s3cret" not in repr(config)  # secret in the config...
    delivery = make_delivery("c1")
    ids, requests = send_with(config, [delivery], httpx.Response(200, json={"contact_id": "x"}))
    assert ids == ["x"]
    assert len(requests) == 1
    request = requests[0]
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["idempotency-key"] == delivery.idempotency_key
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == "Bearer s3cret"  # ...sent in clear
    assert request.headers["x-tenant"] == "north-7"
    assert json.loads(request.content) == delivery.body


def test_http_sink_batch_posts_an_array_with_a_batch_key(mapping_dir: Path) -> None:
    config = http_config(mapping_dir, batch_size=3)
    assert config.batch_size == 3
    batch = [make_delivery(c, outbox_id=i) for i, c in enumerate(("a", "b", "c"), 1)]
    answer = httpx.Response(200, json=[{"contact_id": "ca"}, {"contact_id": "cb"}, {}])
    ids, requests = send_with(config, batch, answer)
    assert ids == ["ca", "cb", None]
    assert len(requests) == 1
    assert json.loads(requests[0].content) == [d.body for d in batch]
    key = requests[0].headers["idempotency-key"]
    assert key
    assert key not in {d.idempotency_key for d in batch}
    # derived from the operations' keys: stable for the same batch, another for another one
    _, again = send_with(config, batch, httpx.Response(200, json=[]))
    assert again[0].headers["idempotency-key"] == key
    other = [*batch[:2], make_delivery("d", outbox_id=4)]
    _, different = send_with(config, other, httpx.Response(200, json=[]))
    assert different[0].headers["idempotency-key"] != key


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="OK"),
        httpx.Response(204),
        httpx.Response(200, json={"id": "not-the-contract"}),
        httpx.Response(200, json={"contact_id": ""}),
    ],
)
def test_http_sink_without_a_contact_id_gives_none(
    answer: httpx.Response, mapping_dir: Path
) -> None:
    ids, _ = send_with(http_config(mapping_dir), [make_delivery("c1")], answer)
    assert ids == [None]


def test_http_sink_batch_with_non_json_answer_gives_none_each(mapping_dir: Path) -> None:
    batch = [make_delivery(c, outbox_id=i) for i, c in enumerate(("a", "b"), 1)]
    ids, _ = send_with(
        http_config(mapping_dir, batch_size=2), batch, httpx.Response(200, text="ok")
    )
    assert ids == [None, None]


def test_http_sink_refusal_is_fatal_with_the_response(mapping_dir: Path) -> None:
    answer = httpx.Response(422, json={"error": "email invalid"})
    with pytest.raises(FatalDelivery) as caught:
        send_with(http_config(mapping_dir), [make_delivery("c1")], answer)
    assert caught.value.status_code == 422
    assert caught.value.body is not None
    assert json.loads(caught.value.body) == {"error": "email invalid"}


# ---- JsonlSink -------------------------------------------------------------------------------


def test_jsonl_sink_appends_one_line_per_operation(mapping_dir: Path) -> None:
    config = JsonlDestination.model_validate(
        {"name": "file", "type": "jsonl", "path": "out/deep/ops.jsonl", "mapping": "http.yaml"},
        context={"base_dir": mapping_dir},
    )
    target = mapping_dir / "out" / "deep" / "ops.jsonl"
    assert config.path == target
    assert not target.parent.exists()
    sink = JsonlSink(config)
    first = [make_delivery("a"), make_delivery("b")]
    second = [make_delivery("c")]

    async def go() -> tuple[list[str | None], list[str | None]]:
        try:
            return contact_ids(await sink.send(first)), contact_ids(await sink.send(second))
        finally:
            await sink.aclose()

    ids_first, ids_second = asyncio.run(go())
    assert ids_first == [None, None]
    assert ids_second == [None]
    lines = target.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {**d.body, "idempotency_key": d.idempotency_key} for d in first + second
    ]


# ---- DeliveryWorker: real SQLite store, fake service over HTTP ------------------------------


def test_worker_delivers_and_records_the_contact_id(
    store: Store, service: FakeService, mapping_dir: Path
) -> None:
    enqueue(store, [make_op("c1")])
    asyncio.run(drain(store, HttpSink(http_config(mapping_dir, url=service.url))))

    row = outbox_rows(store)["k-c1-1"]
    assert row.status == "done"
    assert row.attempts == 1
    assert store.contact_ids(DISPENSARY, DEST, ["c1"]) == {"c1": "c-c1"}
    [attempt] = service.attempts
    assert attempt.idempotency_key == "k-c1-1"
    [op] = attempt.ops
    assert op["idempotency_key"] == "k-c1-1"
    assert op["customer_id"] == "c1"
    assert op["contact_id"] is None
    assert op["fields"] == {"email": "c1@example.com", "n": 1}


def test_worker_sends_the_known_contact_id(
    store: Store, service: FakeService, mapping_dir: Path
) -> None:
    enqueue(store, [make_op("c1", 1), make_op("c1", 2)])
    asyncio.run(drain(store, HttpSink(http_config(mapping_dir, url=service.url))))
    ops = [op for a in service.attempts for op in a.ops]
    assert [op["contact_id"] for op in ops] == [None, "c-c1"]  # learnt from the first answer


def test_worker_retries_a_500_then_delivers(
    store: Store, service: FakeService, mapping_dir: Path
) -> None:
    service.script(["500", "ok"])
    enqueue(store, [make_op("c1")])
    asyncio.run(drain(store, HttpSink(http_config(mapping_dir, url=service.url))))

    assert service.statuses() == [500, 200]
    assert {a.idempotency_key for a in service.attempts} == {"k-c1-1"}  # same key on retry
    row = outbox_rows(store)["k-c1-1"]
    assert row.status == "done"
    assert row.attempts == 2
    assert dead_rows(store) == []
    assert store.contact_ids(DISPENSARY, DEST, ["c1"]) == {"c1": "c-c1"}


def test_worker_honours_retry_after(store: Store, service: FakeService, mapping_dir: Path) -> None:
    service.script(["429:1", "ok"])
    enqueue(store, [make_op("c1")])
    asyncio.run(drain(store, HttpSink(http_config(mapping_dir, url=service.url))))

    assert service.statuses() == [429, 200]
    assert service.retry_after_violations() == []
    first, second = service.attempts
    assert second.received >= first.answered + 1.0 - 0.05
    assert outbox_rows(store)["k-c1-1"].status == "done"


def test_worker_dead_letters_a_400_with_the_response(
    store: Store, service: FakeService, mapping_dir: Path
) -> None:
    with store.transaction() as conn:  # what the planner recorded when it planned the upsert
        conn.execute(
            insert(contacts).values(
                dispensary=DISPENSARY,
                customer_id="c1",
                destination=DEST,
                contact_id="c-c1",
                delivered_hash=payload_hash(make_op("c1").body["fields"]),
                unsubscribed=False,
                deactivated=False,
                updated_at=time.time(),
            )
        )
    service.script(["400"])
    enqueue(store, [make_op("c1")])
    asyncio.run(drain(store, HttpSink(http_config(mapping_dir, url=service.url))))

    assert service.statuses() == [400]  # not retried
    row = outbox_rows(store)["k-c1-1"]
    assert row.status == "dead"
    [dead] = dead_rows(store)
    assert dead.outbox_id == row.id
    assert dead.status_code == 400
    assert json.loads(dead.response_body) == {"error": "injected"}
    assert dead.idempotency_key == "k-c1-1"
    assert dead.customer_id == "c1"
    assert dead.attempts == 1
    assert not dead.reason.startswith("gave up")
    [contact] = store.query(select(contacts).where(contacts.c.customer_id == "c1"))
    assert contact.delivered_hash is None  # the next event resends
    assert contact.contact_id == "c-c1"  # the identity map is kept


def test_defect_7_a_dead_upsert_keeps_the_hash_of_a_newer_one(
    store: Store, service: FakeService, mapping_dir: Path
) -> None:
    """U1 dies after U2 was planned: the contact's hash stays U2's, so a replay after the
    delivered rows are purged sees U1 as overtaken (it cleared the hash before)."""
    newer = make_op("c1", 2)
    with store.transaction() as conn:
        conn.execute(
            insert(contacts).values(
                dispensary=DISPENSARY,
                customer_id="c1",
                destination=DEST,
                contact_id="c-c1",
                delivered_hash=payload_hash(newer.body["fields"]),
                unsubscribed=True,
                deactivated=False,
                updated_at=time.time(),
            )
        )
    service.script(["400"])
    enqueue(store, [make_op("c1", 1)])
    asyncio.run(drain(store, HttpSink(http_config(mapping_dir, url=service.url))))
    [contact] = store.query(select(contacts).where(contacts.c.customer_id == "c1"))
    assert contact.delivered_hash == payload_hash(newer.body["fields"])
    replayed = store.replay()
    assert (replayed.replayed, replayed.superseded) == (0, 1)


def test_worker_gives_up_after_min_attempts(
    store: Store, service: FakeService, mapping_dir: Path
) -> None:
    service.configure(fail_500=1.0)
    enqueue(store, [make_op("c1")])
    asyncio.run(drain(store, HttpSink(http_config(mapping_dir, url=service.url))))

    assert service.statuses() == [500, 500, 500]  # min_attempts=3, min_elapsed=0
    row = outbox_rows(store)["k-c1-1"]
    assert row.status == "dead"
    assert row.attempts == 3
    [dead] = dead_rows(store)
    assert dead.reason.startswith("gave up")
    assert dead.status_code == 500
    assert dead.attempts == 3
    assert json.loads(dead.response_body) == {"error": "injected"}


def test_worker_retries_connection_errors_then_gives_up(store: Store, mapping_dir: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    enqueue(store, [make_op("c1")])
    url = f"http://127.0.0.1:{port}/ops"
    asyncio.run(drain(store, HttpSink(http_config(mapping_dir, url=url, timeout_seconds=2))))

    row = outbox_rows(store)["k-c1-1"]
    assert row.status == "dead"
    assert row.attempts == 3
    [dead] = dead_rows(store)
    assert dead.reason.startswith("gave up: no response"), dead.reason  # not an adapter crash
    assert dead.status_code is None


def test_worker_keeps_each_customers_order_and_overlaps_customers(
    store: Store, service: FakeService, mapping_dir: Path
) -> None:
    service.configure(delay=0.1)
    ops = []
    for n in (1, 2, 3):  # interleaved, so id order is not customer order
        ops += [make_op("A", n), make_op("B", n), make_op("C", n)]
    ops.append(make_op("D", 1))
    enqueue(store, ops)
    asyncio.run(drain(store, HttpSink(http_config(mapping_dir, url=service.url))))

    attempts = sorted(service.attempts, key=lambda a: a.received)
    assert all(a.ok for a in attempts)
    ids = {key: row.id for key, row in outbox_rows(store).items()}
    by_customer: dict[str, list[Attempt]] = {}
    for attempt in attempts:
        [op] = attempt.ops
        by_customer.setdefault(op["customer_id"], []).append(attempt)
    assert sorted(by_customer) == ["A", "B", "C", "D"]
    for customer, seen in by_customer.items():
        keys = [a.idempotency_key for a in seen]
        expected = [f"k-{customer}-{n}" for n in range(1, 4 if customer != "D" else 2)]
        assert keys == expected
        assert [ids[k] for k in keys] == sorted(ids[k] for k in keys)
        for before, after in itertools.pairwise(seen):
            assert after.received >= before.answered, f"{customer}: two ops in flight at once"
    overlapping = [
        (a, b)
        for a in attempts
        for b in attempts
        if a.ops[0]["customer_id"] < b.ops[0]["customer_id"]
        and a.received < b.answered
        and b.received < a.answered
    ]
    assert overlapping, "different customers are delivered concurrently"
    assert all(r.status == "done" for r in outbox_rows(store).values())


def test_a_retry_wait_holds_up_only_its_customer(
    store: Store, service: FakeService, mapping_dir: Path
) -> None:
    service.script(["429:1"])
    enqueue(store, [make_op("A", 1), make_op("A", 2)])

    async def go() -> None:
        sink = HttpSink(http_config(mapping_dir, url=service.url))
        async with running_worker(store, sink) as (worker, task):
            await wait_until(lambda: len(service.attempts) >= 1, task)
            enqueue(store, [make_op("B", n) for n in (1, 2, 3)])
            worker.wake.set()
            await wait_until(lambda: open_ops(store) == 0, task)

    asyncio.run(go())
    attempts = sorted(service.attempts, key=lambda a: a.received)
    keys = [a.idempotency_key for a in attempts]
    assert keys[0] == "k-A-1"
    assert attempts[0].status == 429
    retry_at = keys.index("k-A-1", 1)
    b_done = [keys.index(f"k-B-{n}") for n in (1, 2, 3)]
    assert max(b_done) < retry_at, f"B waited for A's retry: {keys}"
    assert keys.index("k-A-2") > retry_at
    assert service.retry_after_violations() == []
    assert all(r.status == "done" for r in outbox_rows(store).values())


@pytest.mark.parametrize("header", FAR_RETRY_AFTERS)
def test_defect_10_a_far_retry_after_parks_an_operation_max_seconds_then_dead_letters_it(
    store: Store, mapping_dir: Path, header: str
) -> None:
    """The user's service answers every attempt 429 with a Retry-After a year (or ages)
    away: each next attempt is max_seconds later, and after min_attempts and
    min_elapsed_seconds the operation is dead-lettered with the response."""
    policy = RetryPolicy(
        initial_seconds=0.01,
        max_seconds=0.2,
        jitter_seconds=0.0,
        min_attempts=3,
        min_elapsed_seconds=0.3,
    )
    enqueue(store, [make_op("c1")])
    sent: list[float] = []
    parked: list[float] = []

    def throttled(request: httpx.Request) -> httpx.Response:
        sent.append(time.time())
        return httpx.Response(429, text="slow down", headers={"Retry-After": header})

    async def go() -> None:
        with respx.mock(assert_all_called=True, using="httpx") as router:
            router.post(URL).mock(side_effect=throttled)
            sink = HttpSink(http_config(mapping_dir), client=httpx.AsyncClient())
            async with running_worker(store, sink, retry=policy, idle_poll=0.02) as (_, task):
                await wait_until(lambda: bool(sent), task)
                await wait_until(lambda: outbox_rows(store)["k-c1-1"].last_error is not None, task)
                parked.append(outbox_rows(store)["k-c1-1"].next_attempt_at - sent[0])
                await wait_until(lambda: open_ops(store) == 0, task, timeout=10.0)

    asyncio.run(go())
    assert parked[0] <= policy.max_seconds + 0.05
    assert len(sent) == 3  # the third attempt is past both min_attempts and 0.3 s
    assert all(0.15 <= b - a <= 1.0 for a, b in itertools.pairwise(sent))
    assert outbox_rows(store)["k-c1-1"].status == "dead"
    (dead,) = dead_rows(store)
    assert (dead.status_code, dead.attempts) == (429, 3)
    assert dead.reason.startswith("gave up: HTTP 429")


def test_worker_does_not_spin_while_waiting_for_a_retry(
    store: Store, service: FakeService, mapping_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A customer's later op is pending (due) but blocked behind the op waiting out its
    Retry-After: the worker must sleep until something can be claimed, not hammer the store
    (each claim is a write transaction competing with the receiver)."""
    claims: list[float] = []
    real_claim = store.claim

    def counting_claim(*args: Any, **kwargs: Any) -> Any:
        claims.append(time.monotonic())
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(store, "claim", counting_claim)
    service.script(["429:1"])
    enqueue(store, [make_op("A", 1), make_op("A", 2)])
    asyncio.run(drain(store, HttpSink(http_config(mapping_dir, url=service.url)), idle_poll=1.0))

    first, retry = (a for a in service.attempts if a.idempotency_key == "k-A-1")
    waiting = [t for t in claims if first.answered < t < retry.received]
    # a worker that sleeps until the retry is due claims a handful of times in that second
    assert len(waiting) <= 20, f"{len(waiting)} claims while nothing could be claimed"


def test_worker_sends_batches_as_arrays(
    store: Store, service: FakeService, mapping_dir: Path
) -> None:
    enqueue(store, [make_op(c) for c in ("a", "b", "c", "d")])
    config = http_config(mapping_dir, url=service.url, batch_size=2)
    asyncio.run(drain(store, HttpSink(config)))

    attempts = service.attempts
    assert all(a.batch and a.ok for a in attempts)
    assert sorted(len(a.ops) for a in attempts) == [2, 2]
    for attempt in attempts:
        assert attempt.idempotency_key not in {op["idempotency_key"] for op in attempt.ops}
    assert sorted(op["customer_id"] for a in attempts for op in a.ops) == ["a", "b", "c", "d"]
    assert store.contact_ids(DISPENSARY, DEST, ["a", "b", "c", "d"]) == {
        c: f"c-{c}" for c in ("a", "b", "c", "d")
    }
    assert all(r.status == "done" for r in outbox_rows(store).values())


def test_worker_delivers_to_a_jsonl_destination(store: Store, mapping_dir: Path) -> None:
    config = JsonlDestination.model_validate(
        {"name": DEST, "type": "jsonl", "path": "out/ops.jsonl", "mapping": "http.yaml"},
        context={"base_dir": mapping_dir},
    )
    enqueue(store, [make_op("a", 1), make_op("a", 2), make_op("b", 1)])
    asyncio.run(drain(store, JsonlSink(config)))
    lines = [json.loads(x) for x in config.path.read_text(encoding="utf-8").splitlines()]
    assert sorted(x["idempotency_key"] for x in lines) == ["k-a-1", "k-a-2", "k-b-1"]
    a_keys = [x["idempotency_key"] for x in lines if x["customer_id"] == "a"]
    assert a_keys == ["k-a-1", "k-a-2"]
    assert all(r.status == "done" for r in outbox_rows(store).values())


def test_worker_paces_requests_to_the_rate_limit(
    store: Store, service: FakeService, mapping_dir: Path
) -> None:
    enqueue(store, [make_op(f"c{i:02d}") for i in range(15)])
    config = http_config(mapping_dir, url=service.url, rate_limit=["5/s"])
    assert config.rate_limit == (Rate(5, 1.0),)
    sent: dict[str, float] = {}  # idempotency key -> when the worker handed it to the sink

    async def go() -> None:
        # Open the client's connections first, so a first burst slowed by TCP set-up does not
        # arrive bunched with the next second's.
        client = httpx.AsyncClient(timeout=10.0)
        service.configure(delay=0.05)
        await asyncio.gather(*(client.get(service.base_url + "/warm-up") for _ in range(8)))
        service.configure(delay=0.0)
        service.reset()
        sink = HttpSink(config, client=client)
        send = sink.send

        async def timed_send(deliveries: list[Delivery]) -> list[str | None]:
            sent[deliveries[0].idempotency_key] = time.monotonic()
            return await send(deliveries)

        sink.send = timed_send  # type: ignore[method-assign]
        await drain(store, sink)

    asyncio.run(go())
    attempts = service.attempts
    assert len(attempts) == 15
    assert all(r.status == "done" for r in outbox_rows(store).values())
    # what leaves the worker is paced exactly (time.monotonic is one clock for the process)
    assert max_in_window(list(sent.values()), 1.0) <= 5
    # what the sink sees: the same, within 20 ms at the window's edges plus however much the
    # transit time varied (this machine may be loaded; a burst is still caught)
    lags = [a.received - sent[str(a.idempotency_key)] for a in attempts]
    assert min(lags) >= 0
    tolerance = 0.02 + (max(lags) - min(lags))
    assert tolerance < 0.5, f"transit times too uneven to judge: {lags}"
    assert max_in_window([a.received for a in attempts], 1.0 - tolerance) <= 5


# ---- claims ----------------------------------------------------------------------------------


def test_claim_gives_one_op_per_customer_in_order(store: Store) -> None:
    enqueue(store, [make_op("A", 1), make_op("A", 2), make_op("B", 1)])
    rows = store.claim(DISPENSARY, DEST, 10)
    assert [r.idempotency_key for r in rows] == ["k-A-1", "k-B-1"]
    assert store.claim(DISPENSARY, DEST, 10) == []  # A-2 waits for A-1
    stored = outbox_rows(store)
    assert stored["k-A-1"].status == "inflight"
    assert stored["k-A-1"].claimed_by == store.process_id
    assert stored["k-A-2"].status == "pending"


def test_release_claims_gives_back_inflight_ops(store: Store) -> None:
    enqueue(store, [make_op("A", 1), make_op("B", 1)])
    assert len(store.claim(DISPENSARY, DEST, 10)) == 2
    assert store.release_claims() == 2
    for row in outbox_rows(store).values():
        assert row.status == "pending"
        assert row.claimed_by is None
        assert row.claimed_until is None
    assert len(store.claim(DISPENSARY, DEST, 10)) == 2  # claimable again at once


def test_an_expired_claim_can_be_claimed_again(store: Store) -> None:
    enqueue(store, [make_op("A", 1)])
    now = time.time()
    assert len(store.claim(DISPENSARY, DEST, 10, now=now)) == 1
    assert store.claim(DISPENSARY, DEST, 10, now=now + CLAIM_SECONDS - 1) == []
    again = store.claim(DISPENSARY, DEST, 10, now=now + CLAIM_SECONDS + 1)
    assert [r.idempotency_key for r in again] == ["k-A-1"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_register_process_releases_ops_of_a_dead_process(store: Store, store_url: str) -> None:
    """Released: a process silent for a claim's lifetime; on SQLite (one host) also a process
    of this host whose pid is gone, at once. PostgreSQL's replicas run on several hosts: a
    dead pid is released when its heartbeat has aged, like any other."""
    pid_checks = store.dialect == "sqlite"
    now = time.time()
    host = socket.gethostname()
    enqueue(store, [make_op("A", 1), make_op("B", 1), make_op("C", 1)])
    ghosts = [
        ("dead-pid", host, dead_pid(), now),  # this host, pid gone: released at once
        ("alive", host, os.getpid(), now),  # still running: kept
        ("silent", "elsewhere", 1, now - CLAIM_SECONDS - 5),  # no heartbeat for 30 s: released
    ]
    with store.transaction() as conn:
        for (pid_id, pid_host, pid, beat), customer in zip(ghosts, "ABC", strict=True):
            conn.execute(
                insert(processes).values(
                    # registered when it last beat: "alive" (this test's pid) registered
                    # after this process started, not a predecessor that had its pid
                    id=pid_id,
                    host=pid_host,
                    pid=pid,
                    started_at=beat,
                    heartbeat_at=beat,
                )
            )
            conn.execute(
                update(outbox)
                .where(outbox.c.idempotency_key == f"k-{customer}-1")
                .values(status="inflight", claimed_by=pid_id, claimed_until=now + CLAIM_SECONDS)
            )

    restarted = open_store(store_url)
    try:
        assert restarted.register_process() == (2 if pid_checks else 1)
        rows = outbox_rows(restarted)
        if pid_checks:
            assert rows["k-A-1"].status == "pending"
            assert rows["k-A-1"].claimed_by is None
        else:
            assert rows["k-A-1"].claimed_by == "dead-pid"
        assert rows["k-B-1"].status == "inflight"
        assert rows["k-B-1"].claimed_by == "alive"
        assert rows["k-C-1"].status == "pending"
        known = {r.id for r in restarted.query(select(processes))}
        assert ("dead-pid" in known) is not pid_checks
        assert "silent" not in known
        assert {"alive", restarted.process_id} <= known
        claimed = restarted.claim(DISPENSARY, DEST, 10)
        released = ["k-A-1", "k-C-1"] if pid_checks else ["k-C-1"]
        assert sorted(r.idempotency_key for r in claimed) == released
    finally:
        restarted.close()


def test_dead_pid_helper_really_is_dead() -> None:
    pid = dead_pid()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
