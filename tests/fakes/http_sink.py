"""A controllable local HTTP endpoint playing "the user's service" for the generic ``http``
destination (design.md, contract 4).

``POST <path>`` (default ``/ops``) takes one operation object or a JSON array of them, with
header ``Idempotency-Key``. Answers:

- 415 ``{"error": ...}`` unless ``Content-Type`` is ``application/json`` (parameters allowed);
- 400 ``{"error": ...}`` without an ``Idempotency-Key``, for invalid JSON, for a body that is
  neither an object nor a non-empty array of objects, and (``strict``) for operations that
  break the contract;
- then, deterministically for a given seed (or as scripted with :meth:`SinkApp.script`):
  500 ``{"error": "injected"}``, 429 with ``Retry-After: N`` or an injected permanent 400;
- otherwise 200 with ``{"contact_id": "c-<customer_id>"}`` (``c-<into_customer_id>`` for a
  merge), or for an array a JSON array of such objects in the same order.

Every attempt is recorded (:class:`Attempt`). In-process use::

    with HttpSink(fail_429=0.1, seed=7) as sink:
        httpx.post(sink.url, ...)
        sink.unique_ops(); sink.retry_after_violations()

As a process (prints ``LISTENING <port>`` once ready, runs until SIGTERM/SIGINT, exits 0)::

    python -m tests.fakes.http_sink --port 0 --fail-500 0.1 --fail-429 0.1 --retry-after 1 \
        --seed 7 --record out.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import uvicorn

from ._serve import (
    DEFAULT_LOOP,
    bind_socket,
    http_body,
    make_server,
    serve_until_signalled,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPERATIONS = frozenset({"upsert", "unsubscribe", "subscribe", "merge", "deactivate"})
CONTRACT_KEYS = (
    "op",
    "dispensary",
    "customer_id",
    "contact_id",
    "fields",
    "channels",
    "from_contact_id",
    "into_contact_id",
    "from_customer_id",
    "into_customer_id",
    "idempotency_key",
)
RETRY_AFTER_TOLERANCE = 0.05

_JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One request received by the sink, whatever it was answered."""

    received: float  # time.monotonic() when the request reached the app
    wall: float  # time.time() at the same moment
    answered: float  # time.monotonic() just before the response was sent
    method: str
    path: str
    idempotency_key: str | None  # the Idempotency-Key header, None when absent
    status: int
    retry_after: int | None  # the Retry-After given with a 429, else None
    batch: bool  # the body was a JSON array
    ops: list[dict[str, Any]]  # the operations of the body ([] when it was not valid)
    response: Any  # the JSON answered (None for an empty body)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """A scripted answer: ``status`` and, for a 429, the Retry-After in seconds."""

    status: int
    retry_after: int | None = None

    @classmethod
    def parse(cls, spec: str | int, default_retry_after: int) -> Answer:
        """``"ok"`` (200), ``"201"``, ``"204"``, ``"429"``, ``"429:3"``, ``"500"``, ``503``..."""
        text = str(spec).strip().lower()
        if text == "ok":
            return cls(200)
        code, _, after = text.partition(":")
        try:
            status = int(code)
            retry_after = int(after) if after else None
        except ValueError:
            raise ValueError(f"bad scripted answer {spec!r}") from None
        if not 200 <= status <= 599 or 300 <= status < 400:
            raise ValueError(f"bad scripted answer {spec!r}: status must be 2xx, 4xx or 5xx")
        if retry_after is not None and retry_after < 0:
            raise ValueError(f"bad scripted answer {spec!r}: negative Retry-After")
        if status == 429 and retry_after is None:
            retry_after = default_retry_after
        return cls(status, retry_after)


def contact_result(op: dict[str, Any]) -> dict[str, Any]:
    """The result of one operation: ``{"contact_id": "c-<customer_id>"}`` (for a merge,
    ``c-<into_customer_id>``)."""
    customer = op.get("into_customer_id") if op.get("op") == "merge" else op.get("customer_id")
    return {"contact_id": None if customer is None else f"c-{customer}"}


def unique_ops(ops: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``ops`` without repeats of an ``idempotency_key`` (first one kept; ops without one kept)."""
    seen: set[Any] = set()
    out: list[dict[str, Any]] = []
    for op in ops:
        key = op.get("idempotency_key")
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        out.append(op)
    return out


def retry_after_violations(
    attempts: Sequence[Attempt], tolerance: float = RETRY_AFTER_TOLERANCE
) -> list[str]:
    """Idempotency keys retried earlier than the Retry-After of the 429 they were given.

    For each 429 the next attempt with the same ``Idempotency-Key`` header must arrive no
    earlier than the 429's answer time + Retry-After - ``tolerance``. A key appears once per
    violation.
    """
    ordered = sorted(attempts, key=lambda a: a.received)
    pending: dict[str, float] = {}  # key -> earliest allowed time of its next attempt
    violations: list[str] = []
    for attempt in ordered:
        key = attempt.idempotency_key
        if key is None:
            continue
        earliest = pending.pop(key, None)
        if earliest is not None and attempt.received < earliest - tolerance:
            violations.append(key)
        if attempt.status == 429 and attempt.retry_after is not None:
            pending[key] = attempt.answered + attempt.retry_after
    return violations


def load_attempts(path: str | Path) -> list[Attempt]:
    """The attempts written by ``--attempts-log`` (one JSON object a line). A last line not
    yet ended by its newline is being written while we read and is left for the next read."""
    with open(path, encoding="utf-8") as fh:
        return [Attempt(**json.loads(line)) for line in fh if line.endswith("\n")]


def read_record(path: str | Path) -> list[dict[str, Any]]:
    """The accepted operations written by ``--record`` (one JSON object a line, duplicates kept)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _check_behaviour(
    fail_500: float, fail_429: float, fail_400: float, retry_after: int, delay: float
) -> None:
    for name, value in (("fail_500", fail_500), ("fail_429", fail_429), ("fail_400", fail_400)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    if fail_500 + fail_429 + fail_400 > 1.0:
        raise ValueError("fail_500 + fail_429 + fail_400 must not exceed 1")
    if retry_after < 0 or delay < 0:
        raise ValueError("retry_after and delay must not be negative")


def _contract_error(ops: list[dict[str, Any]], header_key: str, batch: bool) -> str | None:
    seen: set[str] = set()
    for index, op in enumerate(ops):
        where = f"operation {index}: " if batch else ""
        missing = [k for k in CONTRACT_KEYS if k not in op]
        if missing:
            return f"{where}missing keys {missing}"
        if op["op"] not in OPERATIONS:
            return f"{where}unknown op {op['op']!r}"
        key = op["idempotency_key"]
        if not isinstance(key, str) or not key:
            return f"{where}idempotency_key must be a non-empty string"
        if key in seen:
            return f"{where}idempotency_key {key!r} repeated in the batch"
        seen.add(key)
    if not batch and ops[0]["idempotency_key"] != header_key:
        return "Idempotency-Key header differs from the body's idempotency_key"
    return None


class SinkApp:
    """The ASGI app and its records. Thread-safe: the server runs it on its own event loop
    while tests read the records and script answers from another thread.

    ``fail_500``, ``fail_429``, ``fail_400``, ``retry_after``, ``delay`` and ``strict`` may be
    changed while the sink runs, with :meth:`configure`.
    """

    def __init__(
        self,
        *,
        path: str = "/ops",
        fail_500: float = 0.0,
        fail_429: float = 0.0,
        fail_400: float = 0.0,
        retry_after: int = 1,
        delay: float = 0.0,
        seed: int = 0,
        strict: bool = False,
        record: str | Path | None = None,
        attempts_log: str | Path | None = None,
    ) -> None:
        _check_behaviour(fail_500, fail_429, fail_400, retry_after, delay)
        self.path = path
        self.fail_500 = fail_500
        self.fail_429 = fail_429
        self.fail_400 = fail_400
        self.retry_after = retry_after
        self.delay = delay
        self.seed = seed
        self.strict = strict
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._attempts: list[Attempt] = []
        self._script: collections.deque[Answer] = collections.deque()
        self._by_customer: dict[tuple[str, str], collections.deque[Answer]] = {}
        self._record: IO[str] | None = None
        self._attempts_log: IO[str] | None = None
        if record is not None:
            self._record = open(record, "a", encoding="utf-8")  # noqa: SIM115
        if attempts_log is not None:
            self._attempts_log = open(attempts_log, "a", encoding="utf-8")  # noqa: SIM115

    # ---- control ---------------------------------------------------------------------------

    def script(self, answers: Iterable[str | int]) -> None:
        """Force the next answers, in order, before any random injection: ``"ok"``, ``"500"``,
        ``"429"`` (Retry-After = ``retry_after``), ``"429:3"``, ``"400"``, ``"204"``... Only
        requests that pass validation (content type, key, JSON shape) consume an entry."""
        parsed = [Answer.parse(a, self.retry_after) for a in answers]
        with self._lock:
            self._script.extend(parsed)

    def script_for(self, customer_id: str, op: str, answers: Iterable[str | int]) -> None:
        """Force the next answers to operations ``op`` of one customer (whatever else is
        in flight meanwhile), before the shared script and any random injection."""
        parsed = [Answer.parse(a, self.retry_after) for a in answers]
        with self._lock:
            self._by_customer.setdefault((customer_id, op), collections.deque()).extend(parsed)

    def pending_script(self) -> int:
        with self._lock:
            return len(self._script)

    def configure(
        self,
        *,
        fail_500: float | None = None,
        fail_429: float | None = None,
        fail_400: float | None = None,
        retry_after: int | None = None,
        delay: float | None = None,
        strict: bool | None = None,
    ) -> None:
        """Change the behaviour while the sink runs (arguments left None are kept)."""
        with self._lock:
            new = (
                self.fail_500 if fail_500 is None else fail_500,
                self.fail_429 if fail_429 is None else fail_429,
                self.fail_400 if fail_400 is None else fail_400,
                self.retry_after if retry_after is None else retry_after,
                self.delay if delay is None else delay,
            )
            _check_behaviour(*new)
            self.fail_500, self.fail_429, self.fail_400, self.retry_after, self.delay = new
            if strict is not None:
                self.strict = strict

    def reset(self, seed: int | None = None) -> None:
        """Forget the attempts and the scripts (the sink's and each customer's); restart the
        random injection from ``seed`` (default: the constructor's)."""
        with self._lock:
            self._attempts.clear()
            self._script.clear()
            self._by_customer.clear()
            if seed is not None:
                self.seed = seed
            self._rng = random.Random(self.seed)

    def close(self) -> None:
        with self._lock:
            for fh in (self._record, self._attempts_log):
                if fh is not None:
                    fh.close()
            self._record = self._attempts_log = None

    # ---- records ---------------------------------------------------------------------------

    @property
    def attempts(self) -> list[Attempt]:
        """Every request received, in the order answered (a copy)."""
        with self._lock:
            return list(self._attempts)

    def statuses(self) -> list[int]:
        with self._lock:
            return [a.status for a in self._attempts]

    def accepted_ops(self) -> list[dict[str, Any]]:
        """Operations of the 2xx answers, in order, duplicates included."""
        with self._lock:
            return [op for a in self._attempts if a.ok for op in a.ops]

    def unique_ops(self) -> list[dict[str, Any]]:
        """``accepted_ops()`` de-duplicated by each operation's ``idempotency_key``."""
        return unique_ops(self.accepted_ops())

    def retry_after_violations(self, tolerance: float = RETRY_AFTER_TOLERANCE) -> list[str]:
        return retry_after_violations(self.attempts, tolerance)

    def wait_for(self, count: int, timeout: float = 5.0, *, unique: bool = True) -> bool:
        """Block until ``count`` operations were accepted (``unique``: distinct keys); False
        on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                ops = [op for a in self._attempts if a.ok for op in a.ops]
                if len(unique_ops(ops) if unique else ops) >= count:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)

    # ---- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = time.monotonic()
        wall = time.time()
        body = await http_body(scope, receive, send)
        if body is None:
            return
        content_type = b""
        key: str | None = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"idempotency-key":
                key = value.decode("latin-1")

        method: str = scope["method"]
        path: str = scope["path"]
        ops: list[dict[str, Any]] = []
        batch = False
        answer: Answer | None = None
        error: str | None = None
        extra: list[tuple[bytes, bytes]] = []
        if path != self.path:
            answer, error = Answer(404), "not found"
        elif method != "POST":
            answer, error = Answer(405), "method not allowed"
            extra = [(b"allow", b"POST")]
        elif content_type.split(b";", 1)[0].strip().lower() != b"application/json":
            answer, error = Answer(415), "Content-Type must be application/json"
        elif not key:
            answer, error = Answer(400), "missing Idempotency-Key header"
        else:
            try:
                decoded = json.loads(body)
            except ValueError:
                decoded = None
                answer, error = Answer(400), "invalid JSON"
            if answer is None:
                if isinstance(decoded, dict):
                    ops = [decoded]
                elif (
                    isinstance(decoded, list)
                    and decoded
                    and all(isinstance(op, dict) for op in decoded)
                ):
                    ops, batch = decoded, True
                else:
                    answer = Answer(400)
                    error = "body must be an operation object or a non-empty array of them"
            if answer is None and self.strict:
                error = _contract_error(ops, key, batch)
                if error is not None:
                    answer = Answer(400)
            if answer is None:
                answer = self._decide(ops)
                if answer.status >= 400:
                    error = "injected"

        if self.delay:
            await asyncio.sleep(self.delay)

        status = answer.status
        headers = list(_JSON_HEADERS)
        response: Any
        if error is not None or status >= 300:
            response = {"error": error or "injected"}
        elif status == 204:
            response = None
        else:
            results = [contact_result(op) for op in ops]
            response = results if batch else results[0]
        if status == 429 and answer.retry_after is not None:
            headers.append((b"retry-after", str(answer.retry_after).encode()))
        headers.extend(extra)
        payload = b"" if response is None else _dumps(response)
        headers.append((b"content-length", str(len(payload)).encode()))

        attempt = Attempt(
            received=received,
            wall=wall,
            answered=time.monotonic(),
            method=method,
            path=path,
            idempotency_key=key,
            status=status,
            retry_after=answer.retry_after if status == 429 else None,
            batch=batch,
            ops=ops,
            response=response,
        )
        self._store(attempt)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _decide(self, ops: Sequence[dict[str, Any]] = ()) -> Answer:
        with self._lock:
            for op in ops:  # a customer's own script first (several customers in flight)
                scripted = self._by_customer.get((str(op.get("customer_id")), str(op.get("op"))))
                if scripted:
                    return scripted.popleft()
            if self._script:
                return self._script.popleft()
            draw = self._rng.random()
            fail_500, fail_429, fail_400 = self.fail_500, self.fail_429, self.fail_400
            retry_after = self.retry_after
        if draw < fail_500:
            return Answer(500)
        if draw < fail_500 + fail_429:
            return Answer(429, retry_after)
        if draw < fail_500 + fail_429 + fail_400:
            return Answer(400)
        return Answer(200)

    def _store(self, attempt: Attempt) -> None:
        with self._changed:
            self._attempts.append(attempt)
            if self._record is not None and attempt.ok and attempt.ops:
                self._record.write("".join(json.dumps(op) + "\n" for op in attempt.ops))
                self._record.flush()
            if self._attempts_log is not None:
                self._attempts_log.write(json.dumps(dataclasses.asdict(attempt)) + "\n")
                self._attempts_log.flush()
            self._changed.notify_all()


class HttpSink:
    """The sink served by uvicorn in a background thread on ``host`` (127.0.0.1) and a free
    port (or ``port``). Use as a context manager; it is accepting connections when entered
    and stopped, with its socket closed, on exit. Record and control methods are those of
    :class:`SinkApp` (``self.app``)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/ops",
        fail_500: float = 0.0,
        fail_429: float = 0.0,
        fail_400: float = 0.0,
        retry_after: int = 1,
        delay: float = 0.0,
        seed: int = 0,
        strict: bool = False,
        record: str | Path | None = None,
        attempts_log: str | Path | None = None,
        loop: str = DEFAULT_LOOP,
        start_timeout: float = 10.0,
    ) -> None:
        self.app = SinkApp(
            path=path,
            fail_500=fail_500,
            fail_429=fail_429,
            fail_400=fail_400,
            retry_after=retry_after,
            delay=delay,
            seed=seed,
            strict=strict,
            record=record,
            attempts_log=attempts_log,
        )
        self.host = host
        self.port = port
        self.path = path
        self.loop = loop
        self.start_timeout = start_timeout
        self.socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def start(self) -> HttpSink:
        if self._thread is not None:
            raise RuntimeError("the sink is already running")
        self.socket = bind_socket(self.host, self.port)
        self.port = self.socket.getsockname()[1]
        self._server = make_server(self.app, self.loop, quiet=True)
        self._thread = threading.Thread(
            target=self._run, args=(self._server, self.socket), name="http-sink", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP sink did not start: {self._error!r}")
            time.sleep(0.002)
        with socket.create_connection((self.host, self.port), timeout=self.start_timeout):
            pass
        return self

    def _run(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported by start(); the thread must not die loudly
            self._error = exc

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(5.0)
            if thread.is_alive():
                server.force_exit = True
                thread.join(5.0)
        if self.socket is not None:
            self.socket.close()
        self._server = self._thread = None
        self.app.close()

    def __enter__(self) -> HttpSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- forwarded to the app ----------------------------------------------------------------

    @property
    def attempts(self) -> list[Attempt]:
        return self.app.attempts

    def statuses(self) -> list[int]:
        return self.app.statuses()

    def accepted_ops(self) -> list[dict[str, Any]]:
        return self.app.accepted_ops()

    def unique_ops(self) -> list[dict[str, Any]]:
        return self.app.unique_ops()

    def retry_after_violations(self, tolerance: float = RETRY_AFTER_TOLERANCE) -> list[str]:
        return self.app.retry_after_violations(tolerance)

    def script(self, answers: Iterable[str | int]) -> None:
        self.app.script(answers)

    def script_for(self, customer_id: str, op: str, answers: Iterable[str | int]) -> None:
        self.app.script_for(customer_id, op, answers)

    def pending_script(self) -> int:
        return self.app.pending_script()

    def configure(self, **behaviour: Any) -> None:
        """See :meth:`SinkApp.configure`: fail_500, fail_429, fail_400, retry_after, delay,
        strict."""
        self.app.configure(**behaviour)

    def reset(self, seed: int | None = None) -> None:
        self.app.reset(seed)

    def wait_for(self, count: int, timeout: float = 5.0, *, unique: bool = True) -> bool:
        return self.app.wait_for(count, timeout, unique=unique)


@contextmanager
def run_sink(**kwargs: Any) -> Iterator[HttpSink]:
    """``with run_sink(fail_500=0.1) as sink:`` — the same as ``with HttpSink(...) as sink:``."""
    with HttpSink(**kwargs) as sink:
        yield sink


# ---- process mode ------------------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not within [0, 1]")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.http_sink",
        description="A fake of the user's service for the generic http destination.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--path", default="/ops")
    parser.add_argument("--fail-500", type=_fraction, default=0.0, help="fraction answered 500")
    parser.add_argument("--fail-429", type=_fraction, default=0.0, help="fraction answered 429")
    parser.add_argument("--fail-400", type=_fraction, default=0.0, help="fraction answered 400")
    parser.add_argument("--retry-after", type=int, default=1, help="seconds, sent with a 429")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="400 for contract violations")
    parser.add_argument("--record", type=Path, help="append each accepted op as a JSON line")
    parser.add_argument("--attempts-log", type=Path, help="append each attempt as a JSON line")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default=DEFAULT_LOOP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        app = SinkApp(
            path=args.path,
            fail_500=args.fail_500,
            fail_429=args.fail_429,
            fail_400=args.fail_400,
            retry_after=args.retry_after,
            delay=args.delay,
            seed=args.seed,
            strict=args.strict,
            record=args.record,
            attempts_log=args.attempts_log,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sock = bind_socket(args.host, args.port)
    try:
        return serve_until_signalled(make_server(app, args.loop, quiet=False), sock)
    finally:
        app.close()


if __name__ == "__main__":
    sys.exit(main())
