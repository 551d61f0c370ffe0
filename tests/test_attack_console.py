"""An adversary's look at the operator's console (issue 15, item 3): each test here shows a
defect found by attacking the console's ASGI app, and is marked ``xfail(strict=True)`` with
what is wrong, so the file passes until the lead fixes the console (then the test passes, the
strict mark fails it, and the mark comes off). What held is listed in the branch's report."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from connector import console, receiver, server, service
from connector.cli import main
from connector.config import Config, load_config
from connector.console import create_console_app, pages
from connector.console.auth import FREE_FAILURES, SESSION_COOKIE
from connector.errors import ConfigError
from connector.store import Store
from tests.test_console import (
    DISPENSARY,
    HTTP_MAPPING,
    TOKEN,
    plan_all,
    receive_samples,
    refuse_and_deliver,
    write_config,
)

with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx (installed) works
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

HUGE = "9" * 30  # a whole number no database column holds
SUPERSCRIPT_TWO = "\u00b2"  # str.isdigit() says yes, int() says no
VENDOR_CODE = "INVALID_CONTACT"  # the code refuse_and_deliver's answers carry


@pytest.fixture
def config(tmp_path: Path, store_url: str) -> Config:
    return write_config(tmp_path, store_url)


@pytest.fixture
def filled(store: Store, config: Config) -> Store:
    receive_samples(store)
    plan_all(store, config)
    refuse_and_deliver(store)
    store.add_conflict(DISPENSARY, "5002", "crm", "external_id_conflict", "contact c-5002 taken")
    store.add_conflict(DISPENSARY, "3904", "crm", "unknown_contact", "contact c-3904 not found")
    return store


@pytest.fixture
def client(store: Store, config: Config) -> Iterator[TestClient]:
    """The console as a browser meets it: a server error is an answer (500), not a raise."""
    app = create_console_app(store, config, failed_sign_in_delay=0)
    with TestClient(app, follow_redirects=False, raise_server_exceptions=False) as found:
        yield found


@pytest.fixture
def served(store: Store, config: Config) -> Iterator[TestClient]:
    """The console wrapped as ``connector serve`` wraps it (uvicorn's configuration from
    :func:`connector.server.console_config`), reached from loopback, as the default
    ``console.host`` means every client is."""
    app = create_console_app(store, config, failed_sign_in_delay=0)
    assert config.console is not None
    settings = server.console_config(app, config.console, config)
    settings.load()
    with TestClient(
        settings.loaded_app, follow_redirects=False, client=("127.0.0.1", 50000)
    ) as found:
        yield found


def sign_in(client: TestClient, **headers: str) -> None:
    answer = client.post("/login", data={"token": TOKEN}, headers=headers)
    assert answer.status_code == 303, answer.text


def csrf_of(client: TestClient, path: str = "/") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def open_letters(store: Store) -> list[int]:
    return [x.id for x in store.dead_letters(dispensary=DISPENSARY)]


# --- authentication: the sign-in brake and the audited address ---


@pytest.mark.sqlite_only
@pytest.mark.xfail(
    strict=True,
    reason="uvicorn trusts X-Forwarded-For from 127.0.0.1 (proxy_headers on by default, "
    "console_config does not turn it off) and the console binds loopback: any client picks "
    "its own address per request and the per-address sign-in brake never engages",
)
def test_forwarded_for_does_not_get_around_the_sign_in_brake(served: TestClient) -> None:
    for n in range(FREE_FAILURES + 1):
        served.post(
            "/login",
            data={"token": "guess-guess-guess"},
            headers={"x-forwarded-for": f"198.51.100.{n}"},
        )

    braked = served.post(
        "/login", data={"token": "guess-guess-guess"}, headers={"x-forwarded-for": "198.51.100.99"}
    )

    assert braked.status_code == 429


@pytest.mark.sqlite_only
@pytest.mark.xfail(
    strict=True,
    reason="the audit log's 'who' takes the client address from X-Forwarded-For, which any "
    "loopback client (every client of the default console) sets to what it likes",
)
def test_the_audited_address_cannot_be_forged(served: TestClient, store: Store) -> None:
    sign_in(served, **{"x-forwarded-for": "203.0.113.66"})

    names = [e.who for e in store.audit_log()]

    assert names
    assert not any("203.0.113.66" in name for name in names)


@pytest.mark.sqlite_only
@pytest.mark.xfail(
    strict=True,
    reason="the brake is per address and refuses the right token too: with the console on "
    "loopback (or behind one proxy) every operator shares one address, so anyone who can "
    "reach the port locks the operator out for up to 300 s per further guess",
)
def test_wrong_guesses_from_a_shared_address_do_not_lock_the_operator_out(
    client: TestClient,
) -> None:
    stranger = client  # same address ("testclient") as the operator below
    for _ in range(FREE_FAILURES + 1):
        stranger.post("/login", data={"token": "guess-guess-guess"})
    stranger.cookies.clear()

    operator = stranger.post("/login", data={"token": TOKEN})

    assert operator.status_code == 303


@pytest.mark.sqlite_only
@pytest.mark.xfail(
    strict=True,
    reason="every refused sign-in, braked ones included, writes an audit row without a "
    "session, and the audit page shows only the newest 500 rows: a stranger without the "
    "token pushes an operator's reveal off the audit page in a few hundred requests",
)
def test_strangers_cannot_push_a_reveal_off_the_audit_page(
    store: Store, config: Config, filled: Store
) -> None:
    app = create_console_app(store, config, failed_sign_in_delay=0)
    with (
        TestClient(app, follow_redirects=False) as operator,
        TestClient(app, follow_redirects=False) as stranger,
    ):
        sign_in(operator)
        letter = open_letters(filled)[0]
        operator.post(f"/dead-letters/{letter}/reveal", data={"csrf": csrf_of(operator)})
        for _ in range(501):
            stranger.post("/login", data={"token": "guess-guess-guess"})

        audit = operator.get("/audit")

    assert any(e.action == "reveal" for e in filled.audit_log(100_000))  # the table has it
    assert audit.status_code == 200
    assert f"dead letter {letter}" in audit.text


@pytest.mark.sqlite_only
@pytest.mark.xfail(
    strict=True,
    reason="no Host check: a page on another site rebinding its name to 127.0.0.1 (DNS "
    "rebinding) passes the same-origin test (its Origin matches the Host it sends), so it "
    "can post sign-in guesses from the operator's own browser and address, which trips the "
    "brake and locks the operator out",
)
def test_a_rebound_host_name_cannot_lock_the_operator_out(client: TestClient) -> None:
    rebound = {"host": "rebound.example:8081", "origin": "http://rebound.example:8081"}
    for _ in range(FREE_FAILURES + 1):
        client.post("/login", data={"token": "guess-guess-guess"}, headers=rebound)

    operator = client.post("/login", data={"token": TOKEN})

    assert operator.status_code == 303


@pytest.mark.xfail(
    strict=True,
    reason="config accepts a console.token equal to a dispensary's webhook_token: a token "
    "that Treez (and whoever reads its webhook settings) holds then opens the console",
)
def test_the_console_token_cannot_be_a_webhook_token(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "console: {token: " + TOKEN + "}\n"
        "dispensaries:\n"
        "  shop1:\n"
        "    webhook_token: " + TOKEN + "\n"
        "    destinations:\n"
        "      - {name: sink, type: jsonl, path: out/sink.jsonl, mapping: "
        + str(HTTP_MAPPING)
        + "}\n",
        encoding="utf-8",
    )

    with pytest.raises(ConfigError, match=r"console\.token"):
        load_config(path, environ={})


@pytest.mark.xfail(
    strict=True,
    reason="connector serve binds the console to a non-loopback console.host (0.0.0.0) "
    "without a word: only 'connector check' warns, and the token then crosses the network "
    "in clear text (the console speaks plain http)",
)
def test_serve_warns_when_the_console_is_not_on_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[object, ...]] = []
    monkeypatch.setattr(server, "bind", lambda host, port: ("socket", host, port))
    monkeypatch.setattr(server, "run_with_companion", lambda *args: started.append(args))
    monkeypatch.setattr(
        service, "Service", lambda *a, **k: SimpleNamespace(astore=SimpleNamespace(store=None))
    )
    monkeypatch.setattr(receiver, "create_app", lambda _service: None)
    monkeypatch.setattr(console, "create_console_app", lambda _store, _config: None)
    path = tmp_path / "config.yaml"
    path.write_text(
        f"store: sqlite:///{tmp_path}/store.db\n"
        "console: {host: 0.0.0.0, token: " + TOKEN + "}\n"
        "dispensaries:\n"
        "  shop1:\n"
        "    webhook_token: whk-token-0001\n"
        "    destinations:\n"
        "      - {name: sink, type: jsonl, path: out/sink.jsonl, mapping: "
        + str(HTTP_MAPPING)
        + "}\n",
        encoding="utf-8",
    )

    result = CliRunner().invoke(main, ["serve", "--config", str(path)])

    assert result.exit_code == 0, result.output
    assert started
    assert started[0][2] == ("socket", "0.0.0.0", 8081)
    assert "not a loopback address" in result.output


# --- audit: what was asked is what is recorded ---


@pytest.mark.xfail(
    strict=True,
    reason="replay with 'one' repeated (one=A&one=B) replays every id given but audits the "
    "target as 'dead letter A' only: the audit log under-reports what was replayed",
)
def test_the_audit_names_every_dead_letter_a_replay_touched(
    client: TestClient, filled: Store
) -> None:
    sign_in(client)
    first, second = open_letters(filled)[:2]

    client.post(
        "/dead-letters/replay",
        data={"one": [str(first), str(second)], "csrf": csrf_of(client)},
    )

    replayed = {first, second} - set(open_letters(filled))
    targets = [e.target for e in filled.audit_log() if e.action == "dlq_replay"]
    assert replayed == {first, second}
    assert any(str(second) in t for t in targets), targets


# --- robustness: ids and codes a database cannot hold ---


@pytest.mark.xfail(
    strict=True,
    reason="ids and codes that pass the route's int converter or str.isdigit() but not "
    "int() or the database's integer (10**30, '\u00b2') end in a bare 500 Internal Server "
    "Error instead of a 404 or 400 page",
)
@pytest.mark.parametrize(
    "path",
    [
        f"/dead-letters/{HUGE}",
        f"/dead-letters?code={HUGE}",
        f"/dead-letters?code={SUPERSCRIPT_TWO}",
    ],
)
def test_a_bad_id_or_code_in_a_page_is_a_clear_answer(
    client: TestClient, filled: Store, path: str
) -> None:
    sign_in(client)

    answer = client.get(path)

    assert answer.status_code < 500, answer.text


@pytest.mark.xfail(
    strict=True,
    reason="posted ids and codes that pass str.isdigit() but not int() or the database's "
    "integer ('\u00b2', 10**30) end in a bare 500 Internal Server Error",
)
@pytest.mark.parametrize(
    ("path", "form"),
    [
        ("/dead-letters/replay", {"one": SUPERSCRIPT_TWO}),
        ("/dead-letters/replay", {"id": SUPERSCRIPT_TWO}),
        ("/dead-letters/replay", {"one": HUGE}),
        ("/dead-letters/replay", {"id": HUGE}),
        ("/dead-letters/replay", {"scope": "all", "code": HUGE}),
        ("/conflicts/ack", {"id": HUGE}),
        ("/quarantine/replay", {"id": HUGE}),
        (f"/quarantine/{HUGE}/reveal", {}),
        (f"/dead-letters/{HUGE}/reveal", {}),
    ],
)
def test_a_bad_id_or_code_in_an_action_is_a_clear_answer(
    client: TestClient, filled: Store, path: str, form: dict[str, str]
) -> None:
    sign_in(client)

    answer = client.post(path, data={**form, "csrf": csrf_of(client)})

    assert answer.status_code < 500, answer.text


@pytest.mark.sqlite_only
@pytest.mark.xfail(
    strict=True,
    reason="with the store unreadable (its SQLite file replaced by one that is not a "
    "database) every page is a bare 500 Internal Server Error, not a page saying the store "
    "cannot be read",
)
def test_a_store_that_cannot_be_read_gives_a_clear_page(
    client: TestClient, store: Store, store_url: str
) -> None:
    sign_in(client)
    path = Path(store_url.removeprefix("sqlite:///"))
    assert path.is_file()
    store.close()  # its pool's connections go; the next query opens the file again
    spoiled = path.with_suffix(".spoiled")
    spoiled.write_bytes(b"this is not a database " * 256)
    spoiled.replace(path)

    answer = client.get("/dead-letters")

    assert answer.status_code == 503
    assert "store" in answer.text.lower()


# --- "all matching" is not all ---


@pytest.mark.xfail(
    strict=True,
    reason="'replay all matching' a vendor code replays only the first MATCH_LIMIT "
    "(100,000) open dead letters by id and says 'all dead letters matching' in the flash "
    "and the audit: the rest stay dead, silently",
)
def test_replay_all_matching_a_vendor_code_replays_them_all(
    client: TestClient, filled: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    matching = open_letters(filled)
    assert len(matching) >= 2
    monkeypatch.setattr(pages, "MATCH_LIMIT", len(matching) - 1)
    sign_in(client)

    client.post(
        "/dead-letters/replay",
        data={"scope": "all", "code": VENDOR_CODE, "csrf": csrf_of(client)},
    )

    assert open_letters(filled) == []


@pytest.mark.xfail(
    strict=True,
    reason="'acknowledge all matching' acknowledges only the first MATCH_LIMIT (100,000) "
    "open conflicts and says 'all open conflicts matching': the rest stay open, silently",
)
def test_acknowledge_all_matching_acknowledges_them_all(
    client: TestClient, filled: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pages, "MATCH_LIMIT", 1)
    sign_in(client)

    client.post("/conflicts/ack", data={"scope": "all", "csrf": csrf_of(client)})

    assert filled.conflict_records() == []


@pytest.mark.xfail(
    strict=True,
    reason="a dead-letter list filtered by a vendor code reads up to MATCH_LIMIT (100,000) "
    "dead letters, and parses each one's stored answer and payload, on every page view, "
    "to show at most LIST_LIMIT (500)",
)
def test_a_vendor_code_filter_reads_no_more_than_the_page_shows(
    client: TestClient, filled: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []
    read = filled.dead_letters

    def counting(**kwargs: object) -> object:
        limit = kwargs.get("limit")
        asked.append(limit if isinstance(limit, int) else -1)
        return read(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(filled, "dead_letters", counting)
    sign_in(client)

    page = client.get(f"/dead-letters?code={VENDOR_CODE}")

    assert page.status_code == 200
    assert asked
    assert max(asked) <= pages.LIST_LIMIT


# --- customers whose id the routes cannot carry ---


@pytest.mark.xfail(
    strict=True,
    reason="a customer id with a '/' (Treez ids are free text) cannot reach its customer "
    "page: the quoted %2F is decoded before routing, so the link every row makes is a 404",
)
def test_a_customer_id_with_a_slash_has_a_customer_page(client: TestClient, filled: Store) -> None:
    sign_in(client)

    found = client.get("/customers", params={"dispensary": DISPENSARY, "customer_id": "a/b"})
    page = client.get(found.headers["location"])

    assert page.status_code == 200


# a session cookie the client made up is not a session (fixation held); kept as the guard
def test_a_session_id_chosen_by_the_client_is_not_a_session(client: TestClient) -> None:
    chosen = {"cookie": f"{SESSION_COOKIE}=chosen-by-the-attacker"}

    assert client.get("/", headers=chosen).status_code == 303
    answer = client.post("/login", data={"token": TOKEN}, headers=chosen)

    assert answer.status_code == 303
    assert answer.cookies[SESSION_COOKIE] not in ("", "chosen-by-the-attacker")
