"""What every part of ``config.yaml`` builds on, and what a destination type's own settings
build on: the model base, rates, file paths, secrets, the retry and policy sections and the
settings every destination shares (:class:`DestinationConfig`).

A destination type declares its settings in its own module (``connector/destinations/``) as a
subclass of :class:`DestinationConfig` with ``type: Literal["..."]``; :mod:`connector.config`
gathers them into the ``destinations`` list's union. This module imports nothing of the
connector's, so the adapters and the pure core (the planner's policy) can import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# the store keeps names in VARCHAR(128) columns and the delivery lease of a destination as
# "deliver:DISPENSARY/DESTINATION" in a VARCHAR(160) one, which PostgreSQL enforces
NAME_LENGTH = 64
_RATE = re.compile(
    r"^\s*(\d+)\s*/\s*(\d*)\s*(s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hour|hours)\s*$"
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``count`` requests in any window of ``per_seconds``."""

    count: int
    per_seconds: float

    def __str__(self) -> str:
        return f"{self.count}/{self.per_seconds:g}s"


def parse_rates(value: Any) -> Any:
    """``"10/s"``, ``"700/min"``, ``"3000/3s"`` or a list of them, as :class:`Rate` s."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    rates = []
    for item in items:
        match = _RATE.match(item) if isinstance(item, str) else None
        if match is None:
            raise ValueError(
                "must be a rate such as '10/s', '700/min' or '3000/3s', or a list of them"
            )
        count, multiple, unit = int(match[1]), int(match[2] or 1), match[3][0]
        if count < 1 or multiple < 1:
            raise ValueError("a rate needs a count and a window of at least 1")
        rates.append(Rate(count, float(multiple * _UNIT_SECONDS[unit])))
    return tuple(rates)


Rates = Annotated[tuple[Rate, ...], BeforeValidator(parse_rates)]


def resolve_path(value: Any, info: ValidationInfo) -> Path:
    """A file path; a relative one resolves against the config file's folder."""
    if not isinstance(value, str | Path) or not str(value).strip():
        raise ValueError("must be a file path")
    path = Path(str(value)).expanduser()
    base = info.context.get("base_dir") if info.context else None
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


FilePath = Annotated[Path, BeforeValidator(resolve_path)]


def secret_set(value: SecretStr) -> SecretStr:
    """A field validator's body: a secret (an API key, a token) must not be empty."""
    if not value.get_secret_value().strip():
        raise ValueError("must not be empty")
    return value


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyConfig(Model):
    """Switches that change what the connector may tell a destination."""

    resubscribe: Literal["never", "on_source_opt_in"] = "never"


class PolicyOverride(Model):
    resubscribe: Literal["never", "on_source_opt_in"] | None = None


class RetryConfig(Model):
    """When a failed delivery is tried again, and when it goes to the dead-letter queue:
    after at least ``min_attempts`` attempts AND ``min_elapsed_seconds`` since the first."""

    initial_seconds: float = Field(default=1.0, gt=0, le=3600)
    max_seconds: float = Field(default=600.0, gt=0, le=86_400)
    min_attempts: int = Field(default=8, ge=1, le=1000)
    min_elapsed_seconds: float = Field(default=1800.0, ge=0, le=30 * 86_400)


class DestinationConfig(Model):
    """The settings every destination has; a type's module adds its own and its ``type``."""

    type: str
    name: str
    mapping: FilePath
    rate_limit: Rates = ()
    batch_size: int = Field(default=1, ge=1, le=10_000)
    concurrency: int = Field(default=16, ge=1, le=256)
    retry: RetryConfig = RetryConfig()
    policy: PolicyOverride = PolicyOverride()
    enabled: Literal[True] = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(
                "must start with a letter or digit and hold only letters, digits, _ . -"
            )
        if len(value) > NAME_LENGTH:
            raise ValueError(f"must be at most {NAME_LENGTH} characters, not {len(value)}")
        return value

    @field_validator("mapping")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"mapping file {value} does not exist")
        return value
