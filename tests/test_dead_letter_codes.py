"""Each dead letter's vendor error code is kept in a column (``dead_letters.code``, revision
0005): written with the letter, filled for the letters a store held before the upgrade (on
SQLite and PostgreSQL), filtered by the store, and never a customer's value echoed back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from conftest import fresh_database
from sqlalchemy import Engine, text
from test_migrate import run, write_config

from connector.delivery._http import vendor_code
from connector.store import open_store
from connector.store._engine import postgres_engine, sqlite_engine
from connector.store.migrate import alembic_config, ensure_current, head

# (payload, answer, the code the letter should get)
LETTERS = [
    (
        {"fields": {"email": "a@example.com"}},
        '{"errors":[{"code":"duplicate_profile"}]}',
        "duplicate_profile",
    ),
    ({"fields": {"last_name": "Vega"}}, '{"error":"Vega"}', None),  # an echo, not a code
    ({"fields": {}}, '{"code": 4012}', "4012"),
    ({"fields": {}}, "<html>bad gateway</html>", None),
    ({"fields": {}}, None, None),
    ({"fields": {}}, '{"errors":[{"detail":"free text, no code"}]}', None),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        made = sqlite_engine(f"sqlite:///{tmp_path / 'store.sqlite'}")
        yield made
        made.dispose()
        return
    with fresh_database("dlcodes") as url:
        made = postgres_engine(url)
        yield made
        made.dispose()


def _at(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), revision)


def _insert(engine: Engine, rows: list[tuple[dict[str, object], str | None, str | None]]) -> None:
    with engine.begin() as conn:
        for payload, answer, _ in rows:
            conn.execute(
                text(
                    "INSERT INTO dead_letters (outbox_id, dispensary, destination, customer_id,"
                    " op, payload, idempotency_key, attempts, reason, status_code,"
                    " response_body, created_at) VALUES (1, 'd', 'k', 'c', 'upsert', :payload,"
                    " 'key', 3, 'refused', 400, :answer, 0)"
                ),
                {"payload": json.dumps(payload), "answer": answer},
            )


def test_the_letters_a_store_held_get_their_codes_when_it_upgrades(engine: Engine) -> None:
    _at(engine, "0004")
    _insert(engine, LETTERS)

    ensure_current(engine)

    with engine.connect() as conn:
        codes = list(conn.execute(text("SELECT code FROM dead_letters ORDER BY id")).scalars())
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
    assert codes == [expected for _, _, expected in LETTERS]
    # what the console computed from the answer before the column existed
    assert codes == [vendor_code(answer, [payload]) for payload, answer, _ in LETTERS]


def test_the_store_lists_the_letters_of_one_code(engine: Engine) -> None:
    _at(engine, "0004")
    _insert(engine, LETTERS * 2)
    ensure_current(engine)
    store = open_store(engine.url.render_as_string(hide_password=False), listen=False)
    try:
        found = store.dead_letters(code="duplicate_profile", limit=10)
        numbered = store.dead_letters(code="4012", dispensary="d", limit=1)
        everything = store.dead_letters(limit=100)
        codes = store.dead_letter_codes(found)
    finally:
        store.close()

    assert len(found) == 2
    assert len(numbered) == 1
    assert len(everything) == 2 * len(LETTERS)
    assert codes == {x.id: "duplicate_profile" for x in found}


def test_the_upgrade_codes_more_letters_than_one_chunk(engine: Engine) -> None:
    from connector.store.migrations.versions import r0005_dead_letter_codes as r0005

    _at(engine, "0004")
    many = LETTERS * (r0005.CHUNK // len(LETTERS) + 2)
    _insert(engine, many)

    ensure_current(engine)

    with engine.connect() as conn:
        codes = list(conn.execute(text("SELECT code FROM dead_letters ORDER BY id")).scalars())
    assert codes == [expected for _, _, expected in many]


def test_downgrading_drops_the_column_and_upgrading_again_refills_it(engine: Engine) -> None:
    _at(engine, "head")
    _insert(engine, LETTERS[:1])
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "0004")

    ensure_current(engine)

    with engine.connect() as conn:
        assert conn.execute(text("SELECT code FROM dead_letters")).scalar() == "duplicate_profile"


def test_the_offline_upgrade_adds_the_column_and_says_old_letters_keep_no_code(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.sqlite"
    made = sqlite_engine(f"sqlite:///{path}")
    _at(made, "0004")
    made.dispose()

    result = run("migrate", "--sql", "--config", write_config(tmp_path, f"sqlite:///{path}"))

    assert result.exit_code == 0, result.output
    assert "ADD COLUMN code VARCHAR(64)" in result.stdout
    assert "keep no vendor code" in result.stdout
    assert "CREATE TABLE inbox (" not in result.stdout
