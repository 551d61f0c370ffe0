"""What the vendor adapters share: one httpx client per destination, requests paced per
endpoint, transport errors and HTTP statuses turned into retriable or fatal errors."""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from connector.config_base import Rate
from connector.delivery._http import (
    classify_status,
    json_body,
    json_or_none,
    transport_error,
)
from connector.delivery._secrets import Blanker
from connector.delivery.ratelimit import SlidingWindowLimiter
from connector.destinations._probe import (
    PROBE_TIMEOUT_SECONDS,
    Probe,
    answered,
    failed_to_connect,
)
from connector.errors import DeliveryError

# a vendor counts its limits per account (an API key, an app's token): every sink of one
# account (several stores of an operator) shares the account's limiters, so that together
# they keep to the limits; keyed by vendor, a digest of the account, endpoint family, clock
_ACCOUNT_LIMITERS: weakref.WeakValueDictionary[tuple[str, str, str, int], SlidingWindowLimiter] = (
    weakref.WeakValueDictionary()
)


def account_digest(*parts: str) -> str:
    """A short digest naming a vendor account (its key, and its endpoint where one key may
    serve several): a key for shared state, never the secret itself."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def account_limiters(
    vendor: str,
    account: str,
    limits: Mapping[str, Sequence[Rate]],
    clock: Callable[[], float],
) -> dict[str, SlidingWindowLimiter]:
    """The limiters of ``account`` (an :func:`account_digest`) by endpoint family, shared by
    every client of that account on this clock (made on first use)."""
    found: dict[str, SlidingWindowLimiter] = {}
    for family, rates in limits.items():
        key = (vendor, account, family, id(clock))
        limiter = _ACCOUNT_LIMITERS.get(key)
        if limiter is None:
            limiter = _ACCOUNT_LIMITERS[key] = SlidingWindowLimiter(tuple(rates), clock)
        found[family] = limiter
    return found


def json_object(response: httpx.Response) -> dict[str, Any]:
    """A response's JSON body when it is an object, else an empty one."""
    data = json_or_none(response)
    return data if isinstance(data, dict) else {}


def host_of(url: object) -> str:
    """``scheme://host[:port]`` of a URL, for ``connector check``: never its user part, path
    or query (a webhook URL's path often is a secret)."""
    parts = urlsplit(str(url))
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


class VendorClient:
    """JSON requests to one vendor API.

    ``limits`` maps an endpoint family to its sliding-window rates (``"*"``: every family
    without its own); each request names its family and waits for a slot first, so a burst
    is paced rather than answered with 429s.
    ``describe`` turns an error response body into a short message (codes and titles, never
    the vendor's free text, which may echo a customer's e-mail or phone).
    """

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        timeout: float,
        limits: Mapping[str, Sequence[Rate]],
        describe: Callable[[Any], str],
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_connections: int = 16,
        shared: Mapping[str, SlidingWindowLimiter] | None = None,
        public: Collection[str] = (),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.host = httpx.URL(self.base_url).host
        self._headers = dict(headers)
        # every header value is taken for a secret (the key) but the descriptive ones and
        # ``public``'s (Klaviyo's revision date): an answer quoting one has it blanked
        self.blank = Blanker.of(self._headers, public=public)
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections),
        )
        self._limiters = {family: SlidingWindowLimiter(r, clock) for family, r in limits.items()}
        if shared:  # limiters counted across clients (a vendor account's limits)
            self._limiters.update(shared)
        self._describe = describe
        self.calls: dict[str, int] = {}  # requests made per endpoint family (bench, tests)
        self.paths: dict[str, int] = {}  # requests made per path, query left out (bench)

    async def request(
        self,
        method: str,
        path: str,
        family: str,
        *,
        body: Any = None,
        ok_statuses: frozenset[int] = frozenset(),
        encoded: bytes | None = None,
    ) -> httpx.Response:
        """Send one request; raise :class:`DeliveryError` unless it is a 2xx or in
        ``ok_statuses`` (a status the caller handles itself, such as a 404 or a 409).
        ``encoded``: the body already as :func:`json_body` writes it (instead of ``body``)."""
        limiter = self._limiters.get(family) or self._limiters.get("*")
        if limiter is not None:
            await limiter.acquire()
        self.calls[family] = self.calls.get(family, 0) + 1
        bare = path.partition("?")[0]
        self.paths[bare] = self.paths.get(bare, 0) + 1
        content = encoded if body is None else json_body(body)
        try:
            request = self._client.build_request(
                method, f"{self.base_url}{path}", content=content, headers=self._headers
            )
            response = await self._client.send(request)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(exc) from None
        status = response.status_code
        if 200 <= status < 300 or status in ok_statuses:
            return response
        raise self.error(response)

    def kept(self, response: httpx.Response) -> str:
        """What is kept of an answer (a dead letter's, an attempt's): its text with the
        secrets sent blanked, then cut (a key cut at the limit leaves no prefix)."""
        return self.blank.kept(response.text)

    def error(self, response: httpx.Response) -> DeliveryError:
        """The error for a non-2xx response (retriable: 408, 425, 429, 5xx), its message and
        kept answer without the secrets sent."""
        what = self._describe(json_or_none(response))
        try:
            classify_status(
                response.status_code,
                response.headers.get("retry-after"),
                self.blank.kept(response.text),
                self.host,
            )
        except DeliveryError as exc:
            if what:
                exc.args = (f"{exc.args[0]}: {what}",)
            return self.blank.error(exc)
        raise AssertionError("classify_status accepted a non-2xx status")  # pragma: no cover

    async def probe(self, path: str, notes: dict[int, str] | None = None) -> Probe:
        """One GET of ``path`` with the credentials, unpaced and unretried (a preflight's
        harmless read): what its answer says of the address and the key."""
        try:
            request = self._client.build_request(
                "GET", f"{self.base_url}{path}", headers=self._headers
            )
            response = await self._client.send(request)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return failed_to_connect(exc, self._client.timeout.read or PROBE_TIMEOUT_SECONDS)
        return answered(response, notes)

    async def aclose(self) -> None:
        await self._client.aclose()
