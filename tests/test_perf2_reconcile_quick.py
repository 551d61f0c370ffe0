"""The reconciliation's quick path (issue 17): a page read once by msgspec, each customer's
JSON text checked by the receiver's check and stored as it came, must give what the careful
path gives (``json`` decoding the page, :func:`check_customer`, ``leave_out_deep`` and
``json.dumps`` per customer): the same events (bodies equal as JSON), versions and refusals.
And the fetch ahead of several pages keeps :func:`_ahead`'s promises."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.reconcile import Pulled, Reconciler, _ahead, _pulled
from connector.treez_api import customer_texts, customers_of

DISPENSARY = "partnersandbox3"
SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())["data"]

# values a rule field may take, sound or not
_IDS = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.text(max_size=12),
    st.sampled_from(["3904", " 3904 ", "", "  ", "x" * 300, "٣٩٠٤"]),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
)
_STAMPS = st.one_of(
    st.sampled_from(
        [
            "2026-04-24T11:38:21.000-07:00",
            "2026-04-24T11:38:21Z",
            "2026-04-24T11:38:21.123456+00:00",
            "2026-04-24T11:38:21.1234567+00:00",
            "2026-04-24T11:38:21",  # no offset
            "2026-02-30T11:38:21.000-07:00",
            "2026-04-24 11:38:21.000-07:00",
            "2026-04-24T24:00:00.000Z",
            "",
        ]
    ),
    st.text(max_size=30),
    st.integers(),
    st.none(),
)
_OPT_OUTS = st.one_of(
    st.sampled_from(["true", "false", "TRUE", "yes", "", " true"]),
    st.booleans(),
    st.none(),
    st.integers(-1, 2),
    st.text(max_size=5),
)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    record = copy.deepcopy(SEED)
    for name, values in [
        ("customer_id", _IDS),
        ("last_update", _STAMPS),
        ("opt_out", _OPT_OUTS),
        ("status", st.one_of(st.sampled_from(["ACTIVE", "DEACTIVATED", "MERGED"]), _JSON)),
        ("merged_customer_ids", st.one_of(st.lists(_IDS, max_size=3), _JSON)),
        ("merged_into_customer_id", _IDS),
        ("external_ids", st.one_of(st.fixed_dictionaries({"aiq_contact_id": _IDS}), _JSON)),
        ("first_name", st.one_of(st.text(max_size=10), _JSON)),
        ("notes", st.text(max_size=20)),  # unicode, escapes, surrogates
    ]:
        if draw(st.booleans()):
            record[name] = draw(values)
    if draw(st.booleans()):
        del record[draw(st.sampled_from(sorted(record)))]
    if draw(st.integers(0, 9)) == 0:
        record["loyalty_history"] = _deep(draw(st.sampled_from([10, 125, 126, 127, 200, 600])))
    for _ in range(draw(st.integers(0, 2))):
        record[draw(st.text(max_size=6))] = draw(_JSON)
    return record


def _text(record: dict[str, Any], compact: bool, ascii_only: bool) -> str:
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(record, separators=separators, ensure_ascii=ascii_only)


def _careful(texts: list[str]) -> tuple[Any, ...]:
    """The events of the careful path: each customer decoded, then checked as a record."""
    return Reconciler._events(DISPENSARY, [json.loads(t) for t in texts], "reconcile", 7)


def _compare(texts: list[str]) -> list[Pulled]:
    quick = _pulled(DISPENSARY, texts)
    events, rejected, versions = Reconciler._events(DISPENSARY, quick, "reconcile", 7)
    old_events, old_rejected, old_versions = _careful(texts)
    assert versions == old_versions
    assert rejected == old_rejected
    assert len(events) == len(old_events)
    for new, old in zip(events, old_events, strict=True):
        assert (new.dispensary, new.source, new.event_type, new.customer_id) == (
            old.dispensary,
            old.source,
            old.event_type,
            old.customer_id,
        )
        assert (new.last_update_us, new.status, new.run_id) == (
            old.last_update_us,
            old.status,
            old.run_id,
        )
        assert json.loads(new.body) == json.loads(old.body)
    return quick


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(), min_size=1, max_size=4), st.booleans(), st.booleans())
def test_the_quick_path_gives_what_the_careful_path_gives(
    customers: list[dict[str, Any]], compact: bool, ascii_only: bool
) -> None:
    _compare([_text(c, compact, ascii_only) for c in customers])


def test_a_sound_customer_takes_the_quick_path_and_a_wrong_one_the_careful_path() -> None:
    wrong = copy.deepcopy(SEED) | {"last_update": "yesterday"}
    deep = copy.deepcopy(SEED) | {"loyalty_history": _deep(600)}
    quick = _compare([json.dumps(SEED), json.dumps(wrong), json.dumps(deep)])
    assert [c.body is not None for c in quick] == [True, False, False]
    assert quick[0].body is not None
    assert json.dumps(SEED) in quick[0].body  # as it came
    # the deep field is left out, as it always was
    events, rejected, _ = Reconciler._events(DISPENSARY, quick, "reconcile", 7)
    assert len(rejected) == 1
    assert "loyalty_history" not in json.loads(events[1].body)["data"]


@pytest.mark.parametrize("levels", [100, 123, 124, 125, 126, 127, 128, 129, 140])
def test_a_deep_field_is_left_out_on_either_path(levels: int) -> None:
    record = copy.deepcopy(SEED) | {"loyalty_history": _deep(levels)}
    _compare([json.dumps(record)])


@pytest.mark.parametrize(
    "unread", ['"notes": ' + "1" * 5000, '"notes": ' + "[" * 1500 + "]" * 1500]
)
def test_a_customer_json_cannot_read_is_refused_alone(unread: str) -> None:
    """json refused the whole page before (the run failed); msgspec reads the page, and the
    customer json cannot read is refused as the receiver refuses it, with its text."""
    sound = json.dumps(SEED)
    odd = sound[:-1] + ", " + unread + "}"
    with pytest.raises((ValueError, RecursionError)):
        json.loads(odd)
    page = b'{"resultCode":"SUCCESS","data":[%s,%s]}' % (sound.encode(), odd.encode())
    texts = customer_texts(page)
    if texts is None:  # msgspec refuses it too (its own depth limit): read as before
        return
    assert texts == [sound, odd]
    events, rejected, versions = Reconciler._events(
        DISPENSARY, _pulled(DISPENSARY, texts), "reconcile", 7
    )
    assert [e.customer_id for e in events] == ["3904"]
    assert len(versions) == 1
    assert [r.body for r in rejected] == [odd.encode()]


_PAGES = [
    b'{"resultCode":"SUCCESS","resultReason":null,"resultDetail":null,"data":[%s]}',
    b'{"data":[%s]}',
    b'{"resultCode":null,"data":[%s, 5, "x", [1], null]}',
    b' {"resultCode" : "SUCCESS" , "data" : [ %s ] } ',
    b'{"resultCode":"SUCCESS","data":[%s],"data":[]}',  # the last copy wins
    b'{"resultCode":"SUCCESS","data":[],"data":[%s]}',
    b'{"resultCode":"SUCCESS","data":{"customers":[%s]}}',  # wrapped: the careful path
    b'{"resultCode":"SUCCESS","data":[%s],"extra":NaN}',  # json reads it, msgspec does not
    b'{"resultCode":"SUCCESS","data":[%s],"extra":"\\ud800"}',  # a lone surrogate
    b'\xef\xbb\xbf{"resultCode":"SUCCESS","data":[%s]}',  # a byte-order mark
    b'{"resultCode":"SUCCESS","data":[%s],"extra":"\xff"}',  # not UTF-8
    b'{"resultCode":"SUCCESS","data":null}',
    b'{"resultCode":5,"data":[%s]}',
    b"[%s]",
]


@pytest.mark.parametrize("page", _PAGES)
def test_a_page_is_read_quickly_only_as_json_reads_it(page: bytes) -> None:
    customer = json.dumps(SEED, ensure_ascii=False).encode()
    content = page.replace(b"%s", customer)
    texts = customer_texts(content)
    try:
        data = json.loads(content)
    except ValueError:
        assert texts is None
        return
    if texts is None:
        return  # the careful path reads it, as before
    assert isinstance(data, dict)
    assert data.get("resultCode") in (None, "SUCCESS")
    assert [json.loads(t) for t in texts] == customers_of(data.get("data"))


def test_the_client_falls_back_to_the_careful_reading() -> None:
    """An error answer, or a page read otherwise, goes through the envelope's checks."""
    from connector.config import TreezApiConfig
    from connector.treez_api import TreezApiError, TreezClient

    answers = {
        "quick": b'{"resultCode":"SUCCESS","data":[{"customer_id":"1"}]}',
        "wrapped": b'{"resultCode":"SUCCESS","data":{"x":[{"customer_id":"1"}]}}',
        "fail": b'{"resultCode":"FAIL","resultReason":"NOPE","data":null}',
    }

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("gettokens"):
            return httpx.Response(200, json={"access_token": "t", "expires_in": "7200"})
        return httpx.Response(200, content=answers[request.headers["x-case"]])

    async def scenario() -> None:
        config = TreezApiConfig(
            api_url="http://treez.test/v2.0/dispensary/d", client_id="c", api_key="k"
        )
        for case, expected in [("quick", ['{"customer_id":"1"}']), ("wrapped", None)]:
            client = TreezClient(
                config,
                client=httpx.AsyncClient(
                    transport=httpx.MockTransport(answer), headers={"x-case": case}
                ),
                pace=False,
            )
            from datetime import UTC, datetime

            got = await client.page_texts(datetime(2026, 1, 1, tzinfo=UTC), 1, 50)
            assert got == (expected or [{"customer_id": "1"}])
            assert got == expected or got == await client.page(
                datetime(2026, 1, 1, tzinfo=UTC), 1, 50
            )
            await client.aclose()
        client = TreezClient(
            config,
            client=httpx.AsyncClient(
                transport=httpx.MockTransport(answer), headers={"x-case": "fail"}
            ),
            pace=False,
        )
        from datetime import UTC, datetime

        with pytest.raises(TreezApiError, match="NOPE"):
            await client.page_texts(datetime(2026, 1, 1, tzinfo=UTC), 1, 50)
        await client.aclose()

    asyncio.run(scenario())


# --- _ahead with several pages ahead ------------------------------------------------------


class Source:
    """Items 0..n-1, each fetched until the test lets it go; records which were started."""

    def __init__(self, n: int, *, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.started: list[int] = []
        self.release = [asyncio.Event() for _ in range(n)]
        self.cancelled: list[int] = []
        self.closed = False

    async def items(self) -> AsyncGenerator[int, None]:
        try:
            for i in range(self.n):
                self.started.append(i)
                try:
                    await self.release[i].wait()
                except asyncio.CancelledError:
                    self.cancelled.append(i)
                    raise
                if i == self.fail_at:
                    raise ValueError(f"item {i} failed")
                yield i
        finally:
            self.closed = True


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_several_ahead_never_more() -> None:
    async def scenario() -> list[int]:
        source = Source(8)
        for event in source.release:
            event.set()
        got = []
        async for item in _ahead(source.items(), 3):
            await _settle()
            # while this item is handled, the next three are fetched, and not a fourth
            assert source.started[-1] == min(item + 3, 7)
            got.append(item)
        assert source.closed
        return got

    assert asyncio.run(scenario()) == list(range(8))


def test_several_ahead_a_failure_comes_where_its_item_would() -> None:
    async def scenario() -> list[int]:
        source = Source(6, fail_at=2)
        for event in source.release:
            event.set()
        got: list[int] = []

        async def consume() -> None:
            async for item in _ahead(source.items(), 4):
                await _settle()
                got.append(item)

        with pytest.raises(ValueError, match="item 2 failed"):
            await consume()
        assert source.closed
        return got

    assert asyncio.run(scenario()) == [0, 1]


def test_several_ahead_leaving_early_cancels_the_fetch() -> None:
    async def scenario() -> None:
        source = Source(6)
        source.release[0].set()
        source.release[1].set()  # the third never comes
        items = _ahead(source.items(), 4)
        async for item in items:
            await _settle()
            assert item == 0
            break
        await items.aclose()
        assert source.cancelled == [2]
        assert source.closed

    asyncio.run(scenario())
