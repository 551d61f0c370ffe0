"""A dead letter's link to its operation (``dead_letters.outbox_id``) names that operation or
nothing, whatever the order of deaths, replays, deliveries and purges.

SQLite's outbox has no AUTOINCREMENT: once the retention purge deletes the highest ids, the
next operations are given them again. A letter replayed, then delivered and purged, kept
the id, and so named a later operation: ``explain`` and the console showed the letter under
it, and a replay (of a letter whose link predates the fix) would have reset that operation.
Now the purge unlinks the letters of what it deletes, revision 0008 unlinks what a store
already holds wrongly, and a replay follows a link only to the letter's own operation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select, text, update

from connector.store import open_store
from connector.store.migrate import alembic_config, head
from connector.store.schema import dead_letters, outbox

D, DEST = "d", "sink"
FUTURE = time.time() + 10 * 365 * 86_400  # a purge cutoff past every delivery of a test


def new_op(
    store: Any, customer: str, key: str, op: str = "upsert", d: str = D, dest: str = DEST
) -> int:
    """A pending operation, its id given by the store (as the planner's are)."""
    now = time.time()
    row = {
        "dispensary": d,
        "destination": dest,
        "order_key": customer,
        "customer_id": customer,
        "op": op,
        "payload": json.dumps({"op": op, "dispensary": d, "customer_id": customer}),
        "idempotency_key": key,
        "status": "pending",
        "attempts": 0,
        "created_at": now,
        "next_attempt_at": now - 1,
    }
    with store.engine.begin() as conn:
        return int(conn.execute(insert(outbox).values(**row)).inserted_primary_key[0])


def settle_all(store: Any, *, dead: bool, d: str = D, dest: str = DEST) -> None:
    """Claim what is due and record it delivered (or refused for good: a dead letter each)."""
    while rows := store.claim(d, dest, 100):
        if dead:
            refused = [(r, "HTTP 400: refused", 400, '{"error":"no"}') for r in rows]
            store.finish(d, dest, dead=refused)
        else:
            store.finish(d, dest, done=[(r, None) for r in rows])


def _purge(store: Any) -> None:
    store.purge(raw_before=0.0, delivered_before=FUTURE)


def links(store: Any) -> list[Any]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(dead_letters).order_by(dead_letters.c.id)))


def assert_links_name_their_own_operation(store: Any) -> None:
    with store.engine.connect() as conn:
        ops = {r.id: r for r in conn.execute(select(outbox))}
    for letter in links(store):
        if letter.outbox_id is None:
            continue
        op = ops.get(letter.outbox_id)
        assert op is not None, f"letter {letter.id} names operation {letter.outbox_id}: gone"
        assert (op.dispensary, op.destination, op.idempotency_key) == (
            letter.dispensary,
            letter.destination,
            letter.idempotency_key,
        ), f"letter {letter.id} names operation {letter.outbox_id}, another operation's id"


def test_a_letter_whose_operation_is_purged_no_longer_names_the_id_given_out_again(
    store: Any,
) -> None:
    first = new_op(store, "c1", "k1")
    settle_all(store, dead=True)
    assert store.replay().replayed == 1
    settle_all(store, dead=False)
    _purge(store)
    second = new_op(store, "c1", "k2")
    if store.dialect == "sqlite":
        assert second == first  # the id comes back: what made the old link wrong
    settle_all(store, dead=True)
    old, new = links(store)
    assert old.outbox_id is None
    assert old.idempotency_key == "k1"
    assert new.outbox_id == second
    assert_links_name_their_own_operation(store)
    story = [d.outbox_id for d in store.dead_letters(include_replayed=True, limit=10)]
    assert sorted(story, key=str) == sorted([None, second], key=str)


def test_a_replay_never_resets_an_operation_that_is_not_the_letters_own(store: Any) -> None:
    """A link written before the fix, naming another customer's dead operation: the replay
    leaves that operation dead and counts the letter unreplayable."""
    new_op(store, "c1", "k1")
    settle_all(store, dead=True)
    other = new_op(store, "c2", "k2", op="subscribe")
    settle_all(store, dead=True)
    first, second = links(store)
    with store.engine.begin() as conn:  # the first letter's link, as a reused id left it
        conn.execute(
            update(dead_letters).where(dead_letters.c.id == first.id).values(outbox_id=other)
        )
    replayed = store.replay(ids=[first.id])
    assert (replayed.replayed, replayed.unreplayable) == (0, 1)
    with store.engine.connect() as conn:
        status = conn.execute(select(outbox.c.status).where(outbox.c.id == other)).scalar_one()
    assert status == "dead"
    assert store.replay(ids=[second.id]).replayed == 1  # its own letter still replays it


def test_revision_0008_unlinks_the_letters_a_store_holds_to_another_or_no_operation(
    store_url: str,
) -> None:
    first = open_store(store_url)
    try:
        first.register_process()
        with first.engine.begin() as conn:
            command.downgrade(alembic_config(connection=conn), "0007")
        kept = new_op(first, "c1", "k1")
        reused = new_op(first, "c2", "k2")
        gone = new_op(first, "c3", "k3")
        settle_all(first, dead=True)
        with first.engine.begin() as conn:
            letters = {r.idempotency_key: r.id for r in conn.execute(select(dead_letters))}
            # k2's operation was purged and its id given to another operation; k3's is gone
            conn.execute(
                update(outbox).where(outbox.c.id == reused).values(idempotency_key="other")
            )
            conn.execute(outbox.delete().where(outbox.c.id == gone))
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0007"
    finally:
        first.close()
    store = open_store(store_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
            links = {r.id: r.outbox_id for r in conn.execute(select(dead_letters))}
        assert links == {letters["k1"]: kept, letters["k2"]: None, letters["k3"]: None}
        assert_links_name_their_own_operation(store)
    finally:
        store.close()


def test_the_purge_finds_an_operations_letters_along_their_index(store: Any) -> None:
    new_op(store, "c1", "k1")
    settle_all(store, dead=True)
    store.replay()
    settle_all(store, dead=False)
    seen: list[tuple[str, Any]] = []

    def caught(conn: Any, cursor: Any, sql: str, params: Any, *_: Any) -> None:
        if sql.lstrip().upper().startswith("UPDATE DEAD_LETTERS"):
            seen.append((sql, params))

    from sqlalchemy import event

    event.listen(store.engine, "before_cursor_execute", caught)
    try:
        _purge(store)
    finally:
        event.remove(store.engine, "before_cursor_execute", caught)
    assert len(seen) == 1
    sql, params = seen[0]
    explain = "EXPLAIN QUERY PLAN " if store.dialect == "sqlite" else "EXPLAIN "
    with store.engine.connect() as conn:
        if store.dialect == "postgresql":
            conn.execute(text("SET enable_seqscan = off"))  # an empty table: any plan is cheap
        plan = str(conn.exec_driver_sql(explain + sql, params).all())
    assert "ix_dead_letters_outbox" in plan, plan


# --- any order of what happens to a customer's operations --------------------------------------

# each as likely as another: an id comes back only once every operation above it is purged
STEP = st.tuples(
    st.sampled_from(["new", "deliver", "kill", "replay", "purge"]), st.sampled_from(["c1", "c2"])
)


@pytest.mark.sqlite_only
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(STEP, min_size=1, max_size=25))
def test_every_link_names_its_own_operation_after_any_history(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, str]]
) -> None:
    """Operations planned, refused, replayed, delivered and purged in any order and any
    number of times (SQLite, where ids come back): after every step each letter names its
    own operation or none, no letter is ever lost, and a replay resets only operations a
    letter was written for."""
    path: Path = tmp_path_factory.mktemp("links") / "store.db"
    store = open_store(f"sqlite:///{path}")
    try:
        store.register_process()
        keys = 0
        letters = 0
        for action, customer in steps:
            if action == "new":
                keys += 1
                new_op(store, customer, f"k{keys}")
            elif action in ("deliver", "kill"):
                settle_all(store, dead=action == "kill")
            elif action == "replay":
                with store.engine.connect() as conn:
                    dead_before = {
                        r.id: r.idempotency_key
                        for r in conn.execute(select(outbox).where(outbox.c.status == "dead"))
                    }
                open_keys = {r.idempotency_key for r in links(store) if r.replayed_at is None}
                store.replay()
                with store.engine.connect() as conn:
                    now_pending = {
                        r.id: r.idempotency_key
                        for r in conn.execute(select(outbox).where(outbox.c.status == "pending"))
                    }
                for op_id, key in dead_before.items():
                    if op_id in now_pending:
                        assert key in open_keys, f"operation {op_id} reset by another's letter"
            else:
                _purge(store)
            now = len(links(store))
            assert now >= letters, "a dead letter was lost"
            letters = now
            assert_links_name_their_own_operation(store)
    finally:
        store.close()
