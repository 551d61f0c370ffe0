"""The vendor's error code of each dead letter, kept in a column (``dead_letters.code``) so
that a filter by code is a query, not a read and parse of every answer.

Online, the letters already stored get their code from their stored answer, as the console
read it before (:func:`connector.delivery._http.vendor_code`). ``connector migrate --sql``
cannot run Python: there the letters already stored keep no code (their HTTP status still
filters them) and the upgrade's SQL says so.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import context, op

from connector.delivery._http import vendor_code

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

CHUNK = 500  # letters read and coded at a time


def upgrade() -> None:
    with op.batch_alter_table("dead_letters") as batch:
        batch.add_column(sa.Column("code", sa.String(64)))
    op.create_index("ix_dead_letters_code", "dead_letters", ["code"])
    if context.is_offline_mode():
        op.execute(
            "-- dead letters stored before this upgrade keep no vendor code: "
            "filter them by HTTP status"
        )
        return
    _fill_codes(op.get_bind())


def _fill_codes(conn: sa.Connection) -> None:
    letters = sa.table(
        "dead_letters",
        sa.column("id", sa.Integer),
        sa.column("payload", sa.Text),
        sa.column("response_body", sa.Text),
        sa.column("code", sa.String(64)),
    )
    after = 0
    while True:
        rows = conn.execute(
            sa.select(letters.c.id, letters.c.payload, letters.c.response_body)
            .where(letters.c.id > after, letters.c.response_body.is_not(None))
            .order_by(letters.c.id)
            .limit(CHUNK)
        ).all()
        if not rows:
            return
        coded = [
            {"letter": r.id, "found": code}
            for r in rows
            if (code := vendor_code(r.response_body, _sent(r.payload))) is not None
        ]
        if coded:
            conn.execute(
                letters.update()
                .where(letters.c.id == sa.bindparam("letter"))
                .values(code=sa.bindparam("found")),
                coded,
            )
        after = rows[-1].id


def _sent(payload: str | None) -> list[object]:
    try:
        return [json.loads(payload)] if payload else []
    except ValueError:
        return []


def downgrade() -> None:
    op.drop_index("ix_dead_letters_code", table_name="dead_letters")
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_column("code")
