"""One schema for every database: SQLAlchemy Core tables, portable SQL only.

Times are seconds since the epoch (UTC) as floats; ``last_update`` is kept as integer
microseconds since the epoch so that it orders as an instant. JSON documents are text.
Any change here needs an Alembic revision in ``connector/store/migrations/versions/`` (see
:mod:`connector.store.migrations`; tests/test_migrate.py checks that the two agree).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    literal_column,
    text,
)

metadata = MetaData()

meta = Table(
    "connector_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Every event received (webhook) or pulled (reconcile), before and after planning.
inbox = Table(
    "inbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dispensary", String(128), nullable=False),
    # webhook | reconcile | resend (a reconciliation that ignores change detection)
    Column("source", String(16), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("customer_id", String(128)),
    Column("last_update_us", BigInteger),
    Column("received_at", Float, nullable=False),
    Column("body", Text),  # raw payload; cleared once past the retention period
    # pending | applied | tie | stale | duplicate | absorbed | ignored | failed
    Column("status", String(16), nullable=False),
    Column("processed_at", Float),
    # version 2: the reconciliation run that pulled the event, and what its planning gave
    # ("new " when the customer was unknown, then the operation kinds, "conflict", "merged")
    Column("run_id", Integer),
    Column("planned", String(96)),
    # revision 0004: what planning decided for each destination (JSON: [[destination, kind,
    # detail], ...], kind an operation with its idempotency key as detail, or "failed" or
    # "conflict"): the first half of a customer's story (``connector explain``)
    Column("decisions", Text),
    Index("ix_inbox_pending", "status", "id"),
    Index("ix_inbox_customer", "dispensary", "customer_id"),
    Index("ix_inbox_run", "run_id"),
)

# Bodies that were refused, with the reason: nothing is dropped silently.
quarantine = Table(
    "quarantine",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dispensary", String(128), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("content_type", String(255)),
    Column("body", LargeBinary),
    # revision 0004: moved into the inbox by ``quarantine replay`` (once: never twice)
    Column("replayed_at", Float),
    Column("replayed_event_id", Integer),
)

# What the connector knows of each Treez customer.
customers = Table(
    "customers",
    metadata,
    Column("dispensary", String(128), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("last_update_us", BigInteger),
    Column("content_hash", String(64)),
    Column("opt_out", Boolean),
    Column("merged_into", String(128)),
    Column("merges", Text, nullable=False, default="[]"),  # [[destination, survivor], ...]
    Column("updated_at", Float, nullable=False),
    # an opt-out was seen at some version of this customer or of one merged into it
    Column("opt_out_seen", Boolean, nullable=False, default=False, server_default=false()),
)

# The identity map and per-destination sync state: (dispensary, customer, destination).
contacts = Table(
    "contacts",
    metadata,
    Column("dispensary", String(128), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("destination", String(128), primary_key=True),
    Column("contact_id", String(255)),
    Column("delivered_hash", String(64)),
    Column("unsubscribed", Boolean, nullable=False, default=False),
    Column("deactivated", Boolean, nullable=False, default=False),
    Column("ops_planned", Integer, nullable=False, default=0),
    Column("updated_at", Float, nullable=False),
    # who holds a contact: checked whenever a destination returns one (two customers must
    # never be recorded on one contact)
    Index("ix_contacts_contact", "dispensary", "destination", "contact_id"),
)

# Disagreements between Treez's external ids and the identity map: reported, not overwritten.
conflicts = Table(
    "conflicts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dispensary", String(128), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("destination", String(128), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("detail", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    # revision 0004: acknowledged by an operator (``conflicts ack``, the console)
    Column("acked_at", Float),
    Column("acked_by", String(255)),
    Index("ix_conflicts_customer", "dispensary", "customer_id"),
)

# One row per operation per destination, delivered in id order per (destination, order_key).
outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dispensary", String(128), nullable=False),
    Column("destination", String(128), nullable=False),
    Column("order_key", String(128), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("op", String(16), nullable=False),
    Column("payload", Text, nullable=False),
    Column("idempotency_key", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # pending|inflight|done|dead|superseded
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("first_attempt_at", Float),
    Column("next_attempt_at", Float, nullable=False),
    Column("claimed_by", String(64)),
    Column("claimed_until", Float),
    Column("last_error", Text),
    Column("done_at", Float),
    UniqueConstraint("dispensary", "destination", "idempotency_key", name="uq_outbox_key"),
    # claims walk this in id order and stop at their limit
    Index("ix_outbox_queue", "dispensary", "destination", "status", "id"),
    Index("ix_outbox_order", "dispensary", "destination", "order_key", "id"),
    # version 2: what a dead letter's replay asks (later operations of one contact)
    Index("ix_outbox_contact", "dispensary", "destination", "customer_id", "op", "id"),
    # revision 0006: a process's claims (its heartbeat renews them, its exit gives them
    # back), among the few operations in flight, not every operation kept; the queries
    # name the status as a literal (INFLIGHT), as a partial index needs
    Index(
        "ix_outbox_inflight",
        "claimed_by",
        sqlite_where=text("status = 'inflight'"),
        postgresql_where=text("status = 'inflight'"),
    ),
    # revision 0007: the operations settled (done, superseded, dead) by when, for what the
    # console counts of the last hour and day and what retention purges, among those alone
    # and covering them: without it each read every operation kept. Partial: a queued
    # operation has no done_at, and any comparison of done_at implies the condition
    Index(
        "ix_outbox_settled",
        "done_at",
        "dispensary",
        "destination",
        "status",
        sqlite_where=text("done_at IS NOT NULL"),
        postgresql_where=text("done_at IS NOT NULL"),
    ),
)

# "an operation in flight", with the status as a literal: a partial index
# (ix_outbox_inflight) serves only a query whose own terms imply its condition, and a bound
# parameter does not
INFLIGHT = outbox.c.status == literal_column("'inflight'")

# Operations that will not be retried any more, with the last response.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("outbox_id", Integer),
    Column("dispensary", String(128), nullable=False),
    Column("destination", String(128), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("op", String(16), nullable=False),
    Column("payload", Text, nullable=False),
    Column("idempotency_key", String(64), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("status_code", Integer),
    Column("response_body", Text),
    Column("created_at", Float, nullable=False),
    Column("replayed_at", Float),
    Column("code", String(64)),  # the vendor's error code in the answer, if it names one
    Index("ix_dead_letters_open", "dispensary", "destination", "replayed_at"),
    Index("ix_dead_letters_code", "code"),
    # revision 0008: the letters of an operation, for the purge to unlink them as it deletes
    # it (SQLite's outbox gives a deleted id out again: a link kept would name another
    # operation); partial: a mapping failure's letter has no operation
    Index(
        "ix_dead_letters_outbox",
        "outbox_id",
        sqlite_where=text("outbox_id IS NOT NULL"),
        postgresql_where=text("outbox_id IS NOT NULL"),
    ),
)

# Processes that hold claims; a claim of a process that is gone is released.
processes = Table(
    "processes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
)


# Version 2: reconciliation runs, their checkpoints, and the locks that keep two runs of one
# dispensary apart (across processes).
reconcile_runs = Table(
    "reconcile_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dispensary", String(128), nullable=False),
    Column("trigger", String(16), nullable=False),  # schedule | command
    Column("options", Text, nullable=False),  # JSON: full, resend, since
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("checkpoint_before_us", BigInteger),
    Column("checkpoint_after_us", BigInteger),
    Column("counts", Text, nullable=False),  # JSON
    Column("outcome", String(16), nullable=False),  # running | succeeded | failed
    Column("error", Text),
    Index("ix_reconcile_runs_dispensary", "dispensary", "id"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("dispensary", String(128), primary_key=True),
    Column("after_us", BigInteger, nullable=False),  # pull customers changed after this
    Column("updated_at", Float, nullable=False),
)

locks = Table(
    "locks",
    metadata,
    Column("name", String(160), primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
)

# Revision 0002: the scheduled reconciliation ticks already run in the cluster (one row each: the
# first replica to insert it runs the tick, every other one sends Treez nothing).
schedule_ticks = Table(
    "schedule_ticks",
    metadata,
    Column("job", String(160), primary_key=True),
    Column("tick_at", Float, primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("claimed_at", Float, nullable=False),
)

# Revision 0003: a destination paused until its quota resets (a vendor's daily cap, a window's
# allowance announced with its reset time): the worker that holds the destination's lease
# claims nothing before ``paused_until``, and a replica taking the lease over reads it here.
pauses = Table(
    "pauses",
    metadata,
    Column("dispensary", String(128), primary_key=True),
    Column("destination", String(128), primary_key=True),
    Column("paused_until", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("status_code", Integer),
    Column("paused_at", Float, nullable=False),
)


# Revision 0004: the failed attempts of each operation (a success is the operation's done_at):
# status and vendor code of each answer, for ``connector explain`` and the console. Written
# only when an attempt fails, so a healthy destination adds nothing to its commits.
attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("outbox_id", Integer, nullable=False),
    Column("at", Float, nullable=False),
    Column("result", String(16), nullable=False),  # retry | dead | paused
    Column("status_code", Integer),
    Column("code", String(64)),  # the vendor's error code, when its answer names one
    Column("error", Text, nullable=False),  # what the connector made of it (no body)
    Index("ix_attempts_outbox", "outbox_id", "id"),
)

# Revision 0004: what operators did (console and command line): who (a console session's
# id and address, or the command line's user and host), what, on what, when.
audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("who", String(255), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", Text, nullable=False),
    Column("detail", Text, nullable=False),
)
