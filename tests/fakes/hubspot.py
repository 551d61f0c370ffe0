"""A local fake of the HubSpot APIs the ``hubspot`` destination uses: CRM contacts v3 (batch
upsert, read, merge), CRM properties v3 (contacts' properties and property groups) and
Communication Preferences v4 (e-mail subscription statuses), for the adapter's tests.

Paths, request and answer shapes follow HubSpot's public OpenAPI documents (the contacts,
properties and subscriptions specs of HubSpot's public spec collection, read by hand; nothing
of them is copied here); limits and the rate-limit answers follow HubSpot's usage guidelines
as shared/docs/destinations.md summarises them. Every request needs ``Authorization: Bearer
<token>`` (absent, another scheme or another token: 401 ``INVALID_AUTHENTICATION``).

=========================================================  =================================
``POST /crm/v3/objects/contacts/batch/upsert``              200 all written / 207 some failed
``GET  /crm/v3/objects/contacts/{id}[?idProperty=P]``       200 the contact / 404
``POST /crm/v3/objects/contacts/merge``                     200 the surviving contact
``GET  /crm/v3/properties/contacts``                        200 ``{"results": [...]}``
``GET  /crm/v3/properties/contacts/{name}``                 200 the property / 404
``POST /crm/v3/properties/contacts``                        201 created / 409 exists
``GET  /crm/v3/properties/contacts/groups/{name}``          200 the group / 404
``POST /crm/v3/properties/contacts/groups``                 201 created / 409 exists
``POST /communication-preferences/v4/statuses/batch/unsubscribe-all?channel=EMAIL``  200
``POST /communication-preferences/v4/statuses/batch/write`` 200 (subscribe / unsubscribe one
                                                            subscription type)
=========================================================  =================================

A trailing slash is accepted. Other paths: 404; another method on a known path: 405. Errors
are HubSpot's error object ``{"status": "error", "message", "correlationId", "category",
"subCategory"?, "context"?, "errors"?}``; messages may quote what was sent (HubSpot's do), so
a client must never log them.

What is enforced:

- **batch upsert**: ``inputs`` of 1 to :attr:`HubSpotFake.max_inputs` (100) items, each
  ``{"id", "idProperty", "properties", "objectWriteTraceId"?}``; ``idProperty`` must be an
  existing property with ``hasUniqueValue`` (or ``email``), else 400 for the whole batch.
  Whole-batch failures, as HubSpot fails a batch on one bad input: an unknown property (400
  ``VALIDATION_ERROR``, ``PROPERTY_DOESNT_EXIST``), an invalid e-mail (400), one id twice
  (400 ``Duplicate IDs``), one e-mail twice (409 ``CONFLICT``), an e-mail or another unique
  value held by another contact (409 ``CONFLICT``). Per-input failures (207, the others
  written): a value that does not fit its property's type (a number, a bool, an enumeration
  option). A contact is found by its ``idProperty`` value, else created; given values
  replace the stored ones, an empty string clears one. Results come back **out of request
  order** (HubSpot does not promise an order): a client maps them by ``objectWriteTraceId``
  (echoed) or by the idProperty value.
- **merge**: ``{"primaryObjectId", "objectIdToMerge"}``; the primary keeps its id and its
  values, gains the absorbed one's missing non-unique values, and its e-mail adds the absorbed
  one's to ``hs_additional_emails`` (still found by it); the absorbed contact disappears: its
  id then answers 404 everywhere (a merge naming it too) and its unique custom values are free.
  The same id twice: 400.
- **properties**: a property needs ``name``, ``label``, ``type``, ``fieldType`` and an
  existing ``groupName`` (400 otherwise); an existing name is a 409 ``OBJECT_ALREADY_EXISTS``;
  the default contact properties (``email``, ``firstname``...) and group ``contactinformation``
  exist from the start.
- **communication preferences**: ``unsubscribe-all`` (``channel=EMAIL`` required, ``inputs``:
  e-mail addresses, at most :attr:`HubSpotFake.max_inputs`) opts each address out of every
  subscription type; ``batch/write`` sets one subscription type's status (the type must exist:
  :attr:`HubSpotFake.subscription_types`). Subscribing an address that opted out is recorded
  (:meth:`HubSpotFake.resubscriptions`) so a test can assert it never happens by accident.
  ``channel`` other than ``EMAIL``: 400 (no SMS in the public API).
- **rate limits** (``rate_limits=True``): a rolling ten-second window per token
  (:attr:`HubSpotFake.ten_second_limit`, 190 by default) and a daily cap
  (:attr:`HubSpotFake.daily_limit`) that resets at midnight in the account's time zone
  (``time_zone``, America/New_York by default; the daily count follows ``wall``, epoch
  seconds). Answers carry ``X-HubSpot-RateLimit-Max``, ``-Remaining``,
  ``-Interval-Milliseconds``, ``-Daily`` and ``-Daily-Remaining``; a refused request is a 429
  with ``{"status": "error", "errorType": "RATE_LIMIT", "policyName": "TEN_SECONDLY_ROLLING" |
  "DAILY", ...}`` and no ``Retry-After`` (HubSpot documents none) and consumes no slot.

Behaviours **assumed** (not settled by the public material):

- a 207's error objects name their input in ``context``: ``{"objectWriteTraceId": [trace]}``
  when the input had one, and always ``{"ids": [its idProperty value]}``;
- merged ids answer 404 ``OBJECT_NOT_FOUND`` (HubSpot may also redirect reads of a merged id
  to the survivor); the unique custom values of the absorbed contact are dropped;
- the communication preferences batch limit is the CRM's 100; those calls neither need nor
  create a contact;
- an invalid e-mail is a whole-batch 400 (a documented pitfall), a type mismatch a 207.

In-process::

    fake = HubSpotFake(clock=clock)
    transport = httpx.ASGITransport(app=fake.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://api.hubapi.com") as c:
        ...

Over real HTTP in a thread: ``with serve(fake) as base_url: ...``. As a process (prints
``LISTENING <port>`` once ready, runs until SIGTERM/SIGINT, exits 0)::

    python -m tests.fakes.hubspot --port 0 [--no-rate-limits] [--token T] [--ten-second N]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import random
import re
import sys
import threading
import time
import uuid
import zoneinfo
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any
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

MAX_INPUTS = 100
TEN_SECOND_LIMIT = 190  # Pro / Enterprise private apps; 100 for Free / Starter
DAILY_LIMIT = 625_000  # Pro; 250,000 Free / Starter, 1,000,000 Enterprise
INTERVAL_MS = 10_000
TEN_SECOND_POLICY = "TEN_SECONDLY_ROLLING"
DAILY_POLICY = "DAILY"

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_NAME = re.compile(r"[a-z][a-z0-9_]*")

# name -> (type, fieldType, unique)
DEFAULT_PROPERTIES: dict[str, tuple[str, str, bool]] = {
    "email": ("string", "text", True),
    "firstname": ("string", "text", False),
    "lastname": ("string", "text", False),
    "phone": ("string", "phonenumber", False),
    "mobilephone": ("string", "phonenumber", False),
    "address": ("string", "text", False),
    "city": ("string", "text", False),
    "state": ("string", "text", False),
    "zip": ("string", "text", False),
    "country": ("string", "text", False),
    "date_of_birth": ("string", "text", False),
    "lifecyclestage": ("enumeration", "radio", False),
    "hs_object_id": ("number", "number", True),
    "hs_additional_emails": ("enumeration", "checkbox", False),
    "createdate": ("datetime", "date", False),
    "lastmodifieddate": ("datetime", "date", False),
}
READ_ONLY = frozenset({"hs_object_id", "hs_additional_emails", "createdate", "lastmodifieddate"})
PROPERTY_TYPES = frozenset(
    {"bool", "date", "datetime", "enumeration", "number", "phone_number", "string"}
)
FIELD_TYPES = frozenset(
    {
        "booleancheckbox",
        "calculation_equation",
        "checkbox",
        "date",
        "file",
        "html",
        "number",
        "phonenumber",
        "radio",
        "select",
        "text",
        "textarea",
    }
)
DEFAULT_GROUP = "contactinformation"


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One request received by the fake, whatever it was answered."""

    method: str
    path: str
    status: int
    body: Any  # the request body parsed as JSON; None when absent or not JSON
    query: str
    at: float  # clock() on arrival
    response: Any = None


@dataclasses.dataclass(slots=True)
class Contact:
    id: str
    properties: dict[str, str]
    created: str
    updated: str


@dataclasses.dataclass(frozen=True, slots=True)
class Merge:
    primary: str
    absorbed: str
    at: float


@dataclasses.dataclass(frozen=True, slots=True)
class StatusChange:
    """One e-mail's subscription status set through Communication Preferences v4."""

    email: str
    subscription_id: int | None  # None: unsubscribe from all
    status: str  # SUBSCRIBED, UNSUBSCRIBED
    previous: str  # this type's status before (or the all-opt-out's: UNSUBSCRIBED)
    opted_out_before: bool  # the address had unsubscribed from all
    legal_basis: str | None
    at: float

    @property
    def resubscribed(self) -> bool:
        return self.status == "SUBSCRIBED" and (
            self.opted_out_before or self.previous == "UNSUBSCRIBED"
        )


class ApiError(Exception):
    """An answer made of one HubSpot error object."""

    def __init__(
        self,
        status: int,
        category: str,
        message: str,
        *,
        sub_category: str | None = None,
        context: dict[str, list[str]] | None = None,
        errors: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.category = category
        self.message = message
        self.sub_category = sub_category
        self.context = context
        self.errors = errors
        self.extra = extra or {}
        self.headers = list(headers)

    def body(self, correlation_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": "error",
            "message": self.message,
            "correlationId": correlation_id,
            "category": self.category,
        }
        if self.sub_category is not None:
            body["subCategory"] = self.sub_category
        if self.context is not None:
            body["context"] = self.context
        if self.errors is not None:
            body["errors"] = self.errors
        body.update(self.extra)
        return body


def _validation(message: str, **kwargs: Any) -> ApiError:
    return ApiError(400, "VALIDATION_ERROR", message, **kwargs)


def _not_found(message: str) -> ApiError:
    return ApiError(404, "OBJECT_NOT_FOUND", message)


@dataclasses.dataclass(frozen=True, slots=True)
class _Request:
    params: dict[str, str]
    body: Any
    query: dict[str, list[str]]
    now: float


_Handler = Callable[[_Request], tuple[int, Any]]

_ROUTES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"/crm/v3/objects/contacts/batch/upsert"), "POST", "upsert"),
    (re.compile(r"/crm/v3/objects/contacts/merge"), "POST", "merge"),
    (re.compile(r"/crm/v3/objects/contacts/(?P<id>[^/]+)"), "GET", "get-contact"),
    (re.compile(r"/crm/v3/properties/contacts"), "GET", "get-properties"),
    (re.compile(r"/crm/v3/properties/contacts"), "POST", "create-property"),
    (re.compile(r"/crm/v3/properties/contacts/groups"), "POST", "create-group"),
    (re.compile(r"/crm/v3/properties/contacts/groups/(?P<name>[^/]+)"), "GET", "get-group"),
    (re.compile(r"/crm/v3/properties/contacts/(?P<name>[^/]+)"), "GET", "get-property"),
    (
        re.compile(r"/communication-preferences/v4/statuses/batch/unsubscribe-all"),
        "POST",
        "unsubscribe-all",
    ),
    (re.compile(r"/communication-preferences/v4/statuses/batch/write"), "POST", "status-write"),
)


def _iso(epoch: float) -> str:
    stamp = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _email_key(value: str) -> str:
    return value.strip().lower()


class HubSpotFake:
    """HubSpot's contacts, properties and communication preferences APIs: state, records and
    the ASGI app (:attr:`app`). Thread-safe: a server thread may run the app while a test
    reads the records."""

    def __init__(
        self,
        *,
        token: str = "pat-test-fake",
        rate_limits: bool = True,
        ten_second_limit: int = TEN_SECOND_LIMIT,
        daily_limit: int = DAILY_LIMIT,
        time_zone: str = "America/New_York",
        subscription_types: dict[int, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        seed: int | None = 7,
    ) -> None:
        if ten_second_limit < 1 or daily_limit < 1:
            raise ValueError("the rate limits must be positive")
        self.token = token
        self.rate_limits = rate_limits
        self.ten_second_limit = ten_second_limit
        self.daily_limit = daily_limit
        self.zone = zoneinfo.ZoneInfo(time_zone)
        self.subscription_types = dict(subscription_types or {1001: "Marketing Information"})
        self.clock = clock
        self.wall = wall
        self.seed = seed
        self.max_inputs = MAX_INPUTS
        self._lock = threading.RLock()
        self._handlers: dict[str, _Handler] = {
            "upsert": self._upsert,
            "merge": self._merge,
            "get-contact": self._get_contact,
            "get-properties": self._get_properties,
            "get-property": self._get_property,
            "create-property": self._create_property,
            "get-group": self._get_group,
            "create-group": self._create_group,
            "unsubscribe-all": self._unsubscribe_all,
            "status-write": self._status_write,
        }
        self._reset_state()

    def _reset_state(self) -> None:
        self._rng = random.Random(self.seed)
        self._next_id = 101
        self._contacts: dict[str, Contact] = {}
        # (property, value) -> contact id, for e-mails (primary and additional, any case) and
        # unique properties: kept in step by every write (upsert, merge), rebuilt when a
        # property is added (it may be unique), so a lookup never scans every contact
        self._index: dict[tuple[str, str], str] = {}
        self._gone: dict[str, str] = {}  # absorbed id -> the id it was merged into
        self._groups: dict[str, dict[str, Any]] = {
            DEFAULT_GROUP: {
                "name": DEFAULT_GROUP,
                "label": "Contact information",
                "displayOrder": -1,
                "archived": False,
            }
        }
        self._properties: dict[str, dict[str, Any]] = {}
        for name, (kind, field_type, unique) in DEFAULT_PROPERTIES.items():
            self._properties[name] = self._property_resource(
                {
                    "name": name,
                    "label": name,
                    "type": kind,
                    "fieldType": field_type,
                    "groupName": DEFAULT_GROUP,
                    "hasUniqueValue": unique,
                },
                custom=False,
            )
        self._opted_out: set[str] = set()  # e-mails unsubscribed from all
        self._statuses: dict[tuple[str, int], str] = {}
        self._changes: list[StatusChange] = []
        self._calls: list[Call] = []
        self._merges: list[Merge] = []
        self._hits: deque[float] = deque()
        self._day: dt.date | None = None
        self._day_count = 0
        self._failures: deque[int] = deque()

    def reset(self) -> None:
        """Forget every contact, property created, record and rate-limit window."""
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
    def contacts(self) -> dict[str, Contact]:
        """The live contacts by id (a copy of the mapping; the contacts are live)."""
        with self._lock:
            return dict(self._contacts)

    def contact(self, contact_id: str) -> Contact | None:
        with self._lock:
            return self._contacts.get(contact_id)

    def profile(self, contact_id: str) -> Contact | None:
        """:meth:`contact` under the name the other fakes use (shared test helpers)."""
        return self.contact(contact_id)

    def contact_by(self, name: str, value: str) -> Contact | None:
        """The contact whose property ``name`` holds ``value`` (e-mail: any case, and the
        additional e-mails of merged contacts)."""
        with self._lock:
            return self._holder(name, value)

    def merged_into(self, contact_id: str) -> str | None:
        with self._lock:
            return self._gone.get(contact_id)

    @property
    def merges(self) -> list[Merge]:
        with self._lock:
            return list(self._merges)

    @property
    def properties(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._properties)

    @property
    def groups(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._groups)

    def add_property(self, name: str, *, unique: bool = False, kind: str = "string") -> None:
        """Create a contact property directly, as an account that has one already."""
        with self._lock:
            self._properties[name] = self._property_resource(
                {
                    "name": name,
                    "label": name,
                    "type": kind,
                    "fieldType": "number" if kind == "number" else "text",
                    "groupName": DEFAULT_GROUP,
                    "hasUniqueValue": unique,
                },
                custom=True,
            )
            self._reindex()

    def opted_out(self, email: str) -> bool:
        """Whether the address unsubscribed from all e-mail."""
        with self._lock:
            return _email_key(email) in self._opted_out

    def subscription_status(self, email: str, subscription_id: int) -> str:
        with self._lock:
            return self._statuses.get((_email_key(email), subscription_id), "NOT_SPECIFIED")

    @property
    def status_changes(self) -> list[StatusChange]:
        with self._lock:
            return list(self._changes)

    def resubscriptions(self) -> list[StatusChange]:
        """Subscribes of an address that had opted out (of all, or of that type)."""
        with self._lock:
            return [c for c in self._changes if c.resubscribed]

    def merge_on_hubspot(self, primary: str, absorbed: str) -> None:
        """Merge two contacts as a HubSpot user would in the app (not through our adapter)."""
        with self._lock:
            self._do_merge(primary, absorbed, self.clock())

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` authenticated requests with ``status`` (an error object
        of category ``INTERNAL_ERROR`` for a 5xx), before any other check but the rate limit."""
        if not 400 <= status <= 599 or count < 1:
            raise ValueError("fail_next takes a 4xx or 5xx status and a positive count")
        with self._lock:
            self._failures.extend([status] * count)

    def use_up_daily(self) -> None:
        """Spend what is left of today's cap (the next request is a DAILY 429)."""
        with self._lock:
            self._roll_day()
            self._day_count = self.daily_limit

    def daily_reset_at(self) -> float:
        """Epoch seconds of the next midnight in the account's time zone."""
        local = dt.datetime.fromtimestamp(self.wall(), self.zone)
        midnight = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), self.zone)
        return midnight.timestamp()

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
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                bad_json = True
        with self._lock:
            at = self.clock()
            status, response, extra = self._handle(method, path, query, headers, body, bad_json)
            self._calls.append(Call(method, path, status, body, query, at, response))
        payload = b"" if response is None else _dumps(response)
        out = [(b"content-length", str(len(payload)).encode())]
        if response is not None:
            out.append((b"content-type", b"application/json;charset=utf-8"))
        out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra)
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})

    def _handle(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: Any,
        bad_json: bool,
    ) -> tuple[int, Any, list[tuple[str, str]]]:
        now = self.clock()
        limit_headers: list[tuple[str, str]] = []
        try:
            self._authenticate(headers.get("authorization"))
            if self.rate_limits:
                limit_headers = self._take_slot(now)
            if self._failures:
                status = self._failures.popleft()
                raise ApiError(
                    status,
                    "INTERNAL_ERROR" if status >= 500 else "VALIDATION_ERROR",
                    "A scripted failure.",
                )
            name, params = self._route(method, path)
            if method == "POST":
                if bad_json:
                    raise _validation("Invalid input JSON on line 1: the body is not JSON.")
                if body is None:
                    raise _validation("A request body is required.")
            request = _Request(params, body, parse_qs(query), now)
            status, response = self._handlers[name](request)
        except ApiError as error:
            correlation = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
            return error.status, error.body(correlation), error.headers + limit_headers
        return status, response, limit_headers

    def _authenticate(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.token:
            raise ApiError(
                401,
                "INVALID_AUTHENTICATION",
                "Authentication credentials not found. This API supports OAuth 2.0 "
                "authentication and you can find more details at "
                "https://developers.hubspot.com/docs/methods/auth/oauth-overview",
            )

    # ---- rate limits ------------------------------------------------------------------------

    def _roll_day(self) -> None:
        today = dt.datetime.fromtimestamp(self.wall(), self.zone).date()
        if today != self._day:
            self._day, self._day_count = today, 0

    def _take_slot(self, now: float) -> list[tuple[str, str]]:
        while self._hits and self._hits[0] <= now - INTERVAL_MS / 1000:
            self._hits.popleft()
        self._roll_day()
        daily_left = self.daily_limit - self._day_count
        window_left = self.ten_second_limit - len(self._hits)
        if daily_left <= 0:
            raise self._throttled(DAILY_POLICY, "daily", window_left, 0)
        if window_left <= 0:
            raise self._throttled(TEN_SECOND_POLICY, "ten_secondly_rolling", 0, daily_left)
        self._hits.append(now)
        self._day_count += 1
        return self._limit_headers(window_left - 1, daily_left - 1)

    def _limit_headers(self, window_left: int, daily_left: int) -> list[tuple[str, str]]:
        return [
            ("x-hubspot-ratelimit-daily", str(self.daily_limit)),
            ("x-hubspot-ratelimit-daily-remaining", str(max(0, daily_left))),
            ("x-hubspot-ratelimit-interval-milliseconds", str(INTERVAL_MS)),
            ("x-hubspot-ratelimit-max", str(self.ten_second_limit)),
            ("x-hubspot-ratelimit-remaining", str(max(0, window_left))),
        ]

    def _throttled(self, policy: str, words: str, window_left: int, daily_left: int) -> ApiError:
        return ApiError(
            429,
            "RATE_LIMITS",
            f"You have reached your {words} limit.",
            extra={
                "errorType": "RATE_LIMIT",
                "policyName": policy,
                "groupName": f"publicapi:private-app:{words}",
            },
            headers=self._limit_headers(window_left, daily_left),
        )

    # ---- routing ----------------------------------------------------------------------------

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
                "METHOD_NOT_ALLOWED",
                f"HTTP method {method} is not supported by this resource.",
                headers=[("allow", ", ".join(sorted(set(allowed))))],
            )
        raise _not_found(f"No resource at {path}.")

    # ---- contacts ---------------------------------------------------------------------------

    def _new_id(self) -> str:
        contact_id = str(self._next_id)
        self._next_id += self._rng.randint(1, 50)
        return contact_id

    def _unique(self, name: str) -> bool:
        prop = self._properties.get(name)
        return bool(prop and prop.get("hasUniqueValue"))

    def _holder(self, name: str, value: str) -> Contact | None:
        if name == "hs_object_id":
            return self._contacts.get(value)
        if name == "email" or self._unique(name):
            key = _email_key(value) if name == "email" else value
            found = self._index.get((name, key))
            return None if found is None else self._contacts.get(found)
        for contact in self._contacts.values():  # not unique: the first holder
            if contact.properties.get(name) == value:
                return contact
        return None

    def _keys(self, contact: Contact) -> list[tuple[str, str]]:
        """The index entries of ``contact``: its e-mails and its unique values."""
        props = contact.properties
        emails = [props.get("email", ""), *props.get("hs_additional_emails", "").split(";")]
        keys = [("email", _email_key(e)) for e in emails if e]
        keys += [(n, v) for n, v in props.items() if n != "email" and v != "" and self._unique(n)]
        return keys

    def _unindex(self, contact: Contact) -> None:
        for key in self._keys(contact):
            if self._index.get(key) == contact.id:
                del self._index[key]

    def _add_index(self, contact: Contact) -> None:
        for key in self._keys(contact):
            self._index.setdefault(key, contact.id)

    def _reindex(self) -> None:
        self._index = {}
        for contact in self._contacts.values():
            self._add_index(contact)

    def _contact_resource(self, contact: Contact, names: Sequence[str] | None = None) -> Any:
        shown = names if names is not None else list(contact.properties)
        return {
            "id": contact.id,
            "properties": {
                **{k: contact.properties.get(k) for k in shown},
                "hs_object_id": contact.id,
            },
            "createdAt": contact.created,
            "updatedAt": contact.updated,
            "archived": False,
        }

    @staticmethod
    def _check_value(name: str, value: Any, where: str) -> str:
        """The value as HubSpot stores it (a string); a list or an object fails the batch."""
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int | float):
            value = str(value)
        elif value is None:
            value = ""
        elif not isinstance(value, str):
            raise _validation(f"Invalid input JSON: {where}.properties.{name} is not a string.")
        return str(value)

    def _type_error(self, name: str, value: str) -> str | None:
        kind = self._properties[name]["type"]
        if value == "":
            return None
        if kind == "number":
            try:
                float(value)
            except ValueError:
                return f"{value!r} was not a valid number."
        if kind == "bool" and value not in ("true", "false"):
            return f"{value!r} was not a valid boolean."
        if kind == "enumeration":
            options = {o["value"] for o in self._properties[name].get("options", [])}
            if options and any(v not in options for v in value.split(";")):
                return f"{value!r} was not one of the allowed options."
        return None

    def _upsert(self, request: _Request) -> tuple[int, Any]:
        body = request.body
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(inputs, list):
            raise _validation("Invalid input JSON: 'inputs' is required and must be an array.")
        if not inputs or len(inputs) > self.max_inputs:
            raise _validation(
                f"Batch input must contain between 1 and {self.max_inputs} inputs; "
                f"got {len(inputs)}.",
                context={"limit": [str(self.max_inputs)]},
            )
        parsed: list[tuple[str, str, dict[str, str], str | None]] = []
        unknown: list[str] = []
        for n, item in enumerate(inputs):
            where = f"inputs[{n}]"
            if not isinstance(item, dict):
                raise _validation(f"Invalid input JSON: {where} is not an object.")
            id_value, id_property = item.get("id"), item.get("idProperty")
            props, trace = item.get("properties"), item.get("objectWriteTraceId")
            if not isinstance(id_value, str) or not id_value:
                raise _validation(f"Invalid input JSON: {where}.id is required.")
            if not isinstance(id_property, str) or not id_property:
                raise _validation(f"Invalid input JSON: {where}.idProperty is required.")
            if not isinstance(props, dict):
                raise _validation(f"Invalid input JSON: {where}.properties is required.")
            if trace is not None and not isinstance(trace, str):
                raise _validation(f"Invalid input JSON: {where}.objectWriteTraceId.")
            if id_property not in self._properties:
                raise _validation(
                    f"Property {id_property} does not exist.",
                    sub_category="PROPERTY_DOESNT_EXIST",
                )
            if id_property != "email" and not self._unique(id_property):
                raise _validation(
                    f"Property {id_property} is not a unique identifier property; "
                    "idProperty must name a property with hasUniqueValue.",
                    sub_category="INVALID_ID_PROPERTY",
                )
            values: dict[str, str] = {}
            for name, value in props.items():
                if name not in self._properties:
                    unknown.append(name)
                    continue
                if name in READ_ONLY:
                    raise _validation(f"Property {name} is read-only.", sub_category="READ_ONLY")
                values[name] = self._check_value(name, value, where)
            parsed.append((id_value, id_property, values, trace))
        if unknown:
            raise _validation(
                "Property values were not valid",
                errors=[
                    {
                        "message": f'Property "{name}" does not exist',
                        "code": "PROPERTY_DOESNT_EXIST",
                        "context": {"propertyName": [name]},
                    }
                    for name in dict.fromkeys(unknown)
                ],
            )
        seen_ids: set[tuple[str, str]] = set()
        seen_emails: set[str] = set()
        for id_value, id_property, values, _ in parsed:
            key = (id_property, _email_key(id_value) if id_property == "email" else id_value)
            if key in seen_ids:
                raise _validation("Duplicate IDs found in batch input", context={"ids": [id_value]})
            seen_ids.add(key)
            email = values.get("email") or (id_value if id_property == "email" else "")
            if email:
                if not _EMAIL.fullmatch(email.strip()):
                    raise _validation(
                        f"Email address {email} is invalid",
                        sub_category="INVALID_EMAIL",
                        errors=[
                            {"message": "invalid email", "code": "INVALID_EMAIL", "in": "email"}
                        ],
                    )
                if _email_key(email) in seen_emails:
                    raise ApiError(
                        409,
                        "CONFLICT",
                        "Duplicate e-mail addresses in one batch input.",
                        context={"email": [email]},
                    )
                seen_emails.add(_email_key(email))
        # find targets and conflicts first: a conflict fails the whole batch, nothing written
        plan: list[tuple[Contact | None, str, str, dict[str, str], str | None, list[str]]] = []
        for id_value, id_property, values, trace in parsed:
            target = self._holder(id_property, id_value)
            for name, value in values.items():
                if value and (name == "email" or self._unique(name)):
                    holder = self._holder(name, value)
                    if holder is not None and holder is not target:
                        raise ApiError(
                            409,
                            "CONFLICT",
                            f"Contact already exists. Existing ID: {holder.id}",
                            context={"id": [holder.id], "property": [name]},
                        )
            errors = [e for n, v in values.items() if (e := self._type_error(n, v))]
            plan.append((target, id_value, id_property, values, trace, errors))
        results: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        stamp = _iso(self.wall())
        for target, id_value, id_property, values, trace, errors in plan:
            if errors:
                context = {"ids": [id_value]}
                if trace is not None:
                    context["objectWriteTraceId"] = [trace]
                failures.append(
                    {
                        "status": "error",
                        "category": "VALIDATION_ERROR",
                        "message": "Property values were not valid: " + "; ".join(errors),
                        "context": context,
                        "errors": [{"message": e, "code": "INVALID_OPTION"} for e in errors],
                        "links": {},
                    }
                )
                continue
            new = target is None
            if target is None:
                target = Contact(self._new_id(), {}, stamp, stamp)
                self._contacts[target.id] = target
                if id_property != "hs_object_id":
                    target.properties[id_property] = id_value
            self._unindex(target)
            for name, value in values.items():
                if value == "":
                    target.properties.pop(name, None)
                else:
                    target.properties[name] = value
            self._add_index(target)
            target.updated = stamp
            result = self._contact_resource(target)
            result["new"] = new
            if trace is not None:
                result["objectWriteTraceId"] = trace
            results.append(result)
        self._rng.shuffle(results)  # HubSpot promises no order
        answer: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "requestedAt": stamp,
            "startedAt": stamp,
            "completedAt": stamp,
        }
        if failures:
            answer["numErrors"] = len(failures)
            answer["errors"] = failures
            return 207, answer
        return 200, answer

    def _get_contact(self, request: _Request) -> tuple[int, Any]:
        key = request.params["id"]
        id_property = (request.query.get("idProperty") or ["hs_object_id"])[0]
        contact = self._holder(id_property, key) if id_property in self._properties else None
        if contact is None:
            raise _not_found(f"Object not found.  objectId are usually numeric. ({key})")
        names = None
        wanted = request.query.get("properties")
        if wanted:
            names = [n for v in wanted for n in v.split(",") if n]
        return 200, self._contact_resource(contact, names)

    def _merge(self, request: _Request) -> tuple[int, Any]:
        body = request.body
        primary = body.get("primaryObjectId") if isinstance(body, dict) else None
        absorbed = body.get("objectIdToMerge") if isinstance(body, dict) else None
        if not isinstance(primary, str | int) or not isinstance(absorbed, str | int):
            raise _validation("primaryObjectId and objectIdToMerge are required.")
        primary, absorbed = str(primary), str(absorbed)
        if primary == absorbed:
            raise _validation("Cannot merge an object with itself.", sub_category="MERGE_SELF")
        for contact_id in (primary, absorbed):
            if contact_id not in self._contacts:
                raise _not_found(f"Object not found. Could not find object {contact_id}.")
        self._do_merge(primary, absorbed, request.now)
        return 200, self._contact_resource(self._contacts[primary])

    def _do_merge(self, primary: str, absorbed: str, now: float) -> None:
        keep, gone = self._contacts[primary], self._contacts.pop(absorbed)
        self._unindex(gone)
        self._unindex(keep)
        for name, value in gone.properties.items():
            if name == "email" or name == "hs_additional_emails":
                continue
            if self._unique(name):
                continue  # the absorbed contact's unique values are dropped (assumed)
            keep.properties.setdefault(name, value)
        extra = [e for e in keep.properties.get("hs_additional_emails", "").split(";") if e]
        extra += [gone.properties[n] for n in ("email",) if gone.properties.get(n)]
        extra += [e for e in gone.properties.get("hs_additional_emails", "").split(";") if e]
        if not keep.properties.get("email") and extra:
            keep.properties["email"] = extra.pop(0)
        if extra:
            keep.properties["hs_additional_emails"] = ";".join(dict.fromkeys(extra))
        self._add_index(keep)
        keep.updated = _iso(self.wall())
        self._gone[absorbed] = primary
        for old, into in list(self._gone.items()):
            if into == absorbed:
                self._gone[old] = primary
        self._merges.append(Merge(primary, absorbed, now))

    # ---- properties -------------------------------------------------------------------------

    def _property_resource(self, given: dict[str, Any], *, custom: bool) -> dict[str, Any]:
        stamp = _iso(self.wall())
        return {
            "name": given["name"],
            "label": given["label"],
            "type": given["type"],
            "fieldType": given["fieldType"],
            "groupName": given["groupName"],
            "description": given.get("description", ""),
            "options": copy.deepcopy(given.get("options") or []),
            "hasUniqueValue": bool(given.get("hasUniqueValue", False)),
            "hidden": bool(given.get("hidden", False)),
            "formField": bool(given.get("formField", False)),
            "displayOrder": given.get("displayOrder", -1),
            "calculated": False,
            "externalOptions": False,
            "archived": False,
            "createdAt": stamp,
            "updatedAt": stamp,
            "modificationMetadata": {
                "archivable": custom,
                "readOnlyDefinition": not custom,
                "readOnlyValue": given["name"] in READ_ONLY,
            },
        }

    def _get_properties(self, request: _Request) -> tuple[int, Any]:
        return 200, {"results": copy.deepcopy(list(self._properties.values()))}

    def _get_property(self, request: _Request) -> tuple[int, Any]:
        prop = self._properties.get(request.params["name"])
        if prop is None:
            raise _not_found(f"Unable to find property {request.params['name']}")
        return 200, copy.deepcopy(prop)

    def _create_property(self, request: _Request) -> tuple[int, Any]:
        body = request.body
        if not isinstance(body, dict):
            raise _validation("Invalid input JSON: the body must be an object.")
        missing = [
            k for k in ("name", "label", "type", "fieldType", "groupName") if not body.get(k)
        ]
        if missing:
            raise _validation(f"Missing required fields: {', '.join(missing)}")
        name = body["name"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _validation("Property names must be lowercase letters, digits and underscores.")
        if body["type"] not in PROPERTY_TYPES:
            raise _validation(f"Unknown property type {body['type']}.")
        if body["fieldType"] not in FIELD_TYPES:
            raise _validation(f"Unknown field type {body['fieldType']}.")
        if body["groupName"] not in self._groups:
            raise _validation(f"Property group {body['groupName']} does not exist.")
        if name in self._properties:
            raise ApiError(
                409,
                "OBJECT_ALREADY_EXISTS",
                f"A property named '{name}' already exists.",
                context={"name": [name]},
            )
        prop = self._property_resource(body, custom=True)
        self._properties[name] = prop
        self._reindex()
        return 201, copy.deepcopy(prop)

    def _get_group(self, request: _Request) -> tuple[int, Any]:
        group = self._groups.get(request.params["name"])
        if group is None:
            raise _not_found(f"Unable to find property group {request.params['name']}")
        return 200, dict(group)

    def _create_group(self, request: _Request) -> tuple[int, Any]:
        body = request.body
        if not isinstance(body, dict) or not body.get("name") or not body.get("label"):
            raise _validation("Missing required fields: name, label")
        name = body["name"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _validation("Group names must be lowercase letters, digits and underscores.")
        if name in self._groups:
            raise ApiError(
                409, "OBJECT_ALREADY_EXISTS", f"A property group named '{name}' already exists."
            )
        group = {
            "name": name,
            "label": body["label"],
            "displayOrder": body.get("displayOrder", -1),
            "archived": False,
        }
        self._groups[name] = group
        return 201, dict(group)

    # ---- communication preferences ----------------------------------------------------------

    def _emails(self, body: Any) -> list[str]:
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise _validation("Invalid input JSON: 'inputs' must be an array of strings.")
        if not inputs or len(inputs) > self.max_inputs:
            raise _validation(f"Batch input must contain between 1 and {self.max_inputs} inputs.")
        for email in inputs:
            if not _EMAIL.fullmatch(email.strip()):
                raise _validation(f"{email} is not a valid email address.")
        return inputs

    def _unsubscribe_all(self, request: _Request) -> tuple[int, Any]:
        channel = (request.query.get("channel") or [""])[0]
        if channel != "EMAIL":
            raise _validation(
                "channel is required and must be EMAIL.", context={"channel": [channel]}
            )
        stamp = _iso(self.wall())
        results = []
        for email in self._emails(request.body):
            key = _email_key(email)
            before = key in self._opted_out
            self._opted_out.add(key)
            self._changes.append(
                StatusChange(
                    email,
                    None,
                    "UNSUBSCRIBED",
                    "UNSUBSCRIBED" if before else "NOT_SPECIFIED",
                    before,
                    None,
                    request.now,
                )
            )
            statuses = []
            for type_id, type_name in self.subscription_types.items():
                self._statuses[(key, type_id)] = "UNSUBSCRIBED"
                statuses.append(
                    self._status(
                        email,
                        type_id,
                        type_name,
                        "UNSUBSCRIBED",
                        stamp,
                        "UNSUBSCRIBE_FROM_ALL_OCCURRED",
                    )
                )
            results.append({"subscriberIdString": email, "statuses": statuses})
        return 200, {
            "status": "COMPLETE",
            "results": results,
            "requestedAt": stamp,
            "startedAt": stamp,
            "completedAt": stamp,
        }

    @staticmethod
    def _status(
        email: str, type_id: int, type_name: str, status: str, stamp: str, reason: str
    ) -> dict[str, Any]:
        return {
            "subscriberIdString": email,
            "subscriptionId": type_id,
            "subscriptionName": type_name,
            "channel": "EMAIL",
            "status": status,
            "source": "Public status API",
            "timestamp": stamp,
            "setStatusSuccessReason": reason,
        }

    def _status_write(self, request: _Request) -> tuple[int, Any]:
        body = request.body
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(inputs, list) or not inputs or len(inputs) > self.max_inputs:
            raise _validation(f"'inputs' must hold 1 to {self.max_inputs} status requests.")
        checked = []
        for n, item in enumerate(inputs):
            if not isinstance(item, dict):
                raise _validation(f"inputs[{n}] is not an object.")
            email, state = item.get("subscriberIdString"), item.get("statusState")
            type_id, channel = item.get("subscriptionId"), item.get("channel")
            if channel != "EMAIL":
                raise _validation(f"inputs[{n}].channel must be EMAIL.")
            if not isinstance(email, str) or not _EMAIL.fullmatch(email.strip()):
                raise _validation(f"inputs[{n}].subscriberIdString is not a valid email.")
            if state not in ("SUBSCRIBED", "UNSUBSCRIBED", "NOT_SPECIFIED"):
                raise _validation(f"inputs[{n}].statusState is invalid.")
            if not isinstance(type_id, int) or type_id not in self.subscription_types:
                raise _validation(f"inputs[{n}].subscriptionId names no subscription type.")
            checked.append((email, state, type_id, item.get("legalBasis")))
        stamp = _iso(self.wall())
        results = []
        for email, state, type_id, basis in checked:
            key = _email_key(email)
            before = self._statuses.get((key, type_id), "NOT_SPECIFIED")
            opted_out = key in self._opted_out
            reason = "NO_STATUS_CHANGE" if before == state else "REQUESTED_CHANGE_OCCURRED"
            if state == "SUBSCRIBED" and (opted_out or before == "UNSUBSCRIBED"):
                reason = "RESUBSCRIBE_OCCURRED"
                self._opted_out.discard(key)
            self._statuses[(key, type_id)] = state
            self._changes.append(
                StatusChange(email, type_id, state, before, opted_out, basis, request.now)
            )
            results.append(
                self._status(email, type_id, self.subscription_types[type_id], state, stamp, reason)
            )
        return 200, {
            "status": "COMPLETE",
            "results": results,
            "requestedAt": stamp,
            "startedAt": stamp,
            "completedAt": stamp,
        }


@contextmanager
def serve(
    fake: HubSpotFake, *, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 10.0
) -> Iterator[str]:
    """Serve ``fake`` over HTTP from a background thread; yields its base url."""
    with serve_in_thread(
        fake, host=host, port=port, name="hubspot-fake", start_timeout=start_timeout
    ) as bound:
        yield f"http://{host}:{bound}"


# ---- process mode ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.hubspot",
        description="A fake of HubSpot's contacts, properties and communication preferences APIs.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", default="pat-test-fake")
    parser.add_argument("--no-rate-limits", action="store_true")
    parser.add_argument("--ten-second", type=int, default=TEN_SECOND_LIMIT)
    parser.add_argument("--daily", type=int, default=DAILY_LIMIT)
    parser.add_argument("--time-zone", default="America/New_York")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default=DEFAULT_LOOP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        fake = HubSpotFake(
            token=args.token,
            rate_limits=not args.no_rate_limits,
            ten_second_limit=args.ten_second,
            daily_limit=args.daily,
            time_zone=args.time_zone,
        )
    except (ValueError, zoneinfo.ZoneInfoNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sock = bind_socket(args.host, args.port)
    return serve_until_signalled(make_server(fake, args.loop, quiet=False), sock)


if __name__ == "__main__":
    sys.exit(main())
