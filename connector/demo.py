"""``connector demo``: post the bundled sample events and show what each destination got.

The samples tell the whole story of the rules: a new customer, an update, an opt-out, an
identical re-delivery, a late older version, the real Treez delivery, both payloads of a
merge, a malformed body, another event type and the portal's test ping. Their timestamps are
set relative to now, so the demo can be run again and again against the same store.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from typing import Any

import httpx

from connector.config import Config
from connector.destinations.jsonl import JsonlDestination
from connector.store import Store, open_store

SAMPLE_OFFSET = timezone(timedelta(hours=-7))  # Treez sends store-local time with its offset


def load_samples(dispensary: str, now: datetime | None = None) -> list[tuple[str, str, bytes]]:
    """(name, what it shows, body) of every sample, timestamps filled in relative to ``now``."""
    folder = resources.files("connector") / "samples"
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    now = now or datetime.now(UTC)
    stamps = {
        name: (now + timedelta(seconds=offset))
        .astimezone(SAMPLE_OFFSET)
        .isoformat(timespec="milliseconds")
        for name, offset in index["offsets_seconds"].items()
    }
    out = []
    for entry in index["events"]:
        text = (folder / entry["file"]).read_text(encoding="utf-8")
        for name, stamp in stamps.items():
            text = text.replace("{" + name + "}", stamp)
        body = json.loads(text)
        if isinstance(body, dict) and "dispensary_short_name" in body:
            body["dispensary_short_name"] = dispensary
        out.append((entry["file"].removesuffix(".json"), entry["what"], json.dumps(body).encode()))
    return out


def _reachable(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def embedded_server(config: Config) -> Iterator[str]:
    """Run the connector in this process on a free port; yields its base URL."""
    import uvicorn

    from connector.receiver import create_app
    from connector.server import bind, uvicorn_config
    from connector.service import Service

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    service = Service(config, idle_poll=0.2)
    server = uvicorn.Server(uvicorn_config(create_app(service), config, host=None, port=port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the embedded server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _line_shape(line: str) -> str:
    """One received line told without its values: the operation, the customer and the names
    of the fields it carried."""
    try:
        op = json.loads(line)
    except ValueError:
        return "(not JSON)"
    if not isinstance(op, dict):
        return "(not an operation)"
    fields = op.get("fields")
    names = ", ".join(sorted(fields)) if isinstance(fields, dict) else "no fields"
    return f"{op.get('op')} customer {op.get('customer_id')}: {names}"


def run_demo(
    config: Config,
    *,
    dispensary: str,
    url: str | None,
    timeout: float,
    echo: Callable[[str], None],
    show_values: bool = False,
) -> bool:
    """Post the samples, wait for delivery, print what each destination received (the
    field names of what a file destination got; its lines with ``show_values``)."""
    disp = config.dispensaries[dispensary]
    token = disp.webhook_token[0].get_secret_value()
    base = url or f"http://{config.server.host}:{config.server.port}"
    store = open_store(config.store, listen=False)
    try:
        start_id = _last_outbox_id(store)
        offsets = {
            d.name: (d.path.stat().st_size if d.path.exists() else 0)
            for d in disp.destinations
            if isinstance(d, JsonlDestination)
        }
        with _server(config, base, echo) as server_url:
            _post_all(server_url, dispensary, token, echo)
            finished = _wait(store, timeout)
        return _report(store, config, dispensary, start_id, offsets, finished, echo, show_values)
    finally:
        store.close()


@contextmanager
def _server(config: Config, base: str, echo: Callable[[str], None]) -> Iterator[str]:
    """The running server at ``base`` if one answers, else one started in this process."""
    if _reachable(base):
        echo(f"posting to the running server at {base}")
        yield base
        return
    echo(f"no server at {base}: starting one in this process")
    with embedded_server(config) as embedded:
        yield embedded


def _last_outbox_id(store: Store) -> int:
    rows = store.latest_operations(1)
    return int(rows[0]["id"]) if rows else 0


def _post_all(base: str, dispensary: str, token: str, echo: Callable[[str], None]) -> None:
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    with httpx.Client(timeout=10.0) as client:
        for name, what, body in load_samples(dispensary):
            response = client.post(
                f"{base}/webhooks/treez/{dispensary}", content=body, headers=headers
            )
            try:
                answer: Any = response.json()
            except ValueError:
                answer = response.text
            detail = answer.get("status") or answer.get("error") if isinstance(answer, dict) else ""
            echo(f"  {name:20} {response.status_code} {detail or ''}  ({what})")


def _wait(store: Store, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    time.sleep(0.3)
    while time.monotonic() < deadline:
        if store.pending_work() == 0:
            return True
        time.sleep(0.2)
    return False


def _report(
    store: Store,
    config: Config,
    dispensary: str,
    start_id: int,
    offsets: dict[str, int],
    finished: bool,
    echo: Callable[[str], None],
    show_values: bool = False,
) -> bool:
    if not finished:
        echo("warning: some operations are still pending (see `connector status` later)")
    newest = store.latest_operations(10_000)
    rows = [r for r in reversed(newest) if r["id"] > start_id and r["dispensary"] == dispensary]
    for dest in config.dispensaries[dispensary].destinations:
        mine = [r for r in rows if r["destination"] == dest.name]
        echo(f"\ndestination {dest.name} ({dest.type}): {len(mine)} operations")
        for row in mine:
            echo(f"  {row['op']:12} customer {row['customer_id']:6} {row['status']}")
        if isinstance(dest, JsonlDestination) and dest.path.exists():
            with dest.path.open("rb") as handle:
                handle.seek(offsets.get(dest.name, 0))
                received = handle.read().decode("utf-8").splitlines()
            echo(f"  {dest.path} received {len(received)} lines; the first of them:")
            for line in received[:3]:
                if show_values:
                    echo(f"    {line[:160]}{'…' if len(line) > 160 else ''}")
                else:
                    echo(f"    {_line_shape(line)}")
            if received and not show_values:
                echo("  (field names only: --show-values prints the lines)")
    return finished
