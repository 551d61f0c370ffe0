"""The planner: (event, stored state, destinations) → operations. Pure: no I/O, no clock.

Every correctness rule of the design lives here (docs/design.md, "Rules that make it correct"):

- **Order.** ``last_update`` is compared as an instant. Older than what was applied: *stale*,
  nothing applied. Same instant and same content: *duplicate*. Same instant, other content:
  applied and counted as a *tie*.
- **Opt-out is one-way.** ``opt_out: true`` (on first sight or later) plans an ``unsubscribe``
  for every marketing channel, once per destination; the profile is still upserted. A later
  ``false`` subscribes again only under ``policy.resubscribe: on_source_opt_in`` and only when
  the source flips from true to false.
- **Merges.** Either payload of a Treez merge (the survivor listing ``merged_customer_ids``, or
  the absorbed one with ``merged_into_customer_id``), in any order and repeated, plans exactly
  one ``merge`` per destination with a native merge, keyed (destination, absorbed, survivor).
  The absorbed customer then resolves to the survivor and nothing is planned for it again.
- **External ids.** An id Treez carries for a destination (``external_ids.aiq_contact_id``) is
  used to match when the identity map has none, and reported as a conflict when it disagrees.
- **Change detection.** A hash of the mapped contact is kept per destination; the same contact
  is not sent twice. Mapping already leaves nulls and placeholders out.
- **Idempotency.** Each operation carries a stable key derived from (destination, customer,
  operation, ``last_update``, payload hash, and the count of operations planned for that
  contact before it), or (destination, absorbed, survivor) for a merge, so the two payloads
  of one merge yield one key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from connector.config import PolicyConfig
from connector.errors import FieldMappingError
from connector.mapping import Mapping as FieldMapping
from connector.treez import Customer, CustomerStatus

OpKind = Literal["upsert", "unsubscribe", "subscribe", "merge", "deactivate"]
Outcome = Literal["applied", "tie", "stale", "duplicate", "absorbed"]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MARKETING_CHANNELS = ("email", "sms")


@dataclass(frozen=True, slots=True)
class DestinationSpec:
    """What the planner needs to know about one destination."""

    name: str
    mapping: FieldMapping
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    native_merge: bool = True
    channels: tuple[str, ...] = MARKETING_CHANNELS
    external_id_key: str | None = None  # a key of Treez's external_ids naming this contact
    consent_fields: bool = False  # unsubscribe/subscribe carry the mapped contact (e-mail...)


@dataclass(frozen=True, slots=True)
class ContactState:
    """Per (customer, destination): the identity map entry and what was last planned."""

    contact_id: str | None = None
    delivered_hash: str | None = None
    unsubscribed: bool = False
    deactivated: bool = False
    planned: int = 0  # operations planned so far: part of each key, so none is reused


@dataclass(frozen=True, slots=True)
class CustomerState:
    customer_id: str
    last_update_us: int | None = None  # None: never applied
    content_hash: str | None = None
    opt_out: bool | None = None
    merged_into: str | None = None
    merges: frozenset[tuple[str, str]] = frozenset()  # (destination, survivor) planned
    contacts: Mapping[str, ContactState] = field(default_factory=dict)

    def contact(self, destination: str) -> ContactState:
        return self.contacts.get(destination) or ContactState()


@dataclass(frozen=True, slots=True)
class Operation:
    destination: str
    customer_id: str
    order_key: str  # operations with the same key are delivered one at a time, in order
    op: OpKind
    body: dict[str, Any]  # contract 4's body, less the ids resolved at delivery
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class Conflict:
    customer_id: str
    destination: str
    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class MappingFailure:
    destination: str
    message: str


@dataclass(frozen=True, slots=True)
class Plan:
    outcome: Outcome
    states: dict[str, CustomerState]  # changed states, by customer id
    operations: list[Operation]
    conflicts: list[Conflict] = field(default_factory=list)
    failures: list[MappingFailure] = field(default_factory=list)


def instant_us(moment: datetime) -> int:
    """Microseconds since the epoch: orders timestamps with any offset as instants."""
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def content_hash(customer: Customer) -> str:
    """A hash of the customer as parsed, so "true" and true hash alike."""
    return hashlib.sha256(customer.model_dump_json().encode()).hexdigest()


def payload_hash(fields: Mapping[str, Any]) -> str:
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:40]


def merge_key(destination: str, absorbed: str, survivor: str) -> str:
    return _key(destination, "merge", absorbed, survivor)


def plan(
    customer: Customer,
    dispensary: str,
    states: Mapping[str, CustomerState],
    destinations: Sequence[DestinationSpec],
    *,
    resend: bool = False,
    digest: str | None = None,
) -> Plan:
    """Plan what every destination must be told about this version of ``customer``.

    ``states`` holds the stored state of the customer and of the customers its merge fields
    name (absent when never seen). ``resend`` ignores change detection (a changed mapping or a
    new destination). ``digest`` is the customer's :func:`content_hash` when already computed.
    Each operation's key includes how many operations were planned for the contact before
    it: two events with the same ``last_update`` and payload (a tie flipping back: v2, v2',
    v2) plan two operations, while planning one event against one state is repeatable.
    """
    cid = customer.customer_id
    state = states.get(cid) or CustomerState(cid)
    version = instant_us(customer.last_update)
    digest = digest or content_hash(customer)

    if state.last_update_us is not None:
        if version < state.last_update_us:
            return Plan("stale", {}, [])
        if version == state.last_update_us and digest == state.content_hash and not resend:
            return Plan("duplicate", {}, [])
    tie = state.last_update_us == version
    seen = replace(state, last_update_us=version, content_hash=digest)

    survivor = customer.merged_into_customer_id
    if survivor is not None and survivor != cid:
        return _absorbed(dispensary, seen, survivor, destinations)
    if state.merged_into is not None:
        # Treez refuses updates to a merged-away profile: this is a stray; it must not
        # reach the absorbed contact, nor overwrite the survivor.
        return Plan("absorbed", {cid: seen}, [])

    operations: list[Operation] = []
    changed: dict[str, CustomerState] = {}
    for absorbed_id in dict.fromkeys(customer.merged_customer_ids):
        if absorbed_id == cid:
            continue
        absorbed = states.get(absorbed_id) or CustomerState(absorbed_id)
        marked, merges = _merge_ops(dispensary, absorbed, cid, destinations)
        if merges or marked != absorbed:
            changed[absorbed_id] = marked
        operations.extend(merges)

    conflicts: list[Conflict] = []
    failures: list[MappingFailure] = []
    contacts = dict(state.contacts)
    opt_out = customer.opt_out
    deactivated = customer.status == CustomerStatus.DEACTIVATED
    for dest in destinations:
        contact = state.contact(dest.name)
        contact, conflict = _match_external_id(customer, dest, contact)
        if conflict is not None:
            conflicts.append(conflict)
        ops: list[Operation] = []
        if deactivated:
            if not contact.deactivated:
                body = _body("deactivate", dispensary, cid)
                if dest.consent_fields:  # to find the contact again if its id is gone
                    body["fields"] = _consent_fields(customer, dispensary, dest)
                contact = replace(contact, deactivated=True)
                ops.append(_op(dest.name, cid, "deactivate", body, version, "", contact))
                contact = replace(contact, planned=contact.planned + 1)
        else:
            try:
                fields = dest.mapping.apply(customer, dispensary)
            except FieldMappingError as exc:
                failures.append(MappingFailure(dest.name, str(exc)))
                fields = None
            if fields is not None:
                digest_fields = payload_hash(fields)
                if resend or digest_fields != contact.delivered_hash or contact.deactivated:
                    body = {**_body("upsert", dispensary, cid), "fields": fields}
                    ops.append(_op(dest.name, cid, "upsert", body, version, digest_fields, contact))
                    contact = replace(
                        contact,
                        delivered_hash=digest_fields,
                        deactivated=False,
                        planned=contact.planned + 1,
                    )
        if opt_out is True and not contact.unsubscribed:
            body = {**_body("unsubscribe", dispensary, cid), "channels": list(dest.channels)}
            if dest.consent_fields:
                body["fields"] = _consent_fields(customer, dispensary, dest)
            ops.append(_op(dest.name, cid, "unsubscribe", body, version, "all", contact))
            contact = replace(contact, unsubscribed=True, planned=contact.planned + 1)
        elif (
            opt_out is False
            and contact.unsubscribed
            and state.opt_out is True
            and dest.policy.resubscribe == "on_source_opt_in"
        ):
            body = {**_body("subscribe", dispensary, cid), "channels": list(dest.channels)}
            if dest.consent_fields:
                body["fields"] = _consent_fields(customer, dispensary, dest)
            ops.append(_op(dest.name, cid, "subscribe", body, version, "all", contact))
            contact = replace(contact, unsubscribed=False, planned=contact.planned + 1)
        operations.extend(ops)
        contacts[dest.name] = contact

    # A null opt_out (some API reads) says nothing new: keep the last known value.
    known_opt_out = opt_out if opt_out is not None else state.opt_out
    changed[cid] = replace(seen, opt_out=known_opt_out, contacts=contacts)
    return Plan("tie" if tie else "applied", changed, operations, conflicts, failures)


def _absorbed(
    dispensary: str,
    state: CustomerState,
    survivor: str,
    destinations: Sequence[DestinationSpec],
) -> Plan:
    if state.merged_into is not None and state.merged_into != survivor:
        # merged again into someone else: only the first merge counts; record the payload
        return Plan("absorbed", {state.customer_id: state}, [])
    marked, ops = _merge_ops(dispensary, state, survivor, destinations)
    return Plan("applied" if ops else "absorbed", {state.customer_id: marked}, ops)


def _merge_ops(
    dispensary: str,
    absorbed: CustomerState,
    survivor: str,
    destinations: Sequence[DestinationSpec],
) -> tuple[CustomerState, list[Operation]]:
    """One merge per destination with a native merge, never twice for the same pair.

    Without a native merge (Alpine IQ merges personas by itself) nothing is sent: the
    survivor is updated by its own payload and the absorbed contact is left alone. The
    absorbed id resolves to the survivor's contact through ``merged_into``
    (:meth:`~connector.store.Store.resolve_contact_ids`), never by rewriting its own entry:
    an operation of the absorbed customer still queued must not reach the survivor."""
    if absorbed.merged_into is not None and absorbed.merged_into != survivor:
        return absorbed, []
    ops = []
    merges = set(absorbed.merges)
    contacts = dict(absorbed.contacts)
    for dest in destinations:
        if (dest.name, survivor) in merges:
            continue
        merges.add((dest.name, survivor))
        if not dest.native_merge:
            continue
        body = {
            **_body("merge", dispensary, absorbed.customer_id),
            "from_customer_id": absorbed.customer_id,
            "into_customer_id": survivor,
        }
        key = merge_key(dest.name, absorbed.customer_id, survivor)
        ops.append(
            Operation(dest.name, absorbed.customer_id, absorbed.customer_id, "merge", body, key)
        )
    marked = replace(absorbed, merged_into=survivor, merges=frozenset(merges), contacts=contacts)
    return marked, ops


def _match_external_id(
    customer: Customer, dest: DestinationSpec, contact: ContactState
) -> tuple[ContactState, Conflict | None]:
    if dest.external_id_key is None:
        return contact, None
    value = getattr(customer.external_ids, dest.external_id_key, None)
    if value is None and customer.external_ids.model_extra:
        value = customer.external_ids.model_extra.get(dest.external_id_key)
    if value is None:
        return contact, None
    value = str(value)
    if contact.contact_id is None:
        return replace(contact, contact_id=value), None
    if contact.contact_id != value:
        detail = (
            f"Treez external_ids.{dest.external_id_key} names another contact than the "
            "identity map; the map is kept"
        )
        return contact, Conflict(customer.customer_id, dest.name, "external_id_mismatch", detail)
    return contact, None


def _consent_fields(
    customer: Customer, dispensary: str, dest: DestinationSpec
) -> dict[str, Any] | None:
    """The mapped contact, for a destination whose consent calls name it (by e-mail and
    phone); None if it cannot be mapped (the adapter then looks the contact up)."""
    try:
        return dest.mapping.apply(customer, dispensary)
    except FieldMappingError:
        return None


def _body(op: OpKind, dispensary: str, customer_id: str) -> dict[str, Any]:
    return {"op": op, "dispensary": dispensary, "customer_id": customer_id}


def _op(
    destination: str,
    customer_id: str,
    op: OpKind,
    body: dict[str, Any],
    version: int,
    payload_digest: str,
    contact: ContactState,
) -> Operation:
    key = _key(destination, customer_id, op, version, payload_digest, contact.planned)
    return Operation(destination, customer_id, customer_id, op, body, key)
