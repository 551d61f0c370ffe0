"""A client of the Treez Customer API (v2), for reconciliation.

What it does, from ``shared/docs/treez.md``:

- **Auth**: ``POST {api_url}/config/api/gettokens`` with the form fields ``client_id`` and
  ``apikey``; the token (``expires_in`` seconds, a string, 2 hours) is reused until
  :data:`TOKEN_MARGIN_SECONDS` before it expires, never fetched per call. A 401 on a call
  fetches a new token once and repeats the call.
- **Pull**: ``GET {api_url}/customer/lastUpdated/after/{date}/page/{n}/pagesize/{size}``, the
  date as ``yyyy-MM-ddTHH:mm:ss.SSSXXX`` (URL-encoded), pages from 1, at most 50 a page, no
  total: a short or empty page is the last. :meth:`TreezClient.page_texts` reads a page once
  (msgspec) and leaves each customer as the JSON text Treez sent, for the reconciliation.
- **Pace**: no sliding one-second window holds more than ``requests_per_second`` requests
  (token requests included), with a small margin for the network's jitter.
- **Errors**: the ``resultCode`` envelope is checked as well as the status; ``FAIL`` answers
  become :class:`TreezApiError` naming the call, the status and Treez's ``resultReason`` code.
  5xx, 408, 425, 429, timeouts and connection errors are retried with backoff (tenacity), as
  the destinations judge them (:mod:`connector.delivery._http`); the rest is not.

Nothing here logs a customer field: errors name codes and paths, never bodies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec
import tenacity

from connector.config import TreezApiConfig
from connector.config_base import Rate
from connector.delivery._http import is_retriable, json_or_none
from connector.delivery.ratelimit import SlidingWindowLimiter
from connector.errors import ConnectorError

MAX_PAGE_SIZE = 50
TOKEN_MARGIN_SECONDS = 300.0  # a token is renewed this long before it expires
# the sliding window is this much wider than a second. Each request is counted from when its
# answer came (restamp in _send), which is after Treez received it, so two requests ten
# apart arrive more than a second apart whatever the network's delays; the margin only
# covers Treez's window boundary and the clocks' rates, and each of its milliseconds costs
# the run one every ten requests
PACE_MARGIN_SECONDS = 0.005
T = TypeVar("T")


class TreezApiError(ConnectorError):
    """A call to the Treez API failed; ``code`` is Treez's ``resultReason`` when it gave one."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class TreezAuthError(TreezApiError):
    """The credentials were refused."""


class TreezRetriable(TreezApiError):
    """A failure worth trying again (5xx, 429, a timeout, a lost connection)."""


def format_after(moment: datetime) -> str:
    """``moment`` as the pull's date: ``2026-05-01T10:00:00.000+00:00`` (UTC, milliseconds)."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}+00:00"


def _code(data: Any, secrets: tuple[str, ...] = ()) -> str | None:
    """Treez's error code in an answer: an identifier (``INVALID_TOKEN``), else "error" (free
    text may quote what was sent). A code that holds a secret of the request (the API key, the
    client id, the token), or is a piece of one, is an echo and never shown: "error"."""
    if isinstance(data, dict):
        for key in ("resultReason", "resultCode", "error", "code"):
            value = data.get(key)
            if isinstance(value, str) and value and value not in ("FAIL", "SUCCESS"):
                return _shown(value, secrets)
    return None


def _shown(value: str, secrets: tuple[str, ...]) -> str:
    # codes are upper-case identifiers; keep them short and free of customer text
    if len(value) > 80 or not value.replace("_", "").isalnum():
        return "error"
    folded = value.casefold()
    for secret in secrets:
        secret = secret.casefold()
        if not secret:
            continue
        # the whole secret, or a piece of one long enough to tell (a one-letter client id
        # inside MODEL_VALIDATION_FAIL is no echo)
        if folded == secret or (len(secret) >= 6 and secret in folded):
            return "error"
        if len(folded) >= 6 and folded in secret:
            return "error"
    return value


def customers_of(data: Any) -> list[dict[str, Any]]:
    """The customers of a pull's ``data``: a list, or a list wrapped in an object."""
    if isinstance(data, list):
        return [c for c in data if isinstance(c, dict)]
    if isinstance(data, dict):
        for value in data.values():
            if isinstance(value, list):
                return [c for c in value if isinstance(c, dict)]
    return []


class _PageEnvelope(msgspec.Struct):
    """A pull's answer as :meth:`TreezClient.page_texts` reads it: each customer left as the
    JSON text Treez sent."""

    resultCode: str | None = None  # Treez's name
    data: list[msgspec.Raw] | None = None


_PAGE = msgspec.json.Decoder(_PageEnvelope)


def customer_texts(content: bytes) -> list[str] | None:
    """The customers of a successful pull's body, each as its JSON text (as Treez sent it,
    without its surroundings), or None when the body is anything else than a JSON object
    whose ``resultCode`` is absent, null or ``SUCCESS`` and whose ``data`` is a list, or when
    msgspec and ``json`` might read it differently (strict UTF-8 only; msgspec refuses the
    ``NaN`` and lone surrogates that ``json`` takes): the caller then reads it as before."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        page = _PAGE.decode(text)
    except (msgspec.DecodeError, RecursionError, UnicodeError):
        return None
    if page.resultCode not in (None, "SUCCESS") or page.data is None:
        return None
    # what customers_of keeps: the objects of the list
    texts = [bytes(item).decode("utf-8") for item in page.data]
    return [t for t in texts if t.startswith("{")]


class TreezClient:
    """One store's Treez API. ``client`` and ``clock`` may be given (tests)."""

    def __init__(
        self,
        config: TreezApiConfig,
        *,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        retry_wait: tenacity.wait.wait_base | None = None,
        attempts: int = 5,
        timeout: float = 30.0,
        pace: bool = True,
    ) -> None:
        self.base_url = str(config.api_url).rstrip("/")
        self.host = httpx.URL(self.base_url).host
        self._client_id = config.client_id
        self._api_key = config.api_key
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout))
        self._clock = clock
        rates = [Rate(config.requests_per_second, 1.0 + PACE_MARGIN_SECONDS)] if pace else []
        self._limiter = SlidingWindowLimiter(rates)
        self._token: str | None = None
        self._expires_at = 0.0
        self._token_lock = asyncio.Lock()
        self._wait = retry_wait or tenacity.wait_exponential_jitter(initial=1, max=30, jitter=1)
        self._attempts = attempts
        self.requests = 0  # every HTTP request made, token requests included
        self.token_requests = 0

    def __repr__(self) -> str:
        return f"TreezClient(base_url={self.base_url!r})"  # never the key nor the token

    @property
    def paced(self) -> bool:
        """Whether calls wait for Treez's limit (see :data:`PACE_MARGIN_SECONDS`)."""
        return self._limiter.enabled

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- auth -----------------------------------------------------------------------------

    async def _token_value(self) -> str:
        async with self._token_lock:
            if self._token is None or self._clock() >= self._expires_at - TOKEN_MARGIN_SECONDS:
                await self._fetch_token()
            assert self._token is not None
            return self._token

    async def _fetch_token(self) -> None:
        form = {"client_id": self._client_id, "apikey": self._api_key.get_secret_value()}
        self.token_requests += 1
        response = await self._send("POST", "/config/api/gettokens", data=form)
        body = self._envelope(response, "the token request")
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise TreezApiError(f"the token request to {self.host} gave no access_token")
        try:
            lifetime = float(body.get("expires_in") or 7200)
        except (TypeError, ValueError):
            lifetime = 7200.0
        self._token = token
        self._expires_at = self._clock() + lifetime

    async def probe(self) -> None:
        """One token request, nothing else (a preflight's harmless read: it proves the
        address, ``client_id`` and ``api_key`` and reads no customer). Raises as
        :meth:`page` does, without retrying."""
        await self._fetch_token()

    def forget_token(self) -> None:
        self._token = None

    # --- calls ----------------------------------------------------------------------------

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        await self._limiter.acquire()
        self.requests += 1
        try:
            return await self._client.request(method, f"{self.base_url}{path}", **kwargs)
        except httpx.TimeoutException:
            raise TreezRetriable(f"{method} {self._where(path)}: timed out") from None
        except httpx.HTTPError as exc:
            raise TreezRetriable(
                f"{method} {self._where(path)}: {exc.__class__.__name__}"
            ) from None
        finally:
            # calls are sequential: count each from when its answer came (a new connection's
            # setup can delay a request's arrival past the pace's margin)
            self._limiter.restamp()

    def _where(self, path: str) -> str:
        return f"{self.host}{path.split('/after/')[0]}"

    def _envelope(self, response: httpx.Response, what: str) -> dict[str, Any]:
        status = response.status_code
        data = json_or_none(response)
        secrets = (self._api_key.get_secret_value(), self._client_id, self._token or "")
        code = _code(data, secrets)
        suffix = f" ({code})" if code else ""
        if status in (401, 403):
            raise TreezAuthError(
                f"{what}: {self.host} answered {status}{suffix}: check client_id and api_key",
                status=status,
                code=code,
            )
        if is_retriable(status):
            raise TreezRetriable(f"{what}: {self.host} answered {status}{suffix}", status=status)
        if not 200 <= status < 300:
            raise TreezApiError(
                f"{what}: {self.host} answered {status}{suffix}", status=status, code=code
            )
        if not isinstance(data, dict):
            raise TreezApiError(f"{what}: {self.host} answered {status} without a JSON object")
        result = data.get("resultCode")
        if result not in (None, "SUCCESS"):
            shown = _shown(result, secrets) if isinstance(result, str) else "error"
            raise TreezApiError(
                f"{what}: {self.host} answered resultCode {shown}{suffix}",
                status=status,
                code=code,
            )
        return data

    async def _get(self, path: str, what: str) -> dict[str, Any]:
        """An authenticated GET with retries; a 401 renews the token once."""
        return await self._call(path, what, self._envelope)

    async def _call(self, path: str, what: str, read: Callable[[httpx.Response, str], T]) -> T:
        """:meth:`_get`, its answer read by ``read`` (which raises as :meth:`_envelope`)."""
        renewed = False
        async for attempt in tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(TreezRetriable),
            wait=self._wait,
            stop=tenacity.stop_after_attempt(self._attempts),
            reraise=True,
        ):
            with attempt:
                while True:
                    token = await self._token_value()
                    headers = {"authorization": token, "client_id": self._client_id}
                    response = await self._send("GET", path, headers=headers)
                    if response.status_code == 401 and not renewed:
                        renewed = True
                        self.forget_token()
                        continue
                    return read(response, what)
        raise AssertionError("unreachable")  # pragma: no cover

    async def page(
        self, after: datetime, number: int, size: int = MAX_PAGE_SIZE
    ) -> list[dict[str, Any]]:
        """One page of the customers changed after ``after`` (pages from 1)."""
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise ValueError(f"page size must be 1 to {MAX_PAGE_SIZE}, got {size}")
        if number < 1:
            raise ValueError(f"pages start at 1, got {number}")
        date = quote(format_after(after), safe="")
        path = f"/customer/lastUpdated/after/{date}/page/{number}/pagesize/{size}"
        data = await self._get(path, f"the pull of page {number}")
        return customers_of(data.get("data"))

    async def page_texts(
        self, after: datetime, number: int, size: int = MAX_PAGE_SIZE
    ) -> list[str] | list[dict[str, Any]]:
        """:meth:`page`, each customer as the JSON text Treez sent (read once, never decoded
        into objects here) when the answer is a plain success (:func:`customer_texts`), else
        as :meth:`page` gives them (errors raised alike)."""
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise ValueError(f"page size must be 1 to {MAX_PAGE_SIZE}, got {size}")
        if number < 1:
            raise ValueError(f"pages start at 1, got {number}")
        date = quote(format_after(after), safe="")
        path = f"/customer/lastUpdated/after/{date}/page/{number}/pagesize/{size}"
        return await self._call(path, f"the pull of page {number}", self._texts)

    def _texts(self, response: httpx.Response, what: str) -> list[str] | list[dict[str, Any]]:
        if 200 <= response.status_code < 300:
            texts = customer_texts(response.content)
            if texts is not None:
                return texts
        return customers_of(self._envelope(response, what).get("data"))

    async def pages(
        self, after: datetime, size: int = MAX_PAGE_SIZE
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every page changed after ``after``, by number, until a short or empty one."""
        number = 1
        while True:
            customers = await self.page(after, number, size)
            if customers:
                yield customers
            if len(customers) < size:
                return
            number += 1

    async def customer(self, customer_id: str) -> dict[str, Any] | None:
        """One customer, or None when Treez does not know it."""
        try:
            data = await self._get(f"/customer/{quote(customer_id, safe='')}", "the customer read")
        except TreezApiError as exc:
            if exc.status == 404 or exc.code in ("CUSTOMER_DOESNT_EXIST", "NOT_FOUND"):
                return None
            raise
        found = data.get("data")
        if isinstance(found, list):
            found = found[0] if found else None
        return found if isinstance(found, dict) else None
