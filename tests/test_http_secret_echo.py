"""A service that echoes the request's headers in its error answers (many frameworks' debug
pages do): the http destination keeps the answer's text for the dead letter and the retry's
reason, and must not keep the secrets it sent with it. Both of its paths: its own client over
a real socket, and a given httpx client (respx)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import respx

from connector.delivery.base import Delivery
from connector.destinations.http import HttpDestination, HttpSink
from connector.errors import DeliveryError, FatalDelivery, RetriableDelivery

MAPPING = Path(__file__).resolve().parent.parent / "mappings" / "http.yaml"
KEY = "k3y-Sup3r/Secret+value"
TENANT = "north-7"  # under 8 characters: not taken for a secret (it would garble answers)
PASSWORD = "p@ss word/9"


def config(tmp_path: Path, url: str) -> HttpDestination:
    shutil.copy(MAPPING, tmp_path / "http.yaml")
    data = {
        "name": "hook",
        "type": "http",
        "url": url,
        "mapping": "http.yaml",
        "headers": {"X-Api-Key": KEY, "X-Tenant": TENANT},
    }
    return HttpDestination.model_validate(data, context={"base_dir": tmp_path})


def delivery() -> Delivery:
    body = {"op": "upsert", "customer_id": "c1", "fields": {}, "idempotency_key": "k-c1"}
    return Delivery(1, "k-c1", body)


def echo_page(head: str) -> bytes:
    """A debug page: the request's head, raw and as a JSON string."""
    return (head + "\n" + json.dumps({"headers": head})).encode()


async def echoing_server(status: int) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = next(
            int(line.split(":", 1)[1])
            for line in head.split("\r\n")
            if line.lower().startswith("content-length:")
        )
        await reader.readexactly(length)
        body = echo_page(head)
        writer.write(
            f"HTTP/1.1 {status} Oops\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def refusal(sink: HttpSink, kind: type[DeliveryError]) -> DeliveryError:
    """The error ``sink`` raises sending one operation (of ``kind``); the sink closed."""
    try:
        with pytest.raises(kind) as caught:
            await sink.send([delivery()])
        return caught.value
    finally:
        await sink.aclose()


def secrets_in(error: DeliveryError) -> list[str]:
    basic = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    kept = f"{error} {error.body}"
    found = [s for s in (KEY, json.dumps(KEY)[1:-1], PASSWORD, basic) if s in kept]
    assert "[secret]" in (error.body or "")  # the answer is kept, the secrets blanked
    assert TENANT in (error.body or "")  # what is no secret stays
    return found


@pytest.mark.parametrize(("status", "kind"), [(400, FatalDelivery), (503, RetriableDelivery)])
def test_own_client_keeps_no_echoed_secret(
    tmp_path: Path, status: int, kind: type[DeliveryError]
) -> None:
    async def go() -> DeliveryError:
        server, port = await echoing_server(status)
        try:
            url = f"http://admin:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/h"
            sink = HttpSink(config(tmp_path, url))
        except BaseException:
            server.close()
            raise
        try:
            return await refusal(sink, kind)
        finally:
            server.close()

    assert secrets_in(asyncio.run(go())) == []


def test_given_httpx_client_keeps_no_echoed_secret(tmp_path: Path) -> None:
    url = "https://hooks.example.com/in"

    async def go() -> DeliveryError:
        with respx.mock(assert_all_called=True, using="httpx") as router:
            # the headers the request carried, echoed
            router.post(url).mock(
                side_effect=lambda request: httpx.Response(
                    422, content=echo_page(str(dict(request.headers)))
                )
            )
            sink = HttpSink(config(tmp_path, url), client=httpx.AsyncClient())
            return await refusal(sink, FatalDelivery)

    error = asyncio.run(go())
    assert KEY not in f"{error} {error.body}"
    assert "[secret]" in (error.body or "")


def blanked(url: str, headers: dict[str, str], text: str) -> str:
    """``text`` as the http destination of ``url`` and ``headers`` keeps it."""
    data = {"name": "hook", "type": "http", "url": url, "mapping": "http.yaml", "headers": headers}
    sink = HttpSink(HttpDestination.model_validate(data, context={"base_dir": MAPPING.parent}))
    return sink.blank(text)


@pytest.mark.parametrize(
    ("url", "headers", "text", "kept"),
    [
        # the token of a scheme word, echoed alone (the reviewer's first finding)
        (
            "https://h.example/in",
            {"Authorization": "Bearer sk_live_abcdef1234567890"},
            '{"error": "invalid token", "token": "SK_LIVE_abcdef1234567890"}',
            '{"error": "invalid token", "token": "[secret]"}',
        ),
        # a Basic credential given as a header: its pair and password
        (
            "https://h.example/in",
            {"Authorization": "Basic " + base64.b64encode(b"admin:hunter22").decode()},
            "user admin:hunter22 refused; password hunter22",
            "user [secret] refused; password [secret]",
        ),
        # a hook's secret path and query (Zapier, n8n), echoed by a 404 page
        (
            "https://hooks.example/hooks/catch/123/s3cr3tPathTok/?token=qs-s3cr3t-token",
            {},
            "Cannot POST /hooks/catch/123/s3cr3tPathTok/?token=qs-s3cr3t-token; "
            "token qs-s3cr3t-token; hook s3cr3tPathTok",
            "Cannot POST [secret]; token [secret]; hook [secret]",
        ),
        # an API key as the URL's user, a dummy password: the key goes, "X" stays
        (
            "https://FRESHDESKapikey99:X@h.example/in",
            {},
            "unknown key freshdeskapikey99, expected X-Api",
            "unknown key [secret], expected X-Api",
        ),
        # two secrets overlapping: one blank, nothing of either left
        (
            "https://h.example/in",
            {"X-A": "AAAAbbbbCCCC", "X-B": "CCCCddddEEEE"},
            "AAAAbbbbCCCCddddEEEE!",
            "[secret]!",
        ),
        # escaped as PHP writes JSON, as HTML, percent-encoded
        (
            "https://h.example/in",
            {"X-Key": "k3y/Secret+value&x=1"},
            "php k3y\\/Secret+value&x=1 html k3y/Secret+value&amp;x=1 "
            "url k3y%2FSecret%2Bvalue%26x%3D1",
            "php [secret] html [secret] url [secret]",
        ),
        # what is no secret stays: a media type, a short value, a path without digits
        (
            "https://h.example/contacts/ingest",
            {"Accept": "application/json", "X-Tenant": "north-7"},
            "expected application/json for north-7 at /contacts/ingest",
            "expected application/json for north-7 at [secret]",
        ),
    ],
)
def test_what_is_blanked(url: str, headers: dict[str, str], text: str, kept: str) -> None:
    assert blanked(url, headers, text) == kept
