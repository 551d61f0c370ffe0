"""Shared fixtures: the real Treez delivery from the seed document, and variations of it; the
store under test (``store_url``: every test that takes it runs on SQLite and on PostgreSQL)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connector.treez import Customer, parse_customer

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
SEED_BODY_BYTES = (DATA / "seed_body.json").read_bytes()


@pytest.fixture
def seed_bytes() -> bytes:
    """Exactly the bytes Treez sent (1,403 bytes)."""
    return SEED_BODY_BYTES


@pytest.fixture
def seed_body() -> dict[str, Any]:
    """The decoded webhook body: {event_type, dispensary_short_name, data}."""
    return json.loads(SEED_BODY_BYTES)


@pytest.fixture
def seed_data(seed_body: dict[str, Any]) -> dict[str, Any]:
    """The customer object of the seed delivery."""
    return seed_body["data"]


CustomerFactory = Callable[..., Customer]


@pytest.fixture
def make_customer(seed_data: dict[str, Any]) -> CustomerFactory:
    """A customer from the seed with some fields replaced: make_customer(email="a@b.co")."""

    def make(**overrides: Any) -> Customer:
        data = copy.deepcopy(seed_data)
        data.update(overrides)
        return parse_customer(data)

    return make


# --- the store under test: SQLite and PostgreSQL ---------------------------------------------

# the local server CI provides (.ci/run starts it); CONNECTOR_TEST_PG points elsewhere
PG_SERVER = os.environ.get("CONNECTOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
STORES = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: run with the SQLite store only")
    config.addinivalue_line("markers", "postgresql_only: run with the PostgreSQL store only")


def _unreachable() -> str | None:
    """Why the PostgreSQL server cannot be used, or None when it can."""
    try:
        psycopg.connect(f"{PG_SERVER}/postgres", connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"no PostgreSQL server at {PG_SERVER} ({exc.__class__.__name__})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a server the PostgreSQL tests are left out, said in one line at the end; with
    ``CI`` set the run stops instead."""
    on_pg = [item for item in items if "[postgresql" in item.nodeid]
    if not on_pg:
        return
    reason = _unreachable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.exit(f"CI is set and there is {reason}", returncode=1)
    config.hook.pytest_deselected(items=on_pg)
    items[:] = [item for item in items if "[postgresql" not in item.nodeid]
    config.stash[_LEFT_OUT] = f"SKIPPED {len(on_pg)} tests on PostgreSQL: {reason}"


_LEFT_OUT = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if _LEFT_OUT in config.stash:
        terminalreporter.write_line(config.stash[_LEFT_OUT], yellow=True, bold=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that takes ``store_url`` runs once per store (``[sqlite]``,
    ``[postgresql]``), or with one only when marked ``sqlite_only`` / ``postgresql_only``."""
    if "store_url" not in metafunc.fixturenames:
        return
    kinds = [
        kind
        for kind in STORES
        if not metafunc.definition.get_closest_marker(f"{_other(kind)}_only")
    ]
    metafunc.parametrize("store_url", kinds, indirect=True)


def _other(kind: str) -> str:
    return "postgresql" if kind == "sqlite" else "sqlite"


@contextlib.contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A fresh database ``<prefix>_<random>`` on the test server (:data:`PG_SERVER`), dropped
    after: its URL. An unreachable server skips the test, or fails it when ``CI`` is set."""
    try:
        admin = psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        reason = f"no PostgreSQL server at {PG_SERVER} ({exc.__class__.__name__})"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and there is {reason}")
        pytest.skip(reason)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{PG_SERVER}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh database ``connector_test_<random>`` on the local server for this session,
    dropped at its end: its URL. (A server that is down at collection is handled in
    :func:`pytest_collection_modifyitems`; one that goes away later fails, with CI, or skips.)"""
    with fresh_database("connector_test") as url:
        yield url


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty store of the kind the test is parametrized with: SQLite, a
    file in ``tmp_path``; PostgreSQL, a schema of its own in the session's database (every
    connection opened with the URL, by any process, sees only that schema).

    A schema per test costs 111 ms with the store's opening, truncating every table 73 ms;
    the schema is kept: nothing a test's leftover process or lock does reaches the next."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    database = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{database}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            # a process the test left behind must not hang the session
            conn.execute("SET lock_timeout = '10s'")
            with contextlib.suppress(psycopg.errors.LockNotAvailable):
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def store(store_url: str) -> Iterator[Any]:
    """A fresh store, SQLite or PostgreSQL (the test runs on both), registered as a process
    of the cluster (as a worker's store is); closed after."""
    from connector.store import open_store

    opened = open_store(store_url)
    opened.register_process()
    try:
        yield opened
    finally:
        opened.close()


@contextlib.contextmanager
def fresh_schema(database: str) -> Iterator[str]:
    """A store URL on a schema of its own in ``database`` (see :func:`store_url`), dropped
    after: for tests that need several empty stores, such as one per generated example."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{database}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")
            with contextlib.suppress(psycopg.errors.LockNotAvailable):
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
