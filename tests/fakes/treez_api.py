"""A local fake of Treez's v2 Customer API (the reconciliation pull), for the tests of the Treez
client and for benchmarks.

What it serves follows ``shared/docs/treez.md``, section "Customer API"; the customers follow
the real delivery of the seed document (``tests/data/seed_body.json``): the same fields in the
same order, with the same JSON types and quirks. Paths are under the v2 base
``/v2.0/dispensary/{dispensary}`` (``https://api.treez.io`` in production):

================================================================================  ============
``POST /config/api/gettokens`` (form fields ``client_id``, ``apikey``)             200 a token
``GET  /customer/lastUpdated/after/{yyyy-MM-ddTHH:mm:ss.SSSXXX}/page/{n}/pagesize/{size}``  200
``GET  /customer/{customer_id}``                                                   200 / 404
================================================================================  ============

Documented behaviour reproduced:

- every answer is the envelope ``{"resultCode": "SUCCESS"|"FAIL", "resultReason",
  "resultDetail", "data"}``, except the token answer, which is ``{"resultCode": "SUCCESS",
  "access_token", "expires_in": "7200", "refresh_token", "expires_at"}`` (``expires_in`` a
  string);
- calls send ``authorization: <token>`` (no scheme) and ``client_id: <id>``; tokens live
  ``token_lifetime`` seconds (2 hours) by the fake's clock; without a live token: 401 "Full
  authentication is required to access this resource";
- the pull takes the date as ``yyyy-MM-dd'T'HH:mm:ss.SSSXXX`` (URL-encoded or not; ``Z`` or
  ``±HH:MM``), anything else is a 400 ``INVALID_DATE_FORMAT``; pages start at 1; ``pagesize``
  above 50 is a 400 ``RESPONSE_LIMIT_EXCEEDS``; ``data`` is the list of customers; there is no
  total and no cursor, the last page is short or empty;
- an unknown customer is a 404 ``CUSTOMER_DOESNT_EXIST``, an unknown path a 404 ``NOT_FOUND``;
- at most 10 requests in any sliding one-second window per store, token requests included.

Behaviours **assumed** (treez.md is silent):

- error codes are carried by ``resultReason`` (``resultCode`` is ``FAIL``), ``resultDetail`` is
  a sentence, ``data`` is null; success answers carry ``resultReason``/``resultDetail`` null;
  ``content-type: application/json``; no extra headers (no ``WWW-Authenticate``, no
  ``Retry-After``, no rate-limit headers);
- the token endpoint: a wrong ``client_id``/``apikey`` (or credentials of another store) is a
  401 ``INVALID_CREDENTIALS``; a missing field a 400 ``MODEL_VALIDATION_FAIL``; fields are read
  from an ``application/x-www-form-urlencoded`` body and the query string; ``expires_at`` is
  written ``2026-01-11T13:56:05.000-0800`` (as public client code shows); tokens are opaque
  JWT-shaped strings bound to the store and client id; a new token does not revoke older
  ones; no refresh endpoint (the ``refresh_token`` is decorative);
- a missing, unknown or expired token, or a ``client_id`` header other than the token's, is
  the same 401, told apart only by ``resultDetail``;
- "after" is strict (``last_update > date``; ``after_inclusive=True`` for ``>=``); the order is
  ``last_update`` ascending, then ``customer_id`` as a number (treez.md does not document one);
  ``page``/``pagesize`` that are not whole numbers, ``page`` < 1 or ``pagesize`` < 1 are a
  400 ``MODEL_VALIDATION_FAIL``; a page past the end is a 200 with ``data: []``; the date is
  validated before the page numbers; ``data_wrapper="x"`` wraps the list as ``{"x": [...]}``
  (treez.md: "accept a list wrapped in an object too");
- deactivated customers are listed (``list_deactivated=False`` hides them: "Deactivated
  customers may not be listed (unconfirmed)") and always returned by ``GET customer/{id}``,
  whose ``data`` is the customer object; an id that is not a number is a 404 too;
- the rate limit answers 429 ``TOO_MANY_REQUESTS`` (none is documented); a refused request
  takes no slot; the window is keyed by the store segment of the path;
- other methods on a known path: 405 ``METHOD_NOT_ALLOWED`` with ``Allow``; a trailing slash is
  accepted; the lookups by email, phone or name and ``PATCH customer/update`` are not served;
- merges: the absorbed profile is ``DEACTIVATED``, ``NOT_APPLICABLE``, with
  ``merged_into_customer_id``; the survivor lists it in ``merged_customer_ids`` (integers and
  strings mixed, as treez.md warns), has status ``MERGED`` (``survivor_status="ACTIVE"`` for
  the other reading) and a note with the merge time; both get the merge time as last_update;
- ``opt_out`` is served as in the webhook (``"true"``/``"false"`` strings, ~10 % true) and
  null for ~2 % ("null in some reads"); e-mails use reserved domains (``example.com``...).

For tests: :meth:`TreezFake.update` (bumps ``last_update`` to the fake's clock),
:meth:`~TreezFake.add`, :meth:`~TreezFake.merge`, :meth:`~TreezFake.deactivate`,
:meth:`~TreezFake.touch`; :meth:`~TreezFake.on_page` runs a hook before each page is answered
(customers moving while a client pages); :meth:`~TreezFake.fail_next` scripts 4xx/5xx answers
and timeouts; :meth:`~TreezFake.expire_tokens`; :attr:`~TreezFake.calls` and
:attr:`~TreezFake.counters` record every request.

Checks run in this order: path prefix (404), rate limit (429), scripted failures
(:meth:`TreezFake.fail_next`), route (404/405), token or credentials (401), parameters (400),
page hooks (:meth:`TreezFake.on_page`), the answer. Every request is recorded as a
:class:`Call`.

The population is generated on demand: ``TreezFake.generate(100_000, seed=1)`` keeps the
last_update of each customer (an ``array``), a sorted index of ``last_update * 10**9 + id``
(bisect), the handful of merges, and the fields changed by tests; a customer's dict is built
from its index and the seed when served.

In-process::

    fake = TreezFake.generate(1_000, seed=1, clock=clock)
    transport = httpx.ASGITransport(app=fake.app)
    async with httpx.AsyncClient(transport=transport, base_url=fake.base_url) as client:
        ...

Over real HTTP in a thread: ``with serve(fake) as base_url: ...`` (``base_url`` ends with the
dispensary). As a process (prints ``LISTENING <port>`` once ready, runs until SIGTERM/SIGINT,
exits 0)::

    python -m tests.fakes.treez_api --port 0 --customers N [--no-rate-limit]
        [--client-id X --api-key Y] [--seed S] [--dispensary D] [--calls-log FILE]

``--calls-log``: on exit, one line per request received, ``<arrival seconds> <status>`` (the
fake's monotonic clock; ``-`` for a scripted timeout), for a bench to count requests per
window; no path, no value.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import collections
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import random
import re
import struct
import sys
import threading
import time
import unicodedata
from array import array
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal
from urllib.parse import parse_qs, unquote
from zoneinfo import ZoneInfo

import httpx

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

DEFAULT_DISPENSARY = "partnersandbox3"  # the store of the seed delivery
DEFAULT_CLIENT_ID = "treez_test_client"
DEFAULT_API_KEY = "treez_test_apikey"
TOKEN_LIFETIME = 7200.0  # "Tokens live 2 hours"
MAX_PAGE_SIZE = 50  # "page size at most 50 (more -> 400 RESPONSE_LIMIT_EXCEEDS)"
RATE_LIMIT = 10  # "10 requests per second per store"
RATE_WINDOW = 1.0
STORE_TIME_ZONE = "America/Los_Angeles"  # the seed's offsets are -07:00

#: Seconds a scripted timeout hangs before failing: in-process the client sees the failure at
#: once; a fake served from a thread needs more than the client's read timeout.
DEFAULT_TIMEOUT_HANG = 0.0

UNAUTHORIZED = "Full authentication is required to access this resource"  # Spring's text
INVALID_DATE_FORMAT = "INVALID_DATE_FORMAT"
RESPONSE_LIMIT_EXCEEDS = "RESPONSE_LIMIT_EXCEEDS"
MODEL_VALIDATION_FAIL = "MODEL_VALIDATION_FAIL"
CUSTOMER_DOESNT_EXIST = "CUSTOMER_DOESNT_EXIST"
NOT_FOUND = "NOT_FOUND"
INVALID_CREDENTIALS = "INVALID_CREDENTIALS"  # assumed
TOO_MANY_REQUESTS = "TOO_MANY_REQUESTS"  # assumed
METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"  # assumed

#: The fields of a customer, in the order of the seed delivery.
CUSTOMER_FIELDS = (
    "status",
    "verification_status",
    "verification_reasons",
    "customer_id",
    "first_name",
    "middle_name",
    "nickname",
    "last_name",
    "birthday",
    "drivers_license",
    "drivers_license_expiration",
    "state_medical_id",
    "permit_expiration",
    "email",
    "phone",
    "notes",
    "physician_first_name",
    "physician_last_name",
    "physician_license",
    "physician_address",
    "physician_phone",
    "is_caregiver",
    "caregiver_license_number",
    "caregiver_name_1",
    "caregiver_name_2",
    "caregiver_details",
    "rewards_balance",
    "rewards_type",
    "gender",
    "signup_date",
    "last_visit_date",
    "last_update",
    "opt_out",
    "referral_source",
    "banned",
    "warning_1",
    "warning_2",
    "addresses",
    "merged_customer_ids",
    "merged_into_customer_id",
    "patient_type",
    "imageList",
    "customer_groups",
    "external_ids",
)

FIRST_ID = 1000  # customer ids are FIRST_ID, FIRST_ID + 1, ... as text
_ID_SPACE = 10**9  # sort key: last_update (ms) * _ID_SPACE + customer id

# Shares of the generated population.
OPT_OUT_RATE = 0.10
OPT_OUT_NULL_RATE = 0.02
MERGE_RATE = 0.01  # absorbed profiles (DEACTIVATED, merged into a survivor)
DELETE_RATE = 0.005  # deactivated without a merge
BULK_IMPORT_RATE = 0.03  # customers sharing the last_update second of a bulk import
NEVER_VISITED = "2000-01-01 00:00:00.000"

_AFTER = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(?:Z|[+-]\d\d:\d\d)", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,9}")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)
_DAY_MS = 86_400_000

Failure = int | Literal["timeout"]


# ---- records -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One request received by the fake, whatever it was answered."""

    method: str
    path: str  # decoded, as in the ASGI scope
    status: int | None  # None: a scripted timeout (no answer)
    at: float  # the fake's clock when the request arrived
    reason: str | None = None  # resultReason of a FAIL answer
    returned: int | None = None  # customers in ``data`` (pull and by id)
    query: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class PageRequest:
    """A valid pull request about to be answered; given to the :meth:`TreezFake.on_page`
    hooks."""

    after: str  # the date as sent (decoded)
    after_ms: int  # epoch milliseconds
    page: int
    pagesize: int
    number: int  # 1 for the first page request the fake answers, 2 for the next...


PageHook = Callable[["TreezFake", PageRequest], None]


class ApiError(Exception):
    """A FAIL answer: ``{"resultCode": "FAIL", "resultReason": reason, "resultDetail": detail,
    "data": null}``."""

    def __init__(
        self, status: int, reason: str, detail: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = list(headers)


def envelope(
    data: Any = None, *, code: str = "SUCCESS", reason: str | None = None, detail: str | None = None
) -> dict[str, Any]:
    """Treez's answer envelope."""
    return {"resultCode": code, "resultReason": reason, "resultDetail": detail, "data": data}


# ---- time --------------------------------------------------------------------------------------


def to_ms(moment: dt.datetime) -> int:
    """Epoch milliseconds of an aware datetime."""
    return (moment - _EPOCH) // _MS


def format_timestamp(ms: int, zone: dt.tzinfo) -> str:
    """``2026-04-24T11:38:21.000-07:00``: Treez's form of ``last_update`` and ``signup_date``."""
    seconds, millis = divmod(ms, 1000)
    return (
        dt.datetime.fromtimestamp(seconds, zone)
        .replace(microsecond=millis * 1000)
        .isoformat(timespec="milliseconds")
    )


def parse_timestamp(text: str) -> int:
    """Epoch milliseconds of an ISO 8601 timestamp with an offset (ValueError otherwise)."""
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no offset")
    return to_ms(moment)


def parse_after(text: str) -> int:
    """The pull's date, ``yyyy-MM-dd'T'HH:mm:ss.SSSXXX`` and nothing else, as epoch ms; raises
    a 400 ``INVALID_DATE_FORMAT`` :class:`ApiError`."""
    if _AFTER.fullmatch(text):
        try:
            return parse_timestamp(text)
        except ValueError:
            pass
    raise ApiError(
        400,
        INVALID_DATE_FORMAT,
        f"{text!r} is not a date of the form yyyy-MM-dd'T'HH:mm:ss.SSSXXX "
        "(e.g. 2026-04-24T11:38:21.000-07:00)",
    )


def _java_offset_time(ms: int, zone: dt.tzinfo) -> str:
    """``2026-01-11T13:56:05.000-0800``: the form of ``expires_at`` in public client code."""
    seconds, millis = divmod(ms, 1000)
    moment = dt.datetime.fromtimestamp(seconds, zone)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{millis:03d}{moment:%z}"


# ---- the generated population -----------------------------------------------------------------

FIRST_NAMES = (
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Karen",
    "Christopher",
    "Sarah",
    "Daniel",
    "Lisa",
    "Matthew",
    "Nancy",
    "Anthony",
    "Sandra",
    "Mark",
    "Ashley",
    "Jose",
    "Emily",
    "Luis",
    "Maria",
    "Carlos",
    "Guadalupe",
    "Juan",
    "Sofia",
    "Wei",
    "Mei",
    "Hiroshi",
    "Yuki",
    "Ahmed",
    "Fatima",
    "Dmitri",
    "Olga",
    "Kwame",
    "Amara",
    "Jules",
    "Mia",
    "Noah",
    "Olivia",
    "Liam",
    "Ava",
    "Ethan",
    "Isabella",
    "Mateo",
    "Camila",
    "Aiden",
    "Harper",
    "Elijah",
    "Zoe",
    "Renée",
    "José",
)
LAST_NAMES = (
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "Kim",
    "Park",
    "Chen",
    "Wang",
    "Patel",
    "Singh",
    "O'Brien",
    "Winnfield",
    "Vega",
    "Dubois",
    "Van der Berg",
    "Núñez",
)
MIDDLE_NAMES = ("A", "J", "Marie", "Lee", "Ann", "Michael", "R", "Lynn")
NICKNAMES = ("Jo", "Ace", "Mac", "Sunny", "Red", "Doc", "Lou", "Bee")
# (city, zipcode): California, as the seed's INGLEWOOD 90301.
CITIES = (
    ("INGLEWOOD", "90301"),
    ("LOS ANGELES", "90012"),
    ("SANTA MONICA", "90401"),
    ("PASADENA", "91101"),
    ("LONG BEACH", "90802"),
    ("OAKLAND", "94612"),
    ("SAN FRANCISCO", "94103"),
    ("SAN JOSE", "95113"),
    ("SACRAMENTO", "95814"),
    ("SAN DIEGO", "92101"),
    ("FRESNO", "93721"),
    ("BERKELEY", "94704"),
    ("RIVERSIDE", "92501"),
    ("IRVINE", "92614"),
    ("BAKERSFIELD", "93301"),
    ("SANTA ROSA", "95404"),
    ("EUREKA", "95501"),
    ("PALM SPRINGS", "92262"),
    ("VENTURA", "93001"),
    ("SANTA CRUZ", "95060"),
)
STREETS = (
    "SHEPHERD WAY",
    "MAIN ST",
    "OAK AVE",
    "PINE ST",
    "MAPLE DR",
    "SUNSET BLVD",
    "MISSION ST",
    "BROADWAY",
    "ELM ST",
    "CEDAR LN",
    "LINCOLN AVE",
    "WASHINGTON BLVD",
    "HIGHLAND AVE",
    "VENTURA BLVD",
    "EL CAMINO REAL",
    "PACIFIC COAST HWY",
    "FIGUEROA ST",
    "TELEGRAPH AVE",
)
UNITS = ("APT 4B", "UNIT 12", "#203", "STE 100", "APT 7")
# Californian area codes; with the exchanges below every number is a valid US number.
AREA_CODES = (
    "213",
    "310",
    "323",
    "408",
    "415",
    "424",
    "510",
    "530",
    "559",
    "562",
    "619",
    "626",
    "650",
    "657",
    "661",
    "707",
    "714",
    "747",
    "760",
    "805",
    "818",
    "831",
    "858",
    "909",
    "916",
    "925",
    "949",
    "951",
)
EXCHANGES = tuple(e for e in range(200, 1000) if e % 100 != 11 and e != 555)
EMAIL_DOMAINS = ("example.com", "example.net", "example.org", "mail.example.com")
REFERRAL_SOURCES = ("Google", "Friend", "Instagram", "Walk-in", "Weedmaps", "Leafly", "Yelp")
NOTES = (
    "Prefers pre-rolls",
    "Ask about the loyalty program",
    "Veteran discount on file",
    "Allergic to coconut oil",
    "Likes edibles, low dose",
)
GROUPS = ("VETERAN", "INDUSTRY", "VIP", "EMPLOYEE")
PENDING = [{"verification_reason": "NEW", "verification_reason_description": "NEW_INTAKE_CUSTOMER"}]

_LOCAL_SPACE = len(EXCHANGES) * 10_000
_LOCAL_STEP = 1_000_003  # coprime with _LOCAL_SPACE: the local numbers are a permutation
_U16 = 65_536
_DRAWS = struct.Struct("<60H")


def _draws(seed: int, index: int) -> tuple[tuple[int, ...], bytes]:
    """60 reproducible 16-bit draws and 8 spare bytes for (seed, index): two BLAKE2b digests,
    several times cheaper than seeding a ``random.Random`` per customer."""
    key = b"%d:%d" % (seed, index)
    digest = (
        hashlib.blake2b(key, digest_size=64).digest()
        + hashlib.blake2b(key + b"'", digest_size=64).digest()
    )
    return _DRAWS.unpack_from(digest), digest[_DRAWS.size :]


def _u32(high: int, low: int) -> int:
    return high << 16 | low


@functools.cache
def _email_locals(first: str, last: str) -> tuple[str, str, str]:
    """``jules.winnfield``, ``jules_winnfield``, ``jwinnfield`` (ASCII letters only: Núñez
    gives nunez)."""

    def ascii_letters(name: str) -> str:
        plain = unicodedata.normalize("NFKD", name.lower())
        return "".join(c for c in plain if c.isascii() and c.isalpha())

    first, last = ascii_letters(first), ascii_letters(last)
    return f"{first}.{last}", f"{first}_{last}", f"{first[:1]}{last}"


class _Population:
    """The generated customers of one store: last_update of each, merges and deletions drawn
    once; the rest of each customer is drawn from (seed, index) when built."""

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        end_ms: int,
        history_days: float,
        zone: dt.tzinfo,
        survivor_status: str,
    ) -> None:
        self.seed = seed
        self.zone = zone
        self.survivor_status = survivor_status
        self.end_ms = end_ms
        self.end_day = dt.datetime.fromtimestamp(end_ms // 1000, zone).toordinal()
        self._offsets: dict[int, tuple[int, str]] = {}
        rng = random.Random(seed)
        span = max(1, int(history_days * 86_400))
        end_s = end_ms // 1000 - 1
        imports = [end_s - rng.randrange(span) for _ in range(5)]

        def second() -> int:
            if rng.random() < BULK_IMPORT_RATE:
                return rng.choice(imports)
            return end_s - rng.randrange(span)

        # Whole seconds, as the seed's ".000"; a few bulk imports share one second.
        self.last_update = array("q", (1000 * second() for _ in range(n)))
        merges = round(n * MERGE_RATE)
        deletes = round(n * DELETE_RATE)
        picked = rng.sample(range(n), min(n, 2 * merges + deletes)) if n else []
        absorbed, survivors = picked[:merges], picked[merges : 2 * merges]
        self.deleted = frozenset(picked[2 * merges :])
        self.merged_into: dict[int, tuple[int, int]] = {}  # absorbed -> (survivor, merge ms)
        self.absorbed_by: dict[int, list[int]] = {}
        for number, (gone, drawn) in enumerate(zip(absorbed, survivors, strict=True)):
            # every tenth survivor absorbs a second profile
            survivor = survivors[number - 1] if number % 10 == 9 else drawn
            at = max(self.last_update[gone], self.last_update[survivor])
            self.last_update[gone] = at
            self.last_update[survivor] = at
            self.merged_into[gone] = (survivor, at)
            self.absorbed_by.setdefault(survivor, []).append(gone)

    def __len__(self) -> int:
        return len(self.last_update)

    def status(self, index: int) -> str:
        if index in self.merged_into or index in self.deleted:
            return "DEACTIVATED"
        if index in self.absorbed_by:
            return self.survivor_status
        return "ACTIVE"

    def phone(self, index: int) -> str:
        """Ten digits, no leading 0 or 1, unique per store: an area code and a permutation of
        the valid local numbers."""
        area = AREA_CODES[index % len(AREA_CODES)]
        local = (index // len(AREA_CODES) * _LOCAL_STEP + self.seed * 7919) % _LOCAL_SPACE
        exchange, line = divmod(local, 10_000)
        return f"{area}{EXCHANGES[exchange]}{line:04d}"

    def _day(self, offset: int) -> str:
        return dt.date.fromordinal(self.end_day + offset).isoformat()

    def _offset(self, seconds: int) -> tuple[int, str]:
        """The store's UTC offset at an instant, in seconds and as ``-07:00``; cached by the
        hour (offsets change on the hour), a quarter faster than ``fromtimestamp(zone)``."""
        hour = seconds // 3600
        found = self._offsets.get(hour)
        if found is None:
            moment = dt.datetime.fromtimestamp(hour * 3600, self.zone)
            shift = int(moment.utcoffset().total_seconds())  # type: ignore[union-attr]
            sign, size = "-" if shift < 0 else "+", abs(shift)
            found = self._offsets[hour] = (
                shift,
                f"{sign}{size // 3600:02d}:{size % 3600 // 60:02d}",
            )
        return found

    def stamp(self, ms: int) -> str:
        """:func:`format_timestamp` in the store's zone."""
        seconds, millis = divmod(ms, 1000)
        shift, text = self._offset(seconds)
        t = time.gmtime(seconds + shift)
        return "%04d-%02d-%02dT%02d:%02d:%02d.%03d%s" % (*t[:6], millis, text)  # noqa: UP031

    def visit(self, seconds: int) -> str:
        """``2025-05-15 06:18:22.000``: ``last_visit_date`` in store time, without a zone."""
        t = time.gmtime(seconds + self._offset(seconds)[0])
        return "%04d-%02d-%02d %02d:%02d:%02d.000" % t[:6]  # noqa: UP031

    def build(self, index: int, last_update_ms: int) -> dict[str, Any]:
        """The customer at ``index``, every field of the seed's object, in its order."""
        zone = self.zone
        customer_id = str(FIRST_ID + index)
        merge = self.merged_into.get(index)
        v, spare = _draws(self.seed, index)
        # A merged-away profile is a duplicate: the survivor's name and birthday.
        p = v if merge is None else _draws(self.seed, merge[0])[0]
        first, last = FIRST_NAMES[p[0] % len(FIRST_NAMES)], LAST_NAMES[p[1] % len(LAST_NAMES)]
        if p[2] < 0.2 * _U16:  # some stores type names in capitals ("JOHN DOE")
            first, last = first.upper(), last.upper()
        age_days = 21 * 366 + p[3] % (64 * 365)

        patient = v[4] % 100
        patient_type = "ADULT" if patient < 80 else ("MEDICAL" if patient < 95 else "MEDICAL_MMID")
        medical = patient_type != "ADULT"
        verified = v[5] < 0.85 * _U16
        has_license = v[6] < 0.7 * _U16
        email_local = _email_locals(first, last)[v[12] % 3]
        email = f"{email_local}{customer_id}@{EMAIL_DOMAINS[v[13] % len(EMAIL_DOMAINS)]}"
        if v[14] < OPT_OUT_RATE * _U16:
            opt_out: str | None = "true"
        elif v[14] < (OPT_OUT_RATE + OPT_OUT_NULL_RATE) * _U16:
            opt_out = None
        else:
            opt_out = "false"
        signup_ms = last_update_ms
        if v[15] < 0.75 * _U16:  # edited since signup
            signup_ms -= 1000 * (_u32(v[16], v[17]) % (3 * 365 * 86_400))
        if v[18] < 0.15 * _U16:
            last_visit = NEVER_VISITED
        else:
            seconds = (last_update_ms - signup_ms) // 1000
            visit_s = signup_ms // 1000 + (_u32(v[19], v[20]) * seconds >> 32)
            last_visit = self.visit(visit_s)
        addresses = []
        if v[22] < 0.92 * _U16:
            city, zipcode = CITIES[v[21] % len(CITIES)]
            addresses.append(
                {
                    "type": "address_of_record",
                    "street1": f"{1 + v[23] % 9899} {STREETS[v[24] % len(STREETS)]}",
                    "street2": UNITS[v[26] % len(UNITS)] if v[25] < 0.15 * _U16 else "",
                    "city": city,
                    "state": "CA",
                    "zipcode": zipcode,
                    "primary": True,
                }
            )
        groups = ["SENIOR"] if age_days >= 65 * 365 else []
        if medical:
            groups.append("MEDICAL")
        if v[27] < 0.1 * _U16:
            groups.append(GROUPS[v[28] % len(GROUPS)])
        caregiver = v[29] < 0.02 * _U16
        customer: dict[str, Any] = {
            "status": "ACTIVE",
            "verification_status": "VERIFIED" if verified else "VERIFICATION_PENDING",
            "verification_reasons": [] if verified else [dict(r) for r in PENDING],
            "customer_id": customer_id,
            "first_name": first,
            "middle_name": MIDDLE_NAMES[v[38] % len(MIDDLE_NAMES)] if v[37] < 0.2 * _U16 else None,
            "nickname": NICKNAMES[v[40] % len(NICKNAMES)] if v[39] < 0.05 * _U16 else None,
            "last_name": last,
            "birthday": self._day(-age_days),
            "drivers_license": f"D{_u32(v[7], v[8]) % 10_000_000:07d}" if has_license else None,
            "drivers_license_expiration": (
                self._day(v[9] % (6 * 365) - 365) if has_license else None
            ),
            "state_medical_id": f"MMIC{_u32(v[41], v[42]) % 1_000_000:06d}" if medical else "N/A",
            "permit_expiration": self._day(v[43] % 365) if medical else "N/A",
            "email": email if v[10] < 0.8 * _U16 else None,
            "phone": self.phone(index) if v[11] < 0.85 * _U16 else None,
            "notes": NOTES[v[36] % len(NOTES)] if v[35] < 0.1 * _U16 else "N/A",
            "physician_first_name": FIRST_NAMES[v[44] % len(FIRST_NAMES)] if medical else None,
            "physician_last_name": LAST_NAMES[v[45] % len(LAST_NAMES)] if medical else None,
            "physician_license": f"G{v[46] % 100_000:05d}" if medical else None,
            "physician_address": f"{1 + v[47] % 999} MEDICAL PLAZA DR" if medical else None,
            "physician_phone": self.phone(index + 1_000_000) if medical else None,
            "is_caregiver": caregiver,
            "caregiver_license_number": f"CG{v[30] % 100_000:05d}" if caregiver else "",
            "caregiver_name_1": (
                f"{FIRST_NAMES[v[31] % len(FIRST_NAMES)]} {last}" if caregiver else "N/A"
            ),
            "caregiver_name_2": "N/A",
            "caregiver_details": [],
            "rewards_balance": 0 if v[33] < 0.3 * _U16 else (v[34] % 70) ** 2,
            "rewards_type": "POINTS",
            "gender": "MMMMFFFFUN"[v[32] % 10],
            "signup_date": self.stamp(signup_ms),
            "last_visit_date": last_visit,
            "last_update": self.stamp(last_update_ms),
            "opt_out": opt_out,
            "referral_source": (
                REFERRAL_SOURCES[v[49] % len(REFERRAL_SOURCES)] if v[48] < 0.4 * _U16 else None
            ),
            "banned": v[50] < 0.005 * _U16,
            "warning_1": v[51] < 0.03 * _U16,
            "warning_2": v[52] < 0.01 * _U16,
            "addresses": addresses,
            "merged_customer_ids": [],
            "merged_into_customer_id": None,
            "patient_type": patient_type,
            "imageList": [],
            "customer_groups": groups,
            "external_ids": {
                # an Alpine IQ persona id is 24 hex digits
                "aiq_contact_id": (
                    f"{spare.hex()}{v[57]:04x}{v[58]:04x}" if v[53] < 0.3 * _U16 else None
                ),
                "sticky_cards_contact_id": (
                    str(10_000_000 + _u32(v[55], v[56]) % 90_000_000)
                    if v[54] < 0.1 * _U16
                    else None
                ),
            },
        }
        if merge is not None:
            customer.update(
                status="DEACTIVATED",
                verification_status="NOT_APPLICABLE",
                verification_reasons=[],
                merged_into_customer_id=str(FIRST_ID + merge[0]),
                rewards_balance=0,
            )
        elif index in self.deleted:
            customer["status"] = "DEACTIVATED"
        elif index in self.absorbed_by:
            gone = self.absorbed_by[index]
            customer["status"] = self.survivor_status
            # treez.md: merged_customer_ids "may hold integers or strings"
            customer["merged_customer_ids"] = [
                FIRST_ID + g if n % 2 else str(FIRST_ID + g) for n, g in enumerate(gone)
            ]
            customer["notes"] = " ".join(
                merge_note(str(FIRST_ID + g), self.merged_into[g][1], zone) for g in gone
            )
        return customer


def merge_note(absorbed_id: str, at_ms: int, zone: dt.tzinfo) -> str:
    """The note a merge appends to the survivor (treez.md: "a merge appends a note with the
    merge time"; its wording is our assumption)."""
    return f"Merged customer {absorbed_id} on {format_timestamp(at_ms, zone)}."


def generate_customers(
    n: int,
    *,
    seed: int = 0,
    now: dt.datetime | None = None,
    history_days: float = 365.0,
    time_zone: str = STORE_TIME_ZONE,
) -> Iterator[dict[str, Any]]:
    """``n`` customers shaped as the seed's, in id order, as :class:`TreezFake` would serve
    them (for webhook bodies and benchmarks)."""
    end = now or dt.datetime.now(dt.UTC)
    population = _Population(
        n,
        seed=seed,
        end_ms=to_ms(end),
        history_days=history_days,
        zone=ZoneInfo(time_zone),
        survivor_status="MERGED",
    )
    for index in range(n):
        yield population.build(index, population.last_update[index])


# ---- the fake ----------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Token:
    client_id: str
    store: str
    expires: float  # fake clock


@dataclasses.dataclass(frozen=True, slots=True)
class _Answer:
    status: int | None  # None: hang, then fail as a read timeout
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    reason: str | None = None
    returned: int | None = None


_ROUTES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # (name, segments after the store, "*" for a parameter; method)
    ("token", ("config", "api", "gettokens"), "POST"),
    ("pull", ("customer", "lastUpdated", "after", "*", "page", "*", "pagesize", "*"), "GET"),
    ("customer", ("customer", "*"), "GET"),
)


# resultReason of a scripted failure (5xx not listed: INTERNAL_SERVER_ERROR, other 4xx: FAIL).
_SCRIPTED_REASONS = {
    400: MODEL_VALIDATION_FAIL,
    401: UNAUTHORIZED,
    404: NOT_FOUND,
    429: TOO_MANY_REQUESTS,
}


def _route(rest: Sequence[str]) -> tuple[str, str, list[str]] | None:
    for name, pattern, method in _ROUTES:
        if len(rest) == len(pattern) and all(
            p == "*" or p == s for p, s in zip(pattern, rest, strict=True)
        ):
            params = [s for p, s in zip(pattern, rest, strict=True) if p == "*"]
            return name, method, params
    return None


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _b64(value: Any) -> str:
    return base64.urlsafe_b64encode(_dumps(value)).rstrip(b"=").decode()


class TreezFake:
    """Treez's v2 Customer API for one store: state, records and the ASGI app (:attr:`app`).

    ``customers``: size of the generated population (``seed`` makes it reproducible);
    ``clock``: seconds, monotonic, drives token expiry, the rate limit and ``last_update``
    (``now`` is the wall time the clock reads at construction; generated ``last_update`` are
    spread over the ``history_days`` before it). ``rate_limit``: requests per sliding
    ``rate_window`` per store (None: no limit). ``timeout_hang``: seconds a scripted timeout
    waits before failing. Other options are described in the module docstring.

    Thread-safe: the records may be read from another thread while a server runs the app.
    """

    def __init__(
        self,
        *,
        customers: int = 0,
        seed: int = 0,
        dispensary: str = DEFAULT_DISPENSARY,
        client_id: str = DEFAULT_CLIENT_ID,
        api_key: str = DEFAULT_API_KEY,
        token_lifetime: float = TOKEN_LIFETIME,
        rate_limit: int | None = RATE_LIMIT,
        rate_window: float = RATE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        now: dt.datetime | None = None,
        history_days: float = 365.0,
        time_zone: str = STORE_TIME_ZONE,
        after_inclusive: bool = False,
        list_deactivated: bool = True,
        survivor_status: Literal["MERGED", "ACTIVE"] = "MERGED",
        data_wrapper: str | None = None,
        timeout_hang: float = DEFAULT_TIMEOUT_HANG,
    ) -> None:
        if customers < 0 or customers >= _ID_SPACE - FIRST_ID:
            raise ValueError(f"customers must be between 0 and {_ID_SPACE - FIRST_ID - 1}")
        if token_lifetime <= 0 or rate_window <= 0:
            raise ValueError("token_lifetime and rate_window must be positive")
        if rate_limit is not None and rate_limit < 1:
            raise ValueError("rate_limit must be at least 1 (or None)")
        self.dispensary = dispensary
        self.client_id = client_id
        self.api_key = api_key
        self.token_lifetime = token_lifetime
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.clock = clock
        self.zone = ZoneInfo(time_zone)
        self.after_inclusive = after_inclusive
        self.list_deactivated = list_deactivated
        self.data_wrapper = data_wrapper
        self.timeout_hang = timeout_hang
        self.seed = seed
        self._lock = threading.RLock()
        self._clock0 = clock()
        self._wall0 = to_ms(now or dt.datetime.now(dt.UTC))
        self._population = _Population(
            customers,
            seed=seed,
            end_ms=self._wall0,
            history_days=history_days,
            zone=self.zone,
            survivor_status=survivor_status,
        )
        self._last_update = self._population.last_update  # grows with add()
        self._overrides: dict[int, dict[str, Any]] = {}
        self._keys = sorted(
            ms * _ID_SPACE + FIRST_ID + index
            for index, ms in enumerate(self._last_update)
            if self._listed(index)
        )
        self._rng = random.Random(seed)
        self._reset_records()

    @classmethod
    def generate(cls, n: int, *, seed: int = 0, **options: Any) -> TreezFake:
        """A fake serving ``n`` generated customers (see the module docstring)."""
        return cls(customers=n, seed=seed, **options)

    def _reset_records(self) -> None:
        self._tokens: dict[str, _Token] = {}
        self._windows: dict[str, collections.deque[float]] = {}
        self._failures: collections.deque[tuple[Failure, str | None]] = collections.deque()
        self._hooks: list[PageHook] = []
        self._calls: list[Call] = []
        self._counters: collections.Counter[str] = collections.Counter()
        self._page_requests = 0

    def reset_records(self) -> None:
        """Forget calls, counters, tokens, rate windows, scripted failures and page hooks (the
        customers stay as they are)."""
        with self._lock:
            self._reset_records()

    # ---- control -----------------------------------------------------------------------------

    @property
    def app(self) -> ASGIApp:
        """The ASGI 3 app: the fake itself."""
        return self

    @property
    def base_url(self) -> str:
        """The v2 base url in production, for an in-process client."""
        return f"https://api.treez.io/v2.0/dispensary/{self.dispensary}"

    def now_ms(self) -> int:
        """The fake's wall time (epoch ms): ``now`` plus the clock's progress."""
        return self._wall0 + round((self.clock() - self._clock0) * 1000)

    def timestamp(self, ms: int | None = None) -> str:
        """``ms`` (default: now) in Treez's timestamp form, in the store's time zone."""
        return format_timestamp(self.now_ms() if ms is None else ms, self.zone)

    def expire_tokens(self) -> None:
        """Make every token issued so far expired (the next call with one is a 401)."""
        with self._lock:
            for token in self._tokens.values():
                token.expires = -float("inf")

    def fail_next(self, failure: Failure, count: int = 1, *, path: str | None = None) -> None:
        """Answer the next ``count`` requests that pass the rate limit (and whose path, after
        the store, contains ``path`` when given) with ``failure``: a 4xx/5xx status (a FAIL
        envelope) or ``"timeout"``: no answer for ``timeout_hang`` seconds, then in-process the
        client gets ``httpx.ReadTimeout`` (served over HTTP, uvicorn answers 500 once the hang
        is over: make it longer than the client's timeout). Calls add up in order."""
        if failure != "timeout" and not (isinstance(failure, int) and 400 <= failure <= 599):
            raise ValueError(f"fail_next takes a 4xx/5xx status or 'timeout', got {failure!r}")
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._failures.extend([(failure, path)] * count)

    def on_page(self, hook: PageHook) -> None:
        """Call ``hook(fake, page_request)`` before answering each valid pull request, with the
        fake locked: it may change customers (:meth:`update`, :meth:`add`...) between pages, as
        staff do while a reconciliation pages."""
        with self._lock:
            self._hooks.append(hook)

    def clear_hooks(self) -> None:
        with self._lock:
            self._hooks.clear()

    # ---- customers ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._last_update)

    def _index(self, customer_id: str | int) -> int:
        text = str(customer_id)
        if not _DIGITS.fullmatch(text):
            raise KeyError(customer_id)
        index = int(text) - FIRST_ID
        if not 0 <= index < len(self._last_update):
            raise KeyError(customer_id)
        return index

    def _status(self, index: int) -> Any:
        override = self._overrides.get(index)
        if override is not None and "status" in override:
            return override["status"]
        return self._population.status(index)

    def _listed(self, index: int) -> bool:
        return self.list_deactivated or self._status(index) != "DEACTIVATED"

    def _build(self, index: int) -> dict[str, Any]:
        customer = self._population.build(index, self._last_update[index])
        override = self._overrides.get(index)
        if override:
            customer.update(json.loads(json.dumps(override)))  # a deep copy
        return customer

    def customer(self, customer_id: str | int) -> dict[str, Any] | None:
        """The customer as served (a fresh dict), None when there is none."""
        with self._lock:
            try:
                return self._build(self._index(customer_id))
            except KeyError:
                return None

    def customer_ids(self) -> list[str]:
        """Every customer id, in id order."""
        with self._lock:
            return [str(FIRST_ID + i) for i in range(len(self._last_update))]

    def ids_after(self, after: str | dt.datetime, *, inclusive: bool | None = None) -> list[str]:
        """The ids a complete pull after ``after`` lists, in order (for assertions)."""
        ms = to_ms(after) if isinstance(after, dt.datetime) else parse_timestamp(after)
        with self._lock:
            start = self._start(ms, self.after_inclusive if inclusive is None else inclusive)
            return [str(key % _ID_SPACE) for key in self._keys[start:]]

    def _start(self, after_ms: int, inclusive: bool) -> int:
        if inclusive:
            return bisect.bisect_left(self._keys, after_ms * _ID_SPACE)
        return bisect.bisect_right(self._keys, after_ms * _ID_SPACE + _ID_SPACE - 1)

    def _move(self, index: int, was_listed: bool, new_ms: int) -> None:
        """Re-file a customer whose last_update or status changed."""
        cid = FIRST_ID + index
        if was_listed:
            old = self._last_update[index] * _ID_SPACE + cid
            position = bisect.bisect_left(self._keys, old)
            if position < len(self._keys) and self._keys[position] == old:
                del self._keys[position]
        self._last_update[index] = new_ms
        if self._listed(index):
            bisect.insort(self._keys, new_ms * _ID_SPACE + cid)

    def _check_fields(self, fields: dict[str, Any]) -> None:
        unknown = sorted(set(fields) - set(CUSTOMER_FIELDS))
        if unknown:
            raise ValueError(f"not customer fields: {unknown}")
        if "customer_id" in fields:
            raise ValueError("customer_id cannot be changed")

    def update(self, customer_id: str | int, /, **fields: Any) -> dict[str, Any]:
        """Change fields of a customer and bump its ``last_update`` to the fake's clock (or to
        ``last_update=`` when given, Treez's form); returns the customer as now served. Raises
        KeyError for an unknown customer, ValueError for a field the seed object lacks."""
        self._check_fields(fields)
        with self._lock:
            index = self._index(customer_id)
            was_listed = self._listed(index)
            stamp = fields.pop("last_update", None)
            new_ms = self.now_ms() if stamp is None else parse_timestamp(stamp)
            if fields:
                self._overrides.setdefault(index, {}).update(json.loads(json.dumps(fields)))
            self._move(index, was_listed, new_ms)
            self._counters["updates"] += 1
            return self._build(index)

    def touch(self, *customer_ids: str | int) -> None:
        """Bump ``last_update`` of customers to now, changing nothing else."""
        for customer_id in customer_ids:
            self.update(customer_id)

    def add(self, **fields: Any) -> dict[str, Any]:
        """A new customer (the next id, generated values, ``fields`` replacing some), its
        ``last_update`` now unless given; returns it as served."""
        self._check_fields(fields)
        with self._lock:
            index = len(self._last_update)
            if FIRST_ID + index >= _ID_SPACE:
                raise ValueError("the fake is full")
            stamp = fields.pop("last_update", None)
            self._last_update.append(self.now_ms() if stamp is None else parse_timestamp(stamp))
            if fields:
                self._overrides[index] = json.loads(json.dumps(fields))
            if self._listed(index):
                bisect.insort(self._keys, self._last_update[index] * _ID_SPACE + FIRST_ID + index)
            self._counters["adds"] += 1
            return self._build(index)

    def merge(self, survivor_id: str | int, absorbed_id: str | int) -> None:
        """Merge ``absorbed_id`` into ``survivor_id`` as Treez does: the absorbed profile is
        DEACTIVATED (NOT_APPLICABLE) and points at the survivor; the survivor lists it, takes
        the survivor status and a note with the merge time; both are updated now."""
        with self._lock:
            survivor = self._build(self._index(survivor_id))
            absorbed = self._build(self._index(absorbed_id))
            ms = self.now_ms()
            notes = survivor["notes"]
            note = merge_note(absorbed["customer_id"], ms, self.zone)
            self.update(
                absorbed["customer_id"],
                status="DEACTIVATED",
                verification_status="NOT_APPLICABLE",
                verification_reasons=[],
                merged_into_customer_id=survivor["customer_id"],
            )
            self.update(
                survivor["customer_id"],
                status=self._population.survivor_status,
                merged_customer_ids=[*survivor["merged_customer_ids"], absorbed["customer_id"]],
                notes=note if notes in (None, "", "N/A") else f"{notes} {note}",
            )

    def deactivate(self, customer_id: str | int) -> dict[str, Any]:
        """Delete a customer as Treez does (status DEACTIVATED), updated now."""
        return self.update(customer_id, status="DEACTIVATED")

    # ---- records -----------------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def calls_to(self, fragment: str, method: str | None = None) -> list[Call]:
        """The calls whose path contains ``fragment`` (e.g. ``"/customer/lastUpdated/"``)."""
        with self._lock:
            return [
                c
                for c in self._calls
                if fragment in c.path and (method is None or c.method == method)
            ]

    def statuses(self) -> list[int | None]:
        with self._lock:
            return [c.status for c in self._calls]

    @property
    def counters(self) -> dict[str, int]:
        """``requests``, ``token_requests``, ``tokens_issued``, ``pages``, ``customers_served``,
        ``throttled``, ``unauthorized``, ``failures_injected``, ``updates``, ``adds`` and one
        ``status_<code>`` per status answered (a ``Counter``: missing keys are 0)."""
        with self._lock:
            return collections.Counter(self._counters)

    @property
    def token_requests(self) -> int:
        with self._lock:
            return self._counters["token_requests"]

    # ---- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await http_body(scope, receive, send)
        if raw is None:
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method: str = scope["method"]
        path: str = scope["path"]
        # Split the raw path before decoding, so that an encoded date stays one segment
        # (httpx's raw_path carries the query string; uvicorn's does not).
        raw_path = scope.get("raw_path") or path.encode()
        raw_path = raw_path.split(b"?", 1)[0].decode("latin-1")
        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        if len(segments) > 1 and segments[-1] == "":
            segments.pop()
        query = scope.get("query_string", b"").decode("latin-1")

        with self._lock:
            at = self.clock()
            try:
                answer = self._handle(method, segments, headers, raw, query, at)
            except ApiError as error:
                if error.status == 401:
                    self._counters["unauthorized"] += 1
                answer = _Answer(
                    error.status,
                    envelope(code="FAIL", reason=error.reason, detail=error.detail),
                    tuple(error.headers),
                    error.reason,
                )
            self._counters["requests"] += 1
            self._counters[f"status_{answer.status or 'timeout'}"] += 1
            self._calls.append(
                Call(method, path, answer.status, at, answer.reason, answer.returned, query)
            )

        if answer.status is None:
            await asyncio.sleep(self.timeout_hang)
            raise httpx.ReadTimeout("scripted timeout (TreezFake.fail_next)")
        payload = _dumps(answer.body)
        out = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers)
        await send({"type": "http.response.start", "status": answer.status, "headers": out})
        await send({"type": "http.response.body", "body": payload})

    def _handle(
        self,
        method: str,
        segments: list[str],
        headers: dict[str, str],
        raw: bytes,
        query: str,
        now: float,
    ) -> _Answer:
        if len(segments) < 4 or segments[:2] != ["v2.0", "dispensary"] or not segments[2]:
            raise ApiError(404, NOT_FOUND, f"no resource at /{'/'.join(segments)}")
        store, rest = segments[2], segments[3:]
        if rest and rest[:3] == ["config", "api", "gettokens"]:
            self._counters["token_requests"] += 1
        self._admit(store, now)
        failure = self._scripted_failure("/".join(rest))
        if failure is not None:
            self._counters["failures_injected"] += 1
            if failure == "timeout":
                return _Answer(None)
            reason = _SCRIPTED_REASONS.get(
                failure, "INTERNAL_SERVER_ERROR" if failure >= 500 else "FAIL"
            )
            raise ApiError(failure, reason, f"scripted failure {failure} (TreezFake.fail_next)")
        found = _route(rest)
        if found is None:
            raise ApiError(404, NOT_FOUND, f"no resource at /{'/'.join(segments)}")
        name, allowed, params = found
        if method != allowed:
            raise ApiError(
                405, METHOD_NOT_ALLOWED, f"{method} is not supported", [("allow", allowed)]
            )
        if name == "token":
            return self._issue_token(store, headers, raw, query, now)
        self._authenticate(store, headers, now)
        if name == "pull":
            return self._pull(*params)
        return self._get_customer(params[0])

    def _admit(self, store: str, now: float) -> None:
        """The sliding window: refuse a request when the last ``rate_window`` seconds already
        hold ``rate_limit`` admitted requests of the store (a token bucket would let a burst
        through at the window's edge; treez.md asks clients for this stricter reading)."""
        if self.rate_limit is None:
            return
        window = self._windows.setdefault(store, collections.deque())
        while window and window[0] <= now - self.rate_window:
            window.popleft()
        if len(window) >= self.rate_limit:
            self._counters["throttled"] += 1
            raise ApiError(
                429,
                TOO_MANY_REQUESTS,
                f"more than {self.rate_limit} requests in {self.rate_window:g} s for {store}",
            )
        window.append(now)

    def _scripted_failure(self, rest: str) -> Failure | None:
        for position, (failure, fragment) in enumerate(self._failures):
            if fragment is None or fragment in rest:
                del self._failures[position]
                return failure
        return None

    def _issue_token(
        self, store: str, headers: dict[str, str], raw: bytes, query: str, now: float
    ) -> _Answer:
        fields = parse_qs(query)
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media == "application/x-www-form-urlencoded":
            for key, values in parse_qs(raw.decode("utf-8", "replace")).items():
                fields.setdefault(key, []).extend(values)
        client_id = (fields.get("client_id") or [""])[0]
        api_key = (fields.get("apikey") or [""])[0]
        missing = [n for n, v in (("client_id", client_id), ("apikey", api_key)) if not v]
        if missing:
            raise ApiError(
                400, MODEL_VALIDATION_FAIL, f"missing form field(s): {', '.join(missing)}"
            )
        if (client_id, api_key, store) != (self.client_id, self.api_key, self.dispensary):
            raise ApiError(401, INVALID_CREDENTIALS, "invalid client_id or apikey for the store")
        self._counters["tokens_issued"] += 1
        issued_ms = self.now_ms()
        expires_ms = issued_ms + round(self.token_lifetime * 1000)
        claims = {"sub": client_id, "dispensary": store, "iat": issued_ms // 1000}
        claims["exp"] = expires_ms // 1000
        claims["jti"] = self._counters["tokens_issued"]
        signature = base64.urlsafe_b64encode(self._rng.randbytes(64)).rstrip(b"=").decode()
        token = f"{_b64({'alg': 'HS512'})}.{_b64(claims)}.{signature}"
        refresh = f"{_b64({'alg': 'HS512'})}.{_b64({**claims, 'typ': 'refresh'})}.{signature}"
        self._tokens[token] = _Token(client_id, store, now + self.token_lifetime)
        return _Answer(
            200,
            {
                "resultCode": "SUCCESS",
                "access_token": token,
                "expires_in": str(round(self.token_lifetime)),
                "refresh_token": refresh,
                "expires_at": _java_offset_time(expires_ms, self.zone),
            },
        )

    def _authenticate(self, store: str, headers: dict[str, str], now: float) -> None:
        value = headers.get("authorization")
        if not value:
            raise ApiError(401, UNAUTHORIZED, "no authorization header")
        token = self._tokens.get(value.strip())
        if token is None:
            raise ApiError(401, UNAUTHORIZED, "unknown access token")
        if now >= token.expires:
            raise ApiError(401, UNAUTHORIZED, "the access token has expired")
        if headers.get("client_id") != token.client_id:
            raise ApiError(401, UNAUTHORIZED, "the client_id header does not match the token")
        if store != token.store:
            raise ApiError(401, UNAUTHORIZED, f"the access token is not valid for {store}")

    @staticmethod
    def _whole(name: str, text: str) -> int:
        if not _DIGITS.fullmatch(text):
            raise ApiError(400, MODEL_VALIDATION_FAIL, f"{name} must be a whole number: {text!r}")
        return int(text)

    def _pull(self, after: str, page_text: str, size_text: str) -> _Answer:
        after_ms = parse_after(after)
        page = self._whole("page", page_text)
        size = self._whole("pagesize", size_text)
        if page < 1:
            raise ApiError(400, MODEL_VALIDATION_FAIL, "page starts at 1")
        if size < 1:
            raise ApiError(400, MODEL_VALIDATION_FAIL, "pagesize must be at least 1")
        if size > MAX_PAGE_SIZE:
            raise ApiError(
                400, RESPONSE_LIMIT_EXCEEDS, f"pagesize {size} exceeds the limit of {MAX_PAGE_SIZE}"
            )
        self._page_requests += 1
        request = PageRequest(after, after_ms, page, size, self._page_requests)
        for hook in list(self._hooks):
            hook(self, request)
        first = self._start(after_ms, self.after_inclusive) + (page - 1) * size
        customers = [
            self._build(key % _ID_SPACE - FIRST_ID) for key in self._keys[first : first + size]
        ]
        self._counters["pages"] += 1
        self._counters["customers_served"] += len(customers)
        data: Any = customers if self.data_wrapper is None else {self.data_wrapper: customers}
        return _Answer(200, envelope(data), returned=len(customers))

    def _get_customer(self, customer_id: str) -> _Answer:
        try:
            index = self._index(customer_id)
        except KeyError:
            raise ApiError(
                404, CUSTOMER_DOESNT_EXIST, f"no customer with id {customer_id!r}"
            ) from None
        self._counters["customers_served"] += 1
        return _Answer(200, envelope(self._build(index)), returned=1)


@contextmanager
def serve(
    fake: TreezFake, *, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 10.0
) -> Iterator[str]:
    """Serve ``fake`` over HTTP from a background thread; yields its v2 base url (ending with
    ``/v2.0/dispensary/{dispensary}``)."""
    with serve_in_thread(
        fake, host=host, port=port, name="treez-fake", start_timeout=start_timeout
    ) as bound:
        yield f"http://{host}:{bound}/v2.0/dispensary/{fake.dispensary}"


# ---- process mode ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.treez_api",
        description="A fake of Treez's v2 Customer API for one store.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--customers", type=int, default=1000, help="generated customers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dispensary", default=DEFAULT_DISPENSARY)
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--no-rate-limit", action="store_true")
    parser.add_argument("--token-lifetime", type=float, default=TOKEN_LIFETIME, help="seconds")
    parser.add_argument("--hide-deactivated", action="store_true")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default=DEFAULT_LOOP)
    parser.add_argument("--calls-log", help="on exit, each request's arrival time and status")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        fake = TreezFake(
            customers=args.customers,
            seed=args.seed,
            dispensary=args.dispensary,
            client_id=args.client_id,
            api_key=args.api_key,
            token_lifetime=args.token_lifetime,
            rate_limit=None if args.no_rate_limit else RATE_LIMIT,
            list_deactivated=not args.hide_deactivated,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sock = bind_socket(args.host, args.port)
    try:
        return serve_until_signalled(make_server(fake, args.loop, quiet=False), sock)
    finally:
        if args.calls_log:
            write_calls_log(fake, args.calls_log)


def write_calls_log(fake: TreezFake, path: str) -> None:
    """Each request's arrival (the fake's clock, seconds) and status, in arrival order."""
    lines = [f"{c.at:.6f} {'-' if c.status is None else c.status}\n" for c in fake.calls]
    with open(path, "w", encoding="ascii") as out:
        out.writelines(lines)


def most_in_window(arrivals: list[float], window: float = 1.0) -> int:
    """The most requests within any ``window`` seconds (a sliding window, as Treez counts)."""
    times = sorted(arrivals)
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


if __name__ == "__main__":
    sys.exit(main())
