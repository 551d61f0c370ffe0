"""The store's ports: what each caller may ask of the durable state, and the records they
exchange. Adapters (:mod:`connector.store.sqlite`, :mod:`connector.store.postgres`) implement
every port; a caller names only the ports it uses, and never a connection or a dialect.

Named by who calls them:

- :class:`Inbox`: the receiver and the reconciliation pull (receive, refuse into quarantine);
- :class:`PlanCommit`: the planner loop (read pending events and the state they need, plan,
  and commit one planned batch as one store operation, re-checked);
- :class:`Outbox`: the delivery workers (claim, finish, next due, backlog, the identity map);
- :class:`Runs`: reconciliation's runs and checkpoints;
- :class:`DeadLetters`: the dead-letter queue and its replay;
- :class:`Processes`: this process's registration, heartbeat, claims and leases;
- :class:`Admin`: status, metrics, readiness and retention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from connector.planner import CustomerState, Operation

# events and operations of one customer a record holds (the newest; the record says so)
STORY_LIMIT = 1000

# --- records --------------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: built for each webhook, where frozen's __init__ costs 4x
class NewEvent:
    dispensary: str
    source: str
    event_type: str
    customer_id: str | None
    last_update_us: int | None
    body: str
    status: str = "pending"
    run_id: int | None = None  # the reconciliation run that pulled it


@dataclass(frozen=True, slots=True)
class Rejected:
    dispensary: str
    status_code: int
    reason: str
    content_type: str | None
    body: bytes


@dataclass(frozen=True, slots=True)
class InboxRow:
    id: int
    dispensary: str
    source: str
    customer_id: str | None
    body: str
    run_id: int | None = None
    received_at: float | None = None  # when it was stored: bounds how far ahead it orders


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    dispensary: str
    destination: str
    customer_id: str
    op: str
    body: dict[str, Any]
    idempotency_key: str
    attempts: int
    first_attempt_at: float | None


@dataclass(slots=True)
class Claimed:
    """What :meth:`Outbox.record_and_claim` claimed, and what sending it needs."""

    rows: list[OutboxRow]
    # the destination's contact id of each claimed operation's customer that has one
    contacts: dict[str, str]
    # for a merge, its survivor's contact (followed through later merges), by survivor
    survivors: dict[str, str]
    # when nothing was claimed and it was asked for: when the next operation falls due
    next_due: float | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    outbox_id: int | None
    dispensary: str
    destination: str
    customer_id: str
    op: str
    attempts: int
    reason: str
    status_code: int | None
    created_at: float
    replayed_at: float | None


@dataclass(frozen=True, slots=True)
class DeadLetterDetail:
    """One dead letter with what it carried: the operation's body (customer values: shown
    only on an explicit reveal) and the destination's answer."""

    letter: DeadLetter
    code: str | None  # the vendor's error code in the answer, when it names one
    response_body: str | None
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A refused body, without the body (:meth:`Operator.quarantined_body` reads it)."""

    id: int
    dispensary: str
    received_at: float
    status_code: int
    reason: str
    content_type: str | None
    size: int | None  # bytes kept (None: purged past retention)
    replayed_at: float | None
    replayed_event_id: int | None


@dataclass(frozen=True, slots=True)
class QuarantineReplay:
    moved: list[tuple[int, int]]  # (quarantine id, inbox event id): now in the inbox
    refused: list[tuple[int, str]]  # (quarantine id, why it still does not pass)
    skipped: int  # already replayed (by another replay meanwhile) or body gone
    missing: list[int] = field(default_factory=list)  # ids asked for that are not open


@dataclass(frozen=True, slots=True)
class ConflictRecord:
    id: int
    dispensary: str
    customer_id: str
    destination: str
    kind: str
    detail: str
    created_at: float
    acked_at: float | None
    acked_by: str | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: float
    who: str
    action: str
    target: str
    detail: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """A failed (or quota-paused) attempt of an operation and the answer it got."""

    at: float
    result: str  # retry | dead | paused
    status_code: int | None
    code: str | None
    error: str


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event of a customer's story, as the inbox holds it."""

    id: int
    source: str
    event_type: str
    received_at: float
    last_update_us: int | None
    status: str
    processed_at: float | None
    run_id: int | None
    decisions: list[tuple[str, str, str]] | None  # None: planned before they were kept
    body: str | None  # None once past retention


@dataclass(frozen=True, slots=True)
class StoredOperation:
    id: int
    destination: str
    op: str
    status: str
    attempts: int
    created_at: float
    first_attempt_at: float | None
    next_attempt_at: float
    done_at: float | None
    last_error: str | None
    idempotency_key: str
    payload: dict[str, Any]
    failures: list[Attempt]


@dataclass(frozen=True, slots=True)
class StoredContact:
    destination: str
    contact_id: str | None
    unsubscribed: bool
    deactivated: bool
    delivered: bool  # a mapped payload is recorded as planned for it
    ops_planned: int


@dataclass(frozen=True, slots=True)
class CustomerRecord:
    """What the store holds of one customer: the material of ``connector explain``."""

    dispensary: str
    customer_id: str
    state: dict[str, Any] | None  # customers row; None when never applied
    contacts: list[StoredContact]
    events: list[StoredEvent]
    operations: list[StoredOperation]
    dead_letters: list[DeadLetter]
    conflicts: list[ConflictRecord]
    absorbed: list[str]  # customers merged into this one
    quarantined: list[Quarantined]  # refused bodies that name this customer
    # the newest events and operations only: older ones were left out (a very long history)
    events_cut: bool = False
    operations_cut: bool = False


@dataclass(frozen=True, slots=True)
class DestinationOverview:
    dispensary: str
    destination: str
    pending: int
    inflight: int
    oldest_pending_at: float | None
    delivered_last_hour: int
    dead: int
    open_conflicts: int
    paused_until: float | None


@dataclass(frozen=True, slots=True)
class Replayed:
    replayed: int  # back in the outbox, pending
    superseded: int  # a later operation of the same kind for that contact exists: not resent
    unreplayable: int  # no operation to resend (a mapping failure): fix the mapping, --resend


@dataclass(frozen=True, slots=True)
class Lease:
    """A named lease (``deliver:DISPENSARY/DESTINATION``: who delivers for it)."""

    name: str
    holder: str  # a registered process's id
    expires_at: float  # renewed by the holder's heartbeat; past it, anyone may take it


@dataclass(frozen=True, slots=True)
class Pause:
    """A destination waiting for its quota to reset: nothing is claimed for it before
    ``until`` (epoch seconds), and the operations that met the quota count no attempt."""

    dispensary: str
    destination: str
    until: float
    reason: str
    status_code: int | None
    since: float


@dataclass(frozen=True, slots=True)
class RegisteredProcess:
    """A process of the cluster that claims work (``serve``'s pipeline, a ``reconcile``)."""

    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float


@dataclass
class PlannedBatch:
    """What planning a batch of inbox events gave, as the store writes it in one commit.

    ``loaded`` is the state read for each dispensary's ``related`` customers before planning:
    the store re-reads it under its write lock and plans again if it changed meanwhile."""

    rows: list[InboxRow]
    outcomes: dict[int, str]
    related: dict[str, set[str]]
    loaded: dict[str, dict[str, CustomerState]]
    current: dict[str, dict[str, CustomerState]]
    operations: dict[str, list[Operation]]
    conflicts: dict[str, list[tuple[str, str, str, str]]]  # customer, destination, kind, detail
    failures: list[tuple[str, str, str, str]]  # dispensary, destination, customer, message
    planned: dict[int, str] = field(default_factory=dict)  # of reconciliation events
    # by event id, what planning decided per destination (JSON, inbox.decisions)
    decisions: dict[int, str] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)  # refused when planned: quarantine
    # customers whose current version must be planned again (an opt-out seen late)
    refresh: dict[str, set[str]] = field(default_factory=dict)


class StateReader(Protocol):
    """The reads planning needs, within one consistent view of the store."""

    def load_states(
        self, dispensary: str, customer_ids: Iterable[str]
    ) -> dict[str, CustomerState]: ...

    def first_received(
        self, dispensary: str, customer_id: str, last_update_us: int
    ) -> float | None: ...


B = TypeVar("B", bound=PlannedBatch)
Plan = Callable[[list[InboxRow], StateReader], B]

# --- ports ----------------------------------------------------------------------------------


class InboxWriterPort(Protocol):
    """Commits the receiver's batches, from one thread."""

    def add(self, events: Sequence[NewEvent], rejected: Sequence[Rejected] = ()) -> None: ...

    def close(self) -> None: ...


class Inbox(Protocol):
    def add_events(self, events: Sequence[NewEvent], rejected: Sequence[Rejected] = ()) -> None: ...

    def inbox_writer(self) -> InboxWriterPort: ...

    def ping(self) -> None: ...


class PlanCommit(Protocol):
    def plan_batch(self, limit: int, plan: Plan[B]) -> B | None:
        """Plan up to ``limit`` pending events with ``plan`` and commit what it gave; None
        when nothing is pending."""
        ...

    def plan_readonly(self, rows: list[InboxRow], plan: Plan[B]) -> B:
        """``plan`` against the stored state, writing nothing (a dry run)."""
        ...


class Outbox(Protocol):
    def claim(
        self, dispensary: str, destination: str, limit: int, now: float | None = None
    ) -> list[OutboxRow]: ...

    def finish(
        self,
        dispensary: str,
        destination: str,
        done: Sequence[tuple[OutboxRow, str | None]] = (),
        retry: Sequence[tuple[OutboxRow, float, str]] = (),
        dead: Sequence[tuple[OutboxRow, str, int | None, str | None]] = (),
        conflicts: Sequence[tuple[str, str, str]] = (),
        replaced: Mapping[int, str] | None = None,
        paused: Sequence[tuple[OutboxRow, float, str]] = (),
        pause: tuple[float, str, int | None] | None = None,
        answers: Mapping[int, tuple[int | None, str | None]] | None = None,
    ) -> None: ...

    def record_and_claim(
        self,
        dispensary: str,
        destination: str,
        limit: int,
        done: Sequence[tuple[OutboxRow, str | None]] = (),
        retry: Sequence[tuple[OutboxRow, float, str]] = (),
        dead: Sequence[tuple[OutboxRow, str, int | None, str | None]] = (),
        conflicts: Sequence[tuple[str, str, str]] = (),
        replaced: Mapping[int, str] | None = None,
        paused: Sequence[tuple[OutboxRow, float, str]] = (),
        pause: tuple[float, str, int | None] | None = None,
        answers: Mapping[int, tuple[int | None, str | None]] | None = None,
        *,
        due_if_none: bool = False,
    ) -> Claimed:
        """:meth:`finish` then :meth:`claim` (up to ``limit``, none when 0) in one write
        transaction, with the contact ids the claimed operations are sent with; when
        nothing is claimed and ``due_if_none``, :meth:`next_due` too."""
        ...

    def pause_of(self, dispensary: str, destination: str) -> Pause | None:
        """The destination's pause, if it has one that has not ended."""
        ...

    def next_due(self, dispensary: str, destination: str) -> float | None: ...

    def pending_count(self, dispensary: str, destination: str) -> int: ...

    def contact_ids(
        self, dispensary: str, destination: str, customer_ids: Iterable[str]
    ) -> dict[str, str]: ...

    def resolve_contact_ids(
        self, dispensary: str, destination: str, customer_ids: Iterable[str]
    ) -> dict[str, str]: ...

    def contact_claims(
        self,
        dispensary: str,
        destination: str,
        contact_id: str | None,
        conflict_kind: str | None = None,
    ) -> tuple[list[str], list[tuple[str, str]]]: ...

    def merged_away(self, dispensary: str, customer_id: str) -> bool:
        """Whether Treez merged the customer into another (a consent change of its must then
        never make a contact at a destination: no merge would ever absorb it)."""
        ...


class Runs(Protocol):
    def checkpoint(self, dispensary: str) -> int | None: ...

    def set_checkpoint(self, dispensary: str, after_us: int) -> None: ...

    def close_interrupted(self, dispensary: str) -> int: ...

    def start_run(
        self, dispensary: str, trigger: str, options: dict[str, Any], before_us: int | None
    ) -> int: ...

    def add_pulled(
        self,
        dispensary: str,
        events: Sequence[NewEvent],
        rejected: Sequence[Rejected],
        checkpoint_us: int | None,
    ) -> None: ...

    def pending_in_run(self, run_id: int) -> int: ...

    def run_counts(self, run_id: int) -> dict[str, int]: ...

    def finish_run(
        self,
        run_id: int,
        outcome: str,
        counts: dict[str, int],
        after_us: int | None,
        error: str | None = None,
    ) -> None: ...

    def runs(self, dispensary: str | None = None, limit: int = 20) -> list[dict[str, Any]]: ...

    def last_runs(self) -> dict[str, dict[str, Any]]: ...

    def outbox_high_water(self, dispensary: str) -> int: ...

    def open_operations(self, dispensary: str, up_to: int) -> int: ...

    def sample_contacts(
        self, dispensary: str, destination: str, run_id: int, limit: int
    ) -> list[tuple[str, str]]: ...

    def add_conflict(
        self, dispensary: str, customer_id: str, destination: str, kind: str, detail: str
    ) -> None: ...

    def claim_tick(self, job: str, tick_at: float, holder: str) -> bool:
        """Record that ``holder`` runs the scheduled tick ``tick_at`` of ``job``: True for
        the first to ask in the cluster, False for every other (it sends nothing)."""
        ...


class DeadLetters(Protocol):
    def dead_letters(
        self,
        *,
        dispensary: str | None = None,
        destination: str | None = None,
        customer: str | None = None,
        include_replayed: bool = False,
        limit: int = 100,
        op: str | None = None,
        status_code: int | None = None,
        ids: Sequence[int] | None = None,
        code: str | None = None,
    ) -> list[DeadLetter]: ...

    def replay(
        self,
        *,
        dispensary: str | None = None,
        destination: str | None = None,
        customer: str | None = None,
        older_than: float | None = None,
        limit: int | None = None,
        op: str | None = None,
        status_code: int | None = None,
        ids: Sequence[int] | None = None,
        progress: Callable[[int], None] | None = None,
        code: str | None = None,
    ) -> Replayed: ...

    def dead_counts(self) -> dict[tuple[str, str], int]: ...


class Processes(Protocol):
    process_id: str

    def register_process(self) -> int: ...

    def heartbeat(self) -> None: ...

    def release_claims(self) -> int: ...

    def acquire(self, name: str, holder: str, ttl: float) -> bool: ...

    def renew(self, name: str, holder: str, ttl: float) -> bool: ...

    def release(self, name: str, holder: str) -> None: ...


@dataclass
class PurgeCursor:
    """Where a purge is (``purge_step``): for each table walked in id order the
    last id read (``None``: walked to its end), whether the others are done, and what the
    steps committed so far purged (``counts``)."""

    inbox: int | None = 0
    quarantine: int | None = 0
    attempts: int | None = 0
    outbox: bool = True
    ticks: bool = True
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        walked = self.inbox is None and self.quarantine is None and self.attempts is None
        return walked and not self.outbox and not self.ticks


class Admin(Protocol):
    dialect: str  # "sqlite" or "postgresql": for display, never for SQL outside the store

    def ping(self) -> None: ...

    def probe_write(self, *, allocate: bool = False) -> None:
        """Raise StoreUnavailable unless the store takes a write now; writes nothing.
        ``allocate``: also a write that needs new pages (and, on SQLite, room on the disk),
        rolled back: whether a full store has room again."""
        ...

    def queue_stats(self) -> list[dict[str, Any]]: ...

    def pending_work(self) -> int: ...

    def purge(self, *, raw_before: float, delivered_before: float) -> dict[str, int]: ...

    def purge_step(
        self, *, raw_before: float, delivered_before: float, cursor: PurgeCursor, limit: int = ...
    ) -> dict[str, int]: ...

    def conflict_counts(self, since: float = 0.0) -> dict[tuple[str, str], int]: ...

    def latest_operations(self, limit: int) -> list[dict[str, Any]]: ...

    def maintain(self) -> None:
        """Keep the database's own bookkeeping fit for the queries (called every few
        seconds by a running process; cheap when there is nothing to do)."""
        ...

    def leases(self) -> list[Lease]:
        """The named leases on record, expired ones included, by name."""
        ...

    def registered_processes(self) -> list[RegisteredProcess]:
        """The processes registered in the cluster, oldest first."""
        ...

    def pauses(self) -> list[Pause]:
        """The destinations paused now, by dispensary and destination."""
        ...

    def close(self) -> None: ...

    def last_webhook_times(self) -> dict[str, float]:
        """Per dispensary, when (Unix time) its latest webhook event was stored."""
        ...

    def reconcile_times(self) -> dict[str, dict[str, Any]]:
        """Per dispensary with a finished reconciliation run: ``outcome`` and ``ended_at`` of
        the latest, ``succeeded_at`` of the latest success (None when none succeeded)."""
        ...


class Operator(Protocol):
    """What people ask through ``connector explain``, ``quarantine``, ``conflicts`` and the
    console: read the whole cluster's store, and act on it (every action audited by the
    caller through :meth:`audit`)."""

    def customer_record(
        self, dispensary: str, customer_id: str, destinations: Iterable[str] = ()
    ) -> CustomerRecord:
        """Everything kept about one customer (``destinations``: configured ones, looked up
        besides those the store names for it)."""
        ...

    def customer_dispensaries(self, customer_id: str) -> list[str]:
        """The dispensaries whose store knows this customer id."""
        ...

    def dead_letter_detail(self, letter_id: int) -> DeadLetterDetail | None: ...

    def dead_letter_codes(self, letters: Sequence[DeadLetter]) -> dict[int, str | None]:
        """The vendor's error code of each dead letter's stored answer (kept when the letter
        was written; ``code`` filters :meth:`dead_letters` and :meth:`replay` by it)."""
        ...

    def quarantined(
        self,
        *,
        dispensary: str | None = None,
        include_replayed: bool = False,
        ids: Sequence[int] | None = None,
        limit: int = 100,
    ) -> list[Quarantined]: ...

    def quarantined_body(self, quarantine_id: int) -> bytes | None: ...

    def replay_quarantined(
        self,
        judge: Callable[[Quarantined, bytes], NewEvent | str],
        *,
        dispensary: str | None = None,
        ids: Sequence[int] | None = None,
        who: str | None = None,
    ) -> QuarantineReplay:
        """Judge each open refused body again (``judge``: the event to store, or why it is
        still refused) and move those that pass into the inbox, each once (with ``who``,
        each move audited in its own transaction)."""
        ...

    def conflict_records(
        self,
        *,
        dispensary: str | None = None,
        destination: str | None = None,
        kind: str | None = None,
        customer: str | None = None,
        include_acked: bool = False,
        ids: Sequence[int] | None = None,
        limit: int = 100,
    ) -> list[ConflictRecord]: ...

    def ack_conflicts(self, ids: Sequence[int], by: str) -> int:
        """Acknowledge open conflicts, audited as ``by`` in the same transaction; the number
        acknowledged now (not before)."""
        ...

    def audit(self, who: str, action: str, target: str, detail: str = "") -> None: ...

    def audit_log(self, limit: int = 100) -> list[AuditEntry]: ...

    def overview(self, destinations: Iterable[tuple[str, str]] = ()) -> list[DestinationOverview]:
        """Per dispensary and destination (those the store names, and ``destinations``, the
        configured ones, even when idle): the queue, what was delivered in the last hour,
        dead letters, open conflicts and any quota pause."""
        ...

    def throughput(self, since: float, bucket_seconds: int) -> list[tuple[float, int]]:
        """Operations delivered since ``since``, counted per bucket (bucket start, count),
        from the delivered operations still kept."""
        ...


class Store(Inbox, PlanCommit, Outbox, Runs, DeadLetters, Processes, Admin, Operator, Protocol):
    """Every port: what :func:`connector.store.open_store` returns."""

    def on_commit(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call ``callback`` (from another thread) with a commit's payload when any process
        of the cluster commits to ``channel`` (``inbox``: events to plan; ``outbox``:
        operations, payload ``dispensary/destination``). A store without cross-process
        notifications never calls it: callers poll as well."""
        ...
