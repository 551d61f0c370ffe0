"""The connector's errors, one tree so callers can catch as broadly as they need.

::

    ConnectorError
    ├── ConfigError            config.yaml is wrong; lists every problem with file and key path
    ├── MappingError           a mapping file is wrong; lists every problem with file and field
    ├── FieldMappingError      a value could not be mapped at run time (field and transform named)
    └── EventValidationError   a webhook body or API record is not a valid Treez event

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
