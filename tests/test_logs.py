"""The log lines: one JSON object each, and no customer value in any of them."""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from connector.errors import ConfigError, Problem
from connector.logs import (
    ALLOWED_KEYS,
    MAX_VALUE_CHARS,
    REDACTED,
    configure_logging,
    get_logger,
    redact,
)

SECRET = "Jules-Winnfield-1948"
PII_KEYS = [
    "first_name",
    "birthday",
    "email",
    "phone",
    "street1",
    "body",
    "payload",
    "token",
    "authorization",
    "headers",
]
_TOUCHED_LOGGERS = ["uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore", "sqlalchemy"]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave the root logger, the touched loggers and structlog as this test found them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name, lg in ((n, logging.getLogger(n)) for n in _TOUCHED_LOGGERS)
    }
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    for name, (lg_handlers, lg_level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = lg_handlers
        lg.setLevel(lg_level)
        lg.propagate = propagate
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


@pytest.fixture
def out() -> io.StringIO:
    stream = io.StringIO()
    configure_logging(stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    parsed = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(obj, dict) for obj in parsed)
    return parsed


def only_line(stream: io.StringIO) -> dict[str, Any]:
    (line,) = lines(stream)
    return line


def _explode() -> None:
    secret = "Jules-Winnfield-1948"
    message = "birthday " + secret + " is not a date"
    raise ValueError(message)


# --- shape ---


def test_one_json_object_per_line_with_event_level_timestamp(out: io.StringIO) -> None:
    log = get_logger("connector.test")
    log.info("delivery.sent", dispensary="partner-a", duration_ms=12)
    log.warning("delivery.retry", attempt=2)

    first, second = lines(out)
    assert first["event"] == "delivery.sent"
    assert first["level"] == "info"
    assert first["logger"] == "connector.test"
    assert second["level"] == "warning"
    assert list(first)[:3] == ["event", "level", "timestamp"]
    stamp = datetime.fromisoformat(first["timestamp"])
    assert first["timestamp"].endswith("Z")
    assert stamp.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


def test_level_filters_and_unknown_level_is_refused() -> None:
    stream = io.StringIO()
    configure_logging(level="warning", stream=stream)
    log = get_logger("connector.test")
    log.info("hidden")
    log.debug("hidden")
    log.error("shown")
    assert [line["event"] for line in lines(stream)] == ["shown"]
    with pytest.raises(ValueError, match="loud"):
        configure_logging(level="loud")


def test_default_stream_is_stdout_at_write_time(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    get_logger("connector.test").info("started", version="0.1.0")
    captured = capsys.readouterr()
    assert json.loads(captured.out)["version"] == "0.1.0"
    assert captured.err == ""


def test_configure_twice_does_not_duplicate_and_retargets() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first)
    configure_logging(stream=second)
    get_logger("connector.test").info("once")
    logging.getLogger("uvicorn.error").warning("once too")
    assert first.getvalue() == ""
    assert [line["event"] for line in lines(second)] == ["once", "once too"]


# --- the allowlist ---


def test_every_allowed_key_keeps_its_value(out: io.StringIO) -> None:
    keys = sorted(ALLOWED_KEYS - {"event", "level", "timestamp", "logger", "exc_info"})
    get_logger("connector.test").info("all", **{key: f"v-{key}" for key in keys})
    line = only_line(out)
    for key in keys:
        assert line[key] == f"v-{key}"


@pytest.mark.parametrize("key", PII_KEYS)
def test_any_other_key_is_redacted(out: io.StringIO, key: str) -> None:
    get_logger("connector.test").info("customer.seen", customer_id="c-1", **{key: SECRET})
    line = only_line(out)
    assert line[key] == REDACTED
    assert line["customer_id"] == "c-1"
    assert SECRET not in out.getvalue()


def test_redacts_whatever_the_value_type(out: io.StringIO) -> None:
    class Customer:
        def __repr__(self) -> str:
            return f"Customer(name={SECRET!r})"

    get_logger("connector.test").info(
        "types",
        payload={"data": {"first_name": SECRET}},
        body=SECRET.encode(),
        phone=[SECRET],
        source=Customer(),
        config=SECRET.encode(),
    )
    line = only_line(out)
    assert line["payload"] == line["body"] == line["phone"] == REDACTED
    assert line["source"] == REDACTED  # allowed key, but an object's repr may hold anything
    assert line["config"] == REDACTED
    assert SECRET not in out.getvalue()


def test_nested_dicts_are_redacted_by_the_same_rule(out: io.StringIO) -> None:
    get_logger("connector.test").info(
        "run.done",
        counts={"delivered": 3, "dead": 1, "first_name": SECRET, f"{SECRET}@example.com": 2},
        config={"store": {"status": "ok", "token": SECRET}},
        events=[{"op": "upsert", "email": SECRET}, "plain", 4],
        customer_ids=["c-1", "c-2"],
    )
    line = only_line(out)
    assert line["counts"] == {
        "delivered": 3,
        "dead": 1,
        "first_name": REDACTED,
        "[redacted key 1]": REDACTED,
    }
    assert line["config"] == {"store": {"status": "ok", "token": REDACTED}}
    assert line["events"] == [{"op": "upsert", "email": REDACTED}, "plain", 4]
    assert line["customer_ids"] == ["c-1", "c-2"]
    assert SECRET not in out.getvalue()


def test_long_strings_are_cut(out: io.StringIO) -> None:
    long = "x" * 1000
    get_logger("connector.test").info(long, reason=long, customer_ids=[long], config={"op": long})
    line = only_line(out)
    cut = "x" * MAX_VALUE_CHARS + "…"
    assert line["event"] == cut
    assert line["reason"] == cut
    assert line["customer_ids"] == [cut]
    assert line["config"] == {"op": cut}
    get_logger("connector.test").info("short", reason="x" * MAX_VALUE_CHARS)
    assert lines(out)[1]["reason"] == "x" * MAX_VALUE_CHARS


def test_scalars_become_json(out: io.StringIO) -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    get_logger("connector.test").info(
        "scalars", next_attempt_at=when, retry_in_s=math.inf, pending=None, dead=True
    )
    line = only_line(out)
    assert line["next_attempt_at"] == "2025-01-02T03:04:05+00:00"
    assert line["retry_in_s"] == "inf"
    assert line["pending"] is None
    assert line["dead"] is True


def test_positional_arguments_are_redacted(out: io.StringIO) -> None:
    get_logger("connector.test").info("customer %s", SECRET)
    line = only_line(out)
    assert line["event"] == "customer %s"
    assert line["positional_args"] == REDACTED


def test_bound_and_context_values_follow_the_same_rule(out: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(request_id="r-1", email=SECRET)
    get_logger("connector.test").bind(dispensary="partner-a", first_name=SECRET).info("bound")
    line = only_line(out)
    assert line["request_id"] == "r-1"
    assert line["dispensary"] == "partner-a"
    assert line["email"] == line["first_name"] == REDACTED


def test_redact_processor_on_its_own() -> None:
    event = {"event": "e", "email": SECRET, "count": 2}
    assert redact(None, "info", event) == {"event": "e", "email": REDACTED, "count": 2}


# --- exceptions ---


def test_exception_has_class_name_and_no_locals_or_message(out: io.StringIO) -> None:
    try:
        _explode()
    except ValueError:
        get_logger("connector.test").exception("delivery.failed", customer_id="c-1")
    line = only_line(out)
    assert line["level"] == "error"
    assert line["error_type"] == "ValueError"
    trace = line["exc_info"]
    assert trace.startswith("Traceback (most recent call last):")
    assert "in _explode" in trace
    assert trace.endswith("\nValueError")
    assert SECRET not in out.getvalue()
    assert "birthday" not in out.getvalue()


def test_chained_exceptions_and_error_values(out: io.StringIO) -> None:
    log = get_logger("connector.test")
    try:
        try:
            _explode()
        except ValueError as exc:
            raise KeyError(SECRET) from exc
    except KeyError as exc:
        log.error("failed", exc_info=exc, error=exc)
    line = only_line(out)
    assert line["error_type"] == "KeyError"
    assert line["error"] == "KeyError"
    assert "direct cause" in line["exc_info"]
    assert "\nValueError\n" in line["exc_info"]
    assert SECRET not in out.getvalue()


def test_connector_errors_keep_their_message(out: io.StringIO) -> None:
    error = ConfigError("config.yaml", [Problem("dispensaries.a.token", "must not be empty")])
    try:
        raise error
    except ConfigError:
        get_logger("connector.test").exception("config.invalid", error=error)
    line = only_line(out)
    assert "dispensaries.a.token: must not be empty" in line["exc_info"]
    assert line["error"].startswith("connector.errors.ConfigError: config.yaml: 1 problem")
    assert line["error_type"] == "connector.errors.ConfigError"


def test_caller_text_under_exc_info_is_not_trusted(out: io.StringIO) -> None:
    get_logger("connector.test").info("odd", exc_info=SECRET)
    line = only_line(out)
    assert "exc_info" not in line  # no exception in flight: nothing to render
    assert SECRET not in out.getvalue()


# --- the stdlib logging module ---


def test_uvicorn_lines_are_json_and_redacted(out: io.StringIO) -> None:
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request from %s", "10.0.0.1")
    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]", 42, extra={"email": SECRET}
    )
    first, second = lines(out)
    assert first["event"] == "Invalid HTTP request from 10.0.0.1"
    assert first["level"] == "warning"
    assert first["logger"] == "uvicorn.error"
    assert "timestamp" in first
    assert second["event"] == "Started server process [42]"
    assert SECRET not in out.getvalue()


def test_uvicorn_exception_has_no_locals(out: io.StringIO) -> None:
    try:
        _explode()
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    line = only_line(out)
    assert line["event"] == "Exception in ASGI application"
    assert line["error_type"] == "ValueError"
    assert line["exc_info"].endswith("\nValueError")
    assert SECRET not in out.getvalue()


def test_uvicorn_access_is_quiet_by_default(out: io.StringIO) -> None:
    access = logging.getLogger("uvicorn.access")
    access.info('%s - "%s %s HTTP/%s" %d', "10.0.0.1", "POST", "/webhooks/treez/a", "1.1", 202)
    access.warning("access warning")
    assert [line["event"] for line in lines(out)] == ["access warning"]


def test_other_libraries_keep_their_template_only(out: io.StringIO) -> None:
    logging.getLogger("sqlalchemy.engine").warning("[generated] %r", (SECRET, "1948-01-01"))
    logging.getLogger("somelib").error("customer %s", SECRET)
    first, second = lines(out)
    assert first["event"] == "[generated] %r"
    assert second["event"] == "customer %s"
    assert SECRET not in out.getvalue()


def test_uvicorn_handlers_are_replaced_by_ours() -> None:
    stray = logging.StreamHandler(io.StringIO())
    logging.getLogger("uvicorn").addHandler(stray)
    logging.getLogger("uvicorn").propagate = False
    stream = io.StringIO()
    configure_logging(stream=stream)
    logging.getLogger("uvicorn").warning("through us")
    assert stray not in logging.getLogger("uvicorn").handlers
    assert only_line(stream)["event"] == "through us"


# --- console mode and unconfigured use ---


def test_console_mode_still_redacts() -> None:
    stream = io.StringIO()
    configure_logging(json=False, stream=stream)
    log = get_logger("connector.test")
    log.info("customer.seen", customer_id="c-1", first_name=SECRET)
    try:
        _explode()
    except ValueError:
        log.exception("delivery.failed")
    logging.getLogger("uvicorn.error").warning("stdlib line", extra={"email": SECRET})
    text = stream.getvalue()
    assert "customer_id=c-1" in text
    assert f"first_name={REDACTED}" in text
    assert "Traceback (most recent call last):" in text
    assert "\x1b[" not in text  # a StringIO is not a terminal: no colours
    assert "stdlib line" in text
    assert SECRET not in text
    assert "birthday" not in text


def test_get_logger_redacts_before_configure_logging(caplog: pytest.LogCaptureFixture) -> None:
    structlog.reset_defaults()
    caplog.set_level(logging.INFO)
    get_logger("connector.unconfigured").info("early", customer_id="c-1", email=SECRET)
    (record,) = [r for r in caplog.records if r.name == "connector.unconfigured"]
    assert record.msg["email"] == REDACTED  # type: ignore[index]
    assert record.msg["customer_id"] == "c-1"  # type: ignore[index]
    assert SECRET not in caplog.text
