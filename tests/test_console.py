"""The operator's console (connector.console) through its ASGI app, on both stores: sign-in,
sessions, CSRF, the audit of every action, replay and acknowledge, reveals, and a scan of
every page for the sample customers' values."""

from __future__ import annotations

import json
import re
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.config import Config, load_config
from connector.console import create_console_app
from connector.console.auth import FREE_FAILURES, SESSION_COOKIE, Sessions, who
from connector.console.chart import throughput_svg
from connector.demo import load_samples
from connector.errors import EventValidationError
from connector.pipeline import Deployment, process_batch
from connector.planner import instant_us
from connector.store import NewEvent, Rejected, Store
from connector.treez import OtherEvent, TestPing, check_event_json

with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx (installed) works
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
HTTP_MAPPING = ROOT / "mappings" / "http.yaml"
TOKEN = "console-token-0123456789"
DISPENSARY = "partnersandbox3"
# fields whose values the pages must never show unreveiled (ids and flags are not values)
PERSONAL = (
    "first_name",
    "last_name",
    "middle_name",
    "nickname",
    "email",
    "phone",
    "birthday",
    "drivers_license",
    "state_medical_id",
    "physician_first_name",
    "physician_last_name",
    "physician_license",
    "caregiver_license_number",
)


def write_config(folder: Path, store_url: str, extra: str = "") -> Config:
    path = folder / "config.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            store: "{store_url}"
            console: {{token: {TOKEN}}}
            dispensaries:
              {DISPENSARY}:
                webhook_token: whk-token-0001
                destinations:
                  - name: crm
                    type: http
                    url: "http://127.0.0.1:9/ops"
                    mapping: "{HTTP_MAPPING}"
            """)
        + extra,
        encoding="utf-8",
    )
    return load_config(path, environ={})


def sample_values() -> set[str]:
    """Every personal value of the sample customers (and its digits-only form)."""
    found: set[str] = set()
    for _, _, body in load_samples(DISPENSARY):
        decoded = json.loads(body)
        data = decoded.get("data") if isinstance(decoded, dict) else None
        if not isinstance(data, dict):
            continue
        for key in PERSONAL:
            value = data.get(key)
            if isinstance(value, str) and len(value) >= 4 and value not in ("N/A", "null"):
                found.add(value)
        for address in data.get("addresses") or []:
            if isinstance(address, dict) and address.get("street1"):
                found.add(address["street1"])
    return found


def receive_samples(store: Store) -> None:
    """The samples as the receiver stores them: events in the inbox, refused bodies in
    quarantine; then planned by the real planner."""
    events, rejected = [], []
    for _, _, body in load_samples(DISPENSARY):
        text = body.decode()
        try:
            event = check_event_json(text, source="body")
        except EventValidationError as exc:
            reason = "; ".join(str(p) for p in exc.problems)
            rejected.append(Rejected(DISPENSARY, 422, reason, "application/json", body))
            continue
        if isinstance(event, TestPing):
            continue
        if isinstance(event, OtherEvent):
            events.append(NewEvent(DISPENSARY, "webhook", event.event_type, None, None, text))
            continue
        events.append(
            NewEvent(
                DISPENSARY,
                "webhook",
                "CUSTOMER",
                event.customer_id,
                instant_us(event.last_update),
                text,
            )
        )
    store.add_events(events, rejected)


def plan_all(store: Store, config: Config) -> None:
    deployment = Deployment.from_config(config)
    while process_batch(store, deployment).events:
        pass


def refuse_and_deliver(store: Store) -> list[int]:
    """Vincent Vega's operations are refused with an answer that quotes him (as vendors'
    answers do); the others are delivered. The dead letters' ids."""
    while True:
        rows = store.claim(DISPENSARY, "crm", 100)
        if not rows:
            break
        done, dead = [], []
        for row in rows:
            if row.customer_id == "5001":
                fields = row.body.get("fields") or {}
                answer = json.dumps(
                    {
                        "code": "INVALID_CONTACT",
                        "message": f"refused {fields.get('email')} {fields.get('first_name')} "
                        f"{fields.get('last_name')} {fields.get('phone')}",
                    }
                )
                dead.append((row, "HTTP 400: the destination refused the operation", 400, answer))
            else:
                # a merge answers with the survivor's contact, as destinations do
                done.append((row, f"c-{row.body.get('into_customer_id') or row.customer_id}"))
        store.finish(DISPENSARY, "crm", done=done, dead=dead)
    return [x.id for x in store.dead_letters(dispensary=DISPENSARY)]


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
    app = create_console_app(store, config, failed_sign_in_delay=0)
    with TestClient(app, follow_redirects=False, base_url="http://localhost") as found:
        yield found


def sign_in(client: TestClient) -> None:
    answer = client.post("/login", data={"token": TOKEN})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/"


def csrf_of(client: TestClient, path: str = "/") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def audit_actions(store: Store) -> list[tuple[str, str, str, str]]:
    return [(e.who, e.action, e.target, e.detail) for e in reversed(store.audit_log())]


# --- sign-in and sessions ---


PAGES = [
    "/",
    "/dead-letters",
    "/dead-letters/1",
    "/quarantine",
    "/conflicts",
    "/customers",
    f"/customers/{DISPENSARY}/5001",
    "/audit",
    "/no-such-page",
]


@pytest.mark.parametrize("path", PAGES)
def test_every_page_sends_a_stranger_to_sign_in(client: TestClient, path: str) -> None:
    answer = client.get(path)

    assert answer.status_code == 303
    assert answer.headers["location"] == "/login"


@pytest.mark.sqlite_only
def test_the_sign_in_page_and_the_stylesheet_need_no_session(client: TestClient) -> None:
    page = client.get("/login")
    style = client.get("/static/console.css")

    assert page.status_code == 200
    assert 'name="token"' in page.text
    assert "Dead letters" not in page.text  # no navigation before signing in
    assert style.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_a_wrong_token_is_refused_and_audited(client: TestClient, store: Store) -> None:
    answer = client.post("/login", data={"token": "not-the-console-token"})

    assert answer.status_code == 403
    assert "That token is not right." in answer.text
    assert SESSION_COOKIE not in answer.cookies
    assert client.get("/").status_code == 303
    assert audit_actions(store) == [
        ("no session from testclient", "sign_in", "console", "refused: wrong token")
    ]
    assert "not-the-console-token" not in json.dumps(audit_actions(store))


@pytest.mark.sqlite_only
def test_guessing_is_braked_per_address(client: TestClient, store: Store) -> None:
    for _ in range(FREE_FAILURES + 1):
        assert client.post("/login", data={"token": "guess-guess-guess"}).status_code == 403

    braked = client.post("/login", data={"token": "guess-guess-guess"})

    assert braked.status_code == 429
    assert int(braked.headers["retry-after"]) >= 1
    assert SESSION_COOKIE not in braked.cookies
    # a braked guess is not checked and not audited (a flood must not push the operator's
    # actions off the audit page); the failures before it are
    assert audit_actions(store)[-1][3] == "refused: wrong token"
    # the right token still signs in: a stranger's guesses never lock the operator out
    assert client.post("/login", data={"token": TOKEN}).status_code == 303


@pytest.mark.sqlite_only
def test_the_session_cookie_is_httponly_strict_and_secure_over_https(
    store: Store, config: Config
) -> None:
    app = create_console_app(store, config, failed_sign_in_delay=0)
    for base, secure in (("http://localhost", False), ("https://localhost", True)):
        with TestClient(app, base_url=base, follow_redirects=False) as client:
            answer = client.post("/login", data={"token": TOKEN})
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=")
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= flags
        assert ("secure" in flags) is secure


def test_sign_in_and_out_are_audited_by_session_hash(client: TestClient, store: Store) -> None:
    sign_in(client)
    session_id = client.cookies[SESSION_COOKIE]
    token = csrf_of(client)

    out = client.post("/logout", data={"csrf": token})

    assert out.status_code == 303
    assert client.get("/").status_code == 303
    name = who(session_id, "testclient")
    assert audit_actions(store) == [
        (name, "sign_in", "console", "ok"),
        (name, "sign_out", "console", ""),
    ]
    assert session_id not in json.dumps(audit_actions(store))


def test_an_old_session_cookie_is_refused_after_sign_out(client: TestClient) -> None:
    sign_in(client)
    session_id = client.cookies[SESSION_COOKIE]
    client.post("/logout", data={"csrf": csrf_of(client)})

    client.cookies.set(SESSION_COOKIE, session_id)

    assert client.get("/").status_code == 303


def test_idle_sessions_expire() -> None:
    now = [1000.0]
    sessions = Sessions(idle_seconds=60, clock=lambda: now[0])
    kept, idle = sessions.create("a"), sessions.create("b")

    now[0] += 50
    assert sessions.get(kept.id) is kept  # seen: its idle clock restarts
    now[0] += 50

    assert sessions.get(kept.id) is kept
    assert sessions.get(idle.id) is None


# --- CSRF and origin ---


def test_a_post_without_or_with_a_wrong_csrf_token_changes_nothing(
    client: TestClient, filled: Store
) -> None:
    sign_in(client)
    letter = filled.dead_letters()[0].id
    before = audit_actions(filled)

    missing = client.post("/dead-letters/replay", data={"one": str(letter)})
    wrong = client.post("/dead-letters/replay", data={"one": str(letter), "csrf": "x" * 43})
    ack = client.post("/conflicts/ack", data={"scope": "all"})
    reveal = client.post(f"/dead-letters/{letter}/reveal", data={})

    for answer in (missing, wrong, ack, reveal):
        assert answer.status_code == 403
        assert "CSRF token is missing or out of date" in answer.text
    assert filled.dead_letters()[0].id == letter
    assert len(filled.conflict_records()) == 2
    assert audit_actions(filled) == before


def test_a_post_from_another_site_is_refused(client: TestClient, filled: Store) -> None:
    sign_in(client)
    token = csrf_of(client)
    letter = filled.dead_letters()[0].id

    answer = client.post(
        "/dead-letters/replay",
        data={"one": str(letter), "csrf": token},
        headers={"origin": "https://evil.example"},
    )

    assert answer.status_code == 403
    assert "not sent from one of the console's own pages" in answer.text
    assert filled.dead_letters()[0].id == letter


def test_a_post_without_a_session_goes_to_sign_in_and_changes_nothing(
    client: TestClient, filled: Store
) -> None:
    letter = filled.dead_letters()[0].id

    answer = client.post("/dead-letters/replay", data={"one": str(letter), "csrf": "x"})

    assert answer.status_code == 303
    assert answer.headers["location"] == "/login"
    assert filled.dead_letters()[0].id == letter


# --- actions ---


def test_replay_one(client: TestClient, filled: Store) -> None:
    sign_in(client)
    letters = [x.id for x in filled.dead_letters()]
    assert len(letters) >= 2

    answer = client.post(
        "/dead-letters/replay", data={"one": str(letters[0]), "csrf": csrf_of(client)}
    )

    assert answer.status_code == 303
    assert [x.id for x in filled.dead_letters()] == letters[1:]
    asked, done = audit_actions(filled)[-2:]
    assert asked[1:] == ("dlq_replay_asked", f"dead letter {letters[0]}", "")
    assert done[1:3] == ("dlq_replay", f"dead letter {letters[0]}")
    assert done[3].startswith("replayed ")
    flash = client.get(answer.headers["location"]).text
    assert f"Dead letter {letters[0]}: replayed" in flash


def test_replay_selected(client: TestClient, filled: Store) -> None:
    sign_in(client)
    letters = [x.id for x in filled.dead_letters()]

    client.post(
        "/dead-letters/replay",
        data={"id": [str(i) for i in letters[:2]], "scope": "selected", "csrf": csrf_of(client)},
    )

    assert [x.id for x in filled.dead_letters()] == letters[2:]
    assert audit_actions(filled)[-1][1:3] == (
        "dlq_replay",
        f"dead letters {letters[0]}, {letters[1]}",
    )


@pytest.mark.parametrize("code", ["400", "INVALID_CONTACT"])
def test_replay_all_matching_the_filter(client: TestClient, filled: Store, code: str) -> None:
    sign_in(client)
    assert filled.dead_letters()

    listed = client.get(f"/dead-letters?destination=crm&op=upsert&code={code}")
    client.post(
        "/dead-letters/replay",
        data={
            "scope": "all",
            "destination": "crm",
            "op": "upsert",
            "code": code,
            "csrf": csrf_of(client),
        },
    )

    assert listed.status_code == 200
    assert "INVALID_CONTACT" in listed.text
    left = filled.dead_letters()
    assert left
    assert all(x.op != "upsert" for x in left)
    assert audit_actions(filled)[-1][1:3] == (
        "dlq_replay",
        f"all dead letters matching destination=crm op=upsert code={code}",
    )


def test_nothing_selected_changes_nothing(client: TestClient, filled: Store) -> None:
    sign_in(client)
    before = len(filled.dead_letters())

    answer = client.post(
        "/dead-letters/replay", data={"scope": "selected", "csrf": csrf_of(client)}
    )

    assert answer.status_code == 303
    assert len(filled.dead_letters()) == before
    assert "No dead letter was selected" in client.get(answer.headers["location"]).text


def test_acknowledge_selected_then_all_matching(client: TestClient, filled: Store) -> None:
    sign_in(client)
    first, second = (c.id for c in filled.conflict_records())

    client.post(
        "/conflicts/ack", data={"id": str(first), "scope": "selected", "csrf": csrf_of(client)}
    )
    client.post(
        "/conflicts/ack", data={"scope": "all", "destination": "crm", "csrf": csrf_of(client)}
    )

    assert filled.conflict_records() == []
    acked = filled.conflict_records(include_acked=True)
    assert {c.acked_by for c in acked} == {who(client.cookies[SESSION_COOKIE], "testclient")}
    assert [a[1:] for a in audit_actions(filled)[-4:]] == [
        ("conflicts_ack_asked", f"conflicts {first}", ""),
        ("conflicts_ack", f"#{first}", "acknowledged 1 of 1"),
        ("conflicts_ack_asked", "all open conflicts matching destination=crm", ""),
        ("conflicts_ack", f"#{second}", "acknowledged 1 of 1"),
    ]
    assert second not in {c.id for c in filled.conflict_records()}


def test_quarantine_replay_judges_again_and_is_audited(client: TestClient, filled: Store) -> None:
    sign_in(client)
    (item,) = filled.quarantined()

    client.post("/quarantine/replay", data={"scope": "all", "csrf": csrf_of(client)})

    assert filled.quarantined()[0].id == item.id  # the malformed body is still malformed
    assert audit_actions(filled)[-1][1:] == (
        "quarantine_replay_asked",
        "all open quarantined bodies matching no filter",
        "",
    )
    flash = client.get("/quarantine").text
    assert "moved 0, still refused 1, skipped 0" in flash


# --- privacy ---


def pages_of(client: TestClient, store: Store) -> dict[str, str]:
    letter = store.dead_letters(include_replayed=True)[0].id
    paths = [
        "/",
        "/dead-letters",
        f"/dead-letters/{letter}",
        "/dead-letters?code=INVALID_CONTACT",
        "/quarantine?all=1",
        "/conflicts?all=1",
        "/customers",
        "/customers?customer_id=5001",
        *(f"/customers/{DISPENSARY}/{c}" for c in ("5001", "5002", "5003", "3904")),
        "/audit",
        "/login",
    ]
    found = {}
    for path in paths:
        answer = client.get(path, follow_redirects=True)
        assert answer.status_code == 200, path
        found[path] = answer.text
    return found


def leaks(pages: dict[str, str], values: set[str]) -> dict[str, list[str]]:
    found = {path: sorted(v for v in values if v in html) for path, html in pages.items()}
    return {path: names for path, names in found.items() if names}


def test_no_page_shows_a_customer_value_unless_revealed(client: TestClient, filled: Store) -> None:
    values = sample_values()
    assert {"Vincent", "Vega", "vincent@example.com", "3105550101", "1961-05-13"} <= values
    sign_in(client)

    assert leaks(pages_of(client, filled), values) == {}

    token = csrf_of(client)
    letter = filled.dead_letters(customer="5001")[0].id
    (item,) = filled.quarantined()
    revealed = {
        "letter": client.post(f"/dead-letters/{letter}/reveal", data={"csrf": token}).text,
        "customer": client.post(f"/customers/{DISPENSARY}/5001/reveal", data={"csrf": token}).text,
        "quarantined": client.post(f"/quarantine/{item.id}/reveal", data={"csrf": token}).text,
    }
    for name, html in revealed.items():  # the scan can fail: revealed, the values are there
        assert "Vega" in html, name
    assert re.search(r"vinc(ent|e\.vega)@example\.com", revealed["letter"])
    assert "vince.vega@example.com" in revealed["customer"]
    assert [a[1:3] for a in audit_actions(filled)[-3:]] == [
        ("reveal", f"dead letter {letter} (customer 5001)"),
        ("reveal", f"customer {DISPENSARY}/5001"),
        ("reveal", f"quarantined body {item.id}"),
    ]
    # and after the reveals, the pages (the audit log among them) are as discreet as before
    assert leaks(pages_of(client, filled), values) == {}


def test_rows_that_name_a_customer_link_to_the_customer_page(
    client: TestClient, filled: Store
) -> None:
    sign_in(client)

    letters = client.get("/dead-letters").text
    conflicts = client.get("/conflicts").text
    story = client.get(f"/customers/{DISPENSARY}/5001").text

    assert f'href="/customers/{DISPENSARY}/5001"' in letters
    assert f'href="/customers/{DISPENSARY}/5002"' in conflicts
    assert "Customer 5001" in story
    assert "Events, oldest first" in story
    assert "dead letter" in story


def test_the_overview_counts_and_charts(client: TestClient, filled: Store) -> None:
    sign_in(client)

    page = client.get("/").text

    assert "<svg" in page
    assert "hour (UTC)" in page
    row = re.search(r"<td>partnersandbox3</td>\s*<td>crm</td>(.*?)</tr>", page, re.S)
    assert row is not None
    assert "badge bad" in row.group(1)  # the dead letters, linked


def test_the_chart_has_a_bar_per_hour_and_axes() -> None:
    now = 1_800_000_000.0
    hour = now - now % 3600

    svg = str(throughput_svg([(hour - 3600, 7), (hour, 3)], now))

    assert svg.count('class="bar"') == 24
    assert "7 delivered" in svg
    assert "3 delivered" in svg
    assert "10 in all" in svg
    assert ">hour (UTC)<" in svg
    assert ">delivered<" in svg
    assert ">10</text>" in svg  # the y axis' top: a round number above the tallest bar


def test_the_console_needs_its_token(tmp_path: Path, store_url: str, store: Store) -> None:
    config = write_config(tmp_path, store_url).model_copy(update={"console": None})

    with pytest.raises(ValueError, match="console is off"):
        create_console_app(store, config)


# --- served by connector serve, never on the webhook port ---


@pytest.mark.sqlite_only
def test_the_webhook_app_has_no_console_route(config: Config) -> None:
    from types import SimpleNamespace

    from connector.metrics import Metrics
    from connector.receiver import create_app

    ports = SimpleNamespace(config=config, metrics=Metrics(), lifespan=None)
    client = TestClient(create_app(ports), follow_redirects=False)  # type: ignore[arg-type]

    for path in ("/login", "/dead-letters", "/audit", "/static/console.css"):
        assert client.get(path).status_code == 404, path
    assert client.post("/login", data={"token": TOKEN}).status_code in (404, 405)


@pytest.mark.sqlite_only
def test_serve_refuses_a_console_on_the_webhook_listener(config: Config) -> None:
    from click.testing import CliRunner

    from connector.cli import main

    assert config.path is not None
    result = CliRunner().invoke(main, ["serve", "--config", str(config.path), "--port", "8081"])

    assert result.exit_code == 1
    assert "console.port 8081 is the webhook listener's (127.0.0.1:8081)" in result.stderr
    assert TOKEN not in result.output
