"""What the operator's view costs: planning with its decisions recorded (``inbox.decisions``)
against planning without (the commit as it was before revision 0004), in interleaved rounds
on the same machine and printed as a ratio; then how long ``explain`` takes for a customer
with a long history, and the console's overview and 24-hour throughput over a store holding
many delivered operations.

Run by hand: ``.venv/bin/python bench/operator.py`` (``--events``, ``--rounds``,
``--history``, ``--delivered``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import connector.pipeline as pipeline
from bench._common import ROOT, event_body
from connector.config import load_config
from connector.explain import build_story, story_lines
from connector.pipeline import Deployment, process_batch
from connector.store import open_store
from connector.store.abc import NewEvent


def _config(workdir: Path) -> Path:
    (workdir / "http.yaml").write_text((ROOT / "mappings" / "http.yaml").read_text())
    path = workdir / "config.yaml"
    path.write_text(
        """
store: sqlite:///connector.db
dispensaries:
  partnersandbox3:
    webhook_token: bench-token-0123456789abcdef
    destinations:
      - {name: crm, type: http, url: "http://127.0.0.1:9/ops", mapping: http.yaml}
      - {name: feed, type: jsonl, path: out.jsonl, mapping: http.yaml}
"""
    )
    return path


def _events(count: int, start: int, version: int = 1) -> list[NewEvent]:
    return [
        NewEvent(
            "partnersandbox3",
            "webhook",
            "CUSTOMER",
            str(start + i),
            version * 1_000_000,
            event_body(start + i, version).decode(),
        )
        for i in range(count)
    ]


def plan_round(events: int, record: bool) -> float:
    """Seconds of planning ``events`` new customers (batches of 256), with or without
    their decisions recorded."""
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(_config(Path(folder)))
        deployment = Deployment.from_config(config)
        store = open_store(config.store)
        original = pipeline.decisions
        if not record:
            pipeline.decisions = lambda planned: None  # type: ignore[assignment,return-value]
        try:
            store.add_events(_events(events, 1))
            started = time.perf_counter()
            while process_batch(store, deployment, 256).events:
                pass
            return time.perf_counter() - started
        finally:
            pipeline.decisions = original
            store.close()


def explain_timing(history: int) -> tuple[float, int]:
    """Seconds to read and tell one customer with ``history`` events (half of them changing
    the mapped fields, so about as many operations), and the story's line count."""
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(_config(Path(folder)))
        deployment = Deployment.from_config(config)
        store = open_store(config.store)
        try:
            for version in range(1, history + 1):
                store.add_events(_events(1, 7, version=version))
            while process_batch(store, deployment, 256).events:
                pass
            started = time.perf_counter()
            record = store.customer_record("partnersandbox3", "7", ["crm", "feed"])
            lines = story_lines(build_story(record, ["crm", "feed"]))
            return time.perf_counter() - started, len(lines)
        finally:
            store.close()


def overview_timing(delivered: int) -> tuple[float, float]:
    """Seconds of the console's overview and 24-hour throughput over ``delivered``
    delivered operations."""
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(_config(Path(folder)))
        deployment = Deployment.from_config(config)
        store = open_store(config.store)
        try:
            for start in range(0, delivered // 2, 5000):
                store.add_events(_events(min(5000, delivered // 2 - start), start))
                while process_batch(store, deployment, 512).events:
                    pass
            with store.transaction() as conn:  # type: ignore[attr-defined]
                conn.exec_driver_sql(
                    "UPDATE outbox SET status='done', done_at=strftime('%s','now') - (id % 86400)"
                )
            started = time.perf_counter()
            store.overview([("partnersandbox3", "crm"), ("partnersandbox3", "feed")])
            overview = time.perf_counter() - started
            started = time.perf_counter()
            store.throughput(time.time() - 86_400, 3600)
            return overview, time.perf_counter() - started
        finally:
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--delivered", type=int, default=100_000)
    args = parser.parse_args()

    plan_round(200, True)  # warm up imports and caches
    without: list[float] = []
    with_decisions: list[float] = []
    for _ in range(args.rounds):  # interleaved: the machine's noise falls on both alike
        without.append(plan_round(args.events, False))
        with_decisions.append(plan_round(args.events, True))
    base, new = statistics.median(without), statistics.median(with_decisions)
    print(f"planning {args.events:,} new customers, 2 destinations, median of {args.rounds}:")
    print(f"  without decisions recorded: {args.events / base:,.0f} events/s")
    print(f"  with decisions recorded:    {args.events / new:,.0f} events/s")
    print(f"  ratio (with / without):     {base / new:.3f}")
    seconds, lines = explain_timing(args.history)
    print(
        f"explain, one customer with {args.history:,} events: {seconds * 1000:,.0f} ms "
        f"({lines:,} lines)"
    )
    overview, throughput = overview_timing(args.delivered)
    print(
        f"console over {args.delivered:,} delivered operations: overview "
        f"{overview * 1000:,.0f} ms, 24-hour throughput {throughput * 1000:,.0f} ms"
    )


if __name__ == "__main__":
    main()
