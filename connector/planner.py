"""The planner: (event, stored state, destinations) → operations. Pure: no I/O, no clock.

Every correctness rule of the design lives here (docs/design.md, "Rules that make it correct";
README, "Consent and identity"):

- **Order.** ``last_update`` is compared as an instant, never later than the event's receipt
  plus the allowed skew (``not_after_us``). Older than what was applied: *stale*, nothing of
  it applied but its opt-out and the merges it names. Same instant and same content:
  *duplicate*. Same instant, other content: applied and counted as a *tie*.
- **Consent is the connector's.** Under ``resubscribe: never`` an opt-out seen at any version
  (stale, a stray or merge payload of an absorbed customer) is owed: one ``unsubscribe`` per
  customer and destination, keyed by the two alone, to the customer's contact, or once it is
  merged away to the final survivor's and to its own on every destination (the merge may
  never land; where it did, the adapter finds the contact merged away and makes none). The
  mapping reads the customer's consent state (:func:`_consent_view`), so no upsert says opted
  in after an opt-out. A later ``false`` subscribes again only under
  ``policy.resubscribe: on_source_opt_in`` and only when the source flips from true to false.
- **Merges.** Either payload of a Treez merge (the survivor listing ``merged_customer_ids``, or
  the absorbed one with ``merged_into_customer_id``), in any order, repeated or overtaken,
  plans exactly one ``merge`` per destination with a native merge, into the final survivor of
  the chain, keyed (destination, absorbed, that survivor). The absorbed customer then resolves
  to the survivor and nothing but an owed opt-out is planned for it again.
- **External ids.** An id Treez carries for a destination (``external_ids.aiq_contact_id``) is
  used to match when the identity map has none, and reported as a conflict when it disagrees.
- **Change detection.** A hash of the mapped contact is kept per destination; the same contact
  is not sent twice. Mapping already leaves nulls and placeholders out.
- **Idempotency.** Each operation carries a stable key derived from (destination, customer,
  operation, ``last_update``, payload hash, and the count of operations planned for that
  contact before it), (destination, customer) for an unsubscribe under ``never``, or
  (destination, absorbed, survivor) for a merge, so the two payloads of one merge yield one
  key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from connector.config_base import PolicyConfig
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
    coalesce_upserts: bool = False  # a newer upsert replaces one still waiting before it


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
    # some version of this customer, or of a customer merged into it, said opt_out true, at
    # any version: under ``resubscribe: never`` that owes an unsubscribe for good
    opt_out_seen: bool = False

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
    # an upsert that replaces the customer's upsert still waiting right before it in the
    # queue (a destination that keeps state, not a feed of every change: see
    # Capabilities.coalesce_upserts)
    replaces_waiting: bool = False


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


# json.dumps with these arguments, without making an encoder per call
_SORTED_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def payload_hash(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(_SORTED_JSON(fields).encode()).hexdigest()


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
    not_after_us: int | None = None,
    refresh: bool = False,
) -> Plan:
    """Plan what every destination must be told about this version of ``customer``.

    ``states`` holds the stored state of the customer and of the customers its merge fields
    name, with the survivors they were merged into (absent when never seen). ``resend``
    ignores change detection (a changed mapping or a new destination). ``digest`` is the
    customer's :func:`content_hash` when already computed. ``not_after_us`` caps the
    version the event orders at (its receipt time plus the allowed clock skew): an event
    dated in the future cannot make every later one stale. ``refresh``: the customer's
    current version planned again after its consent changed (a stale opt-out): not a
    duplicate, but change detection holds (only a contact that now maps differently is sent).
    Each operation's key includes how many operations were planned for the contact before
    it: two events with the same ``last_update`` and payload (a tie flipping back: v2, v2',
    v2) plan two operations, while planning one event against one state is repeatable.
    """
    cid = customer.customer_id
    state = states.get(cid) or CustomerState(cid)
    version = instant_us(customer.last_update)
    if not_after_us is not None and version > not_after_us:
        version = not_after_us
    digest = digest or content_hash(customer)
    opted_out = customer.opt_out is True

    if state.last_update_us is not None:
        if version < state.last_update_us:
            # stale: nothing of it is applied, but an opt-out is owed whatever its version
            return _late("stale", customer, dispensary, state, states, destinations)
        same = version == state.last_update_us and digest == state.content_hash
        if same and not (resend or refresh):
            return Plan("duplicate", {}, [])
    tie = state.last_update_us == version
    # replace() of the hot path, written out (dataclasses.replace costs several times this)
    seen = CustomerState(
        state.customer_id,
        version,
        digest,
        state.opt_out,
        state.merged_into,
        state.merges,
        state.contacts,
        state.opt_out_seen or opted_out,
    )

    survivor = customer.merged_into_customer_id
    if survivor is not None and survivor != cid:
        return _absorbed(customer, dispensary, seen, survivor, states, destinations)
    if state.merged_into is not None:
        # Treez refuses updates to a merged-away profile: this is a stray; it must not
        # reach the absorbed contact, nor overwrite the survivor; its opt-out is still owed
        if customer.opt_out is not None:  # newer than what was applied: its current word
            seen = replace(seen, opt_out=customer.opt_out)
        return _late("absorbed", customer, dispensary, seen, states, destinations)

    operations: list[Operation] = []
    changed: dict[str, CustomerState] = {}
    if customer.merged_customer_ids:
        view = {**states, cid: seen}
        operations += _merge_listed(dispensary, customer, view, destinations)
        changed.update({k: v for k, v in view.items() if states.get(k) != v and k != cid})
        seen = view[cid]

    conflicts: list[Conflict] = []
    failures: list[MappingFailure] = []
    contacts = dict(seen.contacts)
    opt_out = customer.opt_out
    deactivated = customer.status == CustomerStatus.DEACTIVATED
    for dest in destinations:
        contact = seen.contact(dest.name)
        contact, conflict = _match_external_id(customer, dest, contact)
        if conflict is not None:
            conflicts.append(conflict)
        out = _consent_view(customer, state, seen, dest)
        owed = out.opt_out is True
        ops: list[Operation] = []
        if deactivated:
            if not contact.deactivated:
                body = _body("deactivate", dispensary, cid)
                if dest.consent_fields:  # to find the contact again if its id is gone
                    body["fields"] = _consent_fields(out, dispensary, dest)
                contact = replace(contact, deactivated=True)
                ops.append(_op(dest.name, cid, "deactivate", body, version, "", contact))
                contact = replace(contact, planned=contact.planned + 1)
        else:
            try:
                fields = dest.mapping.apply(out, dispensary)
            except FieldMappingError as exc:
                failures.append(MappingFailure(dest.name, str(exc)))
                fields = None
            except Exception as exc:  # a transform's bug: no upsert, yet consent still goes
                # out (its text may hold the value: only its class is kept)
                why = f"the mapping failed unexpectedly ({exc.__class__.__name__})"
                failures.append(MappingFailure(dest.name, why))
                fields = None
            if fields is not None:
                digest_fields = payload_hash(fields)
                if resend or digest_fields != contact.delivered_hash or contact.deactivated:
                    body = {**_body("upsert", dispensary, cid), "fields": fields}
                    upsert = _op(dest.name, cid, "upsert", body, version, digest_fields, contact)
                    if dest.coalesce_upserts:
                        upsert = replace(upsert, replaces_waiting=True)
                    ops.append(upsert)
                    contact = ContactState(
                        contact.contact_id,
                        digest_fields,
                        contact.unsubscribed,
                        False,
                        contact.planned + 1,
                    )
        if owed and not contact.unsubscribed:
            body = {**_body("unsubscribe", dispensary, cid), "channels": list(dest.channels)}
            if dest.consent_fields:
                body["fields"] = _consent_fields(out, dispensary, dest)
            ops.append(_unsubscribe(dest, cid, body, version, contact))
            contact = replace(contact, unsubscribed=True, planned=contact.planned + 1)
        elif (
            opt_out is False
            and contact.unsubscribed
            and state.opt_out is True
            and dest.policy.resubscribe == "on_source_opt_in"
        ):
            body = {**_body("subscribe", dispensary, cid), "channels": list(dest.channels)}
            if dest.consent_fields:
                body["fields"] = _consent_fields(out, dispensary, dest)
            ops.append(_op(dest.name, cid, "subscribe", body, version, "all", contact))
            contact = replace(contact, unsubscribed=False, planned=contact.planned + 1)
        operations.extend(ops)
        contacts[dest.name] = contact

    # A null opt_out (some API reads) says nothing new: keep the last known value.
    known_opt_out = opt_out if opt_out is not None else state.opt_out
    changed[cid] = CustomerState(
        seen.customer_id,
        seen.last_update_us,
        seen.content_hash,
        known_opt_out,
        seen.merged_into,
        seen.merges,
        contacts,
        seen.opt_out_seen,
    )
    return Plan("tie" if tie else "applied", changed, operations, conflicts, failures)


def _never(dest: DestinationSpec) -> bool:
    return dest.policy.resubscribe != "on_source_opt_in"


def _consent_view(
    customer: Customer, before: CustomerState, seen: CustomerState, dest: DestinationSpec
) -> Customer:
    """The customer as this destination may be told about it: ``opt_out`` is the
    connector's consent state, not the event's alone. Under ``never`` an opt-out seen at any
    version (or carried from a merged customer) stays; a null says nothing new (the last
    known value stands). The mapping reads this, so a field that carries consent in an
    upsert never contradicts an unsubscribe (the planner owns consent, not the mapping)."""
    value = customer.opt_out
    if _never(dest) and seen.opt_out_seen:
        value = True
    elif value is None:
        value = before.opt_out
    if value is customer.opt_out:
        return customer
    return customer.model_copy(update={"opt_out": value})


def final_survivor(states: Mapping[str, CustomerState], customer_id: str) -> str:
    """Where a customer's record is now: itself, or the end of its chain of merges (A into
    B after B into C is A into C), as far as ``states`` knows it."""
    current, visited = customer_id, {customer_id}
    while True:
        state = states.get(current)
        into = state.merged_into if state is not None else None
        if into is None or into in visited:
            return current
        visited.add(into)
        current = into


def _exists(contact: ContactState) -> bool:
    """The contact exists at the destination, or will once what is queued is delivered."""
    return contact.contact_id is not None or contact.delivered_hash is not None


def _owe_to(
    dispensary: str,
    target: CustomerState,
    destinations: Sequence[DestinationSpec],
    version: int,
    *,
    native: bool | None,
    customer: Customer | None = None,
    existing_only: bool = True,
) -> tuple[CustomerState, list[Operation]]:
    """Owe an opt-out to ``target``'s contacts: mark the customer (so its first upsert is
    followed by an unsubscribe, if it has no contact yet) and plan one unsubscribe to each
    existing contact not yet unsubscribed. ``native``: only the destinations with (True) or
    without (False) a native merge; None for all. ``customer``: the payload, when it is
    ``target``'s own (its mapped contact then goes with the unsubscribe). ``existing_only``:
    leave out a contact nothing was planned for yet (its first upsert will be followed by
    the unsubscribe), as for a survivor whose own payload has not arrived."""
    contacts = dict(target.contacts)
    ops: list[Operation] = []
    for dest in destinations:
        if native is not None and dest.native_merge != native:
            continue
        contact = target.contact(dest.name)
        if contact.unsubscribed or (existing_only and not _exists(contact)):
            continue
        body = {
            **_body("unsubscribe", dispensary, target.customer_id),
            "channels": list(dest.channels),
        }
        if dest.consent_fields:
            view = None
            if customer is not None:
                view = customer.model_copy(update={"opt_out": True})
            body["fields"] = _consent_fields(view, dispensary, dest) if view else None
        ops.append(_unsubscribe(dest, target.customer_id, body, version, contact))
        contacts[dest.name] = replace(contact, unsubscribed=True, planned=contact.planned + 1)
    return replace(target, opt_out_seen=True, contacts=contacts), ops


def _late(
    outcome: Outcome,
    customer: Customer,
    dispensary: str,
    state: CustomerState,
    states: Mapping[str, CustomerState],
    destinations: Sequence[DestinationSpec],
) -> Plan:
    """An event that applies nothing of its own (stale, or a stray of a merged-away
    customer): the merges it names and its opt-out still count. A merge is planned once per
    Treez merge whichever payload comes first, whatever that payload's version: a survivor's
    payload overtaken by a newer one (its own merge into a third customer, say) still carries
    the merge of the customers it lists."""
    cid = state.customer_id
    view: dict[str, CustomerState] = {**states, cid: state}
    operations: list[Operation] = []
    survivor = customer.merged_into_customer_id
    if survivor is not None and survivor != cid and state.merged_into is None:
        merged = _merge(dispensary, state, survivor, view, destinations, customer)
        view.update(merged.states)
        operations += merged.operations
    operations += _merge_listed(dispensary, customer, view, destinations)
    owed = _owed_only(outcome, customer, dispensary, view[cid], view, destinations)
    view.update(owed.states)
    operations += owed.operations
    changed = {k: v for k, v in view.items() if states.get(k) != v}
    if outcome == "absorbed":
        changed[cid] = view[cid]  # the stray payload is recorded
    return Plan(outcome, changed, operations)


def _merge_listed(
    dispensary: str,
    customer: Customer,
    view: dict[str, CustomerState],
    destinations: Sequence[DestinationSpec],
) -> list[Operation]:
    """The merges a survivor's payload names (``merged_customer_ids``), planned into
    ``view`` (updated in place: one view however many ids a survivor lists)."""
    cid = customer.customer_id
    operations: list[Operation] = []
    for absorbed_id in dict.fromkeys(customer.merged_customer_ids):
        if absorbed_id == cid:
            continue
        absorbed = view.get(absorbed_id) or CustomerState(absorbed_id)
        merged = _merge(dispensary, absorbed, cid, view, destinations, None)
        view.update(merged.states)
        operations += merged.operations
    return operations


def _owed_only(
    outcome: Outcome,
    customer: Customer,
    dispensary: str,
    state: CustomerState,
    states: Mapping[str, CustomerState],
    destinations: Sequence[DestinationSpec],
) -> Plan:
    """An event that applies nothing (stale, or a stray of a merged-away customer) but whose
    opt-out is owed under ``never``: to the customer's own contact while it is not merged
    away; once it is, to the final survivor's contact and to its own (see :func:`_carry`)."""
    if customer.opt_out is not True:
        return Plan(outcome, {state.customer_id: state} if outcome == "absorbed" else {}, [])
    # a stale opt-out is overtaken where the policy lets a newer opt-in stand; a stray of a
    # merged-away customer (newer than what was applied) is its current word
    never = [d for d in destinations if _never(d) or outcome != "stale"]
    if not never:
        return Plan(outcome, {state.customer_id: state} if outcome == "absorbed" else {}, [])
    version = instant_us(customer.last_update)
    if state.merged_into is None:
        marked, ops = _owe_to(
            dispensary, state, never, version, native=None, customer=customer, existing_only=False
        )
        if marked == state and outcome == "stale":
            return Plan(outcome, {}, [])
        return Plan(outcome, {state.customer_id: marked}, ops)
    return _carry(dispensary, state, states, never, version, outcome)


def _carry(
    dispensary: str,
    absorbed: CustomerState,
    states: Mapping[str, CustomerState],
    destinations: Sequence[DestinationSpec],
    version: int,
    outcome: Outcome,
) -> Plan:
    """An opt-out of a merged-away customer: owed to the final survivor's contact, and to
    the contacts of the absorbed customer and of every customer between it and the final
    survivor, on every destination, whatever became of the merges: a merge that never
    lands (the survivor's profile gone, the call dead) leaves the absorbed contact, with the
    person's e-mail and phone, where it was. Where the merge did land, the adapter finds the
    absorbed contact gone (merged away) and creates nothing."""
    # no mapped contact goes with these: a merged-away customer's payload is not applied
    own, ops = _owe_to(dispensary, absorbed, destinations, version, native=None)
    changed = {absorbed.customer_id: own}
    view = {**states, **changed}
    final = final_survivor(view, absorbed.customer_id)
    link = view[absorbed.customer_id].merged_into
    visited = {absorbed.customer_id}
    while link is not None and link != final and link not in visited:
        visited.add(link)
        between = view.get(link) or CustomerState(link)
        marked, more = _owe_to(dispensary, between, destinations, version, native=None)
        changed[link] = marked
        ops += more
        link = between.merged_into
    if final != absorbed.customer_id:
        target = states.get(final) or CustomerState(final)
        marked, more = _owe_to(dispensary, target, destinations, version, native=None)
        changed[final] = marked
        ops += more
    return Plan(outcome, changed, ops)


def _absorbed(
    customer: Customer,
    dispensary: str,
    state: CustomerState,
    survivor: str,
    states: Mapping[str, CustomerState],
    destinations: Sequence[DestinationSpec],
) -> Plan:
    """The absorbed customer's merge payload: the merge (once), then its opt-out, if any,
    owed where the merged record now is."""
    if customer.opt_out is not None:  # not stale: the customer's current word
        state = replace(state, opt_out=customer.opt_out)
    if state.merged_into is not None and state.merged_into != survivor:
        # merged again into someone else: only the first merge counts; record the payload
        return _owed_only("absorbed", customer, dispensary, state, states, destinations)
    merged = _merge(dispensary, state, survivor, states, destinations, customer)
    merging = any(op.op == "merge" for op in merged.operations)
    outcome: Outcome = "applied" if merging else "absorbed"
    return replace(merged, outcome=outcome)


def _merge(
    dispensary: str,
    absorbed: CustomerState,
    survivor: str,
    states: Mapping[str, CustomerState],
    destinations: Sequence[DestinationSpec],
    customer: Customer | None,
) -> Plan:
    """One merge per destination with a native merge, never twice for the same pair, into
    the final survivor of the chain (never into a contact known to be merged away).

    Without a native merge (Alpine IQ merges personas by itself) nothing is sent: the
    survivor is updated by its own payload and the absorbed contact is left alone. The
    absorbed id resolves to the survivor's contact through ``merged_into``
    (:meth:`~connector.store.Store.resolve_contact_ids`), never by rewriting its own entry:
    an operation of the absorbed customer still queued must not reach the survivor.
    An opt-out of the absorbed customer (seen before, or in this payload) is carried to the
    survivor: the same person opted out in one of their records.
    """
    if absorbed.merged_into is not None and absorbed.merged_into != survivor:
        return Plan("absorbed", {}, [])
    cid = absorbed.customer_id
    final = final_survivor(states, survivor)
    if final == cid:
        # a cycle (A into B after B into A): the first merge stands and this customer is
        # the survivor; an opt-out its payload carried is owed to its own contact
        owing = _owing(absorbed, destinations)
        if not owing:
            return Plan("absorbed", {cid: absorbed}, [])
        version = instant_us(customer.last_update) if customer is not None else 0
        marked, owed = _owe_to(
            dispensary, absorbed, owing, version, native=None, existing_only=False
        )
        return Plan("absorbed", {cid: marked}, owed)
    ops: list[Operation] = []
    merges = set(absorbed.merges)
    for dest in destinations:
        if (dest.name, survivor) in merges or (dest.name, final) in merges:
            continue
        merges.add((dest.name, survivor))
        if not dest.native_merge:
            continue
        body = {
            **_body("merge", dispensary, cid),
            "from_customer_id": cid,
            "into_customer_id": final,
        }
        ops.append(Operation(dest.name, cid, cid, "merge", body, merge_key(dest.name, cid, final)))
    marked = replace(absorbed, merged_into=survivor, merges=frozenset(merges))
    owing = _owing(marked, destinations)
    if not owing:
        return Plan("applied", {cid: marked}, ops)
    version = instant_us(customer.last_update) if customer is not None else 0
    # the absorbed customer's own contact is unsubscribed too, on every destination: before
    # the merge when it is planned now (same order key, so delivered first), else after the
    # merge planned earlier (by the survivor's payload): should the merge never land (the
    # survivor's contact gone), the absorbed contact is not left subscribed
    carried = _carry(dispensary, marked, states, owing, version, "applied")
    own = [op for op in carried.operations if op.customer_id == cid]
    rest = [op for op in carried.operations if op.customer_id != cid]
    return Plan("applied", carried.states, own + ops + rest)


def _owing(state: CustomerState, destinations: Sequence[DestinationSpec]) -> list[DestinationSpec]:
    """The destinations an opt-out of ``state``'s customer is owed to: under ``never``, once
    any version opted out; under ``on_source_opt_in``, while its current word (the stored
    ``opt_out``, which only versions newer than the last applied change) is opted out."""
    return [
        d
        for d in destinations
        if (_never(d) and state.opt_out_seen) or (not _never(d) and state.opt_out is True)
    ]


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
    phone). A field that cannot be mapped (a balance of 12.5 for an ``int``) is left out,
    not the whole contact: an opt-out must still find the person by e-mail and phone."""
    return dest.mapping.apply_partial(customer, dispensary)


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


def _unsubscribe(
    dest: DestinationSpec,
    customer_id: str,
    body: dict[str, Any],
    version: int,
    contact: ContactState,
) -> Operation:
    """Under ``never`` a customer is unsubscribed once per destination, whichever version
    of which record (its own, a stale one, an absorbed customer's) owed it first: the key
    names the customer and the destination only, so it is the same in every order of
    arrival. Under ``on_source_opt_in`` a customer may be unsubscribed again after a
    resubscribe: the key then counts what was planned before, as for other operations."""
    if _never(dest):
        key = _key(dest.name, customer_id, "unsubscribe", "opt-out")
        return Operation(dest.name, customer_id, customer_id, "unsubscribe", body, key)
    return _op(dest.name, customer_id, "unsubscribe", body, version, "all", contact)
