"""Stores from before Alembic: ``connector_meta.schema_version`` 1, 2 or 3 and no
``alembic_version``. Their own steps bring them to version 3, which is revision ``0001``
(the baseline), and they are stamped with it.

These are the steps versions 2 and 3 shipped (``MIGRATIONS`` in ``schema.py`` until Alembic),
frozen: tables the old code created with ``create_all`` when a store lacked them are here as
they were then, not as :mod:`connector.store.schema` has them now.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    column,
    table,
    text,
    update,
)

from connector.errors import StoreError

BASELINE = "0001"  # what a version 3 store equals
SCHEDULE_TICKS = "0002"

# from version N to N + 1: portable statements (SQLite and PostgreSQL)
STEPS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE inbox ADD COLUMN run_id INTEGER",
        "ALTER TABLE inbox ADD COLUMN planned VARCHAR(96)",
        "CREATE INDEX ix_inbox_run ON inbox (run_id)",
        "CREATE INDEX ix_outbox_contact ON outbox (dispensary, destination, customer_id, op, id)",
    ),
    2: (
        "ALTER TABLE customers ADD COLUMN opt_out_seen BOOLEAN NOT NULL DEFAULT FALSE",
        # what older versions knew of it: the last opt_out, and any unsubscribe planned
        "UPDATE customers SET opt_out_seen = TRUE WHERE opt_out = TRUE OR EXISTS (SELECT 1 "
        "FROM contacts WHERE contacts.dispensary = customers.dispensary AND "
        "contacts.customer_id = customers.customer_id AND contacts.unsubscribed = TRUE)",
        "CREATE INDEX ix_contacts_contact ON contacts (dispensary, destination, contact_id)",
    ),
}

_meta = table("connector_meta", column("key", String), column("value", Text))

# version 2's new tables, which version 1 stores gained from create_all
_v2 = MetaData()
Table(
    "reconcile_runs",
    _v2,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dispensary", String(128), nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("options", Text, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("checkpoint_before_us", BigInteger),
    Column("checkpoint_after_us", BigInteger),
    Column("counts", Text, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("error", Text),
    Index("ix_reconcile_runs_dispensary", "dispensary", "id"),
)
Table(
    "checkpoints",
    _v2,
    Column("dispensary", String(128), primary_key=True),
    Column("after_us", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
)
Table(
    "locks",
    _v2,
    Column("name", String(160), primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
)


def to_baseline(conn: Connection, version: str | None, tables: set[str]) -> str:
    """Bring a store from before Alembic at ``version`` to the baseline, in ``conn``'s
    transaction; the revision to stamp it with."""
    if version not in ("1", "2", "3"):
        raise StoreError(
            f"the store's schema is version {version or '(none)'} without an Alembic revision: "
            "it was not written by a connector this one can upgrade"
        )
    if version == "1":
        _v2.create_all(conn)
    for step in range(int(version), 3):
        for statement in STEPS[step]:
            conn.execute(text(statement))
    if "schedule_ticks" in tables:
        # written by the one version that created this table before its revision existed
        # (with create_all, as revision 0002 makes it)
        conn.execute(update(_meta).where(_meta.c.key == "schema_version").values(value="4"))
        return SCHEDULE_TICKS
    return BASELINE
