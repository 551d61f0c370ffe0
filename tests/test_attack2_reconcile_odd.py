"""Attack on the reconciliation's quick path (each customer kept as Treez's JSON text, checked
by the receiver's check): customers whose text msgspec and json might read apart (a
repeated key, numbers past a float's range, negative zero, huge integers, escapes,
surrogate pairs, a lone surrogate) must be accepted or refused as the careful path does,
with the same customer id, version and body; and a customer id the database cannot store
must not stop a run for good."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from connector.reconcile import Reconciler, _pulled
from connector.store import Store
from connector.store.schema import inbox

SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())["data"]
DISPENSARY = "partnersandbox3"


def _with(field: str, raw: str) -> str:
    """The seed customer's text with ``field``'s value written as ``raw`` (JSON text)."""
    record = dict(SEED)
    record[field] = "@@"
    return json.dumps(record).replace('"@@"', raw)


def _again(field: str, raw: str) -> str:
    """The seed customer's text with ``field`` repeated at its end (the last copy wins)."""
    return json.dumps(SEED)[:-1] + f', "{field}": {raw}}}'


ODD = {
    "notes 1e400": _with("notes", "1e400"),
    "notes -0.0": _with("notes", "-0.0"),
    "rewards 400 digits": _with("rewards_balance", "1" + "0" * 400),
    "id 1e400": _with("customer_id", "1e400"),
    "id -0.0": _with("customer_id", "-0.0"),
    "id 3904.0": _with("customer_id", "3904.0"),
    "id 3.904e3": _with("customer_id", "3.904e3"),
    "id 31 digits": _with("customer_id", "1" + "0" * 30),
    "id escaped": _with("customer_id", '"\\u0033904"'),
    "id surrogate pair": _with("customer_id", '"\\ud83d\\ude00"'),
    "id lone surrogate": _with("customer_id", '"\\ud83d"'),
    "opt_out 1e400": _with("opt_out", "1e400"),
    "opt_out -0.0": _with("opt_out", "-0.0"),
    "opt_out 1": _with("opt_out", "1"),
    "last_update escaped": _with("last_update", '"2026-04-24T11:38:21.000\\u002d07:00"'),
    "merged_into 1e400": _with("merged_into_customer_id", "1e400"),
    "merged ids odd numbers": _with("merged_customer_ids", "[1e400, -0.0, 123456789012345678901]"),
    "id repeated": _again("customer_id", '"9999"'),
    "opt_out repeated true": _again("opt_out", "true"),
    "opt_out repeated wrong": _again("opt_out", '"maybe"'),
    "last_update repeated": _again("last_update", '"2030-01-01T00:00:00.000Z"'),
    "status repeated": _again("status", '"MERGED"'),
    "merged_into repeated": _again("merged_into_customer_id", '"12"'),
}


def _summary(result: tuple[Any, ...], text: str) -> tuple[Any, ...]:
    events, rejected, versions = result
    return (
        [(e.customer_id, e.last_update_us, e.status, json.loads(e.body)["data"]) for e in events],
        [(r.status_code, r.reason) for r in rejected],
        versions,
    )


@pytest.mark.parametrize("name", sorted(ODD))
def test_an_odd_customer_is_read_as_the_careful_path_reads_it(name: str) -> None:
    text = ODD[name]
    quick = Reconciler._events(DISPENSARY, _pulled(DISPENSARY, [text]), "reconcile", 7)
    careful = Reconciler._events(DISPENSARY, [json.loads(text)], "reconcile", 7)
    assert _summary(quick, text) == _summary(careful, text)


@pytest.mark.postgresql_only
# held since the receiver's check refuses an id with a control character (NUL included)
def test_a_customer_id_the_database_cannot_store_does_not_stop_the_run(store: Store) -> None:
    sound = json.dumps(SEED)
    odd = _with("customer_id", '"39\\u00004"')
    events, rejected, _ = Reconciler._events(
        DISPENSARY, _pulled(DISPENSARY, [sound, odd]), "reconcile", 7
    )
    real: Any = store
    real.add_pulled(DISPENSARY, events, rejected, None)
    stored = store.query(select(inbox.c.customer_id, inbox.c.status))
    assert ("3904", "pending") in stored
