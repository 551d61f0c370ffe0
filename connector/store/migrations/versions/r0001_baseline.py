"""Baseline: the schema as version 3 shipped it (commit ab3e061), the last before Alembic.

A store from before Alembic at version 3 equals this revision and is stamped with it (see
:mod:`connector.store.migrations.legacy`); an empty database starts here.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

TABLES = (
    "connector_meta",
    "inbox",
    "quarantine",
    "customers",
    "contacts",
    "conflicts",
    "outbox",
    "dead_letters",
    "processes",
    "reconcile_runs",
    "checkpoints",
    "locks",
)


def upgrade() -> None:
    meta = op.create_table(
        "connector_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    # connectors from before Alembic read this, and refuse a store above their version
    op.bulk_insert(meta, [{"key": "schema_version", "value": "3"}])
    op.create_table(
        "inbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dispensary", sa.String(128), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("customer_id", sa.String(128)),
        sa.Column("last_update_us", sa.BigInteger),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("body", sa.Text),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("processed_at", sa.Float),
        sa.Column("run_id", sa.Integer),
        sa.Column("planned", sa.String(96)),
        sa.Index("ix_inbox_pending", "status", "id"),
        sa.Index("ix_inbox_customer", "dispensary", "customer_id"),
        sa.Index("ix_inbox_run", "run_id"),
    )
    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dispensary", sa.String(128), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("content_type", sa.String(255)),
        sa.Column("body", sa.LargeBinary),
    )
    op.create_table(
        "customers",
        sa.Column("dispensary", sa.String(128), primary_key=True),
        sa.Column("customer_id", sa.String(128), primary_key=True),
        sa.Column("last_update_us", sa.BigInteger),
        sa.Column("content_hash", sa.String(64)),
        sa.Column("opt_out", sa.Boolean),
        sa.Column("merged_into", sa.String(128)),
        sa.Column("merges", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("opt_out_seen", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "contacts",
        sa.Column("dispensary", sa.String(128), primary_key=True),
        sa.Column("customer_id", sa.String(128), primary_key=True),
        sa.Column("destination", sa.String(128), primary_key=True),
        sa.Column("contact_id", sa.String(255)),
        sa.Column("delivered_hash", sa.String(64)),
        sa.Column("unsubscribed", sa.Boolean, nullable=False),
        sa.Column("deactivated", sa.Boolean, nullable=False),
        sa.Column("ops_planned", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Index("ix_contacts_contact", "dispensary", "destination", "contact_id"),
    )
    op.create_table(
        "conflicts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dispensary", sa.String(128), nullable=False),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("destination", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dispensary", sa.String(128), nullable=False),
        sa.Column("destination", sa.String(128), nullable=False),
        sa.Column("order_key", sa.String(128), nullable=False),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("op", sa.String(16), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("first_attempt_at", sa.Float),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("claimed_until", sa.Float),
        sa.Column("last_error", sa.Text),
        sa.Column("done_at", sa.Float),
        sa.UniqueConstraint("dispensary", "destination", "idempotency_key", name="uq_outbox_key"),
        sa.Index("ix_outbox_queue", "dispensary", "destination", "status", "id"),
        sa.Index("ix_outbox_order", "dispensary", "destination", "order_key", "id"),
        sa.Index("ix_outbox_contact", "dispensary", "destination", "customer_id", "op", "id"),
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("outbox_id", sa.Integer),
        sa.Column("dispensary", sa.String(128), nullable=False),
        sa.Column("destination", sa.String(128), nullable=False),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("op", sa.String(16), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.String(64), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("response_body", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("replayed_at", sa.Float),
        sa.Index("ix_dead_letters_open", "dispensary", "destination", "replayed_at"),
    )
    op.create_table(
        "processes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
    )
    op.create_table(
        "reconcile_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dispensary", sa.String(128), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("options", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.Column("checkpoint_before_us", sa.BigInteger),
        sa.Column("checkpoint_after_us", sa.BigInteger),
        sa.Column("counts", sa.Text, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Index("ix_reconcile_runs_dispensary", "dispensary", "id"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("dispensary", sa.String(128), primary_key=True),
        sa.Column("after_us", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "locks",
        sa.Column("name", sa.String(160), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
