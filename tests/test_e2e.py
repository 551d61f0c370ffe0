"""End to end: ``connector serve`` as a subprocess, the HTTP sink fake (tests/fakes/http_sink.py)
as another, real HTTP both ways and a real store: SQLite in ``tmp_path``, and PostgreSQL (each
test runs on both; tests/conftest.py's ``store_url``).

A few hundred CUSTOMER webhooks are generated from the seed body: about a hundred customers with
several versions each (``last_update`` written with varying UTC offsets, so that text order is
not instant order), exact re-deliveries, older versions posted after newer ones, same-instant
ties, opt-outs (some followed by a later ``"false"``), two merge pairs (one in each order), a
deactivation and a stray payload of a merged-away customer. The version of each payload is
visible at the sink in ``fields.rewards_balance`` (version * 10 + variant).

Events of one customer are posted in order (round by round, a round holding at most one event
per customer), different customers concurrently with several clients. So the outcome of every
event and the operations each customer must produce are known in advance (:func:`model`), and
are compared exactly with the inbox, the outbox and what the sink received.

Checks that may reveal bugs are collected (:class:`Checks`) and reported together at the end of
each test rather than stopping at the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg
import pytest
import yaml
from fakes.http_sink import load_attempts, read_record, retry_after_violations, unique_ops

ROOT = Path(__file__).resolve().parent.parent
SEED = json.loads((ROOT / "tests" / "data" / "seed_body.json").read_bytes())
MAPPING = ROOT / "mappings" / "http.yaml"
DISPENSARY = "partnersandbox3"
TOKEN = "e2e-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
GRACE = 2.0
DRAIN_SECONDS = 90.0
CLIENTS = 4
PROCESSED = {"applied", "tie", "stale", "duplicate", "absorbed", "ignored"}
BASE = datetime(2026, 4, 24, 18, 38, 21, tzinfo=UTC)
OFFSETS = (-7, -10, 2, 0)  # hours; the text of later instants often sorts first


# --- events and what they must produce ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One payload of a customer: ``version`` sets ``last_update``; ``variant`` changes the
    content without changing the instant (a tie)."""

    customer_id: str
    version: int
    variant: int = 0
    opt_out: bool = False
    kind: str = "normal"  # normal | survivor | absorbed | deactivated | stray
    other: str | None = None  # survivor: the absorbed id; absorbed: the survivor id

    @property
    def rewards(self) -> int:
        return self.version * 10 + self.variant

    @property
    def last_update(self) -> str:
        instant = BASE + timedelta(minutes=self.version, milliseconds=self.version)
        offset = timezone(timedelta(hours=OFFSETS[self.version % len(OFFSETS)]))
        return instant.astimezone(offset).isoformat(timespec="milliseconds")

    @property
    def body(self) -> bytes:
        envelope = copy.deepcopy(SEED)
        data = envelope["data"]
        data.update(
            customer_id=self.customer_id,
            last_update=self.last_update,
            rewards_balance=self.rewards,
            opt_out="true" if self.opt_out else "false",
            email=f"c{self.customer_id}@example.com",
        )
        if self.kind == "survivor":
            data.update(status="MERGED", merged_customer_ids=[self.other])
        elif self.kind == "absorbed":
            data.update(status="DEACTIVATED", merged_into_customer_id=self.other)
        elif self.kind == "deactivated":
            data.update(status="DEACTIVATED")
        return json.dumps(envelope, separators=(",", ":")).encode()


Round = list[Event]


@dataclass(slots=True)
class Scenario:
    rounds: list[Round]
    outcomes: dict[str, list[str]]  # customer -> inbox status of each of its events, in order
    ops: dict[str, list[tuple[str, Any]]]  # customer -> (op, rewards | survivor) in order
    opted_out: set[str]
    merges: list[tuple[str, str]]  # (absorbed, survivor)
    flip_flop: str | None  # a customer whose tie flips back to an earlier payload

    @property
    def events(self) -> list[Event]:
        return [event for round_ in self.rounds for event in round_]


def model(sequence: Sequence[Event]) -> tuple[list[str], list[tuple[str, Any]]]:
    """The design's rules for a normal customer: outcomes and operations, in order."""
    current: Event | None = None
    unsubscribed = False
    outcomes: list[str] = []
    ops: list[tuple[str, Any]] = []
    for event in sequence:
        if current is None or event.version > current.version:
            outcome = "applied"
        elif event.version < current.version:
            outcome = "stale"
        elif event == current:
            outcome = "duplicate"
        else:
            outcome = "tie"
        outcomes.append(outcome)
        if outcome in ("applied", "tie"):
            current = event
            ops.append(("upsert", event.rewards))
            if event.opt_out and not unsubscribed:
                ops.append(("unsubscribe", None))
                unsubscribed = True
        elif outcome == "stale" and event.opt_out and not unsubscribed and current is not None:
            # an opt-out is owed whatever its version; the current version is then planned
            # again (a refresh) so that the contact's opted_out field says so
            ops.append(("unsubscribe", None))
            unsubscribed = True
            ops.append(("upsert", current.rewards))
    return outcomes, ops


def _normal_sequence(rng: random.Random, cid: str) -> list[Event]:
    count = rng.randint(1, 4)
    opt_from = rng.randint(1, count) if rng.random() < 0.2 else None
    events = [
        Event(cid, v, opt_out=opt_from is not None and v >= opt_from) for v in range(1, count + 1)
    ]
    if opt_from is not None and rng.random() < 0.5:
        events.append(Event(cid, count + 1, opt_out=False))  # a later "false": no resubscribe
    sequence = list(events)
    if len(sequence) >= 2 and rng.random() < 0.25:  # a newer version arrives first
        i = rng.randrange(len(sequence) - 1)
        sequence[i], sequence[i + 1] = sequence[i + 1], sequence[i]
    if rng.random() < 0.3:  # an exact re-delivery
        i = rng.randrange(len(sequence))
        sequence.insert(i + 1, sequence[i])
    newest = max(e.version for e in sequence)
    if newest >= 2 and rng.random() < 0.3:  # an old version re-posted after newer ones
        sequence.append(rng.choice([e for e in sequence if e.version < newest]))
    if rng.random() < 0.08:  # same instant, other content: a tie, applied
        top = max(sequence, key=lambda e: e.version)
        sequence.append(Event(cid, top.version, variant=1, opt_out=top.opt_out))
    return sequence


def scenario(customers: int = 100, seed: int = 11, specials: bool = True) -> Scenario:
    rng = random.Random(seed)
    sequences: dict[str, list[Event | None]] = {}
    outcomes: dict[str, list[str]] = {}
    ops: dict[str, list[tuple[str, Any]]] = {}
    opted_out: set[str] = set()
    for index in range(customers):
        cid = str(70000 + index)
        sequence = _normal_sequence(rng, cid)
        sequences[cid] = list(sequence)
        outcomes[cid], ops[cid] = model(sequence)
        if any(op == "unsubscribe" for op, _ in ops[cid]):
            opted_out.add(cid)
    merges: list[tuple[str, str]] = []
    flip_flop = None
    if specials:
        # merge pair 1: the survivor's payload first (and repeated), then the absorbed one,
        # then a stray later payload of the absorbed id
        s1, a1 = "80001", "80002"
        sequences[s1] = [Event(s1, 1), Event(s1, 2, kind="survivor", other=a1)]
        sequences[s1].append(sequences[s1][1])
        sequences[a1] = [Event(a1, 1), None, Event(a1, 2, kind="absorbed", other=s1)]
        sequences[a1].append(Event(a1, 3))
        outcomes[s1] = ["applied", "applied", "duplicate"]
        outcomes[a1] = ["applied", "absorbed", "absorbed"]
        ops[s1] = [("upsert", 10), ("upsert", 20)]
        ops[a1] = [("upsert", 10), ("merge", s1)]
        # merge pair 2: the absorbed payload first (and repeated), then the survivor's
        s2, a2 = "80003", "80004"
        sequences[a2] = [Event(a2, 1), Event(a2, 2, kind="absorbed", other=s2)]
        sequences[a2].append(sequences[a2][1])
        sequences[s2] = [Event(s2, 1), None, None, Event(s2, 2, kind="survivor", other=a2)]
        outcomes[a2] = ["applied", "applied", "duplicate"]
        outcomes[s2] = ["applied", "applied"]
        ops[a2] = [("upsert", 10), ("merge", s2)]
        ops[s2] = [("upsert", 10), ("upsert", 20)]
        merges = [(a1, s1), (a2, s2)]
        # deactivated without a merge
        d = "80005"
        sequences[d] = [Event(d, 1), Event(d, 2, kind="deactivated")]
        outcomes[d] = ["applied", "applied"]
        ops[d] = [("upsert", 10), ("deactivate", None)]
        # a tie that flips back: v2, v2' (same instant), then v2 again. Arrival order rules:
        # the destination must end with v2's payload.
        flip_flop = "80006"
        v2 = Event(flip_flop, 2)
        sequence = [Event(flip_flop, 1), v2, Event(flip_flop, 2, variant=1), v2]
        sequences[flip_flop] = list(sequence)
        outcomes[flip_flop], ops[flip_flop] = model(sequence)
    depth = max(len(s) for s in sequences.values())
    rounds = [
        [s[i] for s in sequences.values() if i < len(s) and s[i] is not None] for i in range(depth)
    ]
    return Scenario(rounds, outcomes, ops, opted_out, merges, flip_flop)


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """A subprocess with stdout and stderr in files of ``folder``."""

    def __init__(self, name: str, args: list[str], cwd: Path, folder: Path) -> None:
        self.name = name
        self.out_path = folder / f"{name}.out"
        self.err_path = folder / f"{name}.err"
        self._files: list[IO[bytes]] = [open(self.out_path, "wb"), open(self.err_path, "wb")]  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("CONNECTOR_CONFIG", None)
        self.popen = subprocess.Popen(
            args, cwd=cwd, stdout=self._files[0], stderr=self._files[1], env=env
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.out_path, self.err_path):
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {path.name} (last {lines} lines) ---")
            parts.extend(text.splitlines()[-lines:])
        return "\n".join(parts)

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines of stdout (structlog)."""
        out = []
        for line in self.out_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
        return out

    def kill9(self) -> None:
        os.kill(self.popen.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.running():
            self.popen.terminate()
            if self.wait(10.0) is None:
                self.popen.kill()
                self.popen.wait(10.0)
        for handle in self._files:
            handle.close()


class Procs:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.all: list[Proc] = []

    def start(self, name: str, args: list[str], cwd: Path) -> Proc:
        proc = Proc(name, args, cwd, self.folder)
        self.all.append(proc)
        return proc

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.all)


@contextlib.contextmanager
def procs_in(folder: Path) -> Iterator[Procs]:
    """The processes a test (or a module of tests) starts, closed when it ends; their
    output tails are printed, which pytest shows only when a test failed."""
    registry = Procs(folder)
    try:
        yield registry
    finally:
        for proc in registry.all:
            proc.close()
        print(registry.tails())


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    with procs_in(tmp_path) as registry:
        yield registry


@dataclass(slots=True)
class Sink:
    proc: Proc
    url: str
    record: Path
    attempts: Path


def start_sink(procs: Procs, name: str, *flags: str) -> Sink:
    folder = procs.folder
    record, attempts = folder / f"{name}-record.jsonl", folder / f"{name}-attempts.jsonl"
    args = [sys.executable, "-m", "tests.fakes.http_sink", "--port", "0"]
    args += ["--record", str(record), "--attempts-log", str(attempts), *flags]
    proc = procs.start(name, args, ROOT)
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        match = re.search(r"^LISTENING (\d+)$", proc.out_path.read_text(), re.MULTILINE)
        if match:
            return Sink(proc, f"http://127.0.0.1:{match[1]}/ops", record, attempts)
        if not proc.running():
            break
        time.sleep(0.05)
    pytest.fail(f"the sink did not start\n{proc.tail()}")


def write_config(folder: Path, sink_url: str, store: str) -> Path:
    mapping = folder / "http.yaml"
    mapping.write_bytes(MAPPING.read_bytes())
    config = {
        "store": store,
        "server": {"host": "127.0.0.1", "shutdown_grace_seconds": GRACE},
        "dispensaries": {
            DISPENSARY: {
                "webhook_token": TOKEN,
                "destinations": [
                    {
                        "name": "sink",
                        "type": "http",
                        "url": sink_url,
                        "mapping": "http.yaml",
                        "concurrency": 4,
                        "retry": {
                            "initial_seconds": 0.1,
                            "max_seconds": 1,
                            "min_attempts": 20,
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


@dataclass(slots=True)
class Server:
    proc: Proc
    base: str

    @property
    def webhook(self) -> str:
        return f"{self.base}/webhooks/treez/{DISPENSARY}"


def connector_command() -> list[str]:
    script = Path(sys.executable).with_name("connector")
    return [str(script)] if script.exists() else [sys.executable, "-m", "connector"]


def start_server(procs: Procs, config: Path, name: str) -> Server:
    port = free_port()
    args = [*connector_command(), "serve", "--config", str(config), "--port", str(port)]
    proc = procs.start(name, args, config.parent)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30.0
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not proc.running():
                break
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{base}/healthz").status_code == 200:
                    return Server(proc, base)
            time.sleep(0.05)
    pytest.fail(f"connector serve did not answer /healthz\n{proc.tail()}")


def sigterm(server: Server) -> tuple[int | None, float]:
    """SIGTERM the server; its exit code (None: still running after the grace and a few
    seconds) and how long it took."""
    started = time.monotonic()
    server.proc.popen.send_signal(signal.SIGTERM)
    code = server.proc.wait(2 * GRACE + 8.0)
    return code, time.monotonic() - started


# --- posting -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Posted:
    answered: list[tuple[Event, int]]
    unanswered: list[Event]  # no answer: connection refused or dropped
    not_started: list[Round]

    @property
    def acked(self) -> list[Event]:
        return [event for event, status in self.answered if status == 202]


async def _post_rounds(
    url: str, rounds: Sequence[Round], kill_after: int | None, kill: Callable[[], None] | None
) -> Posted:
    result = Posted([], [], [])
    acked = 0
    killed = False

    async def post_all(client: httpx.AsyncClient, share: list[Event]) -> None:
        nonlocal acked, killed
        for event in share:
            try:
                response = await client.post(url, content=event.body, headers=HEADERS)
            except httpx.TransportError:
                result.unanswered.append(event)
                continue
            result.answered.append((event, response.status_code))
            if response.status_code == 202:
                acked += 1
                if kill is not None and not killed and acked >= (kill_after or 0):
                    kill()
                    killed = True

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(timeout=20.0)) for _ in range(CLIENTS)
        ]
        for index, round_ in enumerate(rounds):
            if killed:
                result.not_started = list(rounds[index:])
                break
            await asyncio.gather(
                *(post_all(client, round_[i::CLIENTS]) for i, client in enumerate(clients))
            )
    return result


def post_rounds(
    url: str,
    rounds: Sequence[Round],
    kill_after: int | None = None,
    kill: Callable[[], None] | None = None,
) -> Posted:
    """Post round after round; the events of a round concurrently with several clients.
    With ``kill``: call it once ``kill_after`` events got 202, and stop after that round."""
    return asyncio.run(_post_rounds(url, rounds, kill_after, kill))


# --- the store, read-only -----------------------------------------------------------------------


def query(db: str, sql: str) -> list[Any]:
    """Rows of ``sql`` read from the store at URL ``db`` (not through the connector)."""
    if db.startswith("sqlite:///"):
        path = db.removeprefix("sqlite:///")
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        ) as c:
            return c.execute(sql).fetchall()
    with psycopg.connect(db, autocommit=True) as conn:
        return [tuple(row) for row in conn.execute(sql).fetchall()]


def wait_drained(db: str, server: Server, inbox_at_least: int) -> None:
    """Until every event is planned and every operation delivered or dead; /metrics is
    scraped meanwhile (its queue gauge is checked once drained)."""
    deadline = time.monotonic() + DRAIN_SECONDS
    seen: tuple[Any, ...] = ()
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if not server.proc.running():
                pytest.fail(f"the server exited ({server.proc.popen.returncode}) while draining")
            seen = query(
                db,
                "SELECT (SELECT count(*) FROM inbox),"
                " (SELECT count(*) FROM inbox WHERE status = 'pending'),"
                " (SELECT count(*) FROM outbox WHERE status IN ('pending', 'inflight'))",
            )[0]
            with contextlib.suppress(httpx.TransportError):
                client.get(f"{server.base}/metrics")
            total, events, ops = seen
            if total >= inbox_at_least and events == 0 and ops == 0:
                return
            time.sleep(0.2)
    pytest.fail(
        f"not drained within {DRAIN_SECONDS} s: (inbox, pending events, pending ops) = {seen}"
    )


def queue_depth(server: Server) -> float | None:
    with httpx.Client(timeout=5.0) as client:
        text = client.get(f"{server.base}/metrics").text
    for match in re.finditer(r"^connector_queue_depth\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
        if labels == {"dispensary": DISPENSARY, "destination": "sink"}:
            return float(match[2])
    return None


# --- checks --------------------------------------------------------------------------------------


class Checks:
    """Collects failed expectations so that one run reports all of them."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, condition: object, message: str) -> None:
        if not condition:
            self.failures.append(message)

    def assert_all(self) -> None:
        assert not self.failures, "\n\n".join(self.failures)


def inbox_by_customer(db: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for customer_id, status in query(
        db, "SELECT customer_id, status FROM inbox WHERE source != 'refresh' ORDER BY id"
    ):
        out[customer_id].append(status)
    return dict(out)


def sink_sequences(ops: Sequence[dict[str, Any]]) -> dict[str, list[tuple[str, Any]]]:
    """Per customer: (op, rewards of an upsert | survivor of a merge | None), in order."""
    out: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for op in ops:
        kind = op.get("op")
        if kind == "upsert":
            detail = (op.get("fields") or {}).get("rewards_balance")
        elif kind == "merge":
            detail = str(op.get("into_customer_id"))
        else:
            detail = None
        out[str(op.get("customer_id"))].append((kind, detail))
    return dict(out)


def check_delivery(checks: Checks, db: str, sink: Sink, world: Scenario) -> None:
    """The outbox against what the sink received and against what the design says."""
    outbox = query(db, "SELECT idempotency_key, op, customer_id, status FROM outbox")
    statuses = Counter(row[3] for row in outbox)
    checks.expect(
        set(statuses) <= {"done"},
        f"every operation must be delivered (only 500/429 injected): {dict(statuses)}; "
        f"dead letters: {query(db, 'SELECT op, customer_id, reason FROM dead_letters')}",
    )
    done = {row[0] for row in outbox if row[3] == "done"}
    received = read_record(sink.record)
    unique = unique_ops(received)
    keys = {op["idempotency_key"] for op in unique}
    checks.expect(
        keys == done,
        f"the sink's unique operations must be the outbox's done ones: "
        f"{len(done - keys)} missing at the sink, {len(keys - done)} extra at the sink",
    )
    checks.expect(
        len(unique) == len(outbox),
        f"{len(unique)} unique operations at the sink, {len(outbox)} in the outbox",
    )
    checks.expect(
        all(op.get("op") != "subscribe" for op in received),
        "a subscribe was sent (policy resubscribe: never)",
    )

    got = sink_sequences(unique)
    # strict order per customer, duplicates included: upserts never go back in time
    for cid, sequence in sink_sequences(received).items():
        versions = [d // 10 for op, d in sequence if op == "upsert" and isinstance(d, int)]
        checks.expect(
            versions == sorted(versions),
            f"customer {cid}: upserts out of last_update order: {versions}",
        )
    for cid, expected in world.ops.items():
        if cid == world.flip_flop:
            continue
        checks.expect(
            got.get(cid, []) == expected,
            f"customer {cid}: the sink received {got.get(cid, [])}, expected {expected}",
        )
    extra = set(got) - set(world.ops)
    checks.expect(not extra, f"operations for customers never posted: {sorted(extra)}")
    for cid in world.opted_out:
        ops = [op for op, _ in got.get(cid, [])]
        checks.expect(
            ops.count("unsubscribe") == 1, f"opted-out customer {cid}: unsubscribes in {ops}"
        )
    for absorbed, survivor in world.merges:
        merges = [op for op in unique if op.get("op") == "merge"]
        pair = [
            op
            for op in merges
            if str(op.get("from_customer_id")) == absorbed
            and str(op.get("into_customer_id")) == survivor
        ]
        checks.expect(len(pair) == 1, f"merge {absorbed} -> {survivor}: {len(pair)} merges")
        after = got.get(absorbed, [])
        index = after.index(("merge", survivor)) if ("merge", survivor) in after else -1
        checks.expect(
            index == len(after) - 1,
            f"absorbed {absorbed}: operations after its merge: {after}",
        )
    # the final upsert of each customer carries its newest applied version
    for cid, expected in world.ops.items():
        if cid == world.flip_flop:
            continue
        upserts = [d for op, d in expected if op == "upsert"]
        final = [d for op, d in got.get(cid, []) if op == "upsert"]
        if upserts:
            checks.expect(
                final[-1:] == upserts[-1:],
                f"customer {cid}: the last upsert delivered carries rewards "
                f"{final[-1:]}, the newest payload applied has {upserts[-1]}",
            )


def check_inbox_exact(checks: Checks, db: str, posted: Sequence[Event], world: Scenario) -> None:
    bodies = Counter(
        row[0].encode() for row in query(db, "SELECT body FROM inbox WHERE source != 'refresh'")
    )
    checks.expect(
        bodies == Counter(e.body for e in posted),
        f"the inbox holds {sum(bodies.values())} events, {len(posted)} were posted "
        f"(or their bodies differ)",
    )
    statuses = Counter(row[0] for row in query(db, "SELECT status FROM inbox"))
    checks.expect(set(statuses) <= PROCESSED, f"inbox statuses: {dict(statuses)}")
    actual = inbox_by_customer(db)
    for cid, expected in world.outcomes.items():
        checks.expect(
            actual.get(cid) == expected,
            f"customer {cid}: inbox outcomes {actual.get(cid)}, expected {expected}",
        )


def check_retries(checks: Checks, sink: Sink) -> None:
    attempts = load_attempts(sink.attempts)
    codes = Counter(a.status for a in attempts)
    assert codes[429], f"no 429 was injected: {dict(codes)}"
    assert codes[500], f"no 500 was injected: {dict(codes)}"
    violations = retry_after_violations(attempts)
    checks.expect(not violations, f"Retry-After not honoured for {len(violations)} retries")


def check_metrics(checks: Checks, server: Server) -> None:
    depth = queue_depth(server)
    checks.expect(
        depth in (None, 0.0),
        f"GET /metrics: connector_queue_depth is {depth} with nothing pending or in flight",
    )


def check_flip_flop(checks: Checks, sink: Sink, cid: str) -> None:
    """v1, v2, v2' (same instant, other content: a tie), v2 again (a tie again, in arrival
    order): the destination must end up with v2's payload, as the planner's state believes."""
    upserts = [
        (op.get("fields") or {}).get("rewards_balance")
        for op in unique_ops(read_record(sink.record))
        if op.get("customer_id") == cid and op.get("op") == "upsert"
    ]
    checks.expect(
        upserts[-1:] == [20],
        f"tie flip-flop customer {cid}: upserts delivered {upserts}; the last event applied "
        "(a tie, recorded in the inbox as such) carries rewards 20, but its upsert was never "
        "delivered: its idempotency key equals that of the first v2 upsert",
    )


# --- the tests -----------------------------------------------------------------------------------


def test_serve_delivers_every_event_through_500s_and_429s(
    tmp_path: Path, store_url: str, procs: Procs
) -> None:
    world = scenario()
    events = world.events
    assert 250 <= len(events) <= 400, len(events)
    sink = start_sink(
        procs, "sink", "--fail-500", "0.1", "--fail-429", "0.1", "--retry-after", "1", "--seed", "7"
    )
    config = write_config(tmp_path, sink.url, store_url)
    server = start_server(procs, config, "serve")
    db = store_url
    checks = Checks()

    posted = post_rounds(server.webhook, world.rounds)
    assert not posted.unanswered, f"{len(posted.unanswered)} posts got no answer"
    answers = Counter(status for _, status in posted.answered)
    assert answers == {202: len(events)}, dict(answers)

    wait_drained(db, server, len(events))
    check_inbox_exact(checks, db, events, world)
    check_delivery(checks, db, sink, world)
    check_retries(checks, sink)
    check_metrics(checks, server)
    if world.flip_flop is not None:
        check_flip_flop(checks, sink, world.flip_flop)

    code, took = sigterm(server)
    checks.expect(code == 0, f"SIGTERM: serve exited with {code} after {took:.1f} s, not 0")
    checks.assert_all()


def test_kill_9_mid_posting_loses_nothing(tmp_path: Path, store_url: str, procs: Procs) -> None:
    world = scenario(seed=23)
    events = world.events
    sink = start_sink(
        procs, "sink", "--fail-500", "0.1", "--fail-429", "0.1", "--retry-after", "1", "--seed", "8"
    )
    config = write_config(tmp_path, sink.url, store_url)
    first = start_server(procs, config, "serve-1")
    db = store_url
    checks = Checks()

    before = post_rounds(first.webhook, world.rounds, len(events) // 2, first.proc.kill9)
    assert first.proc.wait(10.0) == -signal.SIGKILL
    assert len(before.acked) >= len(events) // 2
    assert set(before.answered) <= {(e, 202) for e in events}, "an answer other than 202"
    inflight = query(db, "SELECT count(*) FROM outbox WHERE status = 'inflight'")[0][0]
    acked_in_db = Counter(
        row[0].encode() for row in query(db, "SELECT body FROM inbox WHERE source != 'refresh'")
    )
    missing = Counter(e.body for e in before.acked) - acked_in_db
    checks.expect(not missing, f"{sum(missing.values())} events answered 202 are not stored")

    second = start_server(procs, config, "serve-2")
    # Treez retries what got no answer, in order, before anything newer of that customer
    rest = [before.unanswered, *before.not_started] if before.unanswered else before.not_started
    after = post_rounds(second.webhook, rest)
    assert not after.unanswered, f"{len(after.unanswered)} posts got no answer after restart"
    assert all(status == 202 for _, status in after.answered)
    acked = before.acked + after.acked
    assert Counter(e.body for e in acked) >= Counter(e.body for e in events)

    wait_drained(db, second, len(acked))
    started = [line for line in second.proc.log_lines() if line.get("event") == "started"]
    # receiver and pipeline process: the pipeline one releases (SQLite: the killed pid is
    # gone from this host; PostgreSQL has no pid check across hosts, its claims expire)
    released = inflight if store_url.startswith("sqlite") else 0
    checks.expect(
        started and sum(line.get("released", 0) for line in started) == released,
        f"restart: claims of the killed process released at start: {started}, "
        f"{inflight} were in flight at the kill",
    )
    stored = Counter(
        row[0].encode() for row in query(db, "SELECT body FROM inbox WHERE source != 'refresh'")
    )
    acked_count = Counter(e.body for e in acked)
    retried = Counter(e.body for e in before.unanswered)
    checks.expect(
        all(acked_count[b] <= stored[b] <= acked_count[b] + retried[b] for b in acked_count)
        and set(stored) <= set(acked_count),
        f"inbox: {sum(stored.values())} events for {sum(acked_count.values())} answered 202 "
        f"and {len(before.unanswered)} re-posted after no answer",
    )
    statuses = Counter(row[0] for row in query(db, "SELECT status FROM inbox"))
    checks.expect(set(statuses) <= PROCESSED, f"inbox statuses: {dict(statuses)}")
    actual = inbox_by_customer(db)
    for cid, expected in world.outcomes.items():
        got = Counter(actual.get(cid, []))
        extra = got - Counter(expected)
        checks.expect(
            Counter(expected) <= got and set(extra) <= {"duplicate", "stale", "absorbed", "tie"},
            f"customer {cid}: inbox outcomes {actual.get(cid)}, expected {expected} "
            "(plus re-deliveries)",
        )
    check_delivery(checks, db, sink, world)
    check_retries(checks, sink)
    check_metrics(checks, second)
    received = read_record(sink.record)
    print(
        f"sink: {len(received)} accepted, {len(unique_ops(received))} unique; {inflight} "
        f"in flight at the kill; {len(before.unanswered)} posts unanswered"
    )

    code, took = sigterm(second)
    checks.expect(code == 0, f"SIGTERM: serve exited with {code} after {took:.1f} s, not 0")
    checks.assert_all()


def test_sigterm_during_slow_deliveries_then_restart(
    tmp_path: Path, store_url: str, procs: Procs
) -> None:
    world = scenario(customers=30, seed=5, specials=False)
    events = world.events
    sink = start_sink(procs, "sink", "--delay", "0.5")
    config = write_config(tmp_path, sink.url, store_url)
    first = start_server(procs, config, "serve-1")
    db = store_url
    checks = Checks()

    posted = post_rounds(first.webhook, world.rounds)
    assert Counter(status for _, status in posted.answered) == {202: len(events)}
    deadline = time.monotonic() + 30.0
    while len(read_record(sink.record)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(read_record(sink.record)) >= 4, "no delivery started"

    first.proc.popen.send_signal(signal.SIGTERM)
    started = time.monotonic()
    time.sleep(0.5)
    refused = False
    with httpx.Client(timeout=5.0) as client:
        try:
            late = client.post(first.webhook, content=events[0].body, headers=HEADERS)
        except httpx.TransportError:
            refused = True
        else:
            checks.expect(late.status_code != 202, "a webhook got 202 after SIGTERM")
    code = first.proc.wait(2 * GRACE + 8.0)
    took = time.monotonic() - started
    assert code is not None, f"serve still runs {took:.1f} s after SIGTERM"
    checks.expect(code == 0, f"SIGTERM: serve exited with {code} after {took:.1f} s, not 0")
    checks.expect(refused, "serve still accepted connections 0.5 s after SIGTERM")

    left = dict(query(db, "SELECT status, count(*) FROM outbox GROUP BY status"))
    checks.expect(not left.get("inflight"), f"claims kept after a clean stop: {left}")
    assert left.get("pending"), f"nothing was left to deliver at SIGTERM: {left}"
    stored = query(db, "SELECT count(*) FROM inbox WHERE source != 'refresh'")[0][0]
    checks.expect(stored == len(events), f"inbox: {stored} events, {len(events)} posted")

    second = start_server(procs, config, "serve-2")
    wait_drained(db, second, len(events))
    check_inbox_exact(checks, db, events, world)
    check_delivery(checks, db, sink, world)
    check_metrics(checks, second)

    code, took = sigterm(second)
    checks.expect(code == 0, f"SIGTERM: serve exited with {code} after {took:.1f} s, not 0")
    checks.assert_all()


# --- the pipeline process (server.pipeline_process, the default) ------------------------------


def pipeline_child(server: Server) -> int:
    """The pid of serve's pipeline process (its only child)."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def metric(server: Server, name: str, **labels: str) -> float:
    with httpx.Client(timeout=5.0) as client:
        text = client.get(f"{server.base}/metrics").text
    total = 0.0
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match[2])
    return total


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads children from /proc")
def test_a_pipeline_process_killed_alone_is_restarted_and_loses_nothing(
    tmp_path: Path, store_url: str, procs: Procs
) -> None:
    world = scenario(customers=40, seed=5)
    events = world.events
    sink = start_sink(procs, "sink", "--seed", "3")
    config = write_config(tmp_path, sink.url, store_url)
    server = start_server(procs, config, "serve")
    db = store_url
    checks = Checks()
    half = len(world.rounds) // 2

    first = post_rounds(server.webhook, world.rounds[:half])
    child = pipeline_child(server)
    os.kill(child, signal.SIGKILL)
    # the receiver keeps answering while the pipeline is down: events wait in the inbox
    second = post_rounds(server.webhook, world.rounds[half:])
    answers = Counter(status for _, status in first.answered + second.answered)
    assert answers == {202: len(events)}, dict(answers)

    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError, OSError):
            if pipeline_child(server) != child:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"no new pipeline process within 30 s\n{server.proc.tail()}")
    wait_drained(db, server, len(events))
    check_inbox_exact(checks, db, events, world)
    check_delivery(checks, db, sink, world)

    with httpx.Client(timeout=5.0) as client:
        deadline = time.monotonic() + 10.0
        while client.get(f"{server.base}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "/readyz not ready after the restart"
            time.sleep(0.2)
    lines = server.proc.log_lines()
    exited = [line for line in lines if line.get("event") == "pipeline_process_exited"]
    checks.expect(len(exited) == 1, f"one exit of the pipeline process logged: {exited}")
    checks.expect(
        all(
            isinstance(line.get("exit_code"), int) and isinstance(line.get("retry_in_s"), float)
            for line in exited
        ),
        f"the exit's code and the restart's delay are logged, not redacted: {exited}",
    )
    started = [line for line in lines if line.get("event") == "started"]
    checks.expect(
        [line.get("role") for line in started].count("pipeline") == 2,
        f"the pipeline process started twice: {started}",
    )
    # the new child's counters reach the receiver's /metrics (they restart from zero)
    deadline = time.monotonic() + 5.0
    while metric(server, "connector_events_planned_total") == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    checks.expect(
        metric(server, "connector_events_planned_total") > 0,
        "GET /metrics: no connector_events_planned_total from the restarted pipeline process",
    )
    checks.expect(
        metric(server, "connector_events_received_total", outcome="accepted") == len(events),
        "GET /metrics: connector_events_received_total{outcome=accepted} != events posted",
    )

    current = pipeline_child(server)
    code, took = sigterm(server)
    checks.expect(code == 0, f"SIGTERM: serve exited with {code} after {took:.1f} s, not 0")
    deadline = time.monotonic() + 5.0
    while _alive(current) and time.monotonic() < deadline:
        time.sleep(0.1)
    checks.expect(not _alive(current), "the pipeline process outlived serve")
    checks.assert_all()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
