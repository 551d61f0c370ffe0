"""An index of the settled operations (done, superseded, dead) by when they were settled
(``ix_outbox_settled``, partial: only rows with a ``done_at``), covering what the console's
overview and chart count (the last hour's and day's deliveries per destination) and what the
retention purge deletes: without it each read every operation the store keeps.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    where = sa.text("done_at IS NOT NULL")
    op.create_index(
        "ix_outbox_settled",
        "outbox",
        ["done_at", "dispensary", "destination", "status"],
        sqlite_where=where,
        postgresql_where=where,
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_settled", table_name="outbox")
