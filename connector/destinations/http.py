"""The generic ``http`` destination (contract 4 of the design): one POST per operation, or a
JSON array of ``batch_size`` operations per POST, to the configured URL."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import aiohttp
import httpx
from pydantic import Field, HttpUrl, SecretStr

from connector.config_base import DestinationConfig, Rate
from connector.delivery._http import (
    aiohttp_error,
    classify,
    classify_status,
    json_body,
    transport_error,
)
from connector.delivery.base import (
    Capabilities,
    Delivery,
    DestinationType,
    Result,
    as_results,
)
from connector.destinations._probe import Probe, not_checked
from connector.destinations._vendor import host_of


class HttpDestination(DestinationConfig):
    """Contract 4 of the design: one POST per operation (or per batch) to ``url``."""

    type: Literal["http"]
    url: HttpUrl
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)


def _capabilities(config: HttpDestination) -> Capabilities:
    return Capabilities(batch_size=config.batch_size, native_merge=True)  # contract 4


class HttpSink:
    """POSTs each operation (or a JSON array of ``batch_size`` operations) to ``url``.

    Sends through aiohttp: measured here at about a third of the CPU per request of httpx
    over its own pool or over aiohttp (bench/clients.py). Given an ``httpx.AsyncClient``
    (tests with respx, or a caller's own transport) it sends through that instead; both
    paths classify responses and errors alike.
    """

    kind = "http"

    def __init__(self, config: HttpDestination, client: httpx.AsyncClient | None = None) -> None:
        self.name = config.name
        self.capabilities = _capabilities(config)
        self.rate_limit: tuple[Rate, ...] = config.rate_limit
        self._url = str(config.url)
        self._host = httpx.URL(self._url).host
        headers = {k: v.get_secret_value() for k, v in config.headers.items()}
        if not any(k.lower() == "content-type" for k in headers):
            headers["content-type"] = "application/json"
        self._headers = headers
        self._client = client
        self._concurrency = config.concurrency
        self._timeout = config.timeout_seconds
        self._session: aiohttp.ClientSession | None = None

    @property
    def batch_size(self) -> int:
        return self.capabilities.batch_size

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        """Contract 4 has no bulk path: ``batch_size`` operations per POST."""
        results: list[Result] = []
        for start in range(0, len(deliveries), self.batch_size):
            results.extend(await self.send(deliveries[start : start + self.batch_size]))
        return results

    async def lookup(self, contact_id: str) -> dict[str, Any] | None:
        return None  # contract 4 has no read

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        if len(deliveries) == 1:
            key = deliveries[0].idempotency_key
            payload: Any = deliveries[0].body
        else:
            joined = "|".join(d.idempotency_key for d in deliveries)
            key = hashlib.sha256(joined.encode()).hexdigest()[:40]
            payload = [d.body for d in deliveries]
        content = json_body(payload)
        headers = {**self._headers, "idempotency-key": key}
        if self._client is not None:
            return await self._send_httpx(self._client, content, headers, len(deliveries))
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._concurrency),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=True,
            )
        try:
            async with session.post(self._url, data=content, headers=headers) as response:
                status = response.status
                raw = await response.read()
                retry_after = response.headers.get("retry-after")
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise aiohttp_error(exc) from None
        if not 200 <= status < 300:
            text = raw.decode("utf-8", errors="replace")
            classify_status(status, retry_after, text, self._host)
        return as_results(_contact_ids_from(raw, len(deliveries)))

    async def _send_httpx(
        self, client: httpx.AsyncClient, content: bytes, headers: dict[str, str], count: int
    ) -> list[Result]:
        try:
            # build_request, not a bare Request: it carries the client's timeouts
            request = client.build_request("POST", self._url, content=content, headers=headers)
            response = await client.send(request)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(exc) from None
        classify(response)
        return as_results(_contact_ids_from(response.content, count))

    async def probe(self) -> Probe:
        """Contract 4 defines POSTs of operations only: any request to ``url`` could be
        taken for one (a Zapier hook runs on a GET), so nothing is sent."""
        return not_checked("contract 4 defines no harmless read; the first delivery tells")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._client is not None:
            await self._client.aclose()


def _contact_ids_from(raw: bytes, count: int) -> list[str | None]:
    """``{"contact_id": ...}`` for one operation, or an array of them for a batch."""
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    items = data if isinstance(data, list) else [data]
    out: list[str | None] = []
    for index in range(count):
        item = items[index] if index < len(items) else None
        found = item.get("contact_id") if isinstance(item, dict) else None
        usable = isinstance(found, str | int) and not isinstance(found, bool) and found != ""
        out.append(str(found) if usable else None)
    return out


DESTINATION = DestinationType(
    tag="http",
    config=HttpDestination,
    build=HttpSink,
    capabilities=_capabilities,
    where=lambda config: host_of(config.url),
    summary="your own HTTP endpoint (contract 4: one JSON body per operation or batch)",
)
