"""Durable state: received events, customer state, the identity map, the outbox."""

from connector.store.store import (
    CLAIM_SECONDS,
    AsyncStore,
    InboxRow,
    InboxWriter,
    NewEvent,
    OutboxRow,
    Rejected,
    Store,
)

__all__ = [
    "CLAIM_SECONDS",
    "AsyncStore",
    "InboxRow",
    "InboxWriter",
    "NewEvent",
    "OutboxRow",
    "Rejected",
    "Store",
]
