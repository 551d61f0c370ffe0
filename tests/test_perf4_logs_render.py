"""The cheaper log line (issue 17, cost at a trickle) writes the same bytes as the chain it
replaced: structlog's own shared processors, the redaction as it was, and the stdlib record
through ProcessorFormatter and JSONRenderer. Generated events, redacted cases included, go
through three paths: the reference chain below (the previous code, kept here verbatim), the
new chain writing its line directly (our handler alone on the root logger), and the new chain
through the stdlib (another handler beside ours)."""

from __future__ import annotations

import enum
import io
import logging
import math
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, time, timedelta
from pathlib import PurePath
from typing import Any
from uuid import UUID

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector import logs
from connector.errors import StoreError
from connector.logs import ALLOWED_KEYS, configure_logging

# --- the reference: connector/logs.py's redaction before issue 17, unchanged ---

_MAX_DEPTH = 6
_LEADING_KEYS = ("event", "level", "timestamp", "logger")
_META_KEYS = frozenset({"_record", "_from_structlog"})


def _cut(text: str) -> str:
    return text if len(text) <= logs.MAX_VALUE_CHARS else text[: logs.MAX_VALUE_CHARS] + "…"


def _plain_key(key: object) -> bool:
    return isinstance(key, str) and key.isascii() and key.isidentifier() and len(key) <= 64


def _clean(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, logs._Traceback):
        return value
    if isinstance(value, str):
        return _cut(value)
    if depth >= _MAX_DEPTH:
        return logs.REDACTED
    if isinstance(value, Mapping):
        return _clean_mapping(value, depth + 1)
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(item, depth + 1) for item in value]
    if isinstance(value, BaseException):
        return _cut(logs._exception_header(value))
    if isinstance(value, enum.Enum):
        return _clean(value.value, depth + 1)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, UUID | PurePath):
        return _cut(str(value))
    return logs.REDACTED


def _clean_mapping(mapping: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    hidden = 0
    for key, value in mapping.items():
        if not _plain_key(key):
            hidden += 1
            out[f"[redacted key {hidden}]"] = logs.REDACTED
        elif key in ALLOWED_KEYS:
            out[key] = _clean(value, depth)
        else:
            out[key] = logs.REDACTED
    return out


def old_redact(_logger: Any, _method_name: str, event_dict: Any) -> Any:
    meta = {key: event_dict[key] for key in _META_KEYS if key in event_dict}
    ordered = {key: event_dict[key] for key in _LEADING_KEYS if key in event_dict}
    ordered.update((k, v) for k, v in event_dict.items() if k not in meta and k not in ordered)
    cleaned = _clean_mapping(ordered, 0)
    cleaned.update(meta)
    return cleaned


OLD_CHAIN: list[Any] = [
    structlog.stdlib.filter_by_level,
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    logs._render_exception,
    old_redact,
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
]

# --- generated events ---


class Colour(enum.Enum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 3


class Opaque:
    def __repr__(self) -> str:
        return "Opaque(secret)"


_KEYS = st.one_of(
    st.sampled_from(sorted(ALLOWED_KEYS - {"event", "level", "timestamp", "logger"})),
    st.sampled_from(["email", "first_name", "body", "row", "x1"]),
)
_NESTED_KEYS = st.one_of(
    _KEYS,
    st.sampled_from(["a@b.example", "with space", "é", "x" * 65, "", "1abc"]),
    st.integers(0, 3),
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.text(min_size=295, max_size=305, alphabet='ab\u00e9\u2603\n"'),
    st.sampled_from(
        [
            Colour.RED,
            Size.BIG,
            UUID(int=7),
            PurePath("/a/b"),
            datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
            date(2026, 1, 2),
            time(1, 2, 3),
            timedelta(seconds=1.5),
            b"secret",
            Opaque(),
            ValueError("secret value"),
            StoreError("no value here"),
            logs._Traceback("Traceback ...\nValueError"),
        ]
    ),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.dictionaries(_NESTED_KEYS, inner, max_size=4),
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
    ),
    max_leaves=12,
)
_EVENTS = st.dictionaries(_KEYS, _VALUES, max_size=6)

_STAMP = re.compile(r'"timestamp": "[0-9T:.\-]+Z"')


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    configure_logging(stream=out)
    ours = [h for h in root.handlers if h not in handlers]
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)
    for handler in ours:
        handler.close()
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def _render(out: io.StringIO, processors: list[Any], event: str, kw: dict[str, Any]) -> str:
    logger = structlog.wrap_logger(
        logging.getLogger("connector.test_perf4"),
        processors=processors,
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
    )
    start = out.tell()
    try:
        raise KeyError("secret key")
    except KeyError:
        logger.info(event, **kw)
    return _STAMP.sub('"timestamp": "T"', out.getvalue()[start:])


class _Unused(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        raise AssertionError("the line went through the stdlib's formatter")


def _three_ways(out: io.StringIO, event: str, kw: dict[str, Any]) -> tuple[str, str, str]:
    root = logging.getLogger()
    ours = next(h for h in root.handlers if h is logs._direct)
    others = [h for h in root.handlers if h is not ours]
    new_chain = list(structlog.get_config()["processors"])
    old = _render(out, OLD_CHAIN, event, kw)
    formatter = ours.formatter
    root.handlers[:] = [ours]
    if not _META_KEYS & kw.keys():  # lines with those go through the stdlib on purpose
        ours.setFormatter(_Unused())  # the direct path writes without it, or writes nothing
    try:
        direct = _render(out, new_chain, event, kw)
    finally:
        root.handlers[:] = [ours, *others]
        ours.setFormatter(formatter)
    beside = logging.NullHandler()
    root.addHandler(beside)
    try:
        through = _render(out, new_chain, event, kw)
    finally:
        root.removeHandler(beside)
    return old, direct, through


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(event=st.text(max_size=10), kw=_EVENTS, bound=st.dictionaries(_KEYS, _SCALARS, max_size=2))
def test_same_bytes_as_the_previous_chain(
    stream: io.StringIO, event: str, kw: dict[str, Any], bound: dict[str, Any]
) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**bound)
    old, direct, through = _three_ways(stream, event, kw)
    assert old.endswith("\n")
    assert old.count("\n") == 1
    assert direct == old
    assert through == old


@pytest.mark.parametrize(
    "kw",
    [
        {"events": 1, "counts": {"upsert": 1}},
        {
            "dispensary": "d",
            "destination": "x",
            "count": 1,
            "counts": {"upsert": 1},
            "requests": 1,
            "duration_ms": 2.5,
        },
        {"email": "a@b", "counts": {"a@b": 1, "upsert": float("nan")}},
        {"exc_info": True},
        {"exc_info": ValueError("secret")},
        {"_from_structlog": 1},
        {"level": "loud", "timestamp": 1, "logger": "other"},
    ],
)
def test_same_bytes_for_the_lines_a_lone_event_writes(
    stream: io.StringIO, kw: dict[str, Any]
) -> None:
    old, direct, through = _three_ways(stream, "planned", kw)
    assert direct == old
    assert through == old


@given(st.integers(0, 253402300799999999))
def test_timestamp_text_is_isoformat_in_utc_with_z(microseconds: int) -> None:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=microseconds)
    expected = moment.isoformat().replace("+00:00", "Z")
    assert logs._Stamper().format(microseconds) == expected
    stamper = logs._Stamper()
    stamper.format(microseconds - microseconds % 1_000_000)  # the second's text cached
    assert stamper.format(microseconds) == expected


def test_warn_and_exception_levels(stream: io.StringIO) -> None:
    logger = structlog.get_logger("connector.test_perf4")
    logger.warning("w")
    try:
        raise ValueError("Jules-" + "Winnfield")
    except ValueError:
        logger.exception("e")
    text = stream.getvalue()
    assert '"level": "warning"' in text
    assert '"level": "error"' in text
    assert "Jules-Winnfield" not in text
