"""The generic ``http`` destination (contract 4 of the design): one POST per operation, or a
JSON array of ``batch_size`` operations per POST, to the configured URL."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import httpx
from pydantic import Field, HttpUrl, SecretStr, field_validator

from connector import __version__
from connector.config_base import DestinationConfig, Rate
from connector.delivery._h1 import H1Error, H1Pool, Unsendable, header_problem
from connector.delivery._http import (
    BODY_KEPT,
    classify_status,
    json_body,
    transport_error,
)
from connector.delivery._secrets import Blanker
from connector.delivery.base import (
    Capabilities,
    Delivery,
    DestinationType,
    Result,
    as_results,
)
from connector.destinations._probe import Probe, not_checked
from connector.destinations._vendor import host_of
from connector.errors import FatalDelivery, RetriableDelivery

USER_AGENT = f"treez-connector/{__version__}"


class HttpDestination(DestinationConfig):
    """Contract 4 of the design: one POST per operation (or per batch) to ``url``."""

    type: Literal["http"]
    url: HttpUrl
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)

    @field_validator("headers")
    @classmethod
    def _sendable(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, value in headers.items():
            problem = header_problem(name, value.get_secret_value())
            if problem is not None:  # names the header, never its value (it may be a secret)
                raise ValueError(problem)
        return headers


def _capabilities(config: HttpDestination) -> Capabilities:
    return Capabilities(batch_size=config.batch_size, native_merge=True)  # contract 4


class HttpSink:
    """POSTs each operation (or a JSON array of ``batch_size`` operations) to ``url``.

    Sends through :class:`~connector.delivery._h1.H1Pool`, a lean HTTP/1.1 client that costs
    less CPU a request than aiohttp, itself cheaper than httpx (bench/pipeline.py prints the
    floor of a lone request; the issue 17 notes compare them). Given an ``httpx.AsyncClient``
    (tests with respx, or a caller's own transport) it sends through that instead; both paths
    classify responses and errors alike. Redirects are answers, never followed: a client
    following a 301 or 302 turns the POST into a GET, and the operation would count as delivered
    with nothing sent.
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
        self._pool: H1Pool | None = None
        # what a service echoing the request (its headers, this URL) must not get into the
        # dead letters: blanked before an answer is classified or kept
        self.blank = Blanker.of(headers, self._url)

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
        try:
            pool = self._pool
            if pool is None:
                pool = self._pool = H1Pool(
                    self._url, limit=self._concurrency, timeout=self._timeout, user_agent=USER_AGENT
                )
            response = await pool.post(content, headers)
        except Unsendable as exc:  # raised before anything was sent; names no value
            raise FatalDelivery(f"request could not be sent ({exc})") from None
        except (TimeoutError, OSError, H1Error, ValueError) as exc:
            # a TLS failure is an OSError and a ValueError both: retried, as a refusal is
            raise RetriableDelivery(f"no response ({exc.__class__.__name__})") from None
        if not 200 <= response.status < 300:
            text = self.blank.kept(response.body[: 8 * BODY_KEPT].decode("utf-8", errors="replace"))
            classify_status(response.status, response.headers.get("retry-after"), text, self._host)
        return as_results(_contact_ids_from(response.body, len(deliveries)))

    async def _send_httpx(
        self, client: httpx.AsyncClient, content: bytes, headers: dict[str, str], count: int
    ) -> list[Result]:
        try:
            # build_request, not a bare Request: it carries the client's timeouts
            request = client.build_request("POST", self._url, content=content, headers=headers)
            response = await client.send(request)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(exc) from None
        if not response.is_success:
            text = self.blank.kept(response.text)
            classify_status(
                response.status_code, response.headers.get("retry-after"), text, self._host
            )
        return as_results(_contact_ids_from(response.content, count))

    async def probe(self) -> Probe:
        """Contract 4 defines POSTs of operations only: any request to ``url`` could be
        taken for one (a Zapier hook runs on a GET), so nothing is sent."""
        return not_checked("contract 4 defines no harmless read; the first delivery tells")

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
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
