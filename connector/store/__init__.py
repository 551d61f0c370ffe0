"""Durable state: received events, customer state, the identity map, the outbox.

:mod:`connector.store.abc` names the ports; :func:`open_store` opens the adapter a store URL
asks for (SQLite, the embedded default, or PostgreSQL, the scale-out store). Nothing outside
this package sees a connection or a dialect.
"""

from __future__ import annotations

from connector.store._statements import CLAIM_SECONDS, LEASE_SECONDS
from connector.store.abc import (
    DeadLetter,
    InboxRow,
    NewEvent,
    OutboxRow,
    PlannedBatch,
    Rejected,
    Replayed,
    StateReader,
    Store,
)
from connector.store.asyncstore import AsyncStore
from connector.store.runs import COUNT_KEYS


def open_store(
    url: str, *, timeout: float = 5.0, synchronous: str = "FULL", listen: bool = True
) -> Store:
    """The store at ``url``, its schema brought up to date (see :mod:`.migrate`)."""
    if url.startswith("sqlite"):
        from connector.store.sqlite import SqliteStore

        return SqliteStore(url, synchronous=synchronous, timeout=timeout)
    from connector.store.postgres import PostgresStore

    return PostgresStore(url, timeout=timeout, listen=listen)


def is_store_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the store could not be read or written (a database error, a
    file that is not a database, a server gone): for callers that answer people, who must
    not be shown a traceback, and must not import a database library to tell."""
    from sqlalchemy.exc import SQLAlchemyError

    from connector.errors import StoreError

    return isinstance(exc, StoreError | SQLAlchemyError)


__all__ = [
    "CLAIM_SECONDS",
    "COUNT_KEYS",
    "LEASE_SECONDS",
    "AsyncStore",
    "DeadLetter",
    "InboxRow",
    "NewEvent",
    "OutboxRow",
    "PlannedBatch",
    "Rejected",
    "Replayed",
    "StateReader",
    "Store",
    "is_store_failure",
    "open_store",
]
