"""The receiver's write path and its neighbours, piece by piece: the inbox writer, the group
committer's own thread, the envelope check made before answering, and how ingestion tells
planning and delivery to step aside. The receiver as a whole is tested in test_receiver.py."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from connector._pressure import Pressure
from connector.errors import EventValidationError, StoreUnavailable
from connector.intake import GroupCommitter
from connector.pipeline_process import BUSY, BUSY_EVERY_SECONDS, PipelineProcess
from connector.planner import instant_us
from connector.service import Service
from connector.store import NewEvent, Rejected, Store, open_store
from connector.store.schema import inbox, quarantine
from connector.store.sqlite import InboxWriter
from connector.treez import (
    RULE_FIELDS,
    CustomerEvent,
    NotJsonError,
    OtherEvent,
    ReceivedCustomer,
    TestPing,
    _check_with_model,
    _quick_check,
    _QuickCustomer,
    check_event_json,
    parse_event_json,
    parse_stored_event,
)

SEED_BYTES = (Path(__file__).resolve().parent / "data" / "seed_body.json").read_bytes()
SEED: dict[str, Any] = json.loads(SEED_BYTES)
INBOX_COLUMNS = (
    "dispensary",
    "source",
    "event_type",
    "customer_id",
    "last_update_us",
    "body",
    "status",
    "run_id",
)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A fresh store: the tests that take it run on SQLite and on PostgreSQL, but for those
    marked ``sqlite_only`` (the SQLite inbox writer, SQLite's write lock)."""
    opened = open_store(store_url, timeout=0.3)
    yield opened
    opened.close()


@pytest.fixture
def writer(store: Store) -> Iterator[InboxWriter]:
    opened = store.inbox_writer()
    yield opened
    opened.close()


def events(count: int, *, start: int = 0, status: str = "pending") -> list[NewEvent]:
    return [
        NewEvent(
            "d",
            "webhook",
            "CUSTOMER",
            str(start + i),
            1_000 + i,
            json.dumps({"n": start + i, "name": "Ünïcode ✓"}),
            status,
        )
        for i in range(count)
    ]


def inbox_rows(store: Store) -> list[tuple[Any, ...]]:
    rows = store.query(select(inbox).order_by(inbox.c.id))
    return [tuple(getattr(r, c) for c in INBOX_COLUMNS) for r in rows]


@contextlib.contextmanager
def write_lock(database: Path) -> Iterator[None]:
    """SQLite's write lock on ``database``, held by another connection."""
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")


# --- the inbox writer ---


def test_the_inbox_writer_stores_what_add_events_stores(tmp_path: Path) -> None:
    batch = events(250) + events(3, start=900, status="ignored")
    reference = open_store(f"sqlite:///{tmp_path / 'reference.db'}")
    reference.add_events(batch)
    fast = open_store(f"sqlite:///{tmp_path / 'fast.db'}")
    writer = fast.inbox_writer()
    try:
        writer.add(batch)
        assert inbox_rows(fast) == inbox_rows(reference)
        ids = [r.id for r in fast.query(select(inbox.c.id).order_by(inbox.c.id))]
        assert ids == list(range(1, len(batch) + 1))  # in the order received
        for row in fast.query(select(inbox)):
            assert row.received_at > 0
            assert (row.processed_at is None) == (row.status == "pending")
    finally:
        writer.close()
        fast.close()
        reference.close()


@pytest.mark.sqlite_only
def test_the_inbox_writer_commits_durably_by_default(writer: InboxWriter) -> None:
    writer.add(events(1))
    assert writer._raw is not None
    assert writer._raw.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


@pytest.mark.sqlite_only
def test_a_batch_with_refused_bodies_goes_through_the_store(
    store: Store, writer: InboxWriter
) -> None:
    writer.add(events(2), [Rejected("d", 415, "content type must be ...", "text/plain", b"x")])
    assert writer._raw is None  # not the driver connection
    assert len(inbox_rows(store)) == 2
    assert [r.status_code for r in store.query(select(quarantine))] == [415]


@pytest.mark.sqlite_only
def test_a_locked_store_is_unavailable_and_nothing_is_half_written(
    store: Store, tmp_path: Path
) -> None:
    writer = store.inbox_writer()
    try:
        writer.add(events(1))
        with (
            write_lock(tmp_path / "store.db"),
            pytest.raises(StoreUnavailable, match="cannot take the write") as caught,
        ):
            writer.add(events(5, start=10))
        assert "Ünïcode" not in str(caught.value)  # never a value
        assert len(inbox_rows(store)) == 1
        writer.add(events(2, start=20))  # a new connection, once the lock is gone
        assert [r[3] for r in inbox_rows(store)] == ["0", "20", "21"]
    finally:
        writer.close()


@pytest.mark.sqlite_only
def test_a_failed_statement_is_rolled_back(store: Store, writer: InboxWriter) -> None:
    bad = events(3)
    bad[2] = NewEvent("d", "webhook", "CUSTOMER", "x", 1, "{}", None)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable, match="NOT NULL"):
        writer.add(bad)
    assert inbox_rows(store) == []
    writer.add(events(1))
    assert len(inbox_rows(store)) == 1


@pytest.mark.sqlite_only
def test_a_batch_is_one_statement_committed_on_its_own(store: Store, writer: InboxWriter) -> None:
    writer.add(events(3))
    assert writer._raw is not None
    assert not writer._raw.in_transaction  # committed by the statement itself
    with contextlib.closing(sqlite3.connect(store.engine.url.database)) as other:
        assert other.execute("SELECT count(*) FROM inbox").fetchone() == (3,)


@pytest.mark.sqlite_only
def test_a_batch_too_big_for_one_statement_is_one_transaction(
    store: Store, writer: InboxWriter
) -> None:
    writer.add(events(1))
    writer._variables = 30  # three rows a statement, as an SQLite build with a low limit
    writer.add(events(7, start=10))
    assert [r[3] for r in inbox_rows(store)] == ["0", *(str(10 + i) for i in range(7))]
    bad = events(7, start=20)
    bad[5] = NewEvent("d", "webhook", "CUSTOMER", "x", 1, "{}", None)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable, match="NOT NULL"):
        writer.add(bad)  # its second statement fails: the first is undone with it
    assert len(inbox_rows(store)) == 8


def test_without_a_database_file_the_writer_uses_the_store(tmp_path: Path) -> None:
    memory = open_store("sqlite://")
    try:
        writer = InboxWriter(memory)
        writer.add(events(2))
        assert writer._raw is None
        assert len(inbox_rows(memory)) == 2
    finally:
        memory.close()


# --- the group committer ---


async def _committing(store: Store) -> tuple[GroupCommitter, asyncio.Event, asyncio.Task[None]]:
    committer = GroupCommitter(store)
    stopping = asyncio.Event()
    task = asyncio.create_task(committer.run(stopping))
    for _ in range(100):  # run() has started the writer thread
        if committer._thread is not None:
            break
        await asyncio.sleep(0.001)
    return committer, stopping, task


def test_concurrent_submissions_are_each_answered_after_their_commit(store: Store) -> None:
    committed: list[int] = []

    async def scenario() -> None:
        committer, stopping, task = await _committing(store)
        committer.on_commit.append(lambda: committed.append(len(inbox_rows(store))))

        async def one(event: NewEvent) -> None:
            await committer.submit(event)
            # answered: the row is there, whatever else is still on its way
            ids = {r[3] for r in inbox_rows(store)}
            assert event.customer_id in ids

        await asyncio.gather(*(one(e) for e in events(300)))
        stopping.set()
        await task

    asyncio.run(scenario())
    assert len(inbox_rows(store)) == 300
    assert committed
    assert committed[-1] == 300
    assert len(committed) < 300  # batched: fewer commits than events


@pytest.mark.sqlite_only
def test_a_failed_batch_fails_its_waiters_and_the_next_batch_commits(
    store: Store, tmp_path: Path
) -> None:
    async def scenario() -> None:
        committer, stopping, task = await _committing(store)
        with write_lock(tmp_path / "store.db"):
            outcomes = await asyncio.gather(
                *(committer.submit(e) for e in events(4)), return_exceptions=True
            )
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        await committer.submit(events(1, start=50)[0])
        stopping.set()
        await task

    asyncio.run(scenario())
    assert [r[3] for r in inbox_rows(store)] == ["50"]


def test_what_is_queued_at_stop_is_committed_and_later_submissions_are_refused(
    store: Store,
) -> None:
    async def scenario() -> None:
        committer, stopping, task = await _committing(store)
        pending = [asyncio.create_task(committer.submit(e)) for e in events(20)]
        await asyncio.sleep(0)  # all queued
        stopping.set()
        await task
        await asyncio.gather(*pending)
        with pytest.raises(StoreUnavailable, match="not running"):
            await committer.submit(events(1, start=99)[0])
        assert committer._thread is None

    asyncio.run(scenario())
    assert len(inbox_rows(store)) == 20


def test_a_submission_before_the_committer_runs_is_refused(store: Store) -> None:
    async def scenario() -> None:
        with pytest.raises(StoreUnavailable, match="not running"):
            await GroupCommitter(store).submit(events(1)[0])

    asyncio.run(scenario())


def test_no_submission_is_left_waiting_whatever_the_timing(store: Store) -> None:
    """The idle flag and the signal: submissions arriving while the writer goes idle, commits
    and wakes are all taken (a lost wake-up would leave a request waiting forever)."""

    async def scenario() -> None:
        committer, stopping, task = await _committing(store)
        for round_ in range(200):
            batch = events(1 + round_ % 3, start=round_ * 10)
            await asyncio.wait_for(asyncio.gather(*(committer.submit(e) for e in batch)), 5)
            if round_ % 7 == 0:
                time.sleep(0.001)  # let the writer go idle meanwhile
        stopping.set()
        await task

    asyncio.run(scenario())
    assert len(inbox_rows(store)) == sum(1 + r % 3 for r in range(200))


def test_the_writer_thread_commits_while_the_event_loop_is_busy(store: Store) -> None:
    """A batch is taken by the writer as soon as the previous commit ends, not when the event
    loop comes round: with the loop blocked, queued events still reach the database. (An
    idle writer is woken by the loop, once, after the turn that queued the first events: see
    tests/test_perf_ingest_group_commit.py.)"""

    async def scenario() -> None:
        committer, stopping, task = await _committing(store)
        waiting = [asyncio.create_task(committer.submit(e)) for e in events(5)]
        await asyncio.sleep(0)  # the submissions
        await asyncio.sleep(0)  # the loop's wake-up of the idle writer
        deadline = time.monotonic() + 5
        while len(inbox_rows(store)) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)  # the event loop does nothing meanwhile
        assert len(inbox_rows(store)) == 5
        await asyncio.gather(*waiting)
        stopping.set()
        await task

    asyncio.run(scenario())
    assert not any(t.name == "receiver-commit" for t in threading.enumerate())


# --- the check made before answering, and the customer model when planned ---


def _seed(**changes: Any) -> bytes:
    body = copy.deepcopy(SEED)
    for key, value in changes.items():
        if value is ...:
            del body["data"][key]
        else:
            body["data"][key] = value
    return json.dumps(body).encode()


def test_the_seed_passes_the_check_with_what_the_receiver_stores() -> None:
    checked = check_event_json(SEED_BYTES)
    full = parse_event_json(SEED_BYTES)
    assert isinstance(checked, ReceivedCustomer)
    assert isinstance(full, CustomerEvent)
    assert checked.customer_id == full.customer.customer_id == "3904"
    assert instant_us(checked.last_update) == instant_us(full.customer.last_update)
    assert checked.dispensary_short_name == full.dispensary_short_name


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b'{"test": true}', TestPing),
        (json.dumps({**SEED, "test": True}).encode(), TestPing),
        (b'{"event_type": "TICKET", "data": {}}', OtherEvent),
        (json.dumps({**SEED, "event_type": " customer "}).encode(), ReceivedCustomer),
    ],
)
def test_pings_and_other_types_are_told_apart(body: bytes, kind: type) -> None:
    assert isinstance(check_event_json(body), kind)
    assert type(parse_event_json(body)) is (CustomerEvent if kind is ReceivedCustomer else kind)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_seed(customer_id=""), "data.customer_id"),
        (_seed(last_update="2026-04-24T11:38:21.000"), "data.last_update"),
        (_seed(last_update=1777055901), "data.last_update"),
        (_seed(opt_out="maybe"), "data.opt_out"),  # consent is never guessed
        (_seed(merged_customer_ids=[""]), "data.merged_customer_ids[0]"),
        (_seed(merged_into_customer_id={"id": 1}), "data.merged_into_customer_id"),
        (_seed(external_ids=[1]), "data.external_ids"),
        (_seed(status=["ACTIVE"]), "data.status"),
        (json.dumps({**SEED, "data": "3904"}).encode(), "data"),
        (b"[1]", "body"),
    ],
)
def test_the_fields_the_rules_stand_on_are_checked_before_answering(
    body: bytes, field: str
) -> None:
    with pytest.raises(EventValidationError) as caught:
        check_event_json(body)
    assert field in [p.where for p in caught.value.problems]
    with pytest.raises(EventValidationError):
        parse_stored_event(body)  # and never dropped when planned


def test_not_json_is_told_apart() -> None:
    with pytest.raises(NotJsonError):
        check_event_json(b"{nope")
    with pytest.raises(NotJsonError):
        parse_stored_event(b"{nope")


def test_only_the_wrong_elements_of_a_list_are_dropped() -> None:
    good = dict(SEED["data"]["addresses"][0])
    body = _seed(
        addresses=[{"city": ["x"], "primary": False}, good, "nowhere"],
        customer_groups=["SENIOR", {"no": 1}],
        first_name={"a": 1},
    )
    event, dropped = parse_stored_event(body)
    assert isinstance(event, CustomerEvent)
    customer = event.customer
    assert [a.city for a in customer.addresses] == [good["city"]]  # the good one stays
    assert customer.primary_address is not None
    assert customer.customer_groups == ["SENIOR"]
    assert customer.first_name is None
    assert {p.where.split("[")[0].split(".")[1] for p in dropped} == {
        "addresses",
        "customer_groups",
        "first_name",
    }


def test_a_wrong_field_outside_the_rules_is_dropped_when_planned() -> None:
    body = _seed(first_name={"not": "text"}, addresses=[{"city": ["x"]}], opt_out="true")
    assert isinstance(check_event_json(body), ReceivedCustomer)
    with pytest.raises(EventValidationError):
        parse_event_json(body)
    event, dropped = parse_stored_event(body)
    assert isinstance(event, CustomerEvent)
    assert {p.where for p in dropped} == {"data.first_name", "data.addresses[0].city"}
    customer = event.customer
    assert customer.first_name is None
    assert customer.addresses == []  # its only element was wrong
    assert customer.opt_out is True
    assert customer.last_name == SEED["data"]["last_name"]
    assert parse_stored_event(SEED_BYTES)[1] == []


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**12),
    st.text(max_size=12),
    st.sampled_from(
        [
            "true",
            "false",
            "N/A",
            "",
            "2026-04-24T11:38:21.000-07:00",
            "2026-04-24T11:38:21Z",
            "2026-02-30T00:00:00+00:00",
            "3904",
            "ACTIVE",
        ]
    ),
    st.lists(st.one_of(st.integers(0, 9), st.text(max_size=2)), max_size=2),
    st.dictionaries(st.sampled_from(["aiq_contact_id", "city", "x"]), st.none()),
)
_fields = st.sampled_from(
    [
        "customer_id",
        "last_update",
        "opt_out",
        "first_name",
        "status",
        "merged_customer_ids",
        "merged_into_customer_id",
        "external_ids",
        "addresses",
        "rewards_balance",
        "birthday",
        "banned",
        "customer_groups",
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.dictionaries(_fields, st.one_of(_values, st.just(...)), max_size=4),
    envelope=st.dictionaries(
        st.sampled_from(["event_type", "dispensary_short_name", "data", "test"]),
        st.one_of(st.just("CUSTOMER"), st.just("TICKET"), _values, st.just(...)),
        max_size=2,
    ),
)
def test_what_the_receiver_accepts_is_planned_with_the_same_rules(
    changes: dict[str, Any], envelope: dict[str, Any]
) -> None:
    """For any body: what the check refuses, planning refuses too (the same 400 or 422); what
    it accepts, planning reads with the same customer id, instant and dispensary, the rule
    fields as sent, and at most fields outside the rules dropped."""
    body = copy.deepcopy(SEED)
    for key, value in changes.items():
        if value is ...:
            body["data"].pop(key, None)
        else:
            body["data"][key] = value
    for key, value in envelope.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    raw = json.dumps(body).encode()
    try:
        checked = check_event_json(raw)
    except EventValidationError as refused:
        with pytest.raises(EventValidationError) as also:
            parse_stored_event(raw)
        assert type(also.value) is type(refused)
        with pytest.raises(EventValidationError):
            parse_event_json(raw)
        return
    event, dropped = parse_stored_event(raw)
    assert {p.where.split(".")[1].split("[")[0] for p in dropped}.isdisjoint(RULE_FIELDS)
    if not dropped:
        assert parse_event_json(raw) == event
    if isinstance(checked, ReceivedCustomer):
        assert isinstance(event, CustomerEvent)
        customer = event.customer
        assert checked.customer_id == customer.customer_id
        assert checked.last_update == customer.last_update
        assert isinstance(checked.last_update, datetime)
        assert checked.dispensary_short_name == event.dispensary_short_name
        sent = body["data"]
        for name in RULE_FIELDS - {"customer_id", "last_update"}:
            if name in sent:  # what the rules read is what was sent, never dropped
                assert name in customer.model_fields_set, name
    else:
        assert checked == event


# --- the quick check: the rule model's answers, sooner ---


def test_the_quick_check_covers_the_fields_the_rules_stand_on() -> None:
    # a rule field added to the model and not to the quick check would go unchecked there
    assert set(_QuickCustomer.__struct_fields__) == RULE_FIELDS


@pytest.mark.parametrize(
    "changes",
    [
        {},  # the seed: text ids, "false", null external ids, an empty merge list
        {"customer_id": 3904, "opt_out": True, "merged_customer_ids": ["12", 13]},
        {"opt_out": " TRUE ", "merged_into_customer_id": "N/A", "status": "DEACTIVATED"},
        {
            "external_ids": {"aiq_contact_id": 77, "other": [1]},
            "last_update": "2026-04-24T11:38:21Z",
        },
        {"opt_out": None, "last_update": "2026-04-24T11:38:21.123456+05:30"},
    ],
)
def test_the_quick_check_takes_what_treez_sends(changes: dict[str, Any]) -> None:
    raw = _seed(**changes)
    quick = _quick_check(raw)
    assert quick is not None  # else the receiver pays for the model on every webhook
    assert quick == _check_with_model(raw, "body")
    assert quick == _quick_check(raw.decode())  # the receiver passes text


@pytest.mark.parametrize(
    "token",
    [
        "NaN",
        "-Infinity",
        '"\\ud800"',
        "-0",
        "1E+2",
        "123456789012345678901234567890",
        "1.5e999",
        '"\\u0000"',
        "01",
        "[1,]",
        '"\\x41"',
        "7" * 4300,
        "7" * 4301,
        "-" + "7" * 4301,
        "[" * 150 + "]" * 150,
        "[" * 995 + "]" * 995,
        "[" * 2000 + "]" * 2000,
    ],
)
def test_the_quick_check_is_never_more_lenient_about_json(token: str) -> None:
    raw = SEED_BYTES.rstrip()[:-1] + b', "extra": ' + token.encode() + b"}"
    quick = _quick_check(raw)
    try:
        model = _check_with_model(raw, "body")
    except EventValidationError:
        assert quick is None
    else:
        assert quick is None or quick == model


@pytest.mark.parametrize(
    "raw",
    [
        SEED_BYTES.replace(b'"Jules"', b'"J\xffles"'),  # not UTF-8, in a field it skips
        SEED_BYTES.replace(b'"3904"', b'"39\xed\xa0\x8004"'),  # an encoded surrogate
        SEED_BYTES.decode().replace('"3904"', '"39\ud80004"'),  # a lone surrogate in text
    ],
)
def test_the_quick_check_leaves_what_is_not_clean_unicode_to_the_model(raw: bytes | str) -> None:
    assert raw != (SEED_BYTES if isinstance(raw, bytes) else SEED_BYTES.decode())
    assert _quick_check(raw) is None  # no verdict, and no exception


_timestamps = st.one_of(
    st.builds(
        "{:04d}-{:02d}-{:02d}{}{:02d}:{:02d}:{:02d}{}{}".format,
        st.integers(0, 9999),
        st.integers(0, 13),
        st.integers(0, 32),
        st.sampled_from("Tt "),
        st.integers(0, 25),
        st.integers(0, 61),
        st.integers(0, 61),
        st.sampled_from(["", ".5", ".123", ".123456", ".1234567", "."]),
        st.sampled_from(
            [
                "Z",
                "z",
                "+00:00",
                "-07:00",
                "+23:59",
                "+24:00",
                "-00:60",
                "+05:30",
                "",
                "+0700",
                "-07",
                "+99:99",
            ]
        ),
    ),
    st.builds(
        "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}{}{}".format,
        st.integers(1, 9999),
        st.integers(1, 12),
        st.integers(1, 31),
        st.integers(0, 23),
        st.integers(0, 59),
        st.integers(0, 59),
        st.sampled_from(["", ".000", ".5", ".999999"]),
        st.sampled_from(["Z", "+00:00", "-07:00", "+14:00", "-23:59"]),
    ),
    st.sampled_from(["2026-04-24T11:38:21.000-07:00", "\uff12026-04-24T11:38:21Z"]),
    st.text(max_size=12),
    st.integers(),
    st.none(),
)
_ids = st.one_of(
    st.text(max_size=4),
    st.sampled_from(["N/A", "", " ", " 12 "]),
    st.integers(-9, 10**20),
    st.booleans(),
    st.none(),
    st.floats(allow_infinity=False),
)
_rule_values: dict[str, st.SearchStrategy[Any]] = {
    "customer_id": _ids,
    "last_update": _timestamps,
    "opt_out": st.one_of(
        st.booleans(),
        st.none(),
        st.integers(-1, 2),
        st.floats(0, 1),
        st.sampled_from(["true", " TRUE ", "false", "0", "1", "yes", "n", "", "maybe", "N/A"]),
    ),
    "status": st.one_of(st.none(), st.text(max_size=8), st.integers(), st.lists(st.none())),
    "merged_customer_ids": st.one_of(
        st.none(),
        st.lists(_ids, max_size=3),
        st.text(max_size=2),
        st.dictionaries(st.text(max_size=2), st.none()),
    ),
    "merged_into_customer_id": st.one_of(_ids, st.lists(st.none(), max_size=1)),
    "external_ids": st.one_of(
        st.none(),
        st.lists(st.integers(), max_size=1),
        st.text(max_size=2),
        st.fixed_dictionaries(
            {},
            optional={
                "aiq_contact_id": _ids,
                "sticky_cards_contact_id": _ids,
                "other": st.integers(),
            },
        ),
    ),
}


_changes = st.fixed_dictionaries(
    {}, optional={name: st.one_of(values, st.just(...)) for name, values in _rule_values.items()}
)
_envelopes = st.fixed_dictionaries(
    {},
    optional={
        "event_type": st.sampled_from(["CUSTOMER", "customer", " CUSTOMER", "TICKET", 5, ...]),
        "dispensary_short_name": st.one_of(st.text(max_size=3), st.none(), st.integers()),
        "test": st.one_of(st.none(), st.booleans()),
    },
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=_changes, envelope=_envelopes, as_text=st.booleans())
def test_the_quick_check_answers_as_the_rule_model(
    changes: dict[str, Any], envelope: dict[str, Any], as_text: bool
) -> None:
    """For any body: the quick check says nothing, or what the model says (same customer id,
    same instant and offset, same dispensary); it never takes what the model refuses."""
    body = copy.deepcopy(SEED)
    for target, values in ((body["data"], changes), (body, envelope)):
        for key, value in values.items():
            if value is ...:
                target.pop(key, None)
            else:
                target[key] = value
    encoded = json.dumps(body)
    raw: bytes | str = encoded if as_text else encoded.encode()
    quick = _quick_check(raw)
    try:
        model = _check_with_model(raw, "body")
    except EventValidationError:
        assert quick is None
        return
    if quick is not None:
        assert isinstance(model, ReceivedCustomer)
        assert quick.customer_id == model.customer_id
        assert quick.last_update == model.last_update
        assert quick.last_update.utcoffset() == model.last_update.utcoffset()
        assert quick.dispensary_short_name == model.dispensary_short_name


# --- ingestion first ---


def test_saturation_needs_both_a_high_rate_and_a_busy_event_loop() -> None:
    pressure = Pressure(saturated_rate=1000, saturated_load=0.5)
    assert not pressure.busy
    pressure.measure(arrivals=150, elapsed=0.1, cpu=0.09)  # 1,500/s, loop 90 % busy
    assert pressure.saturated
    assert pressure.busy
    pressure.measure(arrivals=150, elapsed=0.1, cpu=0.02)  # the loop keeps up easily
    assert not pressure.saturated
    pressure.measure(arrivals=40, elapsed=0.1, cpu=0.1)  # busy, but not with webhooks
    assert not pressure.saturated


def test_saturation_elsewhere_lasts_for_its_lease() -> None:
    pressure = Pressure()
    pressure.saturated_elsewhere(0.05)
    assert pressure.busy
    assert not pressure.saturated
    time.sleep(0.06)
    assert not pressure.busy


def test_the_watch_measures_the_event_loop_and_the_arrivals() -> None:
    async def scenario() -> Pressure:
        pressure = Pressure()
        stopping = asyncio.Event()
        watch = asyncio.create_task(pressure.watch(stopping, window=0.05))
        started = time.monotonic()
        while time.monotonic() - started < 0.2:
            pressure.enter()
            pressure.leave()
            busy_until = time.monotonic() + 0.002
            while time.monotonic() < busy_until:  # the loop's thread on the CPU
                pass
            await asyncio.sleep(0)
        stopping.set()
        await watch
        return pressure

    pressure = asyncio.run(scenario())
    # loose bounds: that the watch sees arrivals and a busy loop at all (a loaded machine
    # starves this loop of its core, and the figures drop with it)
    assert pressure.rate > 10
    assert pressure.load > 0.05
    assert pressure.inflight == 0


def test_background_work_rests_only_when_busy() -> None:
    async def scenario() -> tuple[float, float]:
        pressure = Pressure(ratio=10, max_rest=0.2)
        started = time.monotonic()
        await pressure.yield_after(0.01)
        calm = time.monotonic() - started
        pressure.saturated_elsewhere(1.0)
        started = time.monotonic()
        await pressure.yield_after(0.01)
        return calm, time.monotonic() - started

    calm, busy = asyncio.run(scenario())
    assert calm < 0.05 <= busy  # rested ratio x 0.01 s = 0.1 s (bounds, not timings)


class _Writer:
    def __init__(self) -> None:
        self.sent = b""

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.sent += data


def test_the_receiver_tells_the_pipeline_process_at_most_so_often() -> None:
    child = PipelineProcess.__new__(PipelineProcess)
    child._writer = _Writer()  # type: ignore[assignment]
    child._busy_sent = 0.0
    for _ in range(10):
        child.saturated()
    assert child._writer.sent == BUSY  # type: ignore[union-attr]
    time.sleep(BUSY_EVERY_SECONDS * 1.2)
    child.saturated()
    child.saturated()
    assert child._writer.sent == BUSY * 2  # type: ignore[union-attr]


def test_a_saturated_receiver_tells_its_pipeline_process() -> None:
    class Child:
        told = 0

        def saturated(self) -> None:
            self.told += 1

    service = Service.__new__(Service)
    service.pressure = Pressure()
    service.child = Child()  # type: ignore[assignment]
    service.webhook_started()
    service.webhook_finished()
    assert service.child.told == 0  # type: ignore[attr-defined]
    service.pressure.measure(arrivals=500, elapsed=0.1, cpu=0.08)
    service.webhook_started()
    service.webhook_finished()
    assert service.child.told == 1  # type: ignore[attr-defined]
    assert service.pressure.inflight == 0


class _Dies(BaseException):
    """Not an Exception: what no error handling of the writer catches."""


def test_a_dying_commit_thread_fails_its_waiters_and_ends_the_run(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = store.inbox_writer

    def dying_writer() -> InboxWriter:
        writer = original()

        def add(events: Any, rejected: Any = ()) -> None:
            raise _Dies

        writer.add = add  # type: ignore[method-assign]
        return writer

    monkeypatch.setattr(store, "inbox_writer", dying_writer)

    async def scenario() -> None:
        committer, stopping, task = await _committing(store)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(committer.submit(e) for e in events(3)), return_exceptions=True),
            5,
        )
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        with pytest.raises(RuntimeError, match="commit thread stopped"):
            await asyncio.wait_for(task, 5)
        with pytest.raises(StoreUnavailable):
            await committer.submit(events(1)[0])
        assert not stopping.is_set()

    died: list[type[BaseException]] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_type))
    asyncio.run(scenario())
    assert died == [_Dies]
    assert inbox_rows(store) == []


def test_a_commit_thread_that_cannot_start_ends_the_run(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> InboxWriter:
        raise OSError("no file handles left")

    monkeypatch.setattr(store, "inbox_writer", broken)

    async def scenario() -> None:
        committer = GroupCommitter(store)
        with pytest.raises(RuntimeError, match="commit thread stopped"):
            await asyncio.wait_for(committer.run(asyncio.Event()), 5)
        with pytest.raises(StoreUnavailable):
            await committer.submit(events(1)[0])

    asyncio.run(scenario())


def test_a_submission_racing_the_last_commit_is_refused_not_forgotten(store: Store) -> None:
    """A request that passed its check just before the writer's last look at the queue: the
    run's end fails it (503) instead of leaving it waiting."""

    async def scenario() -> None:
        committer, stopping, task = await _committing(store)
        thread = committer._thread
        assert thread is not None
        stopping.set()
        while thread.is_alive():  # the writer has made its last look at the queue
            await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        late: asyncio.Future[None] = loop.create_future()
        committer._queue.append((events(1)[0], late))  # as submit() does after its check
        await task
        with pytest.raises(StoreUnavailable, match="not running"):
            await asyncio.wait_for(late, 5)

    asyncio.run(scenario())
