"""Adversarial review of e78a360 (a dead letter's link to its operation names that operation or
none): a second letter of one operation, a replay read before the purge gave its operation's id
to another, the migration's repair on mixed letters, any history over two dispensaries and two
destinations whose keys collide, purges cut into steps of one row, and a late failure recorded
under an id given out again. Its two findings are fixed and guarded here: a replay that read a
letter another replay took since revived its operation (now each letter is taken, replayed_at
set while still unset, before its operation is touched), and a late failure's attempt landed
on the operation given its id next (now recorded only where the operation is still its own)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select
from test_dead_letter_links import (
    FUTURE,
    assert_links_name_their_own_operation,
    links,
    new_op,
    settle_all,
)

from connector.explain import build_story, story_json
from connector.store import open_store
from connector.store.admin import PurgeCursor
from connector.store.migrate import alembic_config
from connector.store.schema import attempts, dead_letters, outbox


def _ops(store: Any) -> dict[int, Any]:
    with store.engine.connect() as conn:
        return {r.id: r for r in conn.execute(select(outbox))}


def _counts(r: Any) -> tuple[int, int, int]:
    return (r.replayed, r.superseded, r.unreplayable)


def _story(store: Any, customer: str) -> dict[str, Any]:
    return story_json(build_story(store.customer_record("d", customer, ["sink"]), ["sink"]))


def test_a_second_letter_of_one_operation_replays_and_the_story_follows_the_new_id(
    store: Any,
) -> None:
    """Died, replayed, died again (two letters, one operation): the second letter replays it;
    once delivered and purged both letters are unlinked, and the story of the operation given
    the id next shows only its own letter."""
    first = new_op(store, "c1", "k1")
    settle_all(store, dead=True)
    assert store.replay().replayed == 1
    settle_all(store, dead=True)
    one, two = links(store)
    assert (one.outbox_id, two.outbox_id) == (first, first)
    assert _counts(store.replay(ids=[one.id])) == (0, 0, 0)  # replayed already: not read again
    assert store.replay(ids=[two.id]).replayed == 1
    settle_all(store, dead=False)
    store.purge(raw_before=0.0, delivered_before=FUTURE)
    assert [x.outbox_id for x in links(store)] == [None, None]
    again = new_op(store, "c1", "k2")
    if store.dialect == "sqlite":
        assert again == first
    settle_all(store, dead=True)
    *_, three = links(store)
    assert three.outbox_id == again
    assert_links_name_their_own_operation(store)
    story = _story(store, "c1")
    [op] = story["operations"]
    assert (op["id"], op["dead_letter"]) == (again, three.id)
    assert f"#{one.id}" not in op["standing"]
    assert f"#{two.id}" not in op["standing"]
    shown = {x["id"]: x["operation"] for x in story["dead_letters"]}
    assert shown == {one.id: None, two.id: None, three.id: again}
    # the old letters stay replayed, the new one replays its own operation only
    assert _counts(store.replay()) == (1, 0, 0)
    assert _ops(store)[again].status == "pending"


def test_a_replay_read_before_its_operation_was_purged_and_its_id_given_again(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay reads its letters, then (before its first chunk) another process replays the
    same letter, the operation is delivered and purged, and its id (SQLite) goes to another
    customer's operation that dies: the stale replay leaves that operation and its letter
    alone."""
    slow, other = open_store(store_url), open_store(store_url)
    try:
        slow.register_process()
        other.register_process()
        first = new_op(other, "c1", "k1")
        settle_all(other, dead=True)
        seen: dict[str, int] = {}
        clock = slow._now

        def between() -> float:
            if not seen:
                assert other.replay().replayed == 1
                settle_all(other, dead=False)
                other.purge(raw_before=0.0, delivered_before=FUTURE)
                seen["id"] = new_op(other, "c2", "k2")
                settle_all(other, dead=True)
            return clock()

        monkeypatch.setattr(slow, "_now", between)
        done = slow.replay()
        monkeypatch.undo()
        if other.dialect == "sqlite":
            assert seen["id"] == first
        assert (done.replayed, done.superseded) == (0, 0)
        assert _ops(other)[seen["id"]].status == "dead"
        old, new = links(other)
        assert (old.outbox_id, new.outbox_id, new.replayed_at) == (None, seen["id"], None)
        assert_links_name_their_own_operation(other)
    finally:
        slow.close()
        other.close()


def test_a_replay_read_before_another_replayed_the_same_letter(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replays of one letter (the console and the CLI): the second's snapshot is older
    than the first's replay, the operation's delivery failed again since (a second letter).
    The stale replay must not put the operation back on the first letter's behalf while the
    second letter stays open (the queue would show an open letter for a pending, then
    delivered, operation)."""
    slow, other = open_store(store_url), open_store(store_url)
    try:
        slow.register_process()
        other.register_process()
        first = new_op(other, "c1", "k1")
        settle_all(other, dead=True)
        seen: list[int] = []
        clock = slow._now

        def between() -> float:
            if not seen:
                seen.append(other.replay().replayed)
                settle_all(other, dead=True)
            return clock()

        monkeypatch.setattr(slow, "_now", between)
        slow.replay()
        monkeypatch.undo()
        ops = _ops(other)
        for letter in links(other):
            if letter.replayed_at is None and letter.outbox_id is not None:
                assert ops[letter.outbox_id].status == "dead", (
                    f"letter {letter.id} open, its operation {first} {ops[letter.outbox_id].status}"
                )
    finally:
        slow.close()
        other.close()


def test_revision_0008_on_many_mixed_letters(store_url: str) -> None:
    """Mapping failures, two letters of one operation, links to an operation of the same id
    in another dispensary or destination or with another key, links to nothing: only the
    links naming the letter's own operation stay, and the second letter still replays."""
    first = open_store(store_url)
    try:
        first.register_process()
        with first.engine.begin() as conn:
            command.downgrade(alembic_config(connection=conn), "0007")
        twice = new_op(first, "c1", "k1")
        settle_all(first, dead=True)
        first.replay()
        settle_all(first, dead=True)  # a second letter of the same operation
        other_d = new_op(first, "c2", "k2", d="e")
        settle_all(first, dead=True, d="e")
        other_dest = new_op(first, "c3", "k3", dest="sink2")
        settle_all(first, dead=True, dest="sink2")
        with first.engine.begin() as conn:
            failure = {
                "outbox_id": None,
                "dispensary": "d",
                "destination": "sink",
                "customer_id": "c9",
                "op": "upsert",
                "payload": "{}",
                "idempotency_key": "",
                "attempts": 0,
                "reason": "mapping",
                "created_at": time.time(),
            }
            conn.execute(insert(dead_letters), [failure] * 50)
            # letters as a reused id would have left them: same key, other dispensary or
            # destination; and one naming an id never given
            wrong = [
                {**failure, "outbox_id": other_d, "idempotency_key": "k2"},
                {**failure, "outbox_id": other_dest, "idempotency_key": "k3"},
                {**failure, "outbox_id": 10**9, "idempotency_key": "k4"},
            ]
            conn.execute(insert(dead_letters), wrong)
        before = {r.id: r for r in links(first)}
    finally:
        first.close()
    store = open_store(store_url)
    try:
        after = {r.id: r.outbox_id for r in links(store)}
        assert set(after) == set(before)  # no letter lost
        expect = {}
        for lid, row in before.items():
            if row.customer_id == "c9":
                expect[lid] = None
            else:
                expect[lid] = row.outbox_id
        assert after == expect
        assert_links_name_their_own_operation(store)
        store.register_process()
        open_two = [r for r in links(store) if r.outbox_id == twice and r.replayed_at is None]
        assert len(open_two) == 1
        assert store.replay(ids=[open_two[0].id]).replayed == 1
    finally:
        store.close()


# --- any history over colliding keys, with purges cut into steps of one row ------------------

PAIRS = [("d", "sink"), ("e", "sink"), ("d", "sink2")]
STEP = st.one_of(
    st.tuples(st.just("new"), st.sampled_from(["c1", "c2"]), st.sampled_from(range(3))),
    st.tuples(st.sampled_from(["deliver", "kill"]), st.just(""), st.sampled_from(range(3))),
    st.tuples(st.just("replay"), st.just(""), st.just(0)),
    st.tuples(st.just("replay_one"), st.just(""), st.integers(0, 30)),
    st.tuples(st.sampled_from(["purge", "purge_step"]), st.just(""), st.just(0)),
)


@pytest.mark.sqlite_only
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(STEP, min_size=1, max_size=30))
def test_links_hold_over_colliding_keys_and_one_row_purge_steps(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, str, int]]
) -> None:
    """The same key strings in two dispensaries and two destinations (a key never names the
    dispensary), replays of single letters, purges of one row a step: every link names its
    own operation, a replay puts back only operations an open letter of the replay named,
    an open letter's operation is dead, and no letter is lost."""
    path: Path = tmp_path_factory.mktemp("links") / "store.db"
    store = open_store(f"sqlite:///{path}")
    try:
        store.register_process()
        keys = 0
        count = 0
        cursor = PurgeCursor()
        for action, customer, arg in steps:
            if action == "new":
                keys += 1
                d, dest = PAIRS[arg]
                new_op(store, customer, f"k{keys % 3}-{keys}", d=d, dest=dest)
            elif action in ("deliver", "kill"):
                d, dest = PAIRS[arg]
                settle_all(store, dead=action == "kill", d=d, dest=dest)
            elif action in ("replay", "replay_one"):
                letters = links(store)
                open_ = [x for x in letters if x.replayed_at is None]
                chosen = open_ if action == "replay" else open_[arg : arg + 1]
                dead_before = {i for i, o in _ops(store).items() if o.status == "dead"}
                store.replay(ids=[x.id for x in chosen])
                named = {x.outbox_id for x in chosen}
                for i, o in _ops(store).items():
                    if i in dead_before and o.status == "pending":
                        assert i in named, f"operation {i} put back by another's letter"
            elif action == "purge":
                store.purge(raw_before=0.0, delivered_before=FUTURE)
                cursor = PurgeCursor()
            else:
                if cursor.finished:
                    cursor = PurgeCursor()
                store.purge_step(raw_before=0.0, delivered_before=FUTURE, cursor=cursor, limit=1)
            letters = links(store)
            assert len(letters) >= count, "a dead letter was lost"
            count = len(letters)
            assert_links_name_their_own_operation(store)
            ops = _ops(store)
            for x in letters:
                if x.replayed_at is None and x.outbox_id is not None:
                    assert ops[x.outbox_id].status == "dead"
    finally:
        store.close()


# --- beside the letters: a late failure's attempt under an id given out again -----------------


@pytest.mark.sqlite_only
def test_a_late_failure_never_lands_on_the_operation_given_the_id_again(store_url: str) -> None:
    stalled, other = open_store(store_url), open_store(store_url)
    try:
        stalled.register_process()
        other.register_process()
        first = new_op(other, "c1", "k1")
        [late] = stalled.claim("d", "sink", 10)  # then stalls past its claim
        [again] = other.claim("d", "sink", 10, now=time.time() + 60)
        other.finish("d", "sink", done=[(again, None)])
        other.purge(raw_before=0.0, delivered_before=FUTURE)
        second = new_op(other, "c2", "k2")
        assert second == first  # SQLite gives the purged id out again
        stalled.finish("d", "sink", retry=[(late, time.time() + 5, "HTTP 503: later")])
        with other.engine.connect() as conn:
            found = conn.execute(select(attempts).where(attempts.c.outbox_id == second)).all()
        assert found == [], "operation k2 inherited k1's late failure"
        assert _ops(other)[second].status == "pending"
    finally:
        stalled.close()
        other.close()


def test_one_row_purge_steps_unlink_only_the_letters_of_what_they_delete(store: Any) -> None:
    """A purge in steps of one row: a letter of an operation still dead keeps its link, the
    letter of the operation replayed, delivered and purged loses it."""
    kept = new_op(store, "c1", "k1")
    settle_all(store, dead=True)
    purged = new_op(store, "c2", "k2")
    settle_all(store, dead=True)
    store.replay(ids=[links(store)[1].id])
    settle_all(store, dead=False)
    cursor = PurgeCursor()
    while not cursor.finished:
        store.purge_step(raw_before=0.0, delivered_before=FUTURE, cursor=cursor, limit=1)
    assert [x.outbox_id for x in links(store)] == [kept, None]
    assert purged not in _ops(store)
    assert_links_name_their_own_operation(store)
