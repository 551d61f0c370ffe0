"""The schema's Alembic environment, shipped inside the package (no ``alembic.ini``: the
configuration is built in code by :func:`connector.store.migrate.alembic_config`).

``versions/`` holds one revision per schema change, oldest first: ``r0001`` is the schema as
version 3 shipped it (commit ab3e061), the last one before Alembic; stores from before Alembic
are brought to it by :mod:`.legacy` and stamped. A change to :mod:`connector.store.schema` needs
a revision here (tests/test_migrate.py compares the two); write one with::

    .venv/bin/python -c "from alembic import command; from connector.store.migrate import \\
        alembic_config; command.revision(alembic_config(), 'what changes', rev_id='0003')"

Revisions use only ``op`` (they also run offline, for ``connector migrate --sql``) and, on
SQLite, ``op.batch_alter_table`` for anything ``ALTER TABLE`` cannot do there.
"""
