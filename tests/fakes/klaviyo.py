"""A local fake of Klaviyo's profiles API (revision 2026-07-15), for the tests of the Klaviyo
adapter and for benchmarks.

Paths, bodies, success codes and the error object follow Klaviyo's own OpenAPI document
(``shared/vendor-specs/klaviyo/profiles.openapi.json``); rate limits follow that document's
``x-klaviyo-ratelimit`` of each operation and Klaviyo's "Rate limits, status codes, and errors"
guide. Every request needs ``Authorization: Klaviyo-API-Key <key>`` (absent or another scheme:
401 ``not_authenticated``; another key: 401 ``authentication_failed``) and a ``revision: YYYY-MM-DD
[.suffix]`` header between :data:`OLDEST_REVISION` and :data:`LATEST_REVISION` (else 400
``invalid_revision``: **that code name is our assumption**). POST bodies must be declared
``application/vnd.api+json`` or ``application/json`` (else 415).

==================================================  ========================================
``POST /api/profile-import``                         200 updated / 201 created, the profile
``GET  /api/profiles/{id}``                          200 the profile / 404
``GET  /api/profiles?filter=...``                    200, the profiles matching (never creates)
``POST /api/profile-merge``                          201 ``{"data": {"type": "profile", ...}}``
``POST /api/profile-subscription-bulk-create-jobs``  202, no body (subscribe, <= 1,000)
``POST /api/profile-subscription-bulk-delete-jobs``  202, no body (unsubscribe, <= 100)
``POST /api/profile-bulk-import-jobs``               202, the job (<= 10,000 profiles, 5 MB)
``GET  /api/profile-bulk-import-jobs/{job_id}``      200, the job
``GET  /api/profile-bulk-import-jobs/{id}/import-errors``  200, the job's failures
``GET  /api/accounts``                               200, the key's account (preflight)
==================================================  ========================================

A trailing slash is accepted. Other paths: 404; another method on a known path: 405.

Profile import matches by ``id`` (404 if unknown), else by email (case-insensitive), phone
number and external_id: identifiers held by two different profiles are a 409
``duplicate_profile`` whose ``meta.duplicate_profile_id`` is the profile matched by email, else
by phone, else by external_id. Given attributes replace the stored ones, ``null`` clears a field
(as the spec says), ``location`` is merged key by key, ``properties`` too (``meta.
patch_properties`` append / unappend / unset are applied). Errors are JSON:API error objects
``{"errors": [{"id", "status", "code", "title", "detail", "source", "links", "meta"}]}``.

Consent: each profile has e-mail and SMS marketing consent (``NEVER_SUBSCRIBED``,
``SUBSCRIBED``, ``UNSUBSCRIBED``) and e-mail suppressions. Unsubscribing e-mail adds an
``UNSUBSCRIBE`` suppression; subscribing removes ``UNSUBSCRIBE``, ``SPAM_COMPLAINT`` and
``USER_SUPPRESSED`` suppressions (Klaviyo's documented pitfall) and is recorded in
:attr:`KlaviyoFake.subscribes` with the consent it replaced, so that a test can assert
``fake.resubscriptions() == []``.

Rate limits (``rate_limits=True``): per endpoint, a burst window of 1 s and a steady window of
60 s, fixed windows as Klaviyo documents ("fixed-window rate limiting algorithm with two
distinct windows") or sliding ones (``rate_window="sliding"``, stricter). Non-429 answers carry
``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset`` for the steady window; a 429
``throttled`` carries ``Retry-After`` (whole seconds, at least 1) and, as documented, not the
``RateLimit-*`` headers. A throttled request consumes no slot.

Behaviours **assumed** (not settled by the spec or the guide):

- a profile matched by email or phone that holds another non-null external_id than the one
  sent is a 409 ``duplicate_profile`` too, and so is ``id`` sent with an identifier held by
  another profile;
- unknown attribute names are a 400 ``invalid`` naming them; ``properties: null`` leaves the
  properties alone; e-mail must look like ``a@b.c``; phone must be E.164 (``+`` then 8 to 15
  digits, the first not 0);
- 413 ``payload_too_large`` for a profile-import body over 100 KiB or a bulk job over 5 MiB;
  400 for a bulk job of more than :attr:`KlaviyoFake.max_bulk_profiles` or none; a bulk job's
  invalid or conflicting profile is a failure of the job (an import error), not a 400;
- subscription jobs are applied at once; consent goes to the profile holding the identifier of
  the channel (created when none does, as the spec says, also for unsubscribe unless
  ``unsubscribe_creates_profiles=False``); single opt-in; unsubscribe is always global;
- merge applies at once; the destination keeps its values and gains the source's missing ones
  (with the consent of an e-mail or phone it gains); unknown ids are 404;
- ``GET /api/profiles`` filters on ``id``, ``email``, ``phone_number`` and ``external_id``
  with ``equals(field,"value")`` or ``any(field,["a","b"])`` (quotes single or double), one
  expression, as the spec's ``filter`` parameter allows for those fields; the e-mail compared
  case-insensitively, as profile-import matches it; any other filter is a 400 ``invalid``
  naming the ``filter`` parameter; ``page[size]`` 1 to 100 (default 20), one page, no cursor;
- error codes ``parse_error``, ``unsupported_media_type``, ``not_found``, ``method_not_allowed``.

In-process::

    fake = KlaviyoFake(clock=clock)
    transport = httpx.ASGITransport(app=fake.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://a.klaviyo.com") as c:
        ...

Over real HTTP in a thread: ``with serve(fake) as base_url: ...``. As a process (prints
``LISTENING <port>`` once ready, runs until SIGTERM/SIGINT, exits 0)::

    python -m tests.fakes.klaviyo --port 0 [--no-rate-limits] [--api-key K] [--job-polls N]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import gc
import json
import math
import random
import re
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal
from urllib.parse import parse_qs

from ._serve import (
    DEFAULT_LOOP,
    bind_socket,
    http_body,
    make_server,
    serve_in_thread,
    serve_until_signalled,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LATEST_REVISION = dt.date(2026, 7, 15)
OLDEST_REVISION = dt.date(2023, 1, 1)
JSONAPI = "application/vnd.api+json"

MAX_IMPORT_BYTES = 100 * 1024  # profile-import: "The maximum allowed payload size is 100KB."
MAX_BULK_BYTES = 5 * 1024 * 1024  # bulk import: "The maximum allowed payload size is 5MB."
MAX_BULK_PROFILES = 10_000  # bulk import: "Accepts up to 10,000 profiles per request."
MAX_SUBSCRIBE_PROFILES = 1_000  # bulk subscribe: "Maximum number of profiles ... 1000"
MAX_UNSUBSCRIBE_PROFILES = 100  # bulk unsubscribe: "Maximum number of profiles per call: 100"

PROFILE_FIELDS = (
    "email",
    "phone_number",
    "external_id",
    "first_name",
    "last_name",
    "organization",
    "locale",
    "title",
    "image",
)
IMPORT_ATTRIBUTES = frozenset({*PROFILE_FIELDS, "_kx", "location", "properties"})
_STRING_ATTRIBUTES = frozenset({*PROFILE_FIELDS, "_kx"})  # a string or null each
_PROFILE_FIELD_NAMES = frozenset(PROFILE_FIELDS)
LOCATION_FIELDS = (
    "address1",
    "address2",
    "city",
    "country",
    "latitude",
    "longitude",
    "region",
    "zip",
    "timezone",
    "ip",
)
IDENTIFIERS = ("email", "phone_number", "external_id")
# Suppressions a bulk subscribe removes (its description: UNSUBSCRIBE, SPAM_REPORT or
# USER_SUPPRESSED; the suppression enum spells the spam one SPAM_COMPLAINT).
LIFTED_BY_SUBSCRIBE = frozenset({"UNSUBSCRIBE", "SPAM_COMPLAINT", "USER_SUPPRESSED"})
SUPPRESSION_REASONS = frozenset(
    {"HARD_BOUNCE", "INVALID_EMAIL", "SPAM_COMPLAINT", "UNSUBSCRIBE", "USER_SUPPRESSED"}
)

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_E164 = re.compile(r"\+[1-9][0-9]{7,14}")
_REVISION = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?:\.[A-Za-z0-9_-]+)?")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # by 10-bit value
_TIME_SHIFTS = range(40, -1, -10)
_RANDOM_SHIFTS = range(70, -1, -10)
_MILLISECOND: tuple[int, str] = (-1, "")  # the last time part of an id, swapped as one

Channel = Literal["email", "sms"]


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimit:
    burst: int  # requests per 1-second window
    steady: int  # requests per 60-second window


# The ``x-klaviyo-ratelimit`` of each operation in the OpenAPI document (revision 2026-07-15).
# shared/docs/destinations.md quotes 700/min for profile-import (the guide's "L" tier); the
# operation itself says 750/m. The bulk import job endpoints are 10/s and 150/m (tier "M").
ACCOUNT_ID = "FaKe01"  # the account's id, which is also its public API key (site id)

RATE_LIMITS: dict[str, RateLimit] = {
    "profile-import": RateLimit(75, 750),
    "get-profile": RateLimit(75, 750),
    "get-profiles": RateLimit(75, 750),
    "profile-merge": RateLimit(10, 150),
    "subscribe": RateLimit(75, 750),
    "unsubscribe": RateLimit(75, 750),
    "bulk-import": RateLimit(10, 150),
    "get-bulk-import-job": RateLimit(10, 150),
    "get-import-errors": RateLimit(10, 150),
    # Get Accounts: tier XS of Klaviyo's guide (1/s burst, 15/m steady)
    "get-accounts": RateLimit(1, 15),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One request received by the fake, whatever it was answered."""

    method: str
    path: str
    status: int
    body: Any  # the request body parsed as JSON; None when absent or not JSON
    headers: dict[str, str]  # revision, idempotency-key and content-type, when sent
    at: float  # clock() on arrival
    query: str = ""
    response: Any = None  # the JSON answered; None for an empty body


@dataclasses.dataclass(slots=True)
class ChannelConsent:
    consent: str = "NEVER_SUBSCRIBED"
    consent_timestamp: str | None = None
    last_updated: str | None = None
    method: str | None = None
    method_detail: str | None = None


@dataclasses.dataclass(slots=True)
class Profile:
    id: str
    created: str
    updated: str
    attributes: dict[str, Any]  # every name of PROFILE_FIELDS; None when unset
    location: dict[str, Any] = dataclasses.field(default_factory=dict)
    properties: dict[str, Any] = dataclasses.field(default_factory=dict)
    consent: dict[str, ChannelConsent] = dataclasses.field(
        default_factory=lambda: {"email": ChannelConsent(), "sms": ChannelConsent()}
    )
    suppressions: list[dict[str, str]] = dataclasses.field(default_factory=list)  # e-mail

    @property
    def email(self) -> str | None:
        return self.attributes.get("email")

    @property
    def phone_number(self) -> str | None:
        return self.attributes.get("phone_number")

    @property
    def external_id(self) -> str | None:
        return self.attributes.get("external_id")


@dataclasses.dataclass(frozen=True, slots=True)
class ConsentChange:
    """One channel of one profile touched by a subscription job."""

    profile_id: str
    channel: Channel
    consent: str  # SUBSCRIBED or UNSUBSCRIBED
    previous: str  # the consent it replaced
    was_suppressed: bool  # the e-mail had a suppression before (always False for sms)
    email: str | None
    phone_number: str | None
    list_id: str | None
    at: float

    @property
    def reopted(self) -> bool:
        """A subscribe of a channel that had opted out (or an e-mail that was suppressed)."""
        return self.consent == "SUBSCRIBED" and (
            self.previous == "UNSUBSCRIBED" or self.was_suppressed
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Merge:
    destination: str
    source: str
    at: float


@dataclasses.dataclass(slots=True)
class BulkImportJob:
    id: str
    items: list[Any]
    list_ids: list[str]
    created_at: str
    status: str = "queued"
    polls: int = 0
    completed_count: int = 0
    failed_count: int = 0
    started_at: str | None = None
    completed_at: str | None = None
    profile_ids: list[str] = dataclasses.field(default_factory=list)
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class ApiError(Exception):
    """An answer made of one JSON:API error object."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        *,
        pointer: str | None = "/data/",
        parameter: str | None = None,
        meta: dict[str, Any] | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.pointer = pointer
        self.parameter = parameter
        self.meta = meta
        self.headers = list(headers)

    def source(self) -> dict[str, str]:
        if self.parameter is not None:
            return {"parameter": self.parameter}
        return {"pointer": self.pointer or "/data/"}

    def resource(self, error_id: str) -> dict[str, Any]:
        return {
            "id": error_id,
            "status": self.status,
            "code": self.code,
            "title": self.title,
            "detail": self.detail,
            "source": self.source(),
            "links": {},
            "meta": dict(self.meta or {}),
        }


def _invalid(pointer: str, detail: str) -> ApiError:
    return ApiError(400, "invalid", "Invalid input.", detail, pointer=pointer)


def _object(value: Any, pointer: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(pointer, f"`{what}` must be an object.")
    return value


def _list(value: Any, pointer: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _invalid(pointer, f"`{what}` must be an array.")
    return value


def _optional_string(value: Any, pointer: str, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _invalid(pointer, f"`{what}` must be a string or null.")
    return value


def _check_email(value: str | None, pointer: str) -> None:
    if value is not None and not _EMAIL.fullmatch(value):
        raise _invalid(pointer, f"Invalid email address: {value!r}.")


def _check_phone(value: str | None, pointer: str) -> None:
    if value is not None and not _E164.fullmatch(value):
        raise _invalid(
            pointer, "Invalid phone number format (Example of a valid format: +12345678901)."
        )


def _key(value: str | None) -> str | None:
    return value.strip().lower() if value else None


_FILTERABLE = frozenset({"id", "email", "phone_number", "external_id"})
_QUOTED = r"(?:\"[^\"]*\"|'[^']*')"
_FILTER = re.compile(
    rf"\s*(?P<op>equals|any)\(\s*(?P<field>[a-z_]+)\s*,\s*"
    rf"(?P<value>{_QUOTED}|\[\s*{_QUOTED}(?:\s*,\s*{_QUOTED})*\s*\])\s*\)\s*"
)


def _page_size(request: _Request) -> int:
    """``page[size]`` (1 to 100, 20 when not given), or a 400 naming the parameter."""
    raw_size = (request.query.get("page[size]") or ["20"])[0]
    if not raw_size.isdigit() or not 1 <= int(raw_size) <= 100:
        raise ApiError(
            400,
            "invalid",
            "Invalid input.",
            "`page[size]` must be an integer between 1 and 100.",
            pointer=None,
            parameter="page[size]",
        )
    return int(raw_size)


def _bad_filter(detail: str) -> ApiError:
    return ApiError(400, "invalid", "Invalid input.", detail, pointer=None, parameter="filter")


def _parse_filter(text: str) -> tuple[str, list[str]]:
    """(field, values) of ``equals(field,"v")`` or ``any(field,["a","b"])`` on an
    identifier; anything else is a 400, as Klaviyo answers a filter it does not allow."""
    match = _FILTER.fullmatch(text)
    if match is None:
        raise _bad_filter('Invalid filter: expected equals(field,"value") or any(field,[...]).')
    field, value = match["field"], match["value"]
    if field not in _FILTERABLE:
        raise _bad_filter(f"Filtering on `{field}` is not supported by this fake.")
    values = [q[1:-1] for q in re.findall(_QUOTED, value)]
    if (match["op"] == "equals") != (not value.startswith("[")):
        raise _bad_filter(
            f"`{match['op']}` takes {'one value' if match['op'] == 'equals' else 'a list'}."
        )
    return field, values


@dataclasses.dataclass(frozen=True, slots=True)
class _ProfileInput:
    id: str | None
    attributes: dict[str, Any]
    meta: dict[str, Any]
    where: str


@dataclasses.dataclass(frozen=True, slots=True)
class _ConsentItem:
    id: str | None
    email: str | None
    phone_number: str | None
    channels: tuple[Channel, ...]
    where: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Request:
    params: dict[str, str]
    body: Any
    size: int
    query: dict[str, list[str]]
    base: str
    now: float


class _Window:
    """One rate-limit window: ``limit`` requests per ``length`` seconds."""

    __slots__ = ("count", "hits", "length", "limit", "sliding", "start")

    def __init__(self, length: float, limit: int, sliding: bool) -> None:
        self.length = length
        self.limit = limit
        self.sliding = sliding
        self.start = -math.inf
        self.count = 0
        self.hits: deque[float] = deque()

    def _roll(self, now: float) -> None:
        if self.sliding:
            while self.hits and self.hits[0] <= now - self.length:
                self.hits.popleft()
        else:
            start = math.floor(now / self.length) * self.length
            if start != self.start:
                self.start, self.count = start, 0

    def used(self, now: float) -> int:
        self._roll(now)
        return len(self.hits) if self.sliding else self.count

    def wait(self, now: float) -> float:
        """Seconds until this window has a free slot (0 when it has one now)."""
        used = self.used(now)
        if used < self.limit:
            return 0.0
        if self.sliding:
            return self.hits[used - self.limit] + self.length - now
        return self.start + self.length - now

    def reset_in(self, now: float) -> float:
        """Seconds until the window is empty again."""
        self._roll(now)
        if self.sliding:
            return self.hits[-1] + self.length - now if self.hits else 0.0
        return self.start + self.length - now

    def take(self, now: float) -> None:
        self._roll(now)
        if self.sliding:
            self.hits.append(now)
        else:
            self.count += 1


class _Limiter:
    def __init__(self, limit: RateLimit, sliding: bool) -> None:
        self.burst = _Window(1.0, limit.burst, sliding)
        self.steady = _Window(60.0, limit.steady, sliding)

    def acquire(self, now: float) -> float | None:
        """Take a slot and answer None, or answer the seconds to wait (no slot taken)."""
        wait = max(self.burst.wait(now), self.steady.wait(now))
        if wait > 0:
            return wait
        self.burst.take(now)
        self.steady.take(now)
        return None

    def headers(self, now: float) -> list[tuple[str, str]]:
        window = self.steady
        return [
            ("ratelimit-limit", str(window.limit)),
            ("ratelimit-remaining", str(max(0, window.limit - window.used(now)))),
            ("ratelimit-reset", str(max(0, math.ceil(window.reset_in(now) - 1e-9)))),
        ]


_Handler = Callable[[_Request], tuple[int, Any]]

# (pattern, method, endpoint name: the rate-limit bucket and the handler)
_ROUTES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"/api/profile-import"), "POST", "profile-import"),
    (re.compile(r"/api/accounts"), "GET", "get-accounts"),
    (re.compile(r"/api/profiles"), "GET", "get-profiles"),
    (re.compile(r"/api/profiles/(?P<id>[^/]+)"), "GET", "get-profile"),
    (re.compile(r"/api/profile-merge"), "POST", "profile-merge"),
    (re.compile(r"/api/profile-subscription-bulk-create-jobs"), "POST", "subscribe"),
    (re.compile(r"/api/profile-subscription-bulk-delete-jobs"), "POST", "unsubscribe"),
    (re.compile(r"/api/profile-bulk-import-jobs"), "POST", "bulk-import"),
    (re.compile(r"/api/profile-bulk-import-jobs/(?P<id>[^/]+)"), "GET", "get-bulk-import-job"),
    (
        re.compile(r"/api/profile-bulk-import-jobs/(?P<id>[^/]+)/import-errors"),
        "GET",
        "get-import-errors",
    ),
)


# The last second _iso_now formatted and its text ("YYYY-MM-DDTHH:MM:SS"), swapped as one.
_SECOND: tuple[int, str] = (-1, "")


def _iso_now() -> str:
    """``datetime.now(UTC).isoformat(timespec="microseconds")``, the same clock and rounding
    (down to the microsecond), its date and time formatted once a second."""
    global _SECOND
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    second = _SECOND
    if second[0] != seconds:
        when = dt.datetime.fromtimestamp(seconds, dt.UTC).replace(tzinfo=None)
        second = _SECOND = (seconds, when.isoformat(timespec="seconds"))
    return f"{second[1]}.{micros:06d}+00:00"


# What json.dumps(value, separators=(",", ":")) builds, without a new encoder at each call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_ATOMIC = frozenset({str, int, float, bool, type(None)})


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def _encoded_size(value: Any) -> int:
    """``len(_dumps(value))``: the encoder escapes every non-ASCII character, so its string
    has one character per byte."""
    return len(_ENCODER.encode(value))


def _copy_json(value: Any) -> Any:
    """A deep copy of a value parsed from JSON (dicts, lists and scalars); anything else goes
    to :func:`copy.deepcopy`."""
    kind = type(value)
    if kind in _ATOMIC:
        return value
    if kind is dict:
        return {k: v if type(v) in _ATOMIC else _copy_json(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _ATOMIC else _copy_json(v) for v in value]
    return copy.deepcopy(value)


_SLICE = 64  # profiles of a bulk job whose size is checked with one encoding


class KlaviyoFake:
    """Klaviyo's profiles API: state, records and the ASGI app (:attr:`app`). Thread-safe:
    a server thread may run the app while a test reads the records."""

    def __init__(
        self,
        *,
        api_key: str = "pk_test_fake",
        rate_limits: bool = True,
        rate_window: Literal["fixed", "sliding"] = "fixed",
        limits: Mapping[str, RateLimit] | None = None,
        job_polls_until_complete: int = 2,
        unsubscribe_creates_profiles: bool = True,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        freeze_state: bool = False,
    ) -> None:
        if job_polls_until_complete < 0:
            raise ValueError("job_polls_until_complete must not be negative")
        unknown = set(limits or {}) - set(RATE_LIMITS)
        if unknown:
            raise ValueError(f"unknown endpoints in limits: {sorted(unknown)}")
        self.api_key = api_key
        self.rate_limits = rate_limits
        self.rate_window = rate_window
        self.limits: dict[str, RateLimit] = {**RATE_LIMITS, **(limits or {})}
        self.job_polls_until_complete = job_polls_until_complete
        self.unsubscribe_creates_profiles = unsubscribe_creates_profiles
        self.clock = clock
        self.seed = seed
        self.freeze_state = freeze_state
        self.max_import_bytes = MAX_IMPORT_BYTES
        self.max_bulk_bytes = MAX_BULK_BYTES
        self.max_bulk_profiles = MAX_BULK_PROFILES
        self.max_subscribe_profiles = MAX_SUBSCRIBE_PROFILES
        self.max_unsubscribe_profiles = MAX_UNSUBSCRIBE_PROFILES
        self._lock = threading.RLock()
        self._handlers: dict[str, _Handler] = {
            "profile-import": self._profile_import,
            "get-profile": self._get_profile,
            "get-profiles": self._get_profiles,
            "profile-merge": self._profile_merge,
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "bulk-import": self._bulk_import,
            "get-bulk-import-job": self._get_bulk_import_job,
            "get-import-errors": self._get_import_errors,
            "get-accounts": self._get_accounts,
        }
        self._reset_state()

    def _reset_state(self) -> None:
        self._rng = random.Random(self.seed)
        self._profiles: dict[str, Profile] = {}
        self._by: dict[str, dict[str, str]] = {name: {} for name in IDENTIFIERS}
        self._jobs: dict[str, BulkImportJob] = {}
        self._calls: list[Call] = []
        self._subscribes: list[ConsentChange] = []
        self._unsubscribes: list[ConsentChange] = []
        self._merges: list[Merge] = []
        sliding = self.rate_window == "sliding"
        self._limiters = {name: _Limiter(limit, sliding) for name, limit in self.limits.items()}

    def reset(self) -> None:
        """Forget every profile, job, record and rate-limit window."""
        with self._lock:
            self._reset_state()

    # ---- records and state -------------------------------------------------------------------

    @property
    def app(self) -> ASGIApp:
        """The ASGI 3 app: the fake itself."""
        return self

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def calls_to(self, path_prefix: str, method: str | None = None) -> list[Call]:
        with self._lock:
            return [
                c
                for c in self._calls
                if c.path.startswith(path_prefix) and (method is None or c.method == method)
            ]

    def statuses(self) -> list[int]:
        with self._lock:
            return [c.status for c in self._calls]

    @property
    def profiles(self) -> dict[str, Profile]:
        """The live profiles by id (a copy of the mapping; the profiles themselves are live)."""
        with self._lock:
            return dict(self._profiles)

    def profile(self, profile_id: str) -> Profile | None:
        with self._lock:
            return self._profiles.get(profile_id)

    def profile_by_email(self, email: str) -> Profile | None:
        return self._find("email", email)

    def profile_by_phone(self, phone_number: str) -> Profile | None:
        return self._find("phone_number", phone_number)

    def profile_by_external_id(self, external_id: str) -> Profile | None:
        return self._find("external_id", external_id)

    def consent(self, profile_id: str) -> dict[str, str]:
        """``{"email": ..., "sms": ...}`` marketing consent of a profile (KeyError if unknown)."""
        with self._lock:
            profile = self._profiles[profile_id]
            return {channel: c.consent for channel, c in profile.consent.items()}

    def suppressions(self, profile_id: str) -> list[str]:
        """The reasons of the e-mail suppressions of a profile."""
        with self._lock:
            return [s["reason"] for s in self._profiles[profile_id].suppressions]

    def suppress(self, profile_id: str, reason: str = "HARD_BOUNCE") -> None:
        """Add an e-mail suppression, as a bounce or a complaint would."""
        if reason not in SUPPRESSION_REASONS:
            raise ValueError(f"unknown suppression reason {reason!r}")
        with self._lock:
            profile = self._profiles[profile_id]
            if reason not in {s["reason"] for s in profile.suppressions}:
                profile.suppressions.append({"reason": reason, "timestamp": _iso_now()})

    def delete_profile(self, profile_id: str) -> None:
        """Delete a profile, as a marketer (or a data-privacy deletion request) does in
        Klaviyo: from then on its id answers 404 everywhere and its identifiers are free."""
        with self._lock:
            profile = self._profiles.pop(profile_id)
            self._unindex(profile)

    @property
    def subscribes(self) -> list[ConsentChange]:
        with self._lock:
            return list(self._subscribes)

    @property
    def unsubscribes(self) -> list[ConsentChange]:
        with self._lock:
            return list(self._unsubscribes)

    def resubscriptions(self) -> list[ConsentChange]:
        """Subscribes that re-opted a channel which had opted out or was suppressed."""
        with self._lock:
            return [c for c in self._subscribes if c.reopted]

    @property
    def merges(self) -> list[Merge]:
        with self._lock:
            return list(self._merges)

    @property
    def jobs(self) -> dict[str, BulkImportJob]:
        with self._lock:
            return dict(self._jobs)

    def complete_jobs(self) -> None:
        """Complete every pending bulk import job now, without polling."""
        with self._lock:
            for job in self._jobs.values():
                if job.status != "complete":
                    self._complete(job)

    def _find(self, field: str, value: str | None) -> Profile | None:
        key = _key(value) if field == "email" else value
        with self._lock:
            found = self._by[field].get(key) if key else None
            return self._profiles.get(found) if found else None

    # ---- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await http_body(scope, receive, send)
        if raw is None:
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method: str = scope["method"]
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        query = scope.get("query_string", b"").decode("latin-1")
        base = f"{scope.get('scheme', 'http')}://{headers.get('host', 'a.klaviyo.com')}"
        body: Any = None
        if raw:
            try:
                with self._keeping(len(raw) > MAX_IMPORT_BYTES):
                    body = json.loads(raw)
            except ValueError:
                body = None

        with self._lock:
            at = self.clock()
            status, response, extra = self._handle(method, path, query, headers, raw, body, base)
            kept = {
                k: headers[k]
                for k in ("revision", "idempotency-key", "content-type")
                if k in headers
            }
            self._calls.append(Call(method, path, status, body, kept, at, query, response))

        payload = b"" if response is None else _dumps(response)
        out = [(b"content-length", str(len(payload)).encode())]
        if response is not None:
            out.append((b"content-type", JSONAPI.encode()))
        out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra)
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})

    def _handle(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        raw: bytes,
        body: Any,
        base: str,
    ) -> tuple[int, Any, list[tuple[str, str]]]:
        now = self.clock()
        slot_headers: list[tuple[str, str]] = []
        try:
            self._authenticate(headers.get("authorization"))
            self._check_revision(headers.get("revision"))
            name, params = self._route(method, path)
            if self.rate_limits:
                limiter = self._limiters[name]
                wait = limiter.acquire(now)
                if wait is not None:
                    seconds = max(1, math.ceil(wait - 1e-9))
                    raise ApiError(
                        429,
                        "throttled",
                        "Request was throttled.",
                        f"Request was throttled. Expected available in {seconds} second"
                        f"{'' if seconds == 1 else 's'}.",
                        headers=[("retry-after", str(seconds))],
                    )
                slot_headers = limiter.headers(now)
            if method == "POST":
                self._check_body(name, headers.get("content-type"), raw, body)
            request = _Request(params, body, len(raw), parse_qs(query), base, now)
            status, response = self._handlers[name](request)
        except ApiError as error:
            error_id = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
            return (
                error.status,
                {"errors": [error.resource(error_id)]},
                error.headers + slot_headers,
            )
        return status, response, slot_headers

    def _authenticate(self, authorization: str | None) -> None:
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme != "Klaviyo-API-Key" or not key.strip():
            raise ApiError(
                401,
                "not_authenticated",
                "Authentication credentials were not provided.",
                "Missing or invalid authorization scheme. Please use Klaviyo-API-Key.",
            )
        if key.strip() != self.api_key:
            raise ApiError(
                401,
                "authentication_failed",
                "Incorrect authentication credentials.",
                "Incorrect authentication credentials.",
            )

    def _check_revision(self, revision: str | None) -> None:
        def bad(detail: str) -> ApiError:
            return ApiError(
                400, "invalid_revision", "Invalid revision.", detail, parameter="revision"
            )

        if not revision:
            raise bad("Missing `revision` header.")
        match = _REVISION.fullmatch(revision.strip())
        if match is None:
            raise bad(f"Invalid revision {revision!r}: expected YYYY-MM-DD.")
        try:
            day = dt.date(int(match[1]), int(match[2]), int(match[3]))
        except ValueError:
            raise bad(f"Invalid revision {revision!r}: not a date.") from None
        if day > LATEST_REVISION or day < OLDEST_REVISION:
            raise bad(
                f"Revision {revision!r} is not available: use a revision between "
                f"{OLDEST_REVISION.isoformat()} and {LATEST_REVISION.isoformat()}."
            )

    def _route(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        allowed: list[str] = []
        for pattern, route_method, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if route_method == method:
                return name, match.groupdict()
            allowed.append(route_method)
        if allowed:
            raise ApiError(
                405,
                "method_not_allowed",
                "Method not allowed.",
                f'Method "{method}" not allowed.',
                headers=[("allow", ", ".join(sorted(set(allowed))))],
            )
        raise ApiError(404, "not_found", "Not found.", f"No endpoint at {path}.")

    def _check_body(self, name: str, content_type: str | None, raw: bytes, body: Any) -> None:
        media = (content_type or "").split(";", 1)[0].strip().lower()
        if media not in (JSONAPI, "application/json"):
            raise ApiError(
                415,
                "unsupported_media_type",
                "Unsupported media type.",
                f'Unsupported media type "{content_type or ""}" in request.',
            )
        # The spec states a payload limit for these two only.
        limits = {"bulk-import": self.max_bulk_bytes, "profile-import": self.max_import_bytes}
        limit = limits.get(name)
        if limit is not None and len(raw) > limit:
            raise ApiError(
                413,
                "payload_too_large",
                "Payload too large.",
                f"The request body is {len(raw)} bytes; the maximum is {limit} bytes.",
            )
        if body is None:
            raise ApiError(400, "parse_error", "Parse error.", "The request body is not JSON.")

    # ---- profiles ---------------------------------------------------------------------------

    def _new_id(self) -> str:
        """A ULID-like 26-character id, as Klaviyo's (``01GDDKASAP8TKDDA2GRZDSVP4H``)."""
        # 26 characters of 5 bits, two at a time: 10 of the time in milliseconds (the same
        # for a millisecond), 16 of 80 random bits
        global _MILLISECOND
        millis = int(time.time() * 1000)
        random_bits = self._rng.getrandbits(80)
        millisecond = _MILLISECOND
        if millisecond[0] != millis:
            text = "".join([_CROCKFORD_PAIRS[(millis >> s) & 1023] for s in _TIME_SHIFTS])
            millisecond = _MILLISECOND = (millis, text)
        pairs = _CROCKFORD_PAIRS
        return millisecond[1] + "".join([pairs[(random_bits >> s) & 1023] for s in _RANDOM_SHIFTS])

    def _keys(self, attributes: Mapping[str, Any]) -> tuple[tuple[dict[str, str], Any], ...]:
        """(index, key) of each identifier (email, phone_number, external_id); the e-mail's
        key is lower-cased; a key may be None or empty (not indexed)."""
        by = self._by
        return (
            (by["email"], _key(attributes.get("email"))),
            (by["phone_number"], attributes.get("phone_number")),
            (by["external_id"], attributes.get("external_id")),
        )

    def _index(self, profile: Profile) -> None:
        for index, key in self._keys(profile.attributes):
            if key:
                index[key] = profile.id

    def _unindex(self, profile: Profile) -> None:
        for index, key in self._keys(profile.attributes):
            if key and index.get(key) == profile.id:
                del index[key]

    def _holder(self, field: str, value: str | None) -> str | None:
        key = _key(value) if field == "email" else value
        return self._by[field].get(key) if key else None

    def _profile_resource(
        self, profile: Profile, base: str, *, subscriptions: bool = False
    ) -> dict[str, Any]:
        attributes: dict[str, Any] = dict(profile.attributes)
        attributes.update(
            created=profile.created,
            updated=profile.updated,
            last_event_date=None,
            location={k: profile.location.get(k) for k in LOCATION_FIELDS},
            properties=copy.deepcopy(profile.properties),
        )
        if subscriptions:
            attributes["subscriptions"] = self._subscriptions(profile)
        return {
            "type": "profile",
            "id": profile.id,
            "attributes": attributes,
            "links": {"self": f"{base}/api/profiles/{profile.id}/"},
        }

    @staticmethod
    def _subscriptions(profile: Profile) -> dict[str, Any]:
        email, sms = profile.consent["email"], profile.consent["sms"]
        return {
            "email": {
                "marketing": {
                    "can_receive_email_marketing": email.consent == "SUBSCRIBED"
                    and not profile.suppressions,
                    "consent": email.consent,
                    "consent_timestamp": email.consent_timestamp,
                    "last_updated": email.last_updated,
                    "method": email.method,
                    "method_detail": email.method_detail,
                    "custom_method_detail": None,
                    "double_optin": None,
                    "suppression": [dict(s) for s in profile.suppressions],
                    "list_suppressions": [],
                }
            },
            "sms": {
                "marketing": {
                    "can_receive_sms_marketing": sms.consent == "SUBSCRIBED",
                    "consent": sms.consent,
                    "consent_timestamp": sms.consent_timestamp,
                    "method": sms.method,
                    "method_detail": sms.method_detail,
                    "last_updated": sms.last_updated,
                }
            },
        }

    @staticmethod
    def _wants_subscriptions(query: dict[str, list[str]]) -> bool:
        values = query.get("additional-fields[profile]", [])
        return any("subscriptions" in v.split(",") for v in values)

    def _validate_profile(self, data: Any, where: str) -> _ProfileInput:
        # The pointers of the errors are built only when a check fails.
        if type(data) is not dict:
            _object(data, where, "data")
        if data.get("type") != "profile":
            raise _invalid(f"{where}/type", "`type` must be 'profile'.")
        profile_id = data.get("id")
        if profile_id is not None and not isinstance(profile_id, str):
            _optional_string(profile_id, f"{where}/id", "id")
        attributes = data.get("attributes")
        if type(attributes) is not dict:
            attributes = _object(attributes, f"{where}/attributes", "attributes")
        for name, value in attributes.items():
            if name in _STRING_ATTRIBUTES:
                if value is not None and not isinstance(value, str):
                    _optional_string(value, f"{where}/attributes/{name}", name)
                continue
            pointer = f"{where}/attributes/{name}"
            if name not in IMPORT_ATTRIBUTES:
                raise _invalid(
                    pointer, f"'{name}' is not a valid field for the resource 'profile'."
                )
            if name == "location":
                if value is not None:
                    self._validate_location(_object(value, pointer, name), pointer)
            elif name == "properties":
                if value is not None:
                    _object(value, pointer, name)
            else:
                _optional_string(value, pointer, name)
        if not profile_id and not (
            attributes.get("email")
            or attributes.get("phone_number")
            or attributes.get("external_id")
        ):
            raise _invalid(
                f"{where}/attributes",
                "One of `id`, `email`, `phone_number` or `external_id` is required to "
                "identify a profile.",
            )
        email = attributes.get("email")
        if email is not None and not _EMAIL.fullmatch(email):
            _check_email(email, f"{where}/attributes/email")
        phone = attributes.get("phone_number")
        if phone is not None and not _E164.fullmatch(phone):
            _check_phone(phone, f"{where}/attributes/phone_number")
        meta = data.get("meta") or {}
        if type(meta) is not dict:
            _object(meta, f"{where}/meta", "meta")
        return _ProfileInput(profile_id or None, attributes, meta, where)

    @staticmethod
    def _validate_location(location: dict[str, Any], pointer: str) -> None:
        for name, value in location.items():
            if name not in LOCATION_FIELDS:
                raise _invalid(f"{pointer}/{name}", f"'{name}' is not a valid location field.")
            if name in ("latitude", "longitude"):
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, str | int | float)
                ):
                    raise _invalid(f"{pointer}/{name}", f"`{name}` must be a string or number.")
            elif value is not None and not isinstance(value, str):
                _optional_string(value, f"{pointer}/{name}", name)

    def _match(self, given: _ProfileInput) -> Profile | None:
        attributes = given.attributes
        # email, then phone, then external_id
        held = [index.get(key) if key else None for index, key in self._keys(attributes)]
        if given.id is not None:
            target = self._profiles.get(given.id)
            if target is None:
                raise ApiError(
                    404,
                    "not_found",
                    "Not found.",
                    f"A profile with id {given.id} does not exist.",
                    pointer=f"{given.where}/id",
                )
            for other in held:
                if other is not None and other != target.id:
                    raise self._duplicate(other, given.where)
            return target
        found = [h for h in held if h is not None]
        if not found:
            return None
        if len(set(found)) > 1:
            raise self._duplicate(found[0], given.where)
        target = self._profiles[found[0]]
        sent = attributes.get("external_id")
        if sent and target.external_id is not None and target.external_id != sent:
            # Assumed: the profile found by e-mail or phone belongs to another external id.
            raise self._duplicate(target.id, given.where)
        return target

    @staticmethod
    def _duplicate(profile_id: str, where: str) -> ApiError:
        return ApiError(
            409,
            "duplicate_profile",
            "Conflict.",
            "A profile already exists with one of these identifiers.",
            pointer=f"{where}/attributes",
            meta={"duplicate_profile_id": profile_id},
        )

    def _upsert(self, given: _ProfileInput) -> tuple[Profile, bool]:
        target = self._match(given)
        stamp = _iso_now()
        created = target is None
        if target is None:
            target = Profile(
                id=self._new_id(),
                created=stamp,
                updated=stamp,
                attributes=dict.fromkeys(PROFILE_FIELDS),
            )
            self._profiles[target.id] = target
        else:
            self._unindex(target)
        self._apply(target, given.attributes, given.meta)
        target.updated = stamp
        self._index(target)
        return target, created

    @staticmethod
    def _apply(profile: Profile, attributes: dict[str, Any], meta: dict[str, Any]) -> None:
        stored = profile.attributes  # holds every name of PROFILE_FIELDS, in their order
        for name, value in attributes.items():
            if name in _PROFILE_FIELD_NAMES:  # null clears the field (the spec's words)
                stored[name] = value
        if "location" in attributes:
            location = attributes["location"]
            if location is None:
                profile.location = {}
            else:
                profile.location.update(location)
        properties = attributes.get("properties")
        if properties:
            kept = profile.properties
            for key, value in properties.items():
                kept[key] = value if type(value) in _ATOMIC else _copy_json(value)
        patch = meta.get("patch_properties")
        if isinstance(patch, dict):
            for key, value in (patch.get("append") or {}).items():
                current = profile.properties.get(key)
                items = (
                    current if isinstance(current, list) else [] if current is None else [current]
                )
                items.extend(value if isinstance(value, list) else [value])
                profile.properties[key] = items
            for key, value in (patch.get("unappend") or {}).items():
                current = profile.properties.get(key)
                if isinstance(current, list):
                    drop = value if isinstance(value, list) else [value]
                    profile.properties[key] = [v for v in current if v not in drop]
            unset = patch.get("unset")
            for key in [unset] if isinstance(unset, str) else unset or []:
                profile.properties.pop(key, None)

    def _profile_import(self, request: _Request) -> tuple[int, Any]:
        body = _object(request.body, "/data/", "body")
        given = self._validate_profile(body.get("data"), "/data")
        profile, created = self._upsert(given)
        resource = self._profile_resource(
            profile, request.base, subscriptions=self._wants_subscriptions(request.query)
        )
        return (201 if created else 200), {
            "data": resource,
            "links": {"self": f"{request.base}/api/profile-import/"},
        }

    def _get_profile(self, request: _Request) -> tuple[int, Any]:
        profile_id = request.params["id"]
        profile = self._profiles.get(profile_id)
        if profile is None:
            raise ApiError(
                404,
                "not_found",
                "Not found.",
                f"A profile with id {profile_id} does not exist.",
                pointer=None,
                parameter="id",
            )
        resource = self._profile_resource(
            profile, request.base, subscriptions=self._wants_subscriptions(request.query)
        )
        return 200, {"data": resource, "links": {"self": resource["links"]["self"]}}

    def _get_profiles(self, request: _Request) -> tuple[int, Any]:
        """Get Profiles: the profiles a filter on an identifier matches; a read, never a
        create (what profile-import would do with the same identifiers)."""
        size = _page_size(request)
        filters = request.query.get("filter") or []
        if len(filters) > 1:
            raise _bad_filter("Only one `filter` parameter may be given.")
        if filters:
            field, values = _parse_filter(filters[0])
            ids: list[str] = []
            for value in values:
                found = value if field == "id" else self._holder(field, value)
                if found is not None and found in self._profiles and found not in ids:
                    ids.append(found)
        else:
            ids = list(self._profiles)
        wants = self._wants_subscriptions(request.query)
        data = [
            self._profile_resource(self._profiles[i], request.base, subscriptions=wants)
            for i in ids[:size]
        ]
        links = {"self": f"{request.base}/api/profiles/", "next": None, "prev": None}
        return 200, {"data": data, "links": links}

    # ---- account ----------------------------------------------------------------------------

    def _get_accounts(self, request: _Request) -> tuple[int, Any]:
        """The one account a private key belongs to (Get Accounts: a list of one)."""
        account_id = ACCOUNT_ID
        resource = {
            "type": "account",
            "id": account_id,
            "attributes": {
                "test_account": True,
                "contact_information": {
                    "default_sender_name": "Fake Dispensary",
                    "default_sender_email": "marketing@example.com",
                    "website_url": "https://dispensary.example.com",
                    "organization_name": "Fake Dispensary",
                    "street_address": {
                        "address1": "1 Main St",
                        "address2": None,
                        "city": "Los Angeles",
                        "region": "CA",
                        "country": "US",
                        "zip": "90012",
                    },
                },
                "industry": "Retail",
                "timezone": "America/Los_Angeles",
                "preferred_currency": "USD",
                "public_api_key": account_id,
                "locale": "en-US",
            },
            "links": {"self": f"{request.base}/api/accounts/{account_id}/"},
        }
        links = {"self": f"{request.base}/api/accounts/", "next": None, "prev": None}
        return 200, {"data": [resource], "links": links}

    # ---- merge ------------------------------------------------------------------------------

    def _profile_merge(self, request: _Request) -> tuple[int, Any]:
        body = _object(request.body, "/data/", "body")
        data = _object(body.get("data"), "/data", "data")
        if data.get("type") != "profile-merge":
            raise _invalid("/data/type", "`type` must be 'profile-merge'.")
        destination_id = data.get("id")
        if not isinstance(destination_id, str) or not destination_id:
            raise _invalid("/data/id", "`id` (the destination profile) is required.")
        pointer = "/data/relationships/profiles/data"
        relationships = _object(data.get("relationships"), "/data/relationships", "relationships")
        profiles = _object(
            relationships.get("profiles"), "/data/relationships/profiles", "profiles"
        )
        sources = _list(profiles.get("data"), pointer, "data")
        if len(sources) != 1:
            raise _invalid(pointer, "Exactly one source profile must be given.")
        source = _object(sources[0], f"{pointer}/0", "data")
        source_id = source.get("id")
        if source.get("type") != "profile":
            raise _invalid(f"{pointer}/0/type", "`type` must be 'profile'.")
        if not isinstance(source_id, str) or not source_id:
            raise _invalid(f"{pointer}/0/id", "`id` is required.")
        if source_id == destination_id:
            raise _invalid(f"{pointer}/0/id", "A profile cannot be merged into itself.")
        for profile_id, where in ((destination_id, "/data/id"), (source_id, f"{pointer}/0/id")):
            if profile_id not in self._profiles:
                raise ApiError(
                    404,
                    "not_found",
                    "Not found.",
                    f"A profile with id {profile_id} does not exist.",
                    pointer=where,
                )
        self._merge(self._profiles[destination_id], self._profiles[source_id], request.now)
        return 201, {
            "data": {
                "type": "profile",
                "id": destination_id,
                "links": {"self": f"{request.base}/api/profiles/{destination_id}/"},
            },
            "links": {"self": f"{request.base}/api/profile-merge/"},
        }

    def _merge(self, destination: Profile, source: Profile, at: float) -> None:
        self._unindex(source)
        self._unindex(destination)
        del self._profiles[source.id]
        for name in PROFILE_FIELDS:
            if destination.attributes.get(name) is None and source.attributes.get(name) is not None:
                destination.attributes[name] = source.attributes[name]
                if name == "email":  # consent follows the identifier
                    destination.consent["email"] = source.consent["email"]
                    destination.suppressions = [dict(s) for s in source.suppressions]
                elif name == "phone_number":
                    destination.consent["sms"] = source.consent["sms"]
        for key, value in source.location.items():
            if destination.location.get(key) is None:
                destination.location[key] = value
        for key, value in source.properties.items():
            destination.properties.setdefault(key, value)
        destination.updated = _iso_now()
        self._index(destination)
        self._merges.append(Merge(destination.id, source.id, at))

    # ---- subscriptions ----------------------------------------------------------------------

    def _consent_items(
        self, body: Any, *, kind: str, consent: str, limit: int, allow_id: bool
    ) -> tuple[list[_ConsentItem], dict[str, Any]]:
        body = _object(body, "/data/", "body")
        data = _object(body.get("data"), "/data", "data")
        if data.get("type") != kind:
            raise _invalid("/data/type", f"`type` must be '{kind}'.")
        attributes = _object(data.get("attributes"), "/data/attributes", "attributes")
        profiles = _object(attributes.get("profiles"), "/data/attributes/profiles", "profiles")
        pointer = "/data/attributes/profiles/data"
        items = _list(profiles.get("data"), pointer, "data")
        if not items:
            raise _invalid(pointer, "At least one profile is required.")
        if len(items) > limit:
            raise _invalid(pointer, f"At most {limit} profiles may be given; got {len(items)}.")
        allowed = {"email", "phone_number", "subscriptions"}
        if kind.endswith("create-job"):
            allowed.add("age_gated_date_of_birth")
        historical = attributes.get("historical_import") is True
        out: list[_ConsentItem] = []
        for index, item in enumerate(items):
            where = f"{pointer}/{index}"
            item = _object(item, where, "data")
            if item.get("type") != "profile":
                raise _invalid(f"{where}/type", "`type` must be 'profile'.")
            profile_id = _optional_string(item.get("id"), f"{where}/id", "id") if allow_id else None
            if profile_id is not None and profile_id not in self._profiles:
                raise ApiError(
                    404,
                    "not_found",
                    "Not found.",
                    f"A profile with id {profile_id} does not exist.",
                    pointer=f"{where}/id",
                )
            fields = _object(item.get("attributes"), f"{where}/attributes", "attributes")
            for name in fields:
                if name not in allowed:
                    raise _invalid(
                        f"{where}/attributes/{name}",
                        f"'{name}' is not a valid field for this resource.",
                    )
            email = _optional_string(fields.get("email"), f"{where}/attributes/email", "email")
            phone = _optional_string(
                fields.get("phone_number"), f"{where}/attributes/phone_number", "phone_number"
            )
            _check_email(email, f"{where}/attributes/email")
            _check_phone(phone, f"{where}/attributes/phone_number")
            subscriptions = _object(
                fields.get("subscriptions"), f"{where}/attributes/subscriptions", "subscriptions"
            )
            channels: list[Channel] = []
            for channel_name, channel_value in subscriptions.items():
                at = f"{where}/attributes/subscriptions/{channel_name}"
                parameters = _object(channel_value, at, channel_name)
                for purpose, setting in parameters.items():
                    if purpose in ("tokens", "anonymous_id"):
                        continue
                    setting = _object(setting, f"{at}/{purpose}", purpose)
                    if setting.get("consent") != consent:
                        raise _invalid(f"{at}/{purpose}/consent", f"`consent` must be '{consent}'.")
                    if historical and not setting.get("consented_at"):
                        raise _invalid(
                            f"{at}/{purpose}/consented_at",
                            "`consented_at` is required when `historical_import` is true.",
                        )
                if "marketing" not in parameters:
                    continue
                if channel_name == "email":
                    if email is None:
                        raise _invalid(f"{where}/attributes/email", "An email is required.")
                    channels.append("email")
                elif channel_name == "sms":
                    if phone is None:
                        raise _invalid(
                            f"{where}/attributes/phone_number", "A phone number is required."
                        )
                    channels.append("sms")
            if email is None and phone is None and profile_id is None:
                raise _invalid(f"{where}/attributes", "An email or a phone number is required.")
            out.append(_ConsentItem(profile_id, email, phone, tuple(channels), where))
        return out, data

    @staticmethod
    def _list_id(data: dict[str, Any]) -> str | None:
        relationship = (data.get("relationships") or {}).get("list")
        target = relationship.get("data") if isinstance(relationship, dict) else None
        found = target.get("id") if isinstance(target, dict) else None
        return found if isinstance(found, str) else None

    def _consent_target(self, item: _ConsentItem, channel: Channel, create: bool) -> Profile | None:
        """The profile whose ``channel`` consent changes: the one holding the identifier of the
        channel, else the profile given by id or holding the other identifier (gaining it),
        else a new profile."""
        field, other = (
            ("email", "phone_number") if channel == "email" else ("phone_number", "email")
        )
        value = item.email if channel == "email" else item.phone_number
        holder = self._holder(field, value)
        if holder is not None:
            return self._profiles[holder]
        other_value = item.phone_number if channel == "email" else item.email
        base_id = item.id or self._holder(other, other_value)
        base = self._profiles.get(base_id) if base_id else None
        if base is not None and base.attributes.get(field) is None:
            self._unindex(base)
            base.attributes[field] = value
            self._index(base)
            return base
        if not create:
            return None
        stamp = _iso_now()
        profile = Profile(self._new_id(), stamp, stamp, dict.fromkeys(PROFILE_FIELDS))
        profile.attributes[field] = value
        if other_value and self._holder(other, other_value) is None:
            profile.attributes[other] = other_value
        self._profiles[profile.id] = profile
        self._index(profile)
        return profile

    def _set_consent(
        self,
        item: _ConsentItem,
        consent: str,
        *,
        create: bool,
        list_id: str | None,
        method_detail: str | None,
        at: float,
    ) -> list[ConsentChange]:
        changes: list[ConsentChange] = []
        stamp = _iso_now()
        for channel in item.channels:
            profile = self._consent_target(item, channel, create)
            if profile is None:
                continue
            state = profile.consent[channel]
            was_suppressed = channel == "email" and bool(profile.suppressions)
            changes.append(
                ConsentChange(
                    profile.id,
                    channel,
                    consent,
                    state.consent,
                    was_suppressed,
                    profile.email,
                    profile.phone_number,
                    list_id,
                    at,
                )
            )
            profile.consent[channel] = ChannelConsent(consent, stamp, stamp, "API", method_detail)
            if channel == "email":
                reasons = {s["reason"] for s in profile.suppressions}
                if consent == "SUBSCRIBED":
                    profile.suppressions = [
                        s for s in profile.suppressions if s["reason"] not in LIFTED_BY_SUBSCRIBE
                    ]
                elif "UNSUBSCRIBE" not in reasons:
                    profile.suppressions.append({"reason": "UNSUBSCRIBE", "timestamp": stamp})
            profile.updated = stamp
        return changes

    def _subscribe(self, request: _Request) -> tuple[int, Any]:
        items, data = self._consent_items(
            request.body,
            kind="profile-subscription-bulk-create-job",
            consent="SUBSCRIBED",
            limit=self.max_subscribe_profiles,
            allow_id=True,
        )
        list_id = self._list_id(data)
        source = (data.get("attributes") or {}).get("custom_source")
        for item in items:
            self._subscribes.extend(
                self._set_consent(
                    item,
                    "SUBSCRIBED",
                    create=True,
                    list_id=list_id,
                    method_detail=source if isinstance(source, str) else None,
                    at=request.now,
                )
            )
        return 202, None

    def _unsubscribe(self, request: _Request) -> tuple[int, Any]:
        items, data = self._consent_items(
            request.body,
            kind="profile-subscription-bulk-delete-job",
            consent="UNSUBSCRIBED",
            limit=self.max_unsubscribe_profiles,
            allow_id=False,
        )
        list_id = self._list_id(data)
        for item in items:
            self._unsubscribes.extend(
                self._set_consent(
                    item,
                    "UNSUBSCRIBED",
                    create=self.unsubscribe_creates_profiles,
                    list_id=list_id,
                    method_detail=None,
                    at=request.now,
                )
            )
        return 202, None

    # ---- bulk import jobs -------------------------------------------------------------------

    def _bulk_import(self, request: _Request) -> tuple[int, Any]:
        body = _object(request.body, "/data/", "body")
        data = _object(body.get("data"), "/data", "data")
        if data.get("type") != "profile-bulk-import-job":
            raise _invalid("/data/type", "`type` must be 'profile-bulk-import-job'.")
        attributes = _object(data.get("attributes"), "/data/attributes", "attributes")
        profiles = _object(attributes.get("profiles"), "/data/attributes/profiles", "profiles")
        pointer = "/data/attributes/profiles/data"
        items = _list(profiles.get("data"), pointer, "data")
        if not items:
            raise _invalid(pointer, "At least one profile is required.")
        if len(items) > self.max_bulk_profiles:
            raise _invalid(
                pointer,
                f"At most {self.max_bulk_profiles} profiles may be imported in one job; "
                f"got {len(items)}.",
            )
        lists = ((data.get("relationships") or {}).get("lists") or {}).get("data") or []
        list_ids = [x["id"] for x in lists if isinstance(x, dict) and isinstance(x.get("id"), str)]
        job = BulkImportJob(self._new_id(), items, list_ids, _iso_now())
        self._jobs[job.id] = job
        return 202, {
            "data": self._job_resource(job, request.base),
            "links": {"self": f"{request.base}/api/profile-bulk-import-jobs/"},
        }

    def _job(self, job_id: str) -> BulkImportJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(
                404,
                "not_found",
                "Not found.",
                f"A profile bulk import job with id {job_id} does not exist.",
                pointer=None,
                parameter="id",
            )
        return job

    def _get_bulk_import_job(self, request: _Request) -> tuple[int, Any]:
        job = self._job(request.params["id"])
        if job.status != "complete":
            job.polls += 1
            if job.polls > self.job_polls_until_complete:
                self._complete(job)
            else:
                job.status = "processing"
                job.started_at = job.started_at or _iso_now()
        resource = self._job_resource(job, request.base)
        return 200, {"data": resource, "links": {"self": resource["links"]["self"]}}

    # ---- the cyclic collector, in process mode ------------------------------------------------

    @contextmanager
    def _keeping(self, large: bool = True) -> Iterator[None]:
        """With ``freeze_state`` (process mode), around the building of a large state kept for
        good, without cycles (the parsed body of a bulk job, in the job and the call records;
        the job's stored profiles): the cyclic collector does not run meanwhile (a full
        collection walks the whole heap, again and again as it grows), and the heap is frozen
        afterwards (:func:`gc.freeze`) so that later collections leave it alone."""
        if not (large and self.freeze_state and gc.isenabled()):
            yield
            return
        gc.disable()
        try:
            yield
        finally:
            gc.freeze()
            gc.enable()

    def _complete(self, job: BulkImportJob) -> None:
        with self._keeping():
            self._run(job)

    def _run(self, job: BulkImportJob) -> None:
        job.started_at = job.started_at or _iso_now()
        limit = self.max_import_bytes
        small = False  # every profile of the current slice is within the limit
        for index, item in enumerate(job.items):
            where = f"/data/attributes/profiles/data/{index}"
            if index % _SLICE == 0:
                # a profile's encoding is a part of its slice's: one encoding for the slice
                small = _encoded_size(job.items[index : index + _SLICE]) <= limit
            try:
                if not small and _encoded_size(item) > limit:
                    raise _invalid(where, "A profile may not exceed 100 KB.")
                profile, _ = self._upsert(self._validate_profile(item, where))
            except ApiError as error:
                job.failed_count += 1
                job.errors.append(
                    {
                        "type": "import-error",
                        "id": str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
                        "attributes": {
                            "code": error.code,
                            "title": error.title,
                            "detail": error.detail,
                            "source": {"pointer": error.pointer or where},
                            "original_payload": item if isinstance(item, dict) else None,
                        },
                    }
                )
            else:
                job.completed_count += 1
                job.profile_ids.append(profile.id)
        job.status = "complete"
        job.completed_at = _iso_now()

    def _job_resource(self, job: BulkImportJob, base: str) -> dict[str, Any]:
        url = f"{base}/api/profile-bulk-import-jobs/{job.id}"
        return {
            "type": "profile-bulk-import-job",
            "id": job.id,
            "attributes": {
                "status": job.status,
                "created_at": job.created_at,
                "total_count": len(job.items),
                "completed_count": job.completed_count,
                "failed_count": job.failed_count,
                "completed_at": job.completed_at,
                "expires_at": None,
                "started_at": job.started_at,
            },
            "relationships": {
                "lists": {
                    "data": [{"type": "list", "id": x} for x in job.list_ids],
                    "links": {
                        "self": f"{url}/relationships/lists/",
                        "related": f"{url}/lists/",
                    },
                },
                "profiles": {
                    "links": {
                        "self": f"{url}/relationships/profiles/",
                        "related": f"{url}/profiles/",
                    }
                },
                "import-errors": {"links": {"related": f"{url}/import-errors/"}},
            },
            "links": {"self": f"{url}/"},
        }

    def _get_import_errors(self, request: _Request) -> tuple[int, Any]:
        job = self._job(request.params["id"])
        size = _page_size(request)
        cursor = (request.query.get("page[cursor]") or ["0"])[0]
        start = int(cursor) if cursor.isdigit() else 0
        url = f"{request.base}/api/profile-bulk-import-jobs/{job.id}/import-errors/"
        links: dict[str, str] = {"self": url}
        if start + size < len(job.errors):
            links["next"] = f"{url}?page[cursor]={start + size}&page[size]={size}"
        if start > 0:
            links["prev"] = f"{url}?page[cursor]={max(0, start - size)}&page[size]={size}"
        return 200, {"data": copy.deepcopy(job.errors[start : start + size]), "links": links}


@contextmanager
def serve(
    fake: KlaviyoFake, *, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 10.0
) -> Iterator[str]:
    """Serve ``fake`` over HTTP from a background thread; yields its base url."""
    with serve_in_thread(
        fake, host=host, port=port, name="klaviyo-fake", start_timeout=start_timeout
    ) as bound:
        yield f"http://{host}:{bound}"


# ---- process mode ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.klaviyo", description="A fake of Klaviyo's profiles API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default="pk_test_fake")
    parser.add_argument("--no-rate-limits", action="store_true")
    parser.add_argument("--rate-window", choices=("fixed", "sliding"), default="fixed")
    parser.add_argument("--job-polls", type=int, default=2, help="GETs before a job completes")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default=DEFAULT_LOOP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        fake = KlaviyoFake(
            api_key=args.api_key,
            rate_limits=not args.no_rate_limits,
            rate_window=args.rate_window,
            job_polls_until_complete=args.job_polls,
            seed=args.seed,
            freeze_state=True,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sock = bind_socket(args.host, args.port)
    return serve_until_signalled(make_server(fake, args.loop, quiet=False), sock)


if __name__ == "__main__":
    sys.exit(main())
