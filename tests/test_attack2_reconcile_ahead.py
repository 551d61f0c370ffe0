"""Attack on the reconciliation's fetch ahead (several pages, when the client paces): Treez
failing on a page while the pages after it are being fetched ahead must leave the
checkpoint no further than the pages stored, the next run must skip nothing and send
nothing twice, and the 10 requests a sliding second must hold throughout, retries
included. (tests/test_reconcile.py's half-way failure runs unpaced: one page ahead.)"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fakes.treez_api import TreezFake, most_in_window
from test_reconcile import lines, run, store_rows, write_config

from connector.config import load_config
from connector.treez_api import TreezApiError


@pytest.mark.parametrize("paging", ["auto", "anchored", "numbered"])
@pytest.mark.parametrize("failing", [2, 4])
def test_a_paced_run_failing_on_a_page_while_others_are_fetched_ahead_skips_nothing(
    tmp_path: Path, paging: str, failing: int
) -> None:
    fake = TreezFake.generate(400, seed=11, history_days=0.5)
    assert fake.rate_limit == 10
    config = load_config(write_config(tmp_path, fake.base_url, paging=paging))

    def fail(faked: TreezFake, request: Any) -> None:
        if request.number == failing:
            faked.fail_next(500, count=5)

    fake.on_page(fail)
    with pytest.raises(TreezApiError, match="500"):
        run(config, fake)
    (failed,) = store_rows(tmp_path, "select outcome from reconcile_runs")
    assert failed == ("failed",)
    stored = store_rows(tmp_path, "select max(last_update_us) from inbox")[0][0]
    checkpoint = store_rows(tmp_path, "select after_us from checkpoints")
    if checkpoint and stored is not None:
        # never past what was stored (pages fetched ahead of the failure were not)
        assert checkpoint[0][0] <= stored
    fake.clear_hooks()
    resumed = run(config, fake)
    assert resumed.outcome == "succeeded"
    upserts = Counter(op["customer_id"] for op in lines(tmp_path) if op["op"] == "upsert")
    listed = fake.ids_after(datetime.now(UTC) - timedelta(hours=24))
    active = {c for c in listed if (fake.customer(c) or {}).get("status") != "DEACTIVATED"}
    assert set(upserts) == active  # nothing skipped
    assert set(upserts.values()) == {1}  # nothing sent twice
    assert fake.counters["throttled"] == 0
    assert most_in_window([call.at for call in fake.calls]) <= 10
