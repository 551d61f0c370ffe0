"""The destination port: what the delivery worker needs from every destination."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from connector.config import Rate


@dataclass(frozen=True, slots=True)
class Delivery:
    """One operation ready to send: the outbox body plus the ids resolved at send time."""

    outbox_id: int
    idempotency_key: str
    body: dict[str, Any]  # contract 4: op, dispensary, customer_id, contact_id, fields...


class Destination(Protocol):
    """A place operations are sent to. ``send`` delivers a batch (of at most
    ``batch_size``) and returns each operation's contact id (or None), in order; it raises
    :class:`~connector.errors.RetriableDelivery` or :class:`~connector.errors.FatalDelivery`
    when the batch as a whole was not accepted."""

    name: str
    kind: str
    batch_size: int
    rate_limit: tuple[Rate, ...]

    async def send(self, deliveries: list[Delivery]) -> list[str | None]: ...

    async def aclose(self) -> None: ...
