"""The generic ``http`` destination (contract 4) and the one function that classifies an
HTTP response for every destination.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import aiohttp
import httpx

from connector.config import HttpDestination as HttpConfig
from connector.config import Rate
from connector.delivery.base import Capabilities, Delivery, Result, as_results
from connector.delivery.retry import parse_retry_after
from connector.errors import DeliveryError, FatalDelivery, RetriableDelivery

RETRIABLE_STATUS = frozenset({408, 425, 429})
_BODY_KEPT = 4096


def classify(response: httpx.Response, *, retriable: frozenset[int] = RETRIABLE_STATUS) -> None:
    """Raise for a response that is not a success.

    429, 408, 425 and every 5xx are retriable (with ``Retry-After`` when given); any other
    status outside 2xx is fatal. Vendors pass ``retriable`` to add their own codes.
    """
    status = response.status_code
    if 200 <= status < 300:
        return
    classify_status(
        status,
        response.headers.get("retry-after"),
        response.text,
        response.request.url.host,
        retriable=retriable,
    )


def classify_status(
    status: int,
    retry_after_header: str | None,
    text: str,
    host: str,
    *,
    retriable: frozenset[int] = RETRIABLE_STATUS,
) -> None:
    """:func:`classify` from the parts of a response, for clients other than httpx."""
    if 200 <= status < 300:
        return
    body = text[:_BODY_KEPT]
    retry_after = parse_retry_after(retry_after_header, time.time())
    message = f"HTTP {status} from {host}"
    if status in retriable or status >= 500:
        raise RetriableDelivery(message, status_code=status, body=body, retry_after=retry_after)
    raise FatalDelivery(message, status_code=status, body=body)


def transport_error(exc: httpx.HTTPError | httpx.InvalidURL) -> DeliveryError:
    """Timeouts and connection errors are retriable; other transport errors too (the
    request may not have arrived), except a malformed URL or request."""
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return FatalDelivery(f"request could not be sent ({exc.__class__.__name__})")
    return RetriableDelivery(f"no response ({exc.__class__.__name__})")


def aiohttp_error(exc: BaseException) -> DeliveryError:
    """:func:`transport_error` for aiohttp: a malformed URL is fatal; timeouts, refused or
    dropped connections and other client errors are retriable."""
    if isinstance(exc, aiohttp.InvalidURL):
        return FatalDelivery(f"request could not be sent ({exc.__class__.__name__})")
    return RetriableDelivery(f"no response ({exc.__class__.__name__})")


class HttpSink:
    """POSTs each operation (or a JSON array of ``batch_size`` operations) to ``url``.

    Sends through aiohttp: measured here at about a third of the CPU per request of httpx
    over its own pool or over aiohttp (bench/clients.py). Given an ``httpx.AsyncClient``
    (tests with respx, or a caller's own transport) it sends through that instead; both
    paths classify responses and errors alike.
    """

    kind = "http"

    def __init__(self, config: HttpConfig, client: httpx.AsyncClient | None = None) -> None:
        self.name = config.name
        self.capabilities = Capabilities(batch_size=config.batch_size, native_merge=True)
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
        content = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
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
