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
from sqlalchemy.exc import DBAPIError
from test_attack_perf_worker import DISPENSARY
from test_delivery import DEST
from test_perf2_deliver_trip import NOW, dump, load, results, states

from connector.errors import StoreUnavailable
from connector.store import Store
from connector.store import outbox as outbox_module
from connector.store._statements import Raw


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


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(state=states, point=st.sampled_from(POINTS))
def test_a_trip_failing_inside_leaves_nothing_and_is_taken_again(
    store: Store, state: dict[str, Any], point: str
) -> None:
    real: Any = store
    real._now = lambda: NOW
    state = {**state, "limit": max(1, state["limit"])}
    # the reference: the trip taken without a failure
    held = load(real, state)
    finished, _ = results(held, state["conflict"])
    reference = store.record_and_claim(DISPENSARY, DEST, state["limit"], **finished)
    after = dump(real)

    held = load(real, state)
    before = dump(real)
    finished, _ = results(held, state["conflict"])
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
        assert dump(real) == before, point
    else:
        assert dump(real) == after, point
        return
    # the same trip again, on the same store (its pooled connection is sound)
    again = store.record_and_claim(DISPENSARY, DEST, state["limit"], **finished)
    assert [r.id for r in again.rows] == [r.id for r in reference.rows]
    assert again.contacts == reference.contacts
    assert again.survivors == reference.survivors
    assert dump(real) == after
