"""Quarantine replay: a refused body judged again by today's rules and configuration.

A body the receiver refused (or the planner refused when it came to plan it) stays in the
quarantine table with its reason. After a fix (a dispensary renamed in the config, a newer
connector that reads a shape it refused), ``connector quarantine replay`` (or the console)
judges each open body again, by the same checks the receiver makes, and moves those that now
pass into the inbox, each once (:meth:`connector.store.abc.Operator.replay_quarantined`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from connector.config import Config
from connector.errors import EventValidationError
from connector.pipeline import REFUSED_WHEN_PLANNED
from connector.planner import instant_us
from connector.store.abc import NewEvent, Quarantined
from connector.treez import OtherEvent, TestPing, check_event_json, parse_stored_event

_PLANNED_SOURCE = re.compile(re.escape(REFUSED_WHEN_PLANNED) + r" \((\w+)\)")
_REPLAYABLE_SOURCES = {"webhook", "reconcile", "resend"}


def _problems(exc: EventValidationError) -> str:
    return "; ".join(str(p) for p in exc.problems)


def judge(config: Config) -> Callable[[Quarantined, bytes], NewEvent | str]:
    """The check a refused body must pass to be replayed: the event to store, or why it is
    still refused (the receiver's checks after authentication, then the planner's parse, so
    that a replayed event is never refused again when planned)."""

    def verdict(row: Quarantined, body: bytes) -> NewEvent | str:
        if row.dispensary not in config.dispensaries:
            return f"dispensary {row.dispensary!r} is not configured"
        if row.status_code == 413:
            return "the body was cut at the size limit when it was refused: it cannot be replayed"
        media = (row.content_type or "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            return f"content type must be application/json, not {media or 'missing'}"
        try:
            text = body.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            return "body: is not JSON (not UTF-8 text)"
        try:
            event = check_event_json(text, source="body")
            parse_stored_event(text, source="body")
        except EventValidationError as exc:
            return _problems(exc)
        named = event.dispensary_short_name
        if named is not None and named != row.dispensary:
            return f"the body names dispensary {named!r}, not {row.dispensary!r}"
        if isinstance(event, TestPing):
            return "a test ping: nothing to replay"
        found = _PLANNED_SOURCE.match(row.reason)
        source = found.group(1) if found else "webhook"
        if source not in _REPLAYABLE_SOURCES:
            source = "webhook"
        if isinstance(event, OtherEvent):
            return NewEvent(row.dispensary, source, event.event_type, None, None, text, "ignored")
        return NewEvent(
            row.dispensary,
            source,
            "CUSTOMER",
            event.customer_id,
            instant_us(event.last_update),
            text,
        )

    return verdict
