"""One customer's story for the customer page, in the shape of ``connector explain --json``:
field names always, field values only when ``show_values`` (an audited reveal)."""

from __future__ import annotations

import json
import time
from typing import Any

from connector.config import Config
from connector.store.abc import CustomerRecord, StoredEvent, StoredOperation

# the outcome of an inbox event, by its stored status, in the operator's words
OUTCOMES = {
    "pending": "waiting to be planned",
    "applied": "applied",
    "processed": "applied",
    "stale": "stale: older than what was already applied, nothing sent",
    "duplicate": "duplicate: identical to what was applied, nothing sent",
    "ignored": "ignored (not a customer event)",
    "absorbed": "absorbed: merged into another customer",
    "failed": "failed to plan",
}


def _data(body: str | None) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        found = json.loads(body)
    except ValueError:
        return None
    data = found.get("data") if isinstance(found, dict) else None
    return data if isinstance(data, dict) else None


def _event(event: StoredEvent, show_values: bool) -> dict[str, Any]:
    data = _data(event.body)
    fields = sorted(k for k, v in (data or {}).items() if v not in (None, "", [], {}))
    out: dict[str, Any] = {
        "id": event.id,
        "source": event.source,
        "received_at": event.received_at,
        "last_update": event.last_update_us / 1e6 if event.last_update_us else None,
        "outcome": event.status,
        "outcome_text": OUTCOMES.get(event.status, event.status),
        "fields": fields,
        "decisions": [
            {"destination": d, "rule": rule, "operations": [x for x in ops.split(",") if x]}
            for d, rule, ops in (event.decisions or [])
        ],
    }
    if show_values and data is not None:
        out["values"] = {k: data[k] for k in fields}
    return out


def _standing(op: StoredOperation, now: float) -> str:
    if op.status == "pending" and op.next_attempt_at > now and op.attempts:
        return "retrying"
    return {"done": "delivered", "inflight": "in flight"}.get(op.status, op.status)


def _operation(
    op: StoredOperation, dead: dict[int, int], show_values: bool, now: float
) -> dict[str, Any]:
    fields = op.payload.get("fields")
    out: dict[str, Any] = {
        "id": op.id,
        "destination": op.destination,
        "op": op.op,
        "status": op.status,
        "standing": _standing(op, now),
        "next_attempt_at": op.next_attempt_at if op.status == "pending" else None,
        "attempts": op.attempts,
        "answers": [
            {
                "at": a.at,
                "result": a.result,
                "status_code": a.status_code,
                "code": a.code,
                "error": a.error,
            }
            for a in op.failures
        ],
        "contact_id": op.payload.get("contact_id"),
        "fields": sorted(fields) if isinstance(fields, dict) else [],
        "dead_letter": dead.get(op.id),
        "done_at": op.done_at,
    }
    if show_values:
        out["values"] = op.payload
    return out


def customer_story(
    record: CustomerRecord, config: Config, dispensary: str, *, show_values: bool = False
) -> dict[str, Any]:
    """The story of ``record``, oldest first."""
    now = time.time()
    dead = {x.outbox_id: x.id for x in record.dead_letters if x.outbox_id is not None}
    state = None
    if record.state is not None:
        state = {
            "last_update": (record.state.get("last_update_us") or 0) / 1e6 or None,
            "opt_out": record.state.get("opt_out"),
            "merged_into": record.state.get("merged_into"),
            "updated_at": record.state.get("updated_at"),
            "absorbed": record.absorbed,
        }
    return {
        "dispensary": dispensary,
        "customer_id": record.customer_id,
        "values_shown": show_values,
        "state": state,
        "contacts": [
            {
                "destination": c.destination,
                "contact_id": c.contact_id,
                "unsubscribed": c.unsubscribed,
                "deactivated": c.deactivated,
                "delivered": c.delivered,
            }
            for c in record.contacts
        ],
        "events": [_event(e, show_values) for e in record.events],
        "operations": [_operation(op, dead, show_values, now) for op in record.operations],
        "conflicts": [
            {
                "id": c.id,
                "destination": c.destination,
                "kind": c.kind,
                "detail": c.detail,
                "created_at": c.created_at,
                "acked_at": c.acked_at,
            }
            for c in record.conflicts
        ],
        "quarantined": [
            {"id": q.id, "received_at": q.received_at, "reason": q.reason, "size": q.size}
            for q in record.quarantined
        ],
    }
