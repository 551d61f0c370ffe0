"""Adversary (attack5) of the Treez pace's margin (connector/treez_api.py, 20 ms -> 5 ms):
whatever the delays of requests and answers, and with the machine's CPUs taken by a hog, no
sliding one-second window of the fake Treez's arrivals holds more than 10 requests (token
requests included), through the command with its planning child."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tenacity
from fakes._serve import serve_in_thread
from fakes.treez_api import TreezFake, most_in_window
from test_attack5_child_faults import config_for, no_process_left
from test_reconcile import DISPENSARY

from connector.config import DispensaryConfig
from connector.reconcile import RunOptions
from connector.runner import reconcile_now
from connector.treez_api import TreezClient


@pytest.fixture
def cpu_hog() -> Iterator[frozenset[int]]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield frozenset(hog.pid for hog in hogs)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def jittered(fake: TreezFake, seed: int, inbound: float, outbound: float) -> Any:
    """The fake behind a network: each request arrives up to ``inbound`` seconds late, each
    answer is held up to ``outbound`` seconds."""
    rng = random.Random(seed)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await fake(scope, receive, send)
        await asyncio.sleep(rng.uniform(0, inbound))

        async def later(message: Any) -> None:
            if message["type"] == "http.response.start":
                await asyncio.sleep(rng.uniform(0, outbound))
            await send(message)

        await fake(scope, receive, later)
        return None

    return app


def client_for(url: str | None, app: Any) -> Any:
    def build(_: str, disp: DispensaryConfig) -> TreezClient:
        assert disp.treez is not None
        transport = None if url else httpx.ASGITransport(app=app)
        client = httpx.AsyncClient(transport=transport, timeout=10) if transport else None
        return TreezClient(
            disp.treez if not url else disp.treez.model_copy(update={"api_url": url}),
            client=client,
            retry_wait=tenacity.wait_none(),
            attempts=3,
        )

    return build


def _renew_midway(fake: TreezFake, request: Any) -> None:
    if request.number in (5, 11):
        fake.expire_tokens()  # a 401, then a token request, inside the window


@pytest.mark.parametrize(
    ("over", "inbound", "outbound"),
    [("asgi", 0.03, 0.03), ("asgi", 0.08, 0.0), ("asgi", 0.0, 0.08), ("tcp", 0.03, 0.03)],
)
def test_no_window_holds_more_than_ten_under_load_and_jitter(
    tmp_path: Path, cpu_hog: frozenset[int], over: str, inbound: float, outbound: float
) -> None:
    fake = TreezFake.generate(800, seed=2, history_days=0.5)
    assert fake.rate_limit == 10
    fake.on_page(_renew_midway)
    app = jittered(fake, 17, inbound, outbound)
    config = config_for(tmp_path, f"sqlite:///{tmp_path}/c.db", fake)

    def go(url: str | None) -> Any:
        return asyncio.run(
            reconcile_now(
                config,
                DISPENSARY,
                RunOptions(),
                wait=True,
                timeout=60,
                echo=lambda _: None,
                reconciler_options={"client_for": client_for(url, app)},
            )
        )

    if over == "tcp":
        with serve_in_thread(app, host="127.0.0.1", port=0, name="treez-jitter") as port:
            report = go(f"http://127.0.0.1:{port}/v2.0/dispensary/{fake.dispensary}")
    else:
        report = go(None)
    assert report.outcome == "succeeded"
    no_process_left(cpu_hog)
    arrivals = [call.at for call in fake.calls]
    assert fake.counters["throttled"] == 0
    assert fake.token_requests >= 3
    assert most_in_window(arrivals) <= 10
