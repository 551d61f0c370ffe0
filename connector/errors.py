"""The connector's errors, one tree so callers can catch as broadly as they need.

::

    ConnectorError
    ├── ConfigError            config.yaml is wrong; lists every problem with file and key path
    ├── MappingError           a mapping file is wrong; lists every problem with file and field
    ├── FieldMappingError      a value could not be mapped at run time (field and transform named)
    ├── EventValidationError   a webhook body or API record is not a valid Treez event
    │   └── NotJsonError       (in treez.py) the body is not JSON at all
    ├── StoreError             the store cannot be used (schema newer than this version...)
    │   └── StoreUnavailable   the store cannot take a write now (locked, full, down): retry
    └── DeliveryError          a destination refused or failed an operation
        ├── RetriableDelivery  429, 5xx, timeouts, connection errors: try again later
        └── FatalDelivery      other 4xx: dead-letter with the response

Messages never carry a customer's field values or a secret: they name the place (file, key
path, field path) and the problem, which is enough to fix it and safe to log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class ConnectorError(Exception):
    """Base of every error the connector raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input: where it is and what is wrong."""

    where: str
    what: str
    line: int | None = None

    def __post_init__(self) -> None:
        # A place may be built from an input's own names (a JSON key holding a NUL, a line
        # break or a lone surrogate): written out as escapes, so the error stays one line
        # per problem, and a store that takes no NUL in text (PostgreSQL) keeps its reason.
        if not self.where.isprintable():
            object.__setattr__(self, "where", _printable(self.where))

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


class _ProblemsError(ConnectorError):
    """An error about one file or document that may hold several problems."""

    kind = "input"

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        lines = [f"{self.source}: {count} {noun} in the {self.kind}"]
        for problem in self.problems:
            at = f"{self.source}:{problem.line}: " if problem.line else ""
            lines.append(f"  - {at}{problem}")
        return "\n".join(lines)


class ConfigError(_ProblemsError):
    """The configuration file cannot be used as written."""

    kind = "configuration"


class MappingError(_ProblemsError):
    """A mapping file cannot be compiled."""

    kind = "mapping"


class EventValidationError(_ProblemsError):
    """A webhook body or API record is not a Treez event of the expected shape."""

    kind = "event"


class FieldMappingError(ConnectorError):
    """A customer value could not go through a field's transforms.

    Carries the field and the transform, never the value: the value is customer data.
    """

    def __init__(self, field: str, transform: str, reason: str) -> None:
        self.field = field
        self.transform = transform
        self.reason = reason
        super().__init__(f"field {field!r}: transform {transform!r} failed: {reason}")


class StoreError(ConnectorError):
    """The store cannot be used as it is."""


class StoreUnavailable(StoreError):
    """The store cannot take a write right now; the caller should answer 503 and retry.

    ``reason`` is the fault in a few words ("store full", "store read-only", "store locked",
    "store corrupt", "store cannot be opened", "store I/O error", "store unreachable"), for
    ``/readyz`` and the log line; the message adds the driver's first line.
    """

    def __init__(self, message: str, *, reason: str = "store unavailable") -> None:
        super().__init__(message)
        self.reason = reason


class DeliveryError(ConnectorError):
    """A destination did not accept an operation.

    ``status_code`` and ``body`` keep the response (``None`` for a transport failure);
    ``retry_after`` is the delay the destination asked for, in seconds.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        body: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body
        self.retry_after = retry_after


class RetriableDelivery(DeliveryError):
    """Worth another attempt later: 429, 5xx, timeouts, connection errors."""


class FatalDelivery(DeliveryError):
    """Will fail again as it is: goes to the dead-letter queue with the response."""


class QuotaPause(RetriableDelivery):
    """The destination's quota is used up until ``until`` (epoch seconds), for every operation
    of the account, not just the ones sent (a daily cap, a per-window allowance announced
    with its reset time). The worker pauses the whole destination until then and counts no
    attempt: waiting out a quota is not a failure of the operations."""

    def __init__(
        self,
        message: str,
        *,
        until: float,
        status_code: int | None = None,
        body: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, body=body)
        self.until = until


def _printable(text: str) -> str:
    """``text`` with each character that is not printable (controls, separators other than
    the space, lone surrogates) as its ``\\uXXXX`` escape (``\\UXXXXXXXX`` past the BMP)."""
    return "".join(
        c if c.isprintable() else (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        for c in text
    )
