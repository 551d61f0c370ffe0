"""What every HTTP client of the connector shares: which answers are worth another try, how a
response becomes a retriable or fatal delivery error, and JSON bodies in and out.

Used by the destinations (``connector/destinations/``) and by the Treez API client, so a
status is judged the same way whichever side of the connector met it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any

import httpx
import msgspec

from connector.delivery.retry import parse_retry_after
from connector.errors import DeliveryError, FatalDelivery, RetriableDelivery

RETRIABLE_STATUS = frozenset({408, 425, 429})
"""Statuses below 500 worth another try (timeouts, too early, too many requests); every 5xx
is too."""
BODY_KEPT = 4096


def is_retriable(status: int, retriable: frozenset[int] = RETRIABLE_STATUS) -> bool:
    """408, 425, 429 (or the caller's set) and every 5xx."""
    return status in retriable or status >= 500


_ENCODER = msgspec.json.Encoder()


def json_body(value: Any) -> bytes:
    """``value`` as a compact UTF-8 JSON request body: what ``json.dumps(value,
    separators=(",", ":"), ensure_ascii=False)`` writes, the same keys in the same order, in
    a tenth of the time (a float's exponent is written without its ``+``)."""
    return _ENCODER.encode(value)


def json_or_none(response: httpx.Response) -> Any:
    """A response's JSON body, or None when it has none or it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return None


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
    body = text[:BODY_KEPT]
    retry_after = parse_retry_after(retry_after_header, time.time())
    message = f"HTTP {status} from {host}"
    if is_retriable(status, retriable):
        raise RetriableDelivery(message, status_code=status, body=body, retry_after=retry_after)
    raise FatalDelivery(message, status_code=status, body=body)


def transport_error(exc: httpx.HTTPError | httpx.InvalidURL) -> DeliveryError:
    """Timeouts and connection errors are retriable; other transport errors too (the
    request may not have arrived), except a malformed URL or request."""
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return FatalDelivery(f"request could not be sent ({exc.__class__.__name__})")
    return RetriableDelivery(f"no response ({exc.__class__.__name__})")


_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
# where vendors put a machine-readable error code in a JSON error body, most specific first:
# JSON:API (Klaviyo) errors[].code; HubSpot subCategory and category; Braze errors[].type;
# generic services code, error_code, error (when it is a code, not a sentence)
_CODE_KEYS = ("code", "subCategory", "category", "type", "error_code", "errorCode", "error")


# an e-mail address, a long number (phone, licence), or quoted text (what was sent, quoted)
_UNSAFE = re.compile(r"@|\d{4,}|['\"\u2018\u2019\u201c\u201d`]")


def safe_text(text: Any) -> str:
    """A vendor's short error text, withheld when it may quote what was sent (an e-mail
    address, a phone number or another long number, anything in quotes)."""
    if not isinstance(text, str) or not text.strip():
        return ""
    text = text.strip()[:160]
    return "(text withheld: it may quote what was sent)" if _UNSAFE.search(text) else text


def identifier(value: Any) -> str | None:
    """``value`` when it reads as an error code (``INVALID``, ``duplicate_profile``, 4012),
    else None: free text may quote what was sent (a customer's e-mail address)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and _CODE.fullmatch(value):
        return value
    return None


def _texts(value: Any, found: set[str]) -> None:
    if isinstance(value, str):
        found.add(value.casefold())
    elif isinstance(value, dict):
        for inner in value.values():
            _texts(inner, found)
    elif isinstance(value, list):
        for inner in value:
            _texts(inner, found)


def vendor_code(body: str | None, sent: Iterable[Any] = ()) -> str | None:
    """The vendor's error code in an error answer's JSON body, if it names one: an
    identifier (``duplicate_profile``, ``VALIDATION_ERROR``), never free text, which may
    quote what was sent (a customer's e-mail address). ``sent``: what the request carried
    (operation bodies): a "code" equal to any text in it is an echo of a customer's value
    (a service answering ``{"error": "<the last name>"}``), never a code."""
    code = _vendor_code(body)
    if code is None:
        return None
    texts: set[str] = set()
    for payload in sent:
        _texts(payload, texts)
    return None if code.casefold() in texts else code


def _vendor_code(body: str | None) -> str | None:
    if not body:
        return None
    try:
        found = json.loads(body)
    except ValueError:
        return None
    candidates: list[Any] = []
    if isinstance(found, dict):
        errors = found.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            candidates.append(errors[0])
        candidates.append(found)
    elif isinstance(found, list) and found and isinstance(found[0], dict):
        candidates.append(found[0])
    for candidate in candidates:
        for key in _CODE_KEYS:
            code = identifier(candidate.get(key))
            if code is not None:
                return code
    return None
