"""Attack on the idle worker (the trickle work: the loops look at the store every 5 s only
while wake-ups reach them): a worker whose poll never comes (an hour) must still deliver
everything it is woken for and every retry that falls due, whatever the answers, the
concurrency and when the operations arrive (some while it is parked, some while calls are
out): a wake-up or a retry's due time lost would leave an operation waiting for the poll."""

from __future__ import annotations

import asyncio
import collections
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attack_perf_worker import (
    CUSTOMERS,
    check_order,
    fresh,
    new_store,
)
from test_attack_perf_worker import mapping_dir as mapping_dir
from test_attack_perf_worker import service as service  # a fixture
from test_delivery import enqueue, http_config, make_op, open_ops, running_worker, wait_until

from connector.destinations.http import HttpSink

NEVER = 3600.0  # the poll that never comes within the test
# at most two failures a customer: its third attempt succeeds (FAST: dead after three)
ANSWER = st.sampled_from(["500", "429:0", "ok", "ok", "ok"])


@settings(
    max_examples=12,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    first=st.lists(st.sampled_from(CUSTOMERS), max_size=4),
    later=st.lists(st.lists(st.sampled_from(CUSTOMERS), min_size=1, max_size=3), max_size=3),
    scripts=st.fixed_dictionaries({c: st.lists(ANSWER, max_size=2) for c in CUSTOMERS}),
    concurrency=st.integers(1, 3),
    pause=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_a_worker_whose_poll_never_comes_delivers_what_it_is_woken_for(
    service: Any,
    mapping_dir: Path,
    first: list[str],
    later: list[list[str]],
    scripts: dict[str, list[str]],
    concurrency: int,
    pause: float,
) -> None:
    fresh(service, delay=0.02)
    for customer, script in scripts.items():
        if script:
            service.script_for(customer, "upsert", script)
    seen: collections.Counter[str] = collections.Counter()

    def ops(customers: list[str]) -> list[Any]:
        made = []
        for customer in customers:
            seen[customer] += 1
            made.append(make_op(customer, seen[customer]))
        return made

    with tempfile.TemporaryDirectory() as folder:
        store = new_store(folder)
        try:
            enqueue(store, ops(first))
            sink = HttpSink(http_config(mapping_dir, url=service.url))

            async def go() -> None:
                async with running_worker(
                    store, sink, concurrency=concurrency, idle_poll=NEVER
                ) as (worker, task):
                    worker.wake.set()
                    for group in later:
                        await asyncio.sleep(pause)  # parked, or with calls out
                        enqueue(store, ops(group))
                        worker.wake.set()  # what the planner's commit does
                    await wait_until(lambda: open_ops(store) == 0, task, timeout=30)

            asyncio.run(go())
        finally:
            store.close()
    counts = {c: seen[c] for c in CUSTOMERS}
    accepted = check_order(service, {c: max(1, n) for c, n in counts.items()})
    for customer in CUSTOMERS:
        assert accepted.get(customer, []) == list(range(1, counts[customer] + 1)), customer
