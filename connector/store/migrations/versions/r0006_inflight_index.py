"""An index of the operations in flight by the process that claimed them
(``ix_outbox_inflight``, partial: only rows whose status is ``inflight``), for each process's
heartbeat renews its claims and its exit gives them back: without it both read every
operation the store keeps, delivered ones included.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    where = sa.text("status = 'inflight'")
    op.create_index(
        "ix_outbox_inflight", "outbox", ["claimed_by"], sqlite_where=where, postgresql_where=where
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_inflight", table_name="outbox")
