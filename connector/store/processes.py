"""Processes, their claims, and named leases (held by one process of the cluster at a time)."""

from __future__ import annotations

import os
import socket
from typing import Any

from sqlalchemy import (
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from connector.store._statements import (
    CLAIM_SECONDS,
    LEASE_SECONDS,
)
from connector.store.dead_letters import DeadLettersSql
from connector.store.schema import (
    INFLIGHT,
    locks,
    outbox,
    processes,
)


class ProcessesSql(DeadLettersSql):
    def register_process(self) -> int:
        """Record this process and release the claims of processes that are gone.

        Gone: a process on this host whose pid no longer runs (released at once), or any
        process whose heartbeat is older than a claim's lifetime. Returns operations released.
        """
        host = socket.gethostname()
        with self.transaction(durable=False) as conn:
            self._sync_clock(conn)
            now = self._now()
            gone = []
            for row in conn.execute(select(processes)):
                stale = row.heartbeat_at < now - CLAIM_SECONDS
                if stale or self._gone_here(row, host):
                    gone.append(row.id)
            released = 0
            if gone:
                result = conn.execute(
                    update(outbox)
                    .where(INFLIGHT, outbox.c.claimed_by.in_(gone))
                    .values(status="pending", claimed_by=None, claimed_until=None)
                )
                released = result.rowcount or 0
                conn.execute(delete(processes).where(processes.c.id.in_(gone)))
                conn.execute(delete(locks).where(locks.c.holder.in_(gone)))
            conn.execute(
                insert(processes).values(
                    id=self.process_id, host=host, pid=os.getpid(), started_at=now, heartbeat_at=now
                )
            )
        return released

    def heartbeat(self) -> None:
        """Keep this process known and renew the claims and leases it holds."""
        with self.transaction(durable=False) as conn:
            self._sync_clock(conn)
            now = self._now()
            conn.execute(
                update(processes).where(processes.c.id == self.process_id).values(heartbeat_at=now)
            )
            conn.execute(
                update(outbox)
                .where(INFLIGHT, outbox.c.claimed_by == self.process_id)
                .values(claimed_until=now + CLAIM_SECONDS)
            )
            # this process's leases (a destination's delivery), while they are still its own
            conn.execute(
                update(locks)
                .where(locks.c.holder == self.process_id, locks.c.expires_at >= now)
                .values(expires_at=now + LEASE_SECONDS)
            )

    def release_claims(self) -> int:
        """Give back this process's in-flight operations and its leases (on shutdown)."""
        with self.transaction(durable=False) as conn:
            result = conn.execute(
                update(outbox)
                .where(INFLIGHT, outbox.c.claimed_by == self.process_id)
                .values(status="pending", claimed_by=None, claimed_until=None)
            )
            conn.execute(delete(processes).where(processes.c.id == self.process_id))
            conn.execute(delete(locks).where(locks.c.holder == self.process_id))
        return result.rowcount or 0

    def acquire(self, name: str, holder: str, ttl: float) -> bool:
        """Take ``name`` for ``holder`` until ``ttl`` seconds from now, unless another holder
        has it and has renewed it in time."""
        now = self._now()
        try:
            with self.transaction(durable=False) as conn:
                taken = conn.execute(
                    update(locks)
                    .where(
                        locks.c.name == name,
                        (locks.c.holder == holder) | (locks.c.expires_at < now),
                    )
                    .values(holder=holder, expires_at=now + ttl)
                ).rowcount
                if taken:
                    return True
                if conn.execute(select(locks.c.name).where(locks.c.name == name)).first():
                    return False
                conn.execute(insert(locks).values(name=name, holder=holder, expires_at=now + ttl))
                return True
        except IntegrityError:  # another process inserted it first
            return False

    def renew(self, name: str, holder: str, ttl: float) -> bool:
        with self.transaction(durable=False) as conn:
            return bool(
                conn.execute(
                    update(locks)
                    .where(locks.c.name == name, locks.c.holder == holder)
                    .values(expires_at=self._now() + ttl)
                ).rowcount
            )

    def release(self, name: str, holder: str) -> None:
        with self.transaction(durable=False) as conn:
            conn.execute(delete(locks).where(locks.c.name == name, locks.c.holder == holder))

    def _gone_here(self, row: Any, host: str) -> bool:
        """Whether a registered process is known to be gone without waiting for its
        heartbeat to age (no such check across hosts: only a dialect for one host has it)."""
        return False
