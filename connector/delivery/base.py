"""The destination port: what the planner and the delivery worker need from every destination.

A destination declares its :class:`Capabilities` (what the planner may ask of it, how it
matches contacts, its default pacing) and sends operations. The worker hands it a batch of
operations of different customers (never two of one customer) and gets back one
:data:`Result` per operation, in order: so an adapter that needs several API calls for one
batch (upserts through one endpoint, unsubscribes through another) can fail some operations
and not the others.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from connector.config_base import DestinationConfig, Rate
from connector.errors import DeliveryError, FatalDelivery
from connector.mapping import Mapping


@dataclass(frozen=True, slots=True)
class Delivery:
    """One operation ready to send: the outbox body plus the ids resolved at send time."""

    outbox_id: int
    idempotency_key: str
    body: dict[str, Any]  # contract 4: op, dispensary, customer_id, contact_id, fields...

    @property
    def op(self) -> str:
        return str(self.body["op"])

    @property
    def customer_id(self) -> str:
        return str(self.body["customer_id"])

    @property
    def contact_id(self) -> str | None:
        value = self.body.get("contact_id")
        return None if value is None else str(value)

    @property
    def fields(self) -> dict[str, Any]:
        value = self.body.get("fields")
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class Sent:
    """An operation the destination accepted: the contact id it names (recorded in the
    identity map), and what the adapter had to work around, reported as a conflict."""

    contact_id: str | None = None
    conflict: str | None = None  # kind: detail, for the conflicts table
    # the contact id the identity map held that the destination said is gone (merged away
    # on its side, deleted): ``contact_id`` then replaces it in the map
    replaces: str | None = None


Result = Sent | DeliveryError
"""The outcome of one operation: accepted, or refused (retriable or not)."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the planner and the worker need to know about a destination."""

    batch_size: int = 1  # operations per send
    native_merge: bool = True  # a merge call exists (else the survivor is just updated)
    channels: tuple[str, ...] = ("email", "sms")  # what an unsubscribe covers
    matches_on: tuple[str, ...] = ()  # how the destination finds an existing contact
    external_id_key: str | None = None  # Treez external_ids key naming this contact
    consent_needs_fields: bool = False  # unsubscribe/subscribe carry the mapped contact
    bulk_size: int | None = None  # profiles per backfill call, when a bulk path exists
    can_lookup: bool = False  # lookup() reads contacts (else it always answers None)
    # a deep backlog may go through backfill(): only where the bulk path answers at once
    # with every contact's id (Alpine IQ), not where it is an asynchronous job (Klaviyo)
    bulk_for_backlog: bool = False
    # a newer upsert of a customer replaces its upsert still waiting right before it in the
    # queue: right for a destination that keeps the customer's state (a vendor profile), where
    # sending a state already past only delays the current one (and, in Braze, creates an
    # opted-out customer subscribed for a moment); not for a feed of every change (http, jsonl)
    coalesce_upserts: bool = False
    default_rate_limit: tuple[Rate, ...] = field(default=())


class Destination(Protocol):
    """A place operations are sent to.

    ``send`` delivers a batch (of at most ``capabilities.batch_size``) and returns one
    :data:`Result` per operation, in order. It may also raise
    :class:`~connector.errors.RetriableDelivery` or :class:`~connector.errors.FatalDelivery`
    for the batch as a whole. ``backfill`` upserts many contacts through the bulk path
    (reconciliation), ``lookup`` reads a contact (None: it does not exist, or the
    destination cannot look contacts up).
    """

    name: str
    kind: str
    capabilities: Capabilities
    rate_limit: tuple[Rate, ...]

    @property
    def batch_size(self) -> int: ...

    async def send(self, deliveries: list[Delivery]) -> list[Result]: ...

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]: ...

    async def lookup(self, contact_id: str) -> dict[str, Any] | None: ...

    async def aclose(self) -> None: ...


C = TypeVar("C", bound=DestinationConfig)


@dataclass(frozen=True, slots=True)
class DestinationType(Generic[C]):
    """What a destination type declares about itself, once, in its own module under
    ``connector/destinations/`` (as the module's ``DESTINATION``): everything else (the
    config file's union of destination blocks, the builders, ``connector check``) derives
    from it."""

    tag: str  # the block's ``type:`` in config.yaml
    config: type[C]  # the block's settings (a DestinationConfig with ``type: Literal[tag]``)
    build: Callable[[C], Destination]  # the adapter; its HTTP client opens on first use
    capabilities: Callable[[C], Capabilities]  # the one place they are built
    where: Callable[[C], str]  # where it sends, for `check`: never a secret nor a URL's path
    summary: str  # one line: what the type is, for `check` and errors
    # what the vendor needs before the first sync (HubSpot's custom properties), as
    # ``connector TAG setup -d D --destination NAME``: ``setup(config, mapping)`` does it,
    # idempotently, and returns one line per thing it made or found already there
    setup: Callable[[C, Mapping], Coroutine[Any, Any, list[str]]] | None = None
    setup_help: str = ""
    # what a mapping must hold for this type to keep its promises (Braze reads the consent
    # view from a mapped field): one message per problem; `check` and `serve` refuse them
    check_mapping: Callable[[C, Mapping], list[str]] | None = None


def unsupported(deliveries: Sequence[Delivery], what: str) -> list[Result]:
    """Each operation refused: the destination cannot do ``what``."""
    return [FatalDelivery(f"{what} is not supported by this destination") for _ in deliveries]


def as_results(contact_ids: Sequence[str | None]) -> list[Result]:
    return [Sent(contact_id) for contact_id in contact_ids]
