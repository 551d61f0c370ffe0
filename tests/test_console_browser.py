"""The console in a real browser (Debian's Chromium through Playwright) against a real
``connector serve``: a refused delivery becomes a dead letter, is replayed from the page
and delivered; no page shows a customer value; a stranger sees only the sign-in page; a POST
without the CSRF token is refused. Screenshots of each page go to tests/artifacts/."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.http_sink import HttpSink
from test_console import DISPENSARY, TOKEN, sample_values

from connector.demo import load_samples
from connector.store import Store, open_store

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {CHROMIUM} is missing (.ci/run installs it)", pytrace=False)
    pytest.skip(
        f"console browser tests: {CHROMIUM} is missing (apt-get install chromium)",
        allow_module_level=True,
    )

from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
WEBHOOK_TOKEN = "whk-token-browser-0001"
VIEWPORT = {"width": 1366, "height": 768}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Running:
    def __init__(self, webhook: str, console: str, store: Store, sink: HttpSink) -> None:
        self.webhook, self.console, self.store, self.sink = webhook, console, store, sink


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    """``connector serve`` (the pipeline in its own process, the default) with the console
    on, one dispensary and an ``http`` destination whose service refuses everything."""
    webhook_port, console_port = free_port(), free_port()
    with HttpSink(fail_400=1.0) as sink:
        config = tmp_path / "config.yaml"
        config.write_text(
            textwrap.dedent(f"""\
                store: sqlite:///store.db
                server: {{host: 127.0.0.1, port: {webhook_port}, log_format: console}}
                console: {{host: 127.0.0.1, port: {console_port}, token: {TOKEN}}}
                dispensaries:
                  {DISPENSARY}:
                    webhook_token: {WEBHOOK_TOKEN}
                    destinations:
                      - name: crm
                        type: http
                        url: {sink.url}
                        mapping: {ROOT / "mappings" / "http.yaml"}
                """),
            encoding="utf-8",
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = (tmp_path / "serve.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "connector", "serve", "--config", str(config)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        console = f"http://127.0.0.1:{console_port}"
        webhook = f"http://127.0.0.1:{webhook_port}"
        store = None
        try:

            def up() -> bool:
                if process.poll() is not None:
                    raise AssertionError(
                        "serve exited: " + (tmp_path / "serve.log").read_text()[-2000:]
                    )
                try:
                    ready = httpx.get(f"{webhook}/readyz", timeout=1).status_code == 200
                    return ready and httpx.get(f"{console}/login", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(up, 30, "the console to answer")
            store = open_store(f"sqlite:///{tmp_path / 'store.db'}", listen=False)
            yield Running(webhook, console, store, sink)
        finally:
            process.terminate()
            try:
                assert process.wait(timeout=30) == 0
            finally:
                if process.poll() is None:
                    process.kill()
                log.close()
                if store is not None:
                    store.close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        found = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield found
        finally:
            found.close()


def shoot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=True)


def assert_discreet(page: Page, values: set[str]) -> None:
    html = page.content()
    shown = sorted(v for v in values if v in html)
    assert not shown, f"{page.url} shows customer values ({len(shown)} of them)"


def test_a_dead_letter_replayed_from_the_browser_is_delivered(
    running: Running, browser: Browser
) -> None:
    values = sample_values()
    samples = {name: body for name, _, body in load_samples(DISPENSARY)}
    headers = {"authorization": f"Bearer {WEBHOOK_TOKEN}", "content-type": "application/json"}
    url = f"{running.webhook}/webhooks/treez/{DISPENSARY}"
    # a new customer (one upsert), and a malformed body (quarantined)
    assert httpx.post(url, content=samples["01-create"], headers=headers).status_code == 202
    assert httpx.post(url, content=samples["09-malformed"], headers=headers).status_code == 422
    assert httpx.get(f"{running.webhook}/login").status_code == 404  # never on the webhook port
    (letter,) = wait_until(running.store.dead_letters, 30, "the refused delivery's dead letter")
    customer = letter.customer_id

    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(f"{running.console}/")
    assert page.url.endswith("/login")
    shoot(page, "login")
    page.fill("#token", TOKEN)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{running.console}/")

    row = page.locator("tr", has=page.locator("td", has_text="crm"))
    assert row.locator("a.badge.bad").inner_text() == "1"
    assert_discreet(page, values)
    shoot(page, "overview")

    page.click("nav >> text=Dead letters")
    page.wait_for_url("**/dead-letters")
    assert page.locator("tbody tr").count() == 1
    assert page.locator("tbody tr td").nth(8).inner_text() == "400"
    assert_discreet(page, values)
    shoot(page, "dead-letters")

    page.click(f"a[href='/dead-letters/{letter.id}']")
    assert_discreet(page, values)
    shoot(page, "dead-letter")

    refused = page.request.post(
        f"{running.console}/dead-letters/replay", form={"one": str(letter.id)}
    )
    assert refused.status == 403
    assert running.store.dead_letters()  # nothing changed

    running.sink.app.configure(fail_400=0.0)
    page.goto(f"{running.console}/dead-letters")
    page.click(f"button[name='one'][value='{letter.id}']")
    page.wait_for_url("**/dead-letters")
    assert "replayed 1" in page.locator(".flash").inner_text()

    wait_until(lambda: running.sink.app.unique_ops(), 30, "the sink to accept the operation")
    wait_until(lambda: not running.store.dead_letters(), 5, "the dead letter to be replayed")

    def delivered() -> bool:
        page.goto(f"{running.console}/")
        cells = page.locator("tr", has=page.locator("td", has_text="crm")).locator("td")
        return cells.nth(5).inner_text() == "1" and cells.nth(6).inner_text() == "0"

    wait_until(delivered, 30, "the overview to show it delivered")
    shoot(page, "overview-delivered")

    page.goto(f"{running.console}/dead-letters?all=1")
    assert "replayed" in page.locator("tbody tr").first.inner_text()
    page.click(f"tbody a[href='/customers/{DISPENSARY}/{customer}']")
    page.wait_for_url(f"**/customers/{DISPENSARY}/{customer}")
    assert f"Customer {customer}" in page.locator("h1").inner_text()
    operations = page.locator("section", has=page.locator("h2", has_text="Operations"))
    assert "delivered" in operations.inner_text()
    assert_discreet(page, values)
    shoot(page, "customer")

    for name in ("quarantine", "conflicts", "audit"):
        page.goto(f"{running.console}/{name}")
        assert_discreet(page, values)
        shoot(page, name)
        if name == "quarantine":
            assert page.locator("tbody tr").count() == 1
    audit = page.locator("tbody").inner_text()
    assert "dlq_replay" in audit
    assert "sign_in" in audit

    stranger = browser.new_context(viewport=VIEWPORT).new_page()
    for path in ("/", "/dead-letters", f"/customers/{DISPENSARY}/{customer}", "/audit"):
        stranger.goto(f"{running.console}{path}")
        assert stranger.url.endswith("/login")
        assert stranger.locator("nav").count() == 0
        assert_discreet(stranger, values)
    answer = stranger.request.post(
        f"{running.console}/dead-letters/replay", form={"scope": "all"}, max_redirects=0
    )
    assert answer.status == 303
    assert answer.headers["location"] == "/login"
    context.close()
