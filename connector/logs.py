"""Structured logs for the whole connector: one JSON object per line, and nothing a customer owns.

The rule (design.md, "PII"): a log line never holds a field value of a customer. The payloads
the connector moves carry names, birthdays, licences, medical ids and physician data, and log
lines are copied to places (terminals, log shippers, support tickets) that were never meant to
hold them.

The rule is enforced by an **allowlist** of keys, not a denylist of "sensitive" ones. A denylist
has to guess every name a customer value may travel under (``first_name``, ``fname``, ``dob``,
``body``, ``payload``, ``row``, ``data``, a new destination's field next month...) and fails open
on the first guess it misses. An allowlist fails closed: a key nobody has declared safe keeps
its name, so the line still says what was there, but its value becomes ``"[redacted]"``. Adding
a key to :data:`ALLOWED_KEYS` is a reviewed decision that the values logged under it are ids,
counts, durations, outcomes or names of our own things, never customer data.

What else the redaction step does, so that an allowed key cannot smuggle a value either:

- a string is cut to :data:`MAX_VALUE_CHARS` characters (plus ``"…"``);
- a dict is redacted by the same rule, key by key, at any depth; lists keep their scalars;
- a key that is not a plain identifier (in a nested dict, a key may itself be data, such as an
  e-mail address) is replaced by ``"[redacted key N]"``;
- an exception becomes its class name; its message is kept only for
  :class:`~connector.errors.ConnectorError`, whose messages never carry values by design;
- any other object (a model, bytes, a request) becomes ``"[redacted]"``: its ``repr`` may hold
  anything.

``exc_info`` is rendered as a traceback of file, line, function and source line, ending with
the class name. It never holds local variables, and never the message of an exception outside
the :class:`~connector.errors.ConnectorError` tree (a ``ValueError`` or a pydantic error often
quotes the value that failed).

The stdlib ``logging`` module goes through the same processors, so uvicorn's lines are JSON
and redacted too. A stdlib record's message template is code, but its ``%`` arguments are
values: the arguments are kept only for the loggers in :data:`TRUSTED_STDLIB_LOGGERS`, whose
messages have been read (host, port, pid, method and path); any other library's line keeps its
template only. SQLAlchemy, for one, logs statement parameters at INFO.

A structlog line that no handler but ours would see (the running service's case) is written
to our stream straight from the processor chain, with no LogRecord or formatter pass: the same
bytes, at a fraction of the cost. Any other handler or filter on the way (a test runner's, an
error tracker's) sends every line through the stdlib as before.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from enum import Enum
from pathlib import PurePath
from typing import Any, Final, TextIO
from uuid import UUID

import structlog
from structlog.processors import _json_fallback_handler
from structlog.typing import EventDict, Processor, WrappedLogger

from connector.errors import ConnectorError

__all__ = [
    "ALLOWED_KEYS",
    "MAX_VALUE_CHARS",
    "REDACTED",
    "TRUSTED_STDLIB_LOGGERS",
    "configure_logging",
    "get_logger",
    "redact",
]

ALLOWED_KEYS: Final[frozenset[str]] = frozenset(
    {
        # every line
        "event",
        "level",
        "timestamp",
        "logger",
        # who and what
        "dispensary",
        "customer_id",
        "customer_ids",
        "contact_id",
        "destination",
        "op",
        "operation_id",
        "operation_ids",
        "idempotency_key",
        "run_id",
        "request_id",
        "process_id",
        "pid",
        "source",
        "store",
        "config",
        "checkpoint",
        "version",
        # how it went
        "status",
        "status_code",
        "outcome",
        "duration_ms",
        "attempt",
        "attempts",
        "error",
        "error_type",
        "reason",
        "retry_in_s",
        "exit_code",  # a process's exit status (negative: the signal that ended it)
        "retry_after_s",
        "next_attempt_at",
        "exc_info",
        # how many
        "count",
        "counts",
        "batch_size",
        "pending",
        "queue_depth",
        "events",
        "claimed",
        "released",
        "role",
        "delivered",
        "dead",
        "stale",
        "duplicate",
        "ignored",
        "quarantined",
        "applied",
        "tie",
        "absorbed",
        "failed",
        "accepted",
        "rejected",
        "retried",
        "bodies",
        "conflicts",
        "requests",
        # reconciliation (run lines and the keys of a run's counts)
        "trigger",
        "since",
        "pages",
        "pulled",
        "unchanged",
        "created",
        "updated",
        "opted_out",
        "merged",
        "errors",
        "missing_contacts",
        "redriven",
        # operation kinds (keys of a delivered line's counts)
        "upsert",
        "unsubscribe",
        "subscribe",
        "merge",
        "deactivate",
        # HTTP and process
        "path",
        "method",
        "host",
        "port",
        "url_host",
        "signal",
        "grace_s",
    }
)
"""The keys whose values may appear in a log line. Every other key's value is redacted."""

REDACTED: Final = "[redacted]"
"""What a value under a key outside :data:`ALLOWED_KEYS` becomes."""

MAX_VALUE_CHARS: Final = 300
"""Longest string kept whole; longer ones are cut here and end in ``"…"``."""

TRUSTED_STDLIB_LOGGERS: Final[tuple[str, ...]] = ("uvicorn", "apscheduler")
"""Stdlib loggers (and their children) whose ``%`` arguments are kept in the message."""

_QUIET_LOGGERS: Final[tuple[str, ...]] = (
    "uvicorn.access",
    "httpx",
    "httpcore",
    "sqlalchemy",
    "alembic",
    "psycopg",
)
"""Loggers held at warning or above: uvicorn.access is replaced by our own request line;
httpx logs whole URLs (a webhook URL's path or query is often a secret); SQLAlchemy logs
every statement and its parameters at INFO whenever the root logger is at INFO; Alembic
logs "setup plugin" lines at every start."""

_UVICORN_LOGGERS: Final[tuple[str, ...]] = ("uvicorn", "uvicorn.error", "uvicorn.access")
_HANDLER_MARK: Final = "_connector_logs_handler"
_MAX_DEPTH: Final = 6
_MAX_FRAMES: Final = 40
_MAX_CHAIN: Final = 5
_CAUSE: Final = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT: Final = "\nDuring handling of the above exception, another exception occurred:\n\n"
_LEADING_KEYS: Final = ("event", "level", "timestamp", "logger")
_META_KEYS: Final = frozenset({"_record", "_from_structlog"})
"""ProcessorFormatter's own bookkeeping; it overwrites and then removes these keys itself."""


# --- redaction ---


def _cut(text: str) -> str:
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "…"


def _plain_key(key: object) -> bool:
    # Keyword arguments are identifiers; a key that is not one (an e-mail, a phone number,
    # a name with a space) came from data and may itself be the value.
    return isinstance(key, str) and key.isascii() and key.isidentifier() and len(key) <= 64


def _type_name(exc_type: type[BaseException]) -> str:
    module = exc_type.__module__
    if module in ("builtins", "__main__"):
        return exc_type.__qualname__
    return f"{module}.{exc_type.__qualname__}"


def _exception_header(exc: BaseException) -> str:
    """Class name, and the message only where the class promises it holds no values."""
    name = _type_name(type(exc))
    if isinstance(exc, ConnectorError):
        return f"{name}: {exc}"
    if isinstance(exc, BaseExceptionGroup):
        inner = ", ".join(_type_name(type(e)) for e in exc.exceptions)
        return f"{name} ({len(exc.exceptions)} sub-exceptions: {inner})"
    return name


def _clean(value: Any, depth: int) -> Any:
    """The value as it may appear under an allowed key: JSON-native and free of data."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, _Traceback):
        return value  # built by _render_exception from code only; long by nature
    if isinstance(value, str):
        return _cut(value)
    if depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return _clean_mapping(value, depth + 1)
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(item, depth + 1) for item in value]
    if isinstance(value, BaseException):
        return _cut(_exception_header(value))
    if isinstance(value, Enum):
        return _clean(value.value, depth + 1)
    if isinstance(value, datetime | date | time_of_day):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, UUID | PurePath):
        return _cut(str(value))
    return REDACTED


def _clean_mapping(mapping: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    hidden = 0
    for key, value in mapping.items():
        # allowed keys are plain ones, so they skip the plain-key test; the usual values
        # (exact str, int, bool, None, dict) are cleaned here as _clean would
        if type(key) is str and key in ALLOWED_KEYS:
            kind = type(value)
            if kind is str:
                out[key] = value if len(value) <= MAX_VALUE_CHARS else _cut(value)
            elif kind is int or kind is bool or value is None:
                out[key] = value
            elif kind is dict and depth < _MAX_DEPTH:
                out[key] = _clean_mapping(value, depth + 1)
            else:
                out[key] = _clean(value, depth)
        elif not _plain_key(key):
            hidden += 1
            out[f"[redacted key {hidden}]"] = REDACTED
        else:
            out[key] = REDACTED
    return out


def redact(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """Processor: keep values only under :data:`ALLOWED_KEYS`, cleaned; redact all others."""
    # the keys every line has come first, so a line reads the same way whoever wrote it
    ordered = {key: event_dict[key] for key in _LEADING_KEYS if key in event_dict}
    if "_record" in event_dict or "_from_structlog" in event_dict:
        meta = {key: event_dict[key] for key in _META_KEYS if key in event_dict}
        ordered.update((k, v) for k, v in event_dict.items() if k not in meta and k not in ordered)
        cleaned = _clean_mapping(ordered, 0)
        cleaned.update(meta)
        return cleaned
    for key, value in event_dict.items():
        if key not in ordered:
            ordered[key] = value
    return _clean_mapping(ordered, 0)


# --- exceptions ---


class _Traceback(str):
    """A traceback rendered by :func:`_render_exception`: code locations and class names only.

    A type of its own so that :func:`redact` can tell it from a string a caller passed as
    ``exc_info`` (which is cut like any other) and lets it through whole.
    """

    __slots__ = ()


def _exc_from(value: Any) -> BaseException | None:
    if isinstance(value, BaseException):
        return value
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return value[1]
    if value:
        return sys.exc_info()[1]
    return None


def _format_traceback(exc: BaseException) -> str:
    """Like ``traceback.format_exception``, minus messages of foreign exceptions and notes.

    ``format_tb`` never captures locals; it reads source lines from the files, which are code.
    """
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen and len(chain) < _MAX_CHAIN:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    parts: list[str] = []
    for error, link_to_next in reversed(chain):
        if error.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(error.__traceback__, limit=-_MAX_FRAMES))
        parts.append(_exception_header(error) + "\n")
        parts.append(link_to_next)
    return "".join(parts).rstrip("\n")


def _render_exception(
    _logger: WrappedLogger, _method_name: str, event_dict: EventDict
) -> EventDict:
    """Processor: turn ``exc_info`` into a locals-free traceback and set ``error_type``."""
    if "exc_info" not in event_dict:
        return event_dict
    exc = _exc_from(event_dict.pop("exc_info"))
    if exc is not None:
        event_dict["exc_info"] = _Traceback(_format_traceback(exc))
        event_dict.setdefault("error_type", _type_name(type(exc)))
    return event_dict


def _exc_info_for_console(
    _logger: WrappedLogger, _method_name: str, event_dict: EventDict
) -> EventDict:
    # ConsoleRenderer treats any true ``exc_info`` as "render sys.exc_info()", which would
    # print the live exception (message included, locals if Rich is installed). Hand it the
    # rendered text under ``exception``, which it prints as is.
    rendered = event_dict.pop("exc_info", None)
    if rendered is not None:
        event_dict["exception"] = str(rendered)
    return event_dict


# --- stdlib records ---


def _trusted(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in TRUSTED_STDLIB_LOGGERS)


def _foreign_message(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """Processor for stdlib records: keep ``%`` arguments only for trusted loggers."""
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord) and not _trusted(record.name):
        event_dict["event"] = str(record.msg)
    event_dict["event"] = str(event_dict.get("event", "")).rstrip()  # uvicorn ends some in "\n"
    return event_dict


# --- configuration ---


class _StdoutHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stdout`` is at the time of the write, not at set-up.

    Test runners and click's CliRunner swap ``sys.stdout``; a handler holding the original
    would write past them.
    """

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


class _Stamper:
    """``TimeStamper(fmt="iso", utc=True, key="timestamp")`` to the byte (``datetime.now(UTC)``
    reads the same clock in whole nanoseconds and floors them to microseconds), with the
    second's text formatted once per second rather than a datetime made on every line."""

    __slots__ = ("_second",)

    def __init__(self) -> None:
        # one tuple, replaced whole: a thread never pairs one second with another's text
        self._second: tuple[int, str] = (-1, "")

    def now(self) -> str:
        return self.format(time.time_ns() // 1000)

    def format(self, microseconds: int) -> str:
        """The ISO text of a UTC time given in microseconds since the epoch."""
        second, micro = divmod(microseconds, 1_000_000)
        cached = self._second
        if cached[0] != second:
            text = datetime.fromtimestamp(second, UTC).isoformat()[:-6]  # less "+00:00"
            cached = self._second = (second, text)
        if micro:
            return f"{cached[1]}.{micro:06d}Z"
        return cached[1] + "Z"


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _render_exception,
    ]


_LEVELS: Final = {"warn": "warning", "exception": "error"}
"""structlog's add_log_level: the method's name, but for these two."""

_stamper: Final = _Stamper()


def _prepare(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Processor: :func:`_shared_processors` then :func:`redact`, in one call per line."""
    event_dict = structlog.contextvars.merge_contextvars(logger, method_name, event_dict)
    record = event_dict.get("_record")
    event_dict["logger"] = logger.name if record is None else record.name
    event_dict["level"] = _LEVELS.get(method_name, method_name)
    event_dict["timestamp"] = _stamper.now()
    if "exc_info" in event_dict:
        event_dict = _render_exception(logger, method_name, event_dict)
    return redact(logger, method_name, event_dict)


_ENCODER: Final = json.JSONEncoder(default=_json_fallback_handler)
"""What structlog's ``JSONRenderer()`` calls ``json.dumps`` with, made once."""

_encode_c: Final = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        # no circular check: a redacted event is made of new dicts and lists, depth-bound
        None,
        _json_fallback_handler,
        json.encoder.encode_basestring_ascii,
        None,
        _ENCODER.key_separator,
        _ENCODER.item_separator,
        False,
        False,
        True,
    )
    if json.encoder.c_make_encoder is not None  # type: ignore[attr-defined]
    else None
)
"""The C encoder that :meth:`json.JSONEncoder.iterencode` makes on each call, made once."""


def _encode(event_dict: EventDict) -> str:
    """``json.dumps(event_dict, default=...)``, byte for byte."""
    if _encode_c is None:
        return _ENCODER.encode(event_dict)
    return "".join(_encode_c(event_dict, 0))


_direct: logging.Handler | None = None
"""Our JSON handler, set by :func:`configure_logging` (None for console output): a structlog
line that only it would see is written by :func:`_write` straight to its stream."""


def _only_our_handler(logger: logging.Logger, handler: logging.Handler) -> bool:
    """True when the stdlib would hand a record of ``logger`` to ``handler`` alone, through
    no filter: writing the line directly then gives the same bytes to the same stream."""
    if logger.disabled or handler.filters or handler.level != logging.NOTSET:
        return False
    found = False
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return False
        handlers = current.handlers
        if handlers:
            if len(handlers) != 1 or handlers[0] is not handler:
                return False
            found = True
        if not current.propagate:
            break
        current = current.parent
    return found


def _write(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
    """Final processor: write the line itself when only our JSON handler would see it (no
    LogRecord, no caller lookup, no formatter copy); otherwise hand it to the stdlib as
    ``ProcessorFormatter.wrap_for_formatter`` does, and every handler gets it from there."""
    handler = _direct
    if (
        handler is not None
        and isinstance(logger, logging.Logger)
        and "_record" not in event_dict
        and "_from_structlog" not in event_dict
        and _only_our_handler(logger, handler)
    ):
        lock = handler.lock
        if isinstance(handler, logging.StreamHandler) and lock is not None:
            line = _encode(event_dict) + handler.terminator
            written = False
            with lock:  # Handler.handle's lock: lines from threads never interleave
                try:
                    stream = handler.stream
                    stream.write(line)
                    if hasattr(stream, "flush"):
                        stream.flush()
                    written = True
                except Exception:
                    written = False  # the stdlib's path below reports the failure its own way
            if written:
                raise structlog.DropEvent
    return structlog.stdlib.ProcessorFormatter.wrap_for_formatter(logger, method_name, event_dict)


def _configure_structlog() -> None:
    # The chain is the same on every call (level filtering asks the stdlib logger, the
    # renderer lives in the handler), so loggers cached before a reconfiguration stay right.
    # Redaction runs here, before the event dict becomes a LogRecord: any other handler on
    # the root logger (a test runner's, an error tracker's) only ever sees redacted values.
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            _prepare,  # the shared processors and redact, in one call
            _write,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        context_class=dict,
        cache_logger_on_first_use=True,
    )


def _level_number(level: str) -> int:
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None or level.upper() == "NOTSET":
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error, critical")
    return number


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def configure_logging(
    *, level: str = "info", json: bool = True, stream: TextIO | None = None
) -> None:
    """Send structlog and stdlib logging, redacted, to one stream: one JSON line per event.

    Call once at start-up, before uvicorn runs (and run uvicorn with ``log_config=None`` so it
    keeps this set-up). Calling again replaces the previous set-up, so tests may re-target
    ``stream``; handlers installed by others on the root logger are left alone.

    ``stream`` defaults to ``sys.stdout`` as it is at each write. ``json=False`` renders with
    structlog's ConsoleRenderer for terminals: the same redaction, friendlier layout.
    """
    number = _level_number(level)
    _configure_structlog()

    renderer: Processor
    extra: list[Processor] = []
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        extra = [_exc_info_for_console]
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(stream or sys.stdout))

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[_foreign_message, *_shared_processors(), redact],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *extra, renderer],
    )
    handler: logging.Handler = _StdoutHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(number)
    global _direct
    _direct = handler if json else None

    for name in _UVICORN_LOGGERS:
        # uvicorn's own dictConfig gives these handlers and propagate=False; ours go to root.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(number, logging.WARNING))


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A logger for ``name`` (by convention ``__name__``); safe to call at import time.

    Works before :func:`configure_logging` too: the redacting chain is installed on first
    use, so an unconfigured process still never prints a customer value.
    """
    if not structlog.is_configured():
        _configure_structlog()
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
