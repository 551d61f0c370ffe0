"""The fake of the user's service for the generic ``http`` destination (tests/fakes/http_sink.py)
behaves as documented, over real HTTP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes._serve import listening_port
from fakes.http_sink import (
    Attempt,
    HttpSink,
    load_attempts,
    read_record,
    retry_after_violations,
    run_sink,
)

ROOT = Path(__file__).resolve().parent.parent


def make_op(customer_id: str, key: str | None = None, **overrides: Any) -> dict[str, Any]:
    op: dict[str, Any] = {
        "op": "upsert",
        "dispensary": "partnersandbox3",
        "customer_id": customer_id,
        "contact_id": None,
        "fields": {"email": f"{customer_id}@example.com"},
        "channels": None,
        "from_contact_id": None,
        "into_contact_id": None,
        "from_customer_id": None,
        "into_customer_id": None,
        "idempotency_key": key or f"key-{customer_id}",
    }
    op.update(overrides)
    return op


def post(client: httpx.Client, url: str, body: Any, key: str | None = "k") -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(url, content=json.dumps(body), headers=headers)


@pytest.fixture(scope="module")
def shared_sink() -> Iterator[HttpSink]:
    with HttpSink() as sink:
        yield sink


@pytest.fixture
def sink(shared_sink: HttpSink) -> HttpSink:
    """The module's sink: default behaviour, no attempts, no script, injection restarted."""
    shared_sink.configure(
        fail_500=0.0, fail_429=0.0, fail_400=0.0, retry_after=1, delay=0.0, strict=False
    )
    shared_sink.reset(seed=0)
    return shared_sink


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as c:
        yield c


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_415_unless_the_body_is_declared_json(
    sink: HttpSink, client: httpx.Client, content_type: str | None
) -> None:
    headers = {"Idempotency-Key": "k"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = client.post(sink.url, content=json.dumps(make_op("1")), headers=headers)
    assert response.status_code == 415
    assert "error" in response.json()
    assert sink.statuses() == [415]
    assert sink.accepted_ops() == []


def test_content_type_parameters_are_allowed(sink: HttpSink, client: httpx.Client) -> None:
    response = client.post(
        sink.url,
        content=json.dumps(make_op("1")),
        headers={"Content-Type": "Application/JSON; charset=utf-8", "Idempotency-Key": "k"},
    )
    assert response.status_code == 200


def test_400_with_a_json_error_without_idempotency_key(
    sink: HttpSink, client: httpx.Client
) -> None:
    response = post(client, sink.url, make_op("1"), key=None)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert "Idempotency-Key" in response.json()["error"]
    [attempt] = sink.attempts
    assert attempt.idempotency_key is None
    assert attempt.status == 400


def test_400_for_invalid_json(sink: HttpSink, client: httpx.Client) -> None:
    response = client.post(
        sink.url,
        content=b'{"op": "upsert",',
        headers={"Content-Type": "application/json", "Idempotency-Key": "k"},
    )
    assert response.status_code == 400
    assert response.json() == {"error": "invalid JSON"}


@pytest.mark.parametrize("body", [42, "upsert", None, [], [1, 2], [{"op": "upsert"}, "x"]])
def test_400_for_a_body_that_is_neither_an_op_nor_an_array_of_ops(
    sink: HttpSink, client: httpx.Client, body: Any
) -> None:
    response = post(client, sink.url, body)
    assert response.status_code == 400
    assert "error" in response.json()
    assert sink.attempts[0].ops == []


def test_unknown_path_and_method(sink: HttpSink, client: httpx.Client) -> None:
    assert post(client, sink.base_url + "/other", make_op("1")).status_code == 404
    response = client.get(sink.url)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


# ---- successful answers ------------------------------------------------------------------------


def test_200_for_a_single_op_returns_its_contact_id(sink: HttpSink, client: httpx.Client) -> None:
    response = post(client, sink.url, make_op("42"), key="key-42")
    assert response.status_code == 200
    assert response.json() == {"contact_id": "c-42"}
    [attempt] = sink.attempts
    assert attempt.status == 200
    assert attempt.idempotency_key == "key-42"
    assert attempt.ops == [make_op("42")]
    assert not attempt.batch
    assert attempt.response == {"contact_id": "c-42"}
    assert attempt.received <= attempt.answered <= time.monotonic()
    assert abs(attempt.wall - time.time()) < 60


def test_a_merge_answers_the_surviving_customer(sink: HttpSink, client: httpx.Client) -> None:
    merge = make_op("7", op="merge", fields=None, from_customer_id="7", into_customer_id="9")
    response = post(client, sink.url, merge)
    assert response.json() == {"contact_id": "c-9"}


def test_a_batch_answers_an_array_of_results_in_order(sink: HttpSink, client: httpx.Client) -> None:
    ops = [
        make_op("3"),
        make_op("1", op="unsubscribe", fields=None, channels=["email"]),
        make_op("5", op="merge", from_customer_id="5", into_customer_id="2"),
        make_op("4", op="deactivate", fields=None),
    ]
    response = post(client, sink.url, ops, key="batch-1")
    assert response.status_code == 200
    assert response.json() == [
        {"contact_id": "c-3"},
        {"contact_id": "c-1"},
        {"contact_id": "c-2"},
        {"contact_id": "c-4"},
    ]
    [attempt] = sink.attempts
    assert attempt.batch
    assert attempt.idempotency_key == "batch-1"
    assert sink.accepted_ops() == ops


# ---- scripted answers and injection ------------------------------------------------------------


def test_scripted_answers_come_in_order_then_normal_service(
    sink: HttpSink, client: httpx.Client
) -> None:
    sink.script(["500", "429", "ok", "429:3", 503, "400", "204"])
    assert sink.pending_script() == 7
    responses = [post(client, sink.url, make_op(str(i)), key=f"k{i}") for i in range(8)]
    assert [r.status_code for r in responses] == [500, 429, 200, 429, 503, 400, 204, 200]
    assert responses[0].json() == {"error": "injected"}
    assert responses[1].headers["retry-after"] == "1"
    assert responses[3].headers["retry-after"] == "3"
    assert "retry-after" not in responses[0].headers
    assert responses[2].json() == {"contact_id": "c-2"}
    assert responses[6].content == b""
    assert sink.pending_script() == 0
    assert [op["customer_id"] for op in sink.accepted_ops()] == ["2", "6", "7"]
    assert sink.attempts[1].retry_after == 1
    assert sink.attempts[0].retry_after is None


def test_invalid_requests_do_not_consume_the_script(sink: HttpSink, client: httpx.Client) -> None:
    sink.script(["500"])
    assert post(client, sink.url, make_op("1"), key=None).status_code == 400
    assert post(client, sink.url, make_op("1")).status_code == 500


@pytest.mark.parametrize("answer", ["nope", "302", "429:x", "429:-1", "700", "100"])
def test_a_bad_scripted_answer_is_refused(sink: HttpSink, answer: str) -> None:
    with pytest.raises(ValueError, match="bad scripted answer"):
        sink.script([answer])


RATES: dict[str, Any] = {"fail_500": 0.3, "fail_429": 0.3, "fail_400": 0.1, "retry_after": 2}


def statuses_of(sink: HttpSink, client: httpx.Client, requests: int = 40) -> list[int]:
    got = [post(client, sink.url, make_op(str(i)), key=f"k{i}") for i in range(requests)]
    assert [r.status_code for r in got] == sink.statuses()
    for response in got:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "2"
        elif response.status_code in (400, 500):
            assert response.json() == {"error": "injected"}
    return sink.statuses()


def test_injection_is_deterministic_for_a_seed(sink: HttpSink, client: httpx.Client) -> None:
    with HttpSink(seed=7, **RATES) as first_sink, HttpSink(seed=7, **RATES) as second_sink:
        first = statuses_of(first_sink, client)
        assert statuses_of(second_sink, client) == first
    assert set(first) == {200, 400, 429, 500}
    sink.configure(**RATES)
    sink.reset(seed=8)
    assert statuses_of(sink, client) != first


def test_reset_restarts_the_injection_sequence(sink: HttpSink, client: httpx.Client) -> None:
    sink.configure(fail_500=0.5)
    sink.reset(seed=3)
    first = [post(client, sink.url, make_op("1")).status_code for _ in range(20)]
    sink.script(["ok"])
    sink.reset()
    assert sink.attempts == []
    assert sink.pending_script() == 0
    again = [post(client, sink.url, make_op("1")).status_code for _ in range(20)]
    assert again == first
    assert set(first) == {200, 500}


def test_every_429_carries_retry_after(sink: HttpSink, client: httpx.Client) -> None:
    sink.configure(fail_429=1.0, retry_after=5)
    for i in range(5):
        response = post(client, sink.url, make_op(str(i)))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "5"
    assert sink.accepted_ops() == []
    assert [a.retry_after for a in sink.attempts] == [5] * 5


def test_injection_rates_are_validated(sink: HttpSink) -> None:
    with pytest.raises(ValueError, match="must not exceed 1"):
        HttpSink(fail_500=0.6, fail_429=0.6)
    with pytest.raises(ValueError, match="within"):
        HttpSink(fail_400=-0.1)
    with pytest.raises(ValueError, match="must not exceed 1"):
        sink.configure(fail_500=0.5, fail_400=0.6)
    assert sink.app.fail_500 == 0.0


def test_delay_holds_each_answer(sink: HttpSink, client: httpx.Client) -> None:
    sink.configure(delay=0.05)
    assert post(client, sink.url, make_op("1")).status_code == 200
    [attempt] = sink.attempts
    assert attempt.answered - attempt.received >= 0.04


# ---- records -----------------------------------------------------------------------------------


def test_unique_ops_drops_repeats_of_an_idempotency_key(
    sink: HttpSink, client: httpx.Client
) -> None:
    a, b, c = make_op("a"), make_op("b"), make_op("c")
    sink.script(["ok", "500", "ok", "ok"])
    post(client, sink.url, a, key="key-a")
    post(client, sink.url, b, key="key-b")  # 500: not accepted
    post(client, sink.url, b, key="key-b")
    post(client, sink.url, [a, c], key="batch")  # a delivered again
    assert sink.accepted_ops() == [a, b, a, c]
    assert sink.unique_ops() == [a, b, c]


def test_wait_for_counts_accepted_ops(sink: HttpSink, client: httpx.Client) -> None:
    post(client, sink.url, make_op("1"))
    post(client, sink.url, make_op("1"))
    assert sink.wait_for(1, timeout=1.0)
    assert sink.wait_for(2, timeout=1.0, unique=False)
    assert not sink.wait_for(2, timeout=0.01)


def attempt(key: str, status: int, at: float, retry_after: int | None = None) -> Attempt:
    return Attempt(
        received=at,
        wall=at,
        answered=at,
        method="POST",
        path="/ops",
        idempotency_key=key,
        status=status,
        retry_after=retry_after,
        batch=False,
        ops=[],
        response=None,
    )


def test_retry_after_violations_compares_the_next_attempt_of_the_key() -> None:
    attempts = [
        attempt("early", 429, 0.0, retry_after=1),
        attempt("on-time", 429, 0.0, retry_after=1),
        attempt("within-tolerance", 429, 0.0, retry_after=1),
        attempt("never-retried", 429, 0.0, retry_after=1),
        attempt("after-500", 500, 0.0),
        attempt("after-500", 200, 0.01),
        attempt("early", 200, 0.5),
        attempt("within-tolerance", 200, 0.96),
        attempt("on-time", 429, 1.0, retry_after=2),
        attempt("on-time", 200, 3.0),
        attempt("early", 200, 0.6),  # only the attempt right after a 429 is judged
    ]
    assert retry_after_violations(attempts) == ["early"]
    assert retry_after_violations(attempts, tolerance=0.0) == ["early", "within-tolerance"]


def test_retry_after_violations_over_http(sink: HttpSink, client: httpx.Client) -> None:
    sink.script(["429", "429"])  # Retry-After: 1
    assert post(client, sink.url, make_op("1"), key="impatient").status_code == 429
    assert post(client, sink.url, make_op("2"), key="patient").status_code == 429
    assert post(client, sink.url, make_op("1"), key="impatient").status_code == 200
    assert sink.retry_after_violations() == ["impatient"]
    given = next(a for a in sink.attempts if a.idempotency_key == "patient")
    time.sleep(max(0.0, given.answered + 1.0 - time.monotonic()))
    assert post(client, sink.url, make_op("2"), key="patient").status_code == 200
    assert sink.retry_after_violations() == ["impatient"]


# ---- strict contract checks --------------------------------------------------------------------


def test_strict_mode_refuses_operations_that_break_the_contract(
    sink: HttpSink, client: httpx.Client
) -> None:
    sink.configure(strict=True)
    assert post(client, sink.url, make_op("1"), key="key-1").status_code == 200
    incomplete = make_op("2")
    del incomplete["channels"]
    response = post(client, sink.url, incomplete, key="key-2")
    assert response.status_code == 400
    assert "channels" in response.json()["error"]
    assert post(client, sink.url, make_op("3", op="delete"), key="key-3").status_code == 400
    mismatch = post(client, sink.url, make_op("4"), key="other")
    assert mismatch.status_code == 400
    assert "differs" in mismatch.json()["error"]
    repeated = post(client, sink.url, [make_op("5"), make_op("5")], key="b")
    assert repeated.status_code == 400
    assert post(client, sink.url, [make_op("5"), make_op("6")], key="b").status_code == 200
    assert [op["customer_id"] for op in sink.accepted_ops()] == ["1", "5", "6"]


# ---- sockets and process mode ------------------------------------------------------------------


def test_the_listening_socket_is_tcp_with_nodelay(sink: HttpSink) -> None:
    assert sink.socket is not None
    assert sink.socket.proto == socket.IPPROTO_TCP
    assert sink.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_in_process_sink_stops_and_frees_its_socket(client: httpx.Client) -> None:
    with run_sink(path="/hook") as sink:
        url = sink.url
        assert url == f"http://127.0.0.1:{sink.port}/hook"
        assert post(client, url, make_op("1")).status_code == 200
    assert sink.socket is not None
    assert sink.socket.fileno() == -1
    with pytest.raises(httpx.ConnectError):
        post(client, url, make_op("1"))


def test_process_mode_records_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    record = tmp_path / "out.jsonl"
    log = tmp_path / "attempts.jsonl"
    command = [sys.executable, "-m", "tests.fakes.http_sink", "--port", "0", "--seed", "7"]
    command += ["--record", str(record), "--attempts-log", str(log)]
    with subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            port = listening_port(process)
            url = f"http://127.0.0.1:{port}/ops"
            with httpx.Client(timeout=5.0) as client:
                assert post(client, url, make_op("1"), key="key-1").json() == {"contact_id": "c-1"}
                batch = [make_op("2"), make_op("3")]
                assert post(client, url, batch, key="b").status_code == 200
                assert post(client, url, make_op("4"), key=None).status_code == 400
            assert read_record(record) == [make_op("1"), *batch]
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=20.0)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 0, stderr
    assert read_record(record) == [make_op("1"), make_op("2"), make_op("3")]
    attempts = load_attempts(log)
    assert [a.status for a in attempts] == [200, 200, 400]
    assert [a.idempotency_key for a in attempts] == ["key-1", "b", None]
    assert attempts[1].batch


def test_process_mode_refuses_bad_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.fakes.http_sink", "--fail-500", "1.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20.0,
        check=False,
    )
    assert result.returncode == 2
    assert "--fail-500" in result.stderr
