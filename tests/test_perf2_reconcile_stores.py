"""A reconciliation on each store (SQLite, PostgreSQL), its pages read quickly (issue 17),
stores and plans what the careful reading stores and plans: the same inbox (customers,
versions, bodies as JSON), the same operations, the same checkpoint. The population has
bulk imports (customers sharing a last_update), so anchored paging reads ties again."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fakes.treez_api import TreezFake
from sqlalchemy import create_engine, text
from test_reconcile import DISPENSARY, in_process, lines, write_config

from connector import treez_api
from connector.config import load_config
from connector.reconcile import RunOptions
from connector.runner import reconcile_now


def _run(work: Path, store_url: str, fake: TreezFake, paging: str) -> Any:
    path = write_config(work, fake.base_url, paging=paging, extra="      page_size: 20")
    path.write_text(path.read_text().replace(f"sqlite:///{work}/c.db", store_url))
    config = load_config(path)
    return asyncio.run(
        reconcile_now(
            config,
            DISPENSARY,
            RunOptions(full=True),
            wait=True,
            timeout=60,
            echo=lambda _: None,
            reconciler_options={"client_for": in_process(fake)},
        )
    )


def _stored(store_url: str) -> tuple[list[Any], list[Any], Any]:
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            inbox = [
                (r.customer_id, r.last_update_us, r.source, r.status, json.loads(r.body))
                for r in conn.execute(
                    text(
                        "SELECT customer_id, last_update_us, source, status, body FROM inbox "
                        "ORDER BY customer_id, last_update_us"
                    )
                )
            ]
            quarantined = [tuple(r) for r in conn.execute(text("SELECT reason FROM quarantine"))]
            (checkpoint,) = conn.execute(text("SELECT after_us FROM checkpoints")).one()
    finally:
        engine.dispose()
    return inbox, quarantined, checkpoint


@pytest.mark.parametrize("paging", ["auto", "numbered"])
def test_a_run_read_quickly_stores_what_the_careful_reading_stores(
    tmp_path: Path,
    store_url: str,
    second_url: str,
    monkeypatch: pytest.MonkeyPatch,
    paging: str,
) -> None:
    now = datetime.now(UTC) - timedelta(minutes=5)

    def population() -> TreezFake:
        # the same customers, versions included, for both runs
        fake = TreezFake.generate(300, seed=11, rate_limit=None, now=now, clock=lambda: 0.0)
        wrong = fake.customer_ids()[7]
        fake.update(wrong, opt_out={"not": "a consent"})  # refused on either path
        return fake

    quick_dir, careful_dir = tmp_path / "quick", tmp_path / "careful"
    quick_dir.mkdir()
    careful_dir.mkdir()
    quick = _run(quick_dir, store_url, population(), paging)
    # the careful reading, on a second store of the same kind
    monkeypatch.setattr(treez_api, "customer_texts", lambda _: None)
    careful = _run(careful_dir, second_url, population(), paging)
    assert quick.outcome == careful.outcome == "succeeded"
    assert quick.counts == careful.counts
    assert quick.pages == careful.pages
    assert quick.counts["pulled"] == 299  # one refused
    assert _stored(store_url) == _stored(second_url)
    assert _by_customer(lines(quick_dir)) == _by_customer(lines(careful_dir))
    assert lines(quick_dir)


def _by_customer(ops: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each customer's operations in order (customers are delivered in no set order)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for op in ops:
        found.setdefault(op["customer_id"], []).append(op)
    return found


@pytest.fixture
def second_url(store_url: str, tmp_path: Path) -> Iterator[str]:
    """Another fresh store of the kind of ``store_url``."""
    if store_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'second.db'}"
        return
    database, _, _ = store_url.partition("?")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{database}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
