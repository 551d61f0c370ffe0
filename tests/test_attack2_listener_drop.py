"""Attack on the wake-ups the quiet polls (5 s while the listener is connected) rely on: the
listener's connection dropped by the server while another replica commits must not lose
the wake-up (the loops would then wait for the poll, or, with the poll stretched, longer):
the listener says it is gone, comes back, and wakes every loop for what it missed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connector.store import Store, open_store
from connector.store.abc import NewEvent

SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())


def _wait(check: Any, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return bool(check())


@pytest.mark.postgresql_only
def test_a_listener_dropped_while_a_replica_commits_wakes_the_loops_when_back(
    store: Store, store_url: str
) -> None:
    other: Any = open_store(store_url)
    heard: list[str] = []
    try:
        other.on_commit("inbox", heard.append)
        assert _wait(lambda: other.listening)
        assert _wait(lambda: heard)
        admin_url = store_url.split("?")[0]
        with psycopg.connect(admin_url, autocommit=True) as admin:
            pids = [
                pid
                for (pid,) in admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'"
                    " AND pid != pg_backend_pid() AND datname = current_database()"
                )
            ]
            assert pids
            heard.clear()
            for pid in pids:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        body = json.loads(json.dumps(SEED))
        # committed while the listener may be gone (before it noticed, or reconnecting)
        store.add_events([NewEvent("d1", "webhook", "CUSTOMER", "3904", None, json.dumps(body))])
        assert _wait(lambda: heard), "the commit's wake-up was lost"
        assert _wait(lambda: other.listening)
    finally:
        other.close()
