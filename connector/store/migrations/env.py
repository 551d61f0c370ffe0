"""Alembic's environment: online with the connection :mod:`connector.store.migrate` hands over
(already in its locked transaction), offline (``connector migrate --sql``) for a dialect name.
Run by Alembic, never imported."""

from __future__ import annotations

from alembic import context

from connector.store.schema import metadata

config = context.config

if context.is_offline_mode():
    dialect = config.attributes["dialect_name"]
    context.configure(
        dialect_name=dialect,
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=dialect == "sqlite",
    )
else:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite's ALTER TABLE cannot alter or drop most things: such a change is a copy of
        # the table (op.batch_alter_table), which autogenerate then writes
        render_as_batch=connection.dialect.name == "sqlite",
    )

# in the caller's transaction when online (one transaction: all of the upgrade or nothing)
with context.begin_transaction():
    context.run_migrations()
