"""One customer's story, from what the store keeps: each event received and what became of
it, what the planner decided for each destination and why, each operation with its attempts
and answers, and where it stands now (``connector explain``, the console's customer page).

Field names, never field values, unless the caller asks for values (``show_values``): a
customer's payload carries names, birthdays, licences and medical ids.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from connector.store.abc import (
    STORY_LIMIT,
    CustomerRecord,
    DeadLetter,
    StoredEvent,
    StoredOperation,
)

# why an event planned nothing for a destination, by the event's outcome
_NOTHING = {
    "applied": "no change: the mapped fields are those already sent",
    "tie": "no change: the mapped fields are those already sent",
    "duplicate": "duplicate: the same last_update and content were applied already",
    "stale": "stale: older than the version applied; nothing of it applied, no opt-out owed",
    "absorbed": "merged away: nothing goes to an absorbed contact but an owed opt-out",
}

_OUTCOMES = {
    "pending": "not planned yet",
    "applied": "applied",
    "tie": "applied (same last_update as the version before, different content)",
    "stale": "stale (older than the version applied)",
    "duplicate": "duplicate (already applied)",
    "absorbed": "absorbed (the customer was merged into another)",
    "ignored": "ignored (not a CUSTOMER event, or a dispensary no longer configured)",
    "failed": "refused when planned (kept in quarantine)",
}

_SOURCES = {
    "webhook": "webhook",
    "reconcile": "reconciliation",
    "resend": "reconciliation --resend",
    "refresh": "current version planned again",
}


def iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _iso_us(micros: int | None) -> str | None:
    if micros is None:
        return None
    return datetime.fromtimestamp(micros / 1e6, UTC).isoformat().replace("+00:00", "Z")


def _rule(op: str, event: StoredEvent) -> str:
    """Why planning ``event`` gave operation ``op``: the rule that fired."""
    if op == "upsert":
        if event.source == "resend":
            return "resend asked: the mapped fields sent whatever was sent before"
        if event.source == "refresh":
            return "consent changed by a late opt-out: the current version sent again"
        if event.status == "absorbed":
            return "opt-out owed by a merged-away customer: sent with its consent fields"
        return "mapped fields differ from the last sent (or never sent)"
    if op == "unsubscribe":
        if event.status in ("stale", "absorbed"):
            return "opt-out owed whatever the version: an opt-out is never lost"
        return "opt-out owed: opt_out is true and the contact is not unsubscribed yet"
    if op == "subscribe":
        return "opted back in, under the resubscribe policy on_source_opt_in"
    if op == "deactivate":
        return "deactivated in Treez: the contact is deactivated, never deleted"
    if op == "merge":
        return "a customer absorbed into this one is merged on the destination"
    return op


@dataclass(frozen=True, slots=True)
class Story:
    record: CustomerRecord
    destinations: list[str]  # configured for the dispensary, then any other the store names

    @property
    def dispensary(self) -> str:
        return self.record.dispensary

    @property
    def customer_id(self) -> str:
        return self.record.customer_id


def build_story(record: CustomerRecord, destinations: Iterable[str] = ()) -> Story:
    names = list(dict.fromkeys(destinations))
    for found in [c.destination for c in record.contacts] + [
        o.destination for o in record.operations
    ]:
        if found not in names:
            names.append(found)
    return Story(record, names)


def _customer_of(body: str | None) -> dict[str, Any] | None:
    if body is None:
        return None
    try:
        found = json.loads(body)
    except ValueError:
        return None
    data = found.get("data") if isinstance(found, dict) else None
    return data if isinstance(data, dict) else None


def _changed(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str] | None:
    """The names of the fields whose values differ between two versions (None when there is
    nothing to compare with): what changed, told without the values."""
    if before is None or after is None:
        return None
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _standing(op: StoredOperation, letters: list[DeadLetter], now: float) -> str:
    """Where an operation stands now, and the dead letters it went through (a dead letter
    replayed puts the operation back with its attempts counted from zero)."""
    tries = f"{op.attempts} attempt{'s' * (op.attempts != 1)}"
    replayed = [d for d in letters if d.replayed_at is not None]
    since = " since the replay" if replayed else ""
    history = "".join(
        f"; dead letter #{d.id} ({iso(d.created_at)}) replayed {iso(d.replayed_at)}"
        for d in replayed
    )
    if op.status == "done":
        return f"delivered {iso(op.done_at)} after {tries}{since}{history}"
    if op.status == "dead":
        open_letter = next((d for d in reversed(letters) if d.replayed_at is None), None)
        where = f" (dead letter #{open_letter.id})" if open_letter is not None else ""
        return f"dead {iso(op.done_at)} after {tries}{since}{where}{history}"
    if op.status == "superseded":
        return f"superseded {iso(op.done_at)} by a newer upsert before it was sent{history}"
    if op.status == "inflight":
        return f"being delivered ({tries}{since} before this one){history}"
    if op.attempts or (op.failures and op.failures[-1].result == "paused"):
        late = "due now" if op.next_attempt_at <= now else f"until {iso(op.next_attempt_at)}"
        return f"retrying, {late} ({tries}{since} so far){history}"
    if replayed:
        return f"pending since the replay {iso(replayed[-1].replayed_at)}{history}"
    return f"pending since {iso(op.created_at)}"


def _values_of(record: CustomerRecord) -> set[str]:
    """The customer's text values the story holds (events' bodies, operations' fields),
    casefolded: what must not be told as an id, a detail or an error without a reveal."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            if len(value.strip()) >= 3:
                found.add(value.strip().casefold())
        elif isinstance(value, dict):
            for inner in value.values():
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    for event in record.events:
        data = _customer_of(event.body)
        if data is not None:
            walk({k: v for k, v in data.items() if k != "customer_id"})
    for op in record.operations:
        walk(op.payload.get("fields"))
    found.discard(record.customer_id.casefold())
    found.discard(record.dispensary.casefold())
    return found


class _Mask:
    """Withholds the customer's values from ids and texts (unless values are shown)."""

    WITHHELD = "[withheld: a customer value]"

    def __init__(self, values: set[str], show: bool) -> None:
        self.values = set() if show else values
        self._pattern = (
            re.compile(
                "|".join(re.escape(v) for v in sorted(self.values, key=len, reverse=True)),
                re.IGNORECASE,
            )
            if self.values
            else None
        )

    def id(self, value: str | None) -> str | None:
        if value is None or not self.values:
            return value
        return self.WITHHELD if value.strip().casefold() in self.values else self.text(value)

    def text(self, value: str | None) -> str | None:
        if value is None or self._pattern is None:
            return value
        return self._pattern.sub(self.WITHHELD, value)


def story_json(story: Story, show_values: bool = False, now: float | None = None) -> dict[str, Any]:
    """The story as data (``explain --json``, the console's customer page)."""
    now = time.time() if now is None else now
    record = story.record
    letters: dict[int, list[DeadLetter]] = {}
    for dead in record.dead_letters:
        if dead.outbox_id is not None:
            letters.setdefault(dead.outbox_id, []).append(dead)
    mask = _Mask(_values_of(record), show_values)
    ops_by_key = {(o.destination, o.idempotency_key): o for o in record.operations}
    contact_of = {c.destination: mask.id(c.contact_id) for c in record.contacts}
    event_of: dict[int, int] = {}
    events = []
    previous: dict[str, Any] | None = None
    for event in record.events:
        data = _customer_of(event.body)
        changed = _changed(previous, data)
        if data is not None:
            previous = data
        decided: dict[str, list[tuple[str, str]]] = {}
        for destination, kind, detail in event.decisions or ():
            decided.setdefault(destination, []).append((kind, detail))
        decisions = []
        if event.decisions is not None and event.status not in ("pending", "ignored", "failed"):
            for destination in story.destinations:
                found = decided.get(destination, [])
                ops = [ops_by_key.get((destination, key)) for kind, key in found]
                items: list[dict[str, Any]] = []
                for (kind, detail), op in zip(found, ops, strict=True):
                    if kind == "failed":
                        rule = "the mapping refused the customer (a dead letter)"
                    elif kind == "conflict":
                        rule = f"identity conflict ({detail}): the identity map is kept"
                    else:
                        rule = f"{kind}: {_rule(kind, event)}"
                        if op is not None:
                            event_of[op.id] = event.id
                        elif kind == "upsert":
                            rule += (
                                " (replaced before it was queued by a newer upsert planned"
                                " with it, or no longer kept)"
                            )
                        else:
                            rule += " (no longer kept: delivered past retention)"
                    items.append({"kind": kind, "rule": rule, "operation": op.id if op else None})
                if not items:
                    rule = _NOTHING.get(event.status, "nothing to send")
                    items.append({"kind": "nothing", "rule": rule, "operation": None})
                decisions.append(
                    {
                        "destination": destination,
                        "rule": "; ".join(item["rule"] for item in items),
                        "operations": [i["operation"] for i in items if i["operation"]],
                        "items": items,
                    }
                )
        entry: dict[str, Any] = {
            "id": event.id,
            "source": event.source,
            "source_text": _SOURCES.get(event.source, event.source),
            "event_type": event.event_type,
            "received_at": iso(event.received_at),
            "last_update": _iso_us(event.last_update_us),
            "run_id": event.run_id,
            "outcome": event.status,
            "outcome_text": (
                "planned again: a late opt-out changed what the contact must say"
                if event.source == "refresh" and event.status in ("applied", "tie")
                else _OUTCOMES.get(event.status, event.status)
            ),
            "fields": sorted(data) if data is not None else None,
            "changed": changed,
            "decisions": decisions,
            "decisions_kept": event.decisions is not None,
        }
        if show_values:
            entry["values"] = data
        events.append(entry)
    operations = []
    sent: dict[str, dict[str, Any]] = {}
    for op in record.operations:
        found_letters = letters.get(op.id, [])
        letter = found_letters[-1] if found_letters else None
        fields = op.payload.get("fields")
        changed = None
        if isinstance(fields, dict) and op.op == "upsert":
            changed = _changed(sent.get(op.destination), fields)
            sent[op.destination] = fields
        entry = {
            "id": op.id,
            "destination": op.destination,
            "op": op.op,
            "status": op.status,
            "standing": _standing(op, found_letters, now),
            "created_at": iso(op.created_at),
            "done_at": iso(op.done_at),
            "attempts": op.attempts,
            "answers": [
                {
                    "at": iso(a.at),
                    "result": a.result,
                    "status_code": a.status_code,
                    "error": mask.text(a.error),
                    "code": mask.id(a.code),
                }
                for a in op.failures
            ],
            "contact_id": contact_of.get(op.destination),
            "fields": sorted(fields) if isinstance(fields, dict) else None,
            "changed": changed,
            "dead_letter": letter.id if letter else None,
            "event": event_of.get(op.id),
            "customer_id": op.payload.get("customer_id"),
        }
        if show_values:
            entry["values"] = fields if isinstance(fields, dict) else None
        operations.append(entry)
    state = record.state
    return {
        "dispensary": record.dispensary,
        "customer_id": record.customer_id,
        "values_shown": show_values,
        "events_cut": record.events_cut,
        "operations_cut": record.operations_cut,
        "state": {
            "known": state is not None,
            "last_update": _iso_us(state["last_update_us"]) if state else None,
            "opt_out": state["opt_out"] if state else None,
            "opt_out_seen": bool(state["opt_out_seen"]) if state else False,
            "merged_into": state["merged_into"] if state else None,
            "absorbed": record.absorbed,
        },
        "contacts": [
            {
                "destination": c.destination,
                "contact_id": mask.id(c.contact_id),
                "unsubscribed": c.unsubscribed,
                "deactivated": c.deactivated,
                "operations_planned": c.ops_planned,
            }
            for c in record.contacts
        ],
        "events": events,
        "operations": operations,
        "dead_letters": [
            {
                "id": d.id,
                "destination": d.destination,
                "op": d.op,
                "reason": mask.text(d.reason),
                "status_code": d.status_code,
                "created_at": iso(d.created_at),
                "replayed_at": iso(d.replayed_at),
                "operation": d.outbox_id,
            }
            for d in record.dead_letters
        ],
        "conflicts": [
            {
                "id": c.id,
                "destination": c.destination,
                "kind": c.kind,
                "detail": mask.text(c.detail),
                "created_at": iso(c.created_at),
                "acked_at": iso(c.acked_at),
                "acked_by": c.acked_by,
            }
            for c in record.conflicts
        ],
        "quarantined": [
            {
                "id": q.id,
                "received_at": iso(q.received_at),
                "status_code": q.status_code,
                "reason": q.reason,
                "replayed_event_id": q.replayed_event_id,
            }
            for q in record.quarantined
        ],
    }


def _wrapped_text(head: str, text: str) -> list[str]:
    indent = " " * (len(head) - len(head.lstrip()) + 2)
    return textwrap.wrap(head + text, width=100, subsequent_indent=indent)


def _wrapped(head: str, names: list[str]) -> list[str]:
    """``head`` and the names, wrapped at 100 columns under the first name."""
    text = ", ".join(names) if names else "none"
    indent = " " * (len(head) - len(head.lstrip()) + 2)
    return textwrap.wrap(head + text, width=100, subsequent_indent=indent, break_on_hyphens=False)


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def story_lines(story: Story, show_values: bool = False, now: float | None = None) -> list[str]:
    """The story as text, oldest first: each event with its decisions per destination and
    the operations they gave, with their attempts and where they stand."""
    data = story_json(story, show_values, now)
    state = data["state"]
    shown = (
        "CUSTOMER VALUES SHOWN (--show-values)"
        if show_values
        else "field names only; --show-values shows values"
    )
    lines = [f"customer {data['customer_id']} of {data['dispensary']} ({shown})"]
    if not state["known"] and not data["events"]:
        lines.append("  nothing is kept about this customer (never received, or purged)")
        return lines
    facts = []
    if state["last_update"]:
        facts.append(f"last_update applied {state['last_update']}")
    if state["opt_out"] is True:
        facts.append("opted out")
    elif state["opt_out"] is False:
        facts.append("not opted out" + (" (an opt-out was seen)" if state["opt_out_seen"] else ""))
    if state["merged_into"]:
        facts.append(f"merged into {state['merged_into']}")
    if state["absorbed"]:
        facts.append("absorbed " + ", ".join(state["absorbed"]))
    lines.append("now: " + ("; ".join(facts) if facts else "not applied yet"))
    for contact in data["contacts"]:
        marks = [m for m in ("unsubscribed", "deactivated") if contact[m]]
        lines.append(
            f"  {contact['destination']}: contact {contact['contact_id'] or '(none yet)'}"
            + (f" ({', '.join(marks)})" if marks else "")
        )
    ops = {o["id"]: o for o in data["operations"]}
    told: set[int] = set()
    if data["events_cut"] or data["operations_cut"]:
        lines.append(
            f"(a long history: only the newest {STORY_LIMIT:,} events and operations are told)"
        )
    for event in data["events"]:
        lines.append("")
        run = f" run {event['run_id']}" if event["run_id"] else ""
        lines.append(
            f"event #{event['id']}, {event['source_text']}{run} {event['received_at']}: "
            f"{event['outcome_text']}"
        )
        lines.append(f"  {event['event_type']}, last_update {event['last_update'] or '?'}")
        if event.get("values") is not None:
            lines.append(f"  values: {_value(event['values'])}")
        elif event["changed"] is not None:
            lines += _wrapped("  changed since the event before: ", event["changed"])
        elif event["fields"] is not None:
            lines += _wrapped("  fields: ", event["fields"])
        else:
            lines.append("  body no longer kept (past retention)")
        if not event["decisions_kept"] and event["outcome"] not in ("pending", "ignored"):
            lines.append("  (planned before decisions were recorded)")
        for decision in event["decisions"]:
            items = decision["items"]
            if len(items) == 1 and items[0]["operation"] is None:
                lines += _wrapped_text(f"  {decision['destination']}: ", items[0]["rule"])
                continue
            lines.append(f"  {decision['destination']}:")
            for item in items:
                lines += _wrapped_text("    ", item["rule"])
                if item["operation"] is not None:
                    told.add(item["operation"])
                    lines += _op_lines(ops[item["operation"]], "      ")
    rest = [o for o in data["operations"] if o["id"] not in told]
    if rest:
        if data["events_cut"]:
            why = "planned by events older than those told here"
        else:
            why = (
                "a merge planned by another customer's event, or planned before decisions "
                "were recorded"
            )
        lines += ["", f"operations not told under an event here ({why}):"]
        for op in rest:
            lines += _op_lines(op, "  ")
    open_letters = [d for d in data["dead_letters"] if d["operation"] is None]
    if open_letters:
        lines += ["", "dead letters without an operation (mapping failures):"]
        lines += [
            f"  #{d['id']} {d['created_at']} {d['destination']}: {d['reason']}"
            + (f", replayed {d['replayed_at']}" if d["replayed_at"] else "")
            for d in open_letters
        ]
    if data["conflicts"]:
        lines += ["", "conflicts:"]
        for c in data["conflicts"]:
            acked = f" (acknowledged {c['acked_at']} by {c['acked_by']})" if c["acked_at"] else ""
            lines += _wrapped_text(
                f"  #{c['id']} {c['created_at']} {c['destination']} {c['kind']}: ",
                c["detail"] + acked,
            )
    if data["quarantined"]:
        lines += ["", "refused bodies naming this customer (quarantine):"]
        for q in data["quarantined"]:
            replayed = q["replayed_event_id"]
            lines += _wrapped_text(
                f"  #{q['id']} {q['received_at']} {q['status_code']}: ",
                q["reason"] + (f" (replayed as event #{replayed})" if replayed else ""),
            )
    return lines


def _op_lines(op: dict[str, Any], indent: str) -> list[str]:
    contact = f", contact {op['contact_id']}" if op["contact_id"] else ""
    other = f" (customer {op['customer_id']})" if op["customer_id"] and op["op"] == "merge" else ""
    lines = [f"{indent}-> op #{op['id']} {op['op']}{other}{contact}: {op['standing']}"]
    if op.get("values") is not None:
        lines.append(f"{indent}   values: {_value(op['values'])}")
    elif op["changed"] is not None:
        lines += _wrapped(f"{indent}   changed since the upsert before: ", op["changed"])
    elif op["fields"]:
        lines += _wrapped(f"{indent}   fields: ", op["fields"])
    for answer in op["answers"]:
        status = f"HTTP {answer['status_code']}" if answer["status_code"] else "no response"
        code = f" {answer['code']}" if answer["code"] else ""
        lines.append(
            f"{indent}   {answer['at']} {answer['result']}: {status}{code}: {answer['error']}"
        )
    return lines
