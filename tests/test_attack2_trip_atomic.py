"""Attack on the delivery trip as one write transaction (``Store.record_and_claim``): a
failure anywhere inside it, after the driver-level statements (``Raw``) already ran and
before or after SQLAlchemy's, must leave nothing of the trip behind (the settled results,
the contacts, the attempts, the dead letters, the claim), on both stores; and the store must
take the same trip again afterwards as if the failure had never happened."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select
from sqlalchemy.exc import DBAPIError
from test_attack_perf_worker import DISPENSARY
from test_delivery import DEST
from test_perf2_deliver_trip import NOW, dump, load, results, states

from connector.errors import StoreUnavailable
from connector.store import Store
from connector.store import outbox as outbox_module
from connector.store._statements import Raw
from connector.store.schema import pauses


class Injected(Exception):
    """The failure a test injects."""


# where a trip fails: after the results' driver statements (settle done, contacts), in
# the dead letters (SQLAlchemy, last of the recording), at the claim's lock (recording
# done, nothing claimed yet), after the claim was marked (reading the contacts), in the
# survivors' read (SQLAlchemy), and a statement the database itself refuses (Raw)
POINTS = ["vendor_code", "lock_queue", "contact_ids", "final_in", "database"]


def _inject(store: Any, monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    def boom(*_args: Any, **_kwargs: Any) -> Any:
        raise Injected(point)

    if point == "vendor_code":
        monkeypatch.setattr(outbox_module, "vendor_code", boom)
    elif point == "lock_queue":
        monkeypatch.setattr(store, "_lock_queue", boom)
    elif point == "contact_ids":
        monkeypatch.setattr(store, "_contact_ids_raw", boom)
    elif point == "final_in":
        monkeypatch.setattr(store, "_final_in", boom)
    else:

        def refused(raw: Raw, *_args: Any) -> Any:
            # a statement the database refuses, on the trip's own driver connection
            return raw.rows("SELECT no_such_column FROM outbox")

        monkeypatch.setattr(store, "_contact_ids_raw", refused)


def _paused(finished: dict[str, Any]) -> dict[str, Any]:
    """The retries met a used-up quota instead: paused, and the destination with them."""
    return {
        **finished,
        "retry": [],
        "paused": [(row, NOW + 30, "quota") for row, _, _ in finished["retry"]],
        "pause": (NOW + 60, "quota used up", 429),
    }


def _unpause(store: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(delete(pauses))


def _everything(store: Any) -> Any:
    """Every table the trip writes, the destinations' pauses with them."""
    with store.engine.connect() as conn:
        paused = sorted(tuple(r) for r in conn.execute(select(pauses)))
    return dump(store), paused


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(state=states, point=st.sampled_from(POINTS), quota=st.booleans())
def test_a_trip_failing_inside_leaves_nothing_and_is_taken_again(
    store: Store, state: dict[str, Any], point: str, quota: bool
) -> None:
    real: Any = store
    real._now = lambda: NOW
    state = {**state, "limit": max(1, state["limit"])}
    # the reference: the trip taken without a failure
    held = load(real, state)
    finished, _ = results(held, state["conflict"])
    finished = _paused(finished) if quota else finished
    _unpause(real)
    reference = store.record_and_claim(DISPENSARY, DEST, state["limit"], **finished)
    after = _everything(real)

    held = load(real, state)
    _unpause(real)
    before = _everything(real)
    finished, _ = results(held, state["conflict"])
    finished = _paused(finished) if quota else finished
    with pytest.MonkeyPatch.context() as patch:
        _inject(real, patch, point)
        try:
            store.record_and_claim(DISPENSARY, DEST, state["limit"], **finished)
        except (Injected, DBAPIError, StoreUnavailable):
            failed = True
        else:
            failed = False  # the injection point was not on this trip's way
    event(f"{point}: {'failed' if failed else 'not reached'}")
    if failed:
        assert _everything(real) == before, point
    else:
        assert _everything(real) == after, point
        return
    # the same trip again, on the same store (its pooled connection is sound)
    again = store.record_and_claim(DISPENSARY, DEST, state["limit"], **finished)
    assert [r.id for r in again.rows] == [r.id for r in reference.rows]
    assert again.contacts == reference.contacts
    assert again.survivors == reference.survivors
    assert _everything(real) == after


# (no merge among them: the survivors' read is not on this trip's way)
@pytest.mark.parametrize("point", [p for p in POINTS if p != "final_in"])
def test_a_trip_with_every_kind_of_result_failing_inside_leaves_nothing(
    store: Store, point: str
) -> None:
    """Every kind of result in one trip (a success with its contact, a quota pause, a dead
    letter with its answer, a conflict), the trip failing at ``point``: nothing of it stays,
    and it is taken again whole."""
    from test_delivery import DISPENSARY as DISP
    from test_delivery import enqueue, make_op

    real: Any = store
    enqueue(store, [make_op(c, n) for n in (1, 2) for c in ("a", "b", "c")])
    rows = {r.customer_id: r for r in store.record_and_claim(DISP, DEST, 5).rows}
    assert sorted(rows) == ["a", "b", "c"]
    results: dict[str, Any] = {
        "done": [(rows["a"], "k-a")],
        "paused": [(rows["b"], 10**10, "quota")],
        "pause": (10**10, "quota used up", 429),
        "dead": [(rows["c"], "HTTP 400", 400, '{"code":"E1"}')],
        "conflicts": [("a", "shared_contact", "detail")],
        "answers": {rows["b"].id: (429, None), rows["c"].id: (400, "E1")},
    }
    before = _everything(real)
    with pytest.MonkeyPatch.context() as patch:
        _inject(real, patch, point)
        with pytest.raises((Injected, DBAPIError, StoreUnavailable)):
            store.record_and_claim(DISP, DEST, 5, **results)
    assert _everything(real) == before, point
    again = store.record_and_claim(DISP, DEST, 5, **results)
    # a's and c's next ones (b's waits behind its paused one; the store's claim does not
    # read the pause: the worker claims nothing while it is paused)
    assert [(r.customer_id, r.body["fields"]["n"]) for r in again.rows] == [("a", 2), ("c", 2)]
    assert again.contacts == {"a": "k-a"}
    assert _everything(real) != before
