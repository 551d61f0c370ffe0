"""Schema migrations (Alembic): stores from before Alembic upgrade in place, an empty database
gets the schema once however many processes start together, a current store costs one read,
and ``connector migrate`` applies or prints the upgrade."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner, Result
from conftest import fresh_database
from sqlalchemy import Engine, create_engine, event, inspect, text

from connector.cli import main
from connector.errors import StoreError
from connector.store import NewEvent, open_store
from connector.store._engine import postgres_engine as pg_engine
from connector.store._engine import sqlite_engine
from connector.store.migrate import Migrated, ensure_current, head, migrate_url
from connector.store.migrations.versions.r0001_baseline import TABLES
from connector.store.schema import metadata

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
AB3E061_STORE = DATA / "store_ab3e061.sqlite"  # made by data/make_store_ab3e061.py
V1_DDL = DATA / "schema_v1_sqlite.sql"


def counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def revision_of(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())


def differences(engine: Engine) -> list[Any]:
    """What Alembic's autogenerate would change to make the database equal schema.py."""
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def schema_version(engine: Engine) -> str:
    with engine.connect() as conn:
        query = text("SELECT value FROM connector_meta WHERE key = 'schema_version'")
        return str(conn.execute(query).scalar_one())


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    path = tmp_path / "old.sqlite"
    shutil.copy(AB3E061_STORE, path)
    return path


# --- SQLite: stores from before Alembic ---


def test_a_store_written_by_ab3e061_upgrades_in_place_with_its_rows(old_store: Path) -> None:
    before = counts(old_store)
    assert all(before.values()), before  # the fixture has rows in every table
    engine = sqlite_engine(f"sqlite:///{old_store}")
    try:
        assert ensure_current(engine) == Migrated("legacy schema version 3", head())
        assert counts(old_store) == before
        assert revision_of(engine) == [head()]
        assert differences(engine) == []
        assert "schedule_ticks" in inspect(engine).get_table_names()
        assert schema_version(engine) == "4"  # connectors from before Alembic refuse it now
    finally:
        engine.dispose()
    store = open_store(f"sqlite:///{old_store}")
    try:
        store.add_events([NewEvent("d1", "webhook", "CUSTOMER", "c9", 9, "{}")])
        assert counts(old_store)["inbox"] == before["inbox"] + 1
    finally:
        store.close()


def test_a_version_2_store_gains_opt_out_seen_from_what_it_knew(old_store: Path) -> None:
    """Version 2 had no ``opt_out_seen``: a customer whose last opt_out was true, or who has an
    unsubscribed contact, is known to have opted out; the others are not."""
    with sqlite3.connect(old_store) as db:  # back to what version 2 wrote
        db.execute("DELETE FROM customers")
        db.execute("DELETE FROM contacts")
        db.execute("ALTER TABLE customers DROP COLUMN opt_out_seen")
        db.execute("DROP INDEX ix_contacts_contact")
        db.execute("UPDATE connector_meta SET value = '2' WHERE key = 'schema_version'")
        rows = [("d", "out", 1), ("d", "flipped", 0), ("d", "never", 0), ("d", "unknown", None)]
        db.executemany(
            "INSERT INTO customers (dispensary, customer_id, opt_out, merges, updated_at) "
            "VALUES (?, ?, ?, '[]', 0)",
            rows,
        )
        db.execute(
            "INSERT INTO contacts (dispensary, customer_id, destination, unsubscribed, "
            "deactivated, ops_planned, updated_at) VALUES ('d', 'flipped', 'x', 1, 0, 2, 0)"
        )
    store = open_store(f"sqlite:///{old_store}")
    try:
        with store.snapshot() as conn:
            states = store.load_states(conn, "d", ["out", "flipped", "never", "unknown"])
        assert {cid: s.opt_out_seen for cid, s in states.items()} == {
            "out": True,
            "flipped": True,
            "never": False,
            "unknown": False,
        }
    finally:
        store.close()
    engine = create_engine(f"sqlite:///{old_store}")
    assert revision_of(engine) == [head()]
    assert differences(engine) == []


def test_a_version_1_store_upgrades(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(V1_DDL.read_text(encoding="utf-8"))
        db.execute(
            "INSERT INTO inbox (dispensary, source, event_type, customer_id, received_at, "
            "status) VALUES ('d', 'webhook', 'CUSTOMER', 'c1', 0, 'pending')"
        )
    engine = sqlite_engine(f"sqlite:///{path}")
    try:
        assert ensure_current(engine) == Migrated("legacy schema version 1", head())
        assert differences(engine) == []
    finally:
        engine.dispose()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT customer_id, run_id FROM inbox").fetchall() == [("c1", None)]


def test_a_store_from_before_alembic_with_an_unknown_version_is_refused(old_store: Path) -> None:
    with sqlite3.connect(old_store) as db:
        db.execute("UPDATE connector_meta SET value = '7' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema is version 7 without an Alembic revision"):
        open_store(f"sqlite:///{old_store}")


# --- SQLite: new and current stores ---


def test_a_new_store_is_created_at_head_and_equals_schema_py(tmp_path: Path) -> None:
    engine = sqlite_engine(f"sqlite:///{tmp_path / 'new.sqlite'}")
    try:
        assert ensure_current(engine) == Migrated(None, head())
        assert revision_of(engine) == [head()]
        assert differences(engine) == []
    finally:
        engine.dispose()


def test_opening_a_current_store_reads_alembic_version_and_nothing_else(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    open_store(url).close()
    engine = sqlite_engine(url)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))
    try:
        assert ensure_current(engine) is None
    finally:
        engine.dispose()
    assert [s for s in statements if s.upper() not in ("BEGIN", "COMMIT", "ROLLBACK")] == [
        "SELECT version_num FROM alembic_version"
    ]


def test_a_current_store_opens_read_only(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    open_store(f"sqlite:///{path}").close()
    engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    try:
        assert ensure_current(engine) is None
    finally:
        engine.dispose()


def test_a_revision_newer_than_this_code_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    open_store(url).close()
    with sqlite3.connect(tmp_path / "store.sqlite") as db:
        db.execute("UPDATE alembic_version SET version_num = 'f00d'")
    with pytest.raises(StoreError, match=r"revision f00d, newer .* upgrade the connector"):
        open_store(url)


def test_two_processes_creating_one_sqlite_store_make_it_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    assert racing(url) == [str(Migrated(None, head())), "None"]


def test_opening_waits_for_another_process_holding_the_file_past_the_store_timeout(
    tmp_path: Path,
) -> None:
    """Another process switching the new file to WAL, or closing the last connection to it
    (its checkpoint), holds the file exclusively across an fsync: a process opening the store
    meanwhile waits as long as for a migration, not the store timeout (it failed "database
    is locked" on a loaded machine, before it reached the migration lock)."""
    path = tmp_path / "store.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # a new file, rollback mode: nobody may even read
    release = threading.Timer(1.0, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        assert migrate_url(f"sqlite:///{path}", timeout=0.05) == Migrated(None, head())
    finally:
        release.join()
        holder.close()


RACER = """
import sys, time
from connector.store.migrate import migrate_url
url, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
print(migrate_url(url))
"""


def racing(url: str, processes: int = 2) -> list[str]:
    """``connector migrate`` from ``processes`` processes at once (threads would not do: the
    import lock on Alembic's env.py already keeps two threads of one process apart); what
    each printed, upgrades first."""
    start = time.time() + 1.5  # every process imported and waiting by then
    running = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, url, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    outputs = [p.communicate(timeout=60) for p in running]
    assert [err for _out, err in outputs] == [""] * processes
    return sorted((out.strip() for out, _err in outputs), key=lambda out: out == "None")


# --- connector migrate ---


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def write_config(folder: Path, store: str) -> Path:
    (folder / "mappings").mkdir(exist_ok=True)
    shutil.copy(ROOT / "mappings" / "http.yaml", folder / "mappings" / "http.yaml")
    path = folder / "config.yaml"
    path.write_text(
        f"store: {store}\n"
        "dispensaries:\n"
        "  d1:\n"
        "    webhook_token: a-real-token\n"
        "    destinations:\n"
        "      - {name: out, type: jsonl, path: out.jsonl, mapping: mappings/http.yaml}\n",
        encoding="utf-8",
    )
    return path


def test_migrate_upgrades_then_is_already_current(old_store: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{old_store}")
    first = run("migrate", "--config", config)
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == [
        f"sqlite:///{old_store}: upgraded the store from legacy schema version 3 to {head()}"
    ]
    again = run("migrate", "--config", config)
    assert again.stdout.splitlines() == [
        f"sqlite:///{old_store}: already current (revision {head()})"
    ]


def test_migrate_sql_prints_the_ddl_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    result = run("migrate", "--sql", "--config", write_config(tmp_path, f"sqlite:///{path}"))
    assert result.exit_code == 0, result.output
    assert "CREATE TABLE inbox (" in result.stdout
    assert "CREATE TABLE schedule_ticks (" in result.stdout
    assert f"UPDATE alembic_version SET version_num='{head()}'" in result.stdout
    assert not path.exists()


def test_migrate_sql_from_the_store_s_revision(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    engine = sqlite_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('0001')"))
    engine.dispose()
    result = run("migrate", "--sql", "--config", write_config(tmp_path, f"sqlite:///{path}"))
    assert "CREATE TABLE schedule_ticks (" in result.stdout
    assert "CREATE TABLE inbox (" not in result.stdout


def test_migrate_errors_are_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    open_store(url).close()
    with sqlite3.connect(tmp_path / "store.sqlite") as db:
        db.execute("UPDATE alembic_version SET version_num = 'f00d'")
    for args in (["migrate"], ["migrate", "--sql"]):
        result = run(*args, "--config", write_config(tmp_path, url))
        assert result.exit_code == 1
        assert result.stderr.splitlines() == [
            f"migrate: the store's schema is at revision f00d, newer than this connector "
            f"knows (its newest is {head()}): upgrade the connector"
        ]


# --- PostgreSQL ---


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new empty database on the test server, dropped afterwards."""
    with fresh_database("h_alembic") as url:
        yield url


def test_an_empty_postgresql_database_gets_the_schema(pg_url: str) -> None:
    store = open_store(pg_url, listen=False)
    store.close()
    engine = pg_engine(pg_url)
    try:
        assert revision_of(engine) == [head()]
        assert differences(engine) == []
        assert schema_version(engine) == "4"
        assert ensure_current(engine) is None
    finally:
        engine.dispose()


def test_two_processes_migrating_one_postgresql_database_make_the_schema_once(
    pg_url: str,
) -> None:
    assert racing(pg_url, processes=4) == [str(Migrated(None, head()))] + ["None"] * 3


def test_migrate_sql_prints_postgresql_ddl(pg_url: str, tmp_path: Path) -> None:
    result = run("migrate", "--sql", "--config", write_config(tmp_path, pg_url))
    assert result.exit_code == 0, result.output
    assert "CREATE TABLE inbox (\n    id SERIAL NOT NULL," in result.stdout
    assert "CREATE TABLE schedule_ticks (" in result.stdout
    engine = pg_engine(pg_url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_a_store_written_before_schedule_ticks_had_a_revision_is_stamped(old_store: Path) -> None:
    """The version that added ``schedule_ticks`` created it with ``create_all`` and still wrote
    schema version 3: the table is kept with its rows and the store stamped past it."""
    with sqlite3.connect(old_store) as db:
        db.execute(
            "CREATE TABLE schedule_ticks (job VARCHAR(160) NOT NULL, tick_at FLOAT NOT NULL, "
            "holder VARCHAR(64) NOT NULL, claimed_at FLOAT NOT NULL, PRIMARY KEY (job, tick_at))"
        )
        db.execute("INSERT INTO schedule_ticks VALUES ('reconcile:d1', 1.0, 'p', 1.0)")
    engine = sqlite_engine(f"sqlite:///{old_store}")
    try:
        assert ensure_current(engine) == Migrated("legacy schema version 3", head())
        assert differences(engine) == []
        assert schema_version(engine) == "4"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM schedule_ticks")).scalar_one() == 1
    finally:
        engine.dispose()


def test_migrate_without_a_server_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, "postgresql://postgres@127.0.0.1:9/none")
    for args in (["migrate"], ["migrate", "--sql"]):
        result = run(*args, "--config", config)
        assert result.exit_code == 1
        [line] = result.stderr.splitlines()
        assert line.startswith("migrate: the store cannot be opened (")


def test_migrate_sql_of_a_store_from_before_alembic_says_what_to_do(
    old_store: Path, tmp_path: Path
) -> None:
    result = run("migrate", "--sql", "--config", write_config(tmp_path, f"sqlite:///{old_store}"))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "migrate: the store predates the connector's Alembic revisions: upgrade it with "
        "`connector migrate` (without --sql), which runs its old steps first"
    ]
    assert counts(old_store) == counts(AB3E061_STORE)


def test_a_sqlite_migration_waits_for_another_longer_than_the_store_timeout(
    tmp_path: Path,
) -> None:
    """Another process's migration holding the write lock longer than the store's busy
    timeout (a loaded machine: CI saw 'database is locked') is waited for, as on
    PostgreSQL, not refused."""
    import sqlite3
    import threading

    path = tmp_path / "store.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA journal_mode=WAL")  # as the first process's store set it
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE busy (x)")
    released = threading.Timer(1.5, lambda: holder.execute("ROLLBACK"))
    released.start()
    started = time.monotonic()
    try:
        done = migrate_url(f"sqlite:///{path}", timeout=0.3)
    finally:
        released.join()
        holder.close()
    assert done == Migrated(None, head())
    assert time.monotonic() - started >= 1.0
