"""Replicas: two (or three) ``connector serve`` processes on one PostgreSQL database, each
receiving webhooks, with the HTTP sink (tests/fakes/http_sink.py) as the destination.

Each replica runs in its own PID namespace when ``unshare --pid`` is permitted (root), so
nothing may rely on process ids being unique on one host (both receivers are pid 1 there);
otherwise in its own session. ``kill -9`` of a replica kills its whole process tree (the
receiver and its pipeline process), as a lost host would.

PostgreSQL only: the tests skip when the server (``CONNECTOR_TEST_PG``, default the
local one) is unreachable, unless ``CI`` is set. Each test uses a fresh database, dropped after.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import yaml
from conftest import fresh_database
from fakes.http_sink import Attempt, HttpSink
from fakes.treez_api import TreezFake, serve

psycopg = pytest.importorskip("psycopg")

ROOT = Path(__file__).resolve().parent.parent
SEED = json.loads((ROOT / "tests" / "data" / "seed_body.json").read_bytes())
MAPPING = ROOT / "mappings" / "http.yaml"
DISPENSARY = "partnersandbox3"
TOKEN = "replicas-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
LEASE = f"deliver:{DISPENSARY}/sink"
BASE = datetime(2026, 4, 24, 18, 0, 0, tzinfo=UTC)


# --- the database -------------------------------------------------------------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the test server, dropped after the test."""
    with fresh_database("h_replicas") as url:
        yield url


def query(url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return list(conn.execute(sql, params).fetchall())


# --- replicas -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unshare_works() -> bool:
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    try:
        probe = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"]
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


UNSHARE = _unshare_works()


class Replica:
    """One ``connector serve`` in its own session (and PID namespace when permitted), its
    stdout and stderr in files."""

    def __init__(self, name: str, config: Path, folder: Path) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.out_path, self.err_path = folder / f"{name}.out", folder / f"{name}.err"
        self._files: list[IO[bytes]] = [open(self.out_path, "wb"), open(self.err_path, "wb")]  # noqa: SIM115
        script = Path(sys.executable).with_name("connector")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "connector"]
        command += ["serve", "--config", str(config), "--port", str(self.port)]
        if UNSHARE:
            # --kill-child: unshare's death kills the namespace's init, and with it the rest
            command = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *command]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("CONNECTOR_CONFIG", None)
        self.popen = subprocess.Popen(
            command,
            cwd=folder,
            stdout=self._files[0],
            stderr=self._files[1],
            env=env,
            start_new_session=True,
        )

    @property
    def webhook(self) -> str:
        return f"{self.base}/webhooks/treez/{DISPENSARY}"

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline and self.running():
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.base}/readyz").status_code == 200:
                        return
                time.sleep(0.1)
        pytest.fail(f"{self.name} did not become ready\n{self.tail()}")

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.out_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
        return out

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            line
            for line in self.log_lines()
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]

    def tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.out_path, self.err_path):
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {path.name} (last {lines} lines) ---")
            parts.extend(text.splitlines()[-lines:])
        return "\n".join(parts)

    def kill9(self) -> None:
        """SIGKILL to every process of the replica (its session), at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def close(self) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()
        with contextlib.suppress(ProcessLookupError):  # anything left of the session
            os.killpg(self.popen.pid, signal.SIGKILL)
        for handle in self._files:
            handle.close()


class Cluster:
    def __init__(self, folder: Path, url: str) -> None:
        self.folder, self.url = folder, url
        self.replicas: list[Replica] = []

    def config(self, sink_url: str, **options: Any) -> Path:
        """The config every replica shares; ``options``: ``store_listen``, ``rate_limit``,
        ``concurrency``, ``treez`` (api_url) and ``schedule``."""
        (self.folder / "http.yaml").write_bytes(MAPPING.read_bytes())
        destination: dict[str, Any] = {
            "name": "sink",
            "type": "http",
            "url": sink_url,
            "mapping": "http.yaml",
            "concurrency": options.get("concurrency", 4),
            "batch_size": 1,
            "retry": {
                "initial_seconds": 0.1,
                "max_seconds": 1,
                "min_attempts": 50,
                "min_elapsed_seconds": 0,
            },
        }
        if "rate_limit" in options:
            destination["rate_limit"] = options["rate_limit"]
        dispensary: dict[str, Any] = {"webhook_token": TOKEN, "destinations": [destination]}
        if "treez" in options:
            dispensary["treez"] = {
                "api_url": options["treez"],
                "client_id": "treez_test_client",
                "api_key": "treez_test_apikey",
            }
            dispensary["reconcile"] = {"schedule": options.get("schedule", "* * * * *")}
        config = {
            "store": self.url,
            "store_listen": options.get("store_listen", True),
            "server": {"host": "127.0.0.1", "shutdown_grace_seconds": 2},
            "dispensaries": {DISPENSARY: dispensary},
        }
        path = self.folder / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, config: Path, count: int = 1) -> list[Replica]:
        started = []
        for _ in range(count):
            replica = Replica(f"replica-{len(self.replicas) + 1}", config, self.folder)
            self.replicas.append(replica)
            replica.wait_ready()
            started.append(replica)
        return started

    def lease_holder(self) -> str | None:
        rows = query(
            self.url,
            "SELECT holder FROM locks WHERE name = %s AND expires_at > %s",
            (LEASE, time.time()),
        )
        return str(rows[0][0]) if rows else None

    def holding(self, timeout: float = 30.0) -> Replica:
        """The replica whose worker holds the destination's lease (from its log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for replica in self.replicas:
                if replica.running():
                    taken = replica.logged("delivery_lease", outcome="taken")
                    if taken:
                        return replica
            time.sleep(0.1)
        pytest.fail(f"no replica took the delivery lease\n{self.tails()}")

    def tails(self) -> str:
        return "\n".join(r.tail() for r in self.replicas)


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str) -> Iterator[Cluster]:
    group = Cluster(tmp_path, pg_url)
    try:
        yield group
    finally:
        for replica in group.replicas:
            replica.close()
        print(f"PID namespaces: {UNSHARE}")
        print(group.tails())  # shown by pytest only when the test failed


@pytest.fixture
def sink() -> Iterator[HttpSink]:
    with HttpSink() as running:
        yield running


# --- events -------------------------------------------------------------------------------------


def body(customer_id: int, version: int) -> bytes:
    """The seed delivery as ``customer_id`` at ``version`` (later is newer; visible at the
    sink as ``fields.rewards_balance``)."""
    envelope = copy.deepcopy(SEED)
    envelope["data"].update(
        customer_id=str(customer_id),
        last_update=(BASE + timedelta(minutes=version)).isoformat(timespec="milliseconds"),
        rewards_balance=version,
        opt_out="false",
        email=f"c{customer_id}@example.com",
    )
    return json.dumps(envelope).encode()


class Poster:
    """Posts events to a random live replica, one customer's versions in order (each acked
    before the next is sent); a refused or failed POST is sent again to another replica, as
    Treez would retry. ``acked`` counts events answered 202."""

    def __init__(self, replicas: Sequence[Replica], seed: int = 3) -> None:
        self.replicas = list(replicas)
        self.rng = random.Random(seed)
        self.acked = 0
        self.latest: dict[int, int] = {}  # customer -> latest version acked

    def post(self, client: httpx.Client, customer_id: int, version: int) -> None:
        for _ in range(50):
            live = [r for r in self.replicas if r.running()]
            replica = self.rng.choice(live)
            with contextlib.suppress(httpx.TransportError):
                if (
                    client.post(replica.webhook, content=body(customer_id, version)).status_code
                    == 202
                ):
                    self.acked += 1
                    self.latest[customer_id] = version
                    return
            time.sleep(0.05)
        raise AssertionError(f"event {customer_id}/{version} was never acknowledged")

    def rounds(self, customers: Sequence[int], versions: int) -> None:
        with httpx.Client(timeout=5.0, headers=HEADERS) as client:
            for version in range(1, versions + 1):
                for customer_id in customers:
                    self.post(client, customer_id, version)


def accepted(attempts: Sequence[Attempt]) -> list[Attempt]:
    return [a for a in attempts if a.ok and a.ops]


def first_arrivals(attempts: Sequence[Attempt]) -> dict[str, Attempt]:
    """Idempotency key -> the first accepted attempt carrying it (batch_size 1: one op)."""
    first: dict[str, Attempt] = {}
    for attempt in sorted(accepted(attempts), key=lambda a: a.received):
        assert attempt.idempotency_key is not None
        first.setdefault(attempt.idempotency_key, attempt)
    return first


def wait_until(condition: Callable[[], bool], timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}\n{cluster.tails()}")
        time.sleep(0.2)


def outbox_settled(url: str) -> bool:
    waiting = query(url, "SELECT count(*) FROM outbox WHERE status IN ('pending', 'inflight')")
    planned = query(url, "SELECT count(*) FROM inbox WHERE status = 'pending'")
    return waiting[0][0] == 0 and planned[0][0] == 0


# --- tests --------------------------------------------------------------------------------------


def test_kill_9_of_the_lease_holder_mid_load_loses_nothing(
    cluster: Cluster, sink: HttpSink
) -> None:
    sink.configure(delay=0.25)  # slow answers: the holder has operations in flight when killed
    config = cluster.config(sink.url)
    replicas = cluster.start(config, 2)
    holder = cluster.holding()
    survivor = next(r for r in replicas if r is not holder)
    poster = Poster(replicas)
    customers = list(range(91_000, 91_060))
    thread = threading.Thread(target=poster.rounds, args=(customers, 4), daemon=True)
    thread.start()
    wait_until(lambda: poster.acked >= 80, 60, "80 events acknowledged", cluster)
    wait_until(
        lambda: bool(query(cluster.url, "SELECT 1 FROM outbox WHERE status = 'inflight'")),
        30,
        "operations in flight",
        cluster,
    )
    dead_id = cluster.lease_holder()
    assert dead_id is not None
    holder.kill9()
    killed_at = time.monotonic()
    dead_claims = {
        row[0]
        for row in query(
            cluster.url,
            "SELECT id FROM outbox WHERE status = 'inflight' AND claimed_by = %s",
            (dead_id,),
        )
    }
    assert dead_claims, "the killed replica held no claims: nothing would be tested"
    lease_back = claims_back = math.inf  # seconds after the kill
    while math.inf in (lease_back, claims_back) and time.monotonic() - killed_at < 90:
        now = time.monotonic() - killed_at
        current = cluster.lease_holder()
        if lease_back == math.inf and current is not None and current != dead_id:
            lease_back = now
        if claims_back == math.inf:
            still = query(
                cluster.url,
                "SELECT count(*) FROM outbox WHERE id = ANY(%s) AND status = 'inflight' "
                "AND claimed_by = %s",
                (list(dead_claims), dead_id),
            )
            if still[0][0] == 0:
                claims_back = now
        time.sleep(0.25)
    thread.join(120)
    assert not thread.is_alive(), "the poster did not finish"
    wait_until(lambda: outbox_settled(cluster.url), 120, "every operation delivered", cluster)
    print(
        f"after kill -9: lease taken back in {lease_back:.1f} s, "
        f"{len(dead_claims)} claims in {claims_back:.1f} s"
    )
    assert survivor.running()
    assert lease_back <= 60, f"lease taken back after {lease_back} s"
    assert claims_back <= 35, f"claims taken back after {claims_back} s"

    attempts = sink.attempts
    first = first_arrivals(attempts)
    keys = {
        key: (customer, status)
        for key, customer, status in query(
            cluster.url, "SELECT idempotency_key, customer_id, status FROM outbox"
        )
    }
    lost = sorted(k for k in keys if k not in first)
    assert not lost, f"{len(lost)} operations never reached the sink"
    assert {s for _, s in keys.values()} == {"done"}, "an operation did not end delivered"
    inbox = query(cluster.url, "SELECT count(*) FROM inbox")[0][0]
    assert inbox >= poster.acked == len(customers) * 4
    by_customer: dict[str, list[int]] = defaultdict(list)
    for attempt in sorted(first.values(), key=lambda a: a.received):
        op = attempt.ops[0]
        if op["op"] == "upsert":
            by_customer[str(op["customer_id"])].append(int(op["fields"]["rewards_balance"]))
    for customer_id in customers:
        seen = by_customer[str(customer_id)]
        assert seen == sorted(set(seen)), f"customer {customer_id} out of order: {seen}"
        assert seen, f"customer {customer_id}: nothing delivered"
        assert seen[-1] == poster.latest[customer_id], f"customer {customer_id}: {seen}"
    duplicates = len(accepted(attempts)) - len(first)
    print(f"{len(first)} operations, {duplicates} delivered more than once (at-least-once)")


def test_a_scheduled_tick_runs_once_in_the_cluster(cluster: Cluster, sink: HttpSink) -> None:
    fake = TreezFake(customers=20, seed=5, dispensary=DISPENSARY)
    with serve(fake) as treez_url:
        config = cluster.config(sink.url, treez=treez_url, schedule="* * * * *")
        replicas = cluster.start(config, 2)
        both_up = time.time()
        # a tick that came while only the first replica ran is not this test's: its run
        # (and the token it cached) happened before what is counted here
        idle = "SELECT 1 FROM reconcile_runs WHERE outcome = 'running'"
        wait_until(lambda: not query(cluster.url, idle), 30, "no run in progress", cluster)
        before = len(fake.calls)
        # the first minute boundary with both running, and its run finished
        tick = (int(both_up) // 60 + 1) * 60
        wait_until(
            lambda: bool(
                query(
                    cluster.url,
                    "SELECT 1 FROM reconcile_runs WHERE trigger = 'schedule' AND started_at >= %s "
                    "AND outcome <> 'running'",
                    (tick,),
                )
            ),
            tick - time.time() + 60,
            "the scheduled run after both replicas started",
            cluster,
        )
        time.sleep(2.0)  # a second run, if one were wrongly started, would show by now
        runs = query(
            cluster.url,
            "SELECT outcome FROM reconcile_runs WHERE trigger = 'schedule' AND started_at >= %s",
            (tick,),
        )
        ticks = query(
            cluster.url, "SELECT holder FROM schedule_ticks WHERE tick_at = %s", (float(tick),)
        )
        skipped = [
            r for r in replicas if r.logged("reconcile_skipped", reason="tick ran elsewhere")
        ]
        calls = fake.calls[before:]
        earlier = query(cluster.url, "SELECT count(*) FROM reconcile_runs")[0][0] - len(runs)
    tokens = [c for c in calls if c.path.endswith("/config/api/gettokens")]
    print(
        f"runs {runs}, ticks {ticks}, skipped by {[r.name for r in skipped]}, "
        f"Treez calls {len(calls)} ({len(tokens)} token requests)"
    )
    assert runs == [("succeeded",)], runs
    assert len(ticks) == 1
    assert len(skipped) == 1, "the other replica did not see the tick (or both ran it)"
    # one run's requests: one token request (none if the replica that ran it holds one
    # from an earlier run) and each page of one pull once
    assert len(tokens) == (1 if earlier == 0 else len(tokens)) <= 1, tokens
    assert all(c.status == 200 for c in calls), [c.status for c in calls]
    pulls = [c for c in calls if "/customer/lastUpdated/" in c.path]
    assert len(pulls) == len({c.path for c in pulls}), "a page was asked twice"


def test_rate_limit_holds_across_replicas(cluster: Cluster, sink: HttpSink) -> None:
    config = cluster.config(sink.url, rate_limit="5/s")
    replicas = cluster.start(config, 3)
    poster = Poster(replicas)
    customers = list(range(92_000, 92_030))
    poster.rounds(customers, 1)
    wait_until(lambda: len(first_arrivals(sink.attempts)) >= 30, 60, "30 delivered", cluster)
    times = sorted(a.received for a in sink.attempts)
    worst = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    gaps = [times[i + 5] - times[i] for i in range(len(times) - 5)]
    print(
        f"{len(times)} requests; at most {worst} in any 1-second window; "
        f"closest sixth after {min(gaps):.3f} s"
    )
    assert worst <= 5


def _latencies(cluster: Cluster, sink: HttpSink, sender: Replica, start_id: int) -> list[float]:
    out = []
    with httpx.Client(timeout=5.0, headers=HEADERS) as client:
        for index in range(8):
            before = len(sink.attempts)
            sent = time.monotonic()
            assert client.post(sender.webhook, content=body(start_id + index, 1)).status_code == 202
            wait_until(lambda b=before: len(sink.attempts) > b, 30, "the delivery", cluster)
            out.append(sink.attempts[before].received - sent)
            time.sleep(random.Random(index).uniform(0.05, 0.3))
    return out


@pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll-only"])
def test_wake_up_across_replicas(cluster: Cluster, sink: HttpSink, listen: bool) -> None:
    config = cluster.config(sink.url, store_listen=listen)
    (first,) = cluster.start(config, 1)
    holder = cluster.holding()
    assert holder is first
    (other,) = cluster.start(config, 1)
    time.sleep(1.0)
    latencies = _latencies(cluster, sink, other, 93_000)
    median = statistics.median(latencies)
    print(
        f"listen={listen}: POST to the other replica → sink: median {median * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms (idle_poll 1 s)"
    )
    assert not other.logged("delivery_lease", outcome="taken")
    if listen:
        assert median < 0.3, latencies
    else:
        assert max(latencies) < 5.0, latencies
