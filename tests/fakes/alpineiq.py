"""A local fake of Alpine IQ's loyalty API, for the tests of the Alpine IQ adapter.

Alpine IQ's public documentation names the endpoints but publishes neither request bodies,
error bodies, a batch size limit nor a rate limit. What this fake accepts is **our documented
assumption** of what the adapter sends (shared/docs/destinations.md, Alpine IQ column):

- every request carries ``X-APIKEY: <api key>`` (missing or wrong: 401 ``unauthorized``); the
  account uid appears in paths (and in the body of the real-time upsert): another uid is 403
  ``forbidden``;
- ``POST /api/v2/loyalty`` upserts one member object (with ``"uid"``) in real time and answers
  ``{"success": true, "data": {"contactID": ..., "created": ...}}``;
- ``POST /api/v1.1/createUpdateMembers/{uid}`` upserts a JSON array of member objects (without
  ``"uid"``) and answers ``{"success": true, "data": {"results": [...]}}`` in request order; an
  invalid item fails the whole request with a 400 naming its index (``[3].birthday``), more
  than ``bulk_limit`` items is 413 ``too_large``;
- ``POST /api/v2/loyaltyContact/{uid}`` (and ``/api/v1.1/...``) texts the customer a double
  opt-in in real life: accepted (200) and recorded in :attr:`AlpineIQFake.texted` so that tests
  can assert a sync never calls it;
- ``GET /api/v2/persona/{contactID}`` answers the persona or 404 ``not_found``;
- ``GET /api/v1.1/stores/{uid}`` answers the account's store locations as Alpine IQ's store
  locations API documents them, ``{"data": {"stores": [...]}}`` (a preflight's read);
- a sliding one-second rate limit over all endpoints (``rate_limit_per_second``, assumed: none
  is published) answers 429 ``rate_limited`` with ``Retry-After: 1``.

Errors are ``{"success": false, "error": {"code": ..., "message": ...}}``; a 400
(``invalid_request``) names the offending field at the start of its message.

Matching follows Alpine IQ (phone, then email; ``srcID`` is the POS id): ``contactID`` when
given (404 if unknown), else the oldest persona with the same mobile phone (``5551234567`` and
``+15551234567`` are the same number), else the same email (case-insensitive), else the same
``srcID``; else a new persona with a fresh 24-hex-digit id. Given fields replace, absent or
null ones are left alone, ``tags`` are unioned and ``customAttributes`` merged key by key.

Consent: ``emailOptIn``/``smsOptIn`` false opts the channel out; true opts it in, except that
a phone number that ever opted out of SMS is never re-opted (Alpine IQ's documented behaviour):
the attempt is logged as ``reopt_refused``. Email may be re-opted in. Alpine IQ merges personas
sharing a phone number by itself overnight: :meth:`AlpineIQFake.run_nightly_merge`.

Checks run in this order: rate limit, scripted failures (:meth:`AlpineIQFake.fail_next`),
API key, route (404/405), uid, body. Every request is recorded as a :class:`Call`.

In-process use::

    fake = AlpineIQFake(clock=clock)
    transport = httpx.ASGITransport(app=fake.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://lab.alpineiq.com") as c:
        ...

As a process (prints ``LISTENING <port>`` once ready, runs until SIGTERM/SIGINT, exits 0)::

    python -m tests.fakes.alpineiq --port 0 [--no-rate-limit] [--api-key K] [--uid U]
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import datetime
import json
import random
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Literal

from ._serve import bind_socket, http_body, make_server, serve_until_signalled

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Channel = Literal["email", "sms"]
ConsentAction = Literal["opt_in", "opt_out", "reopt_refused"]

DEFAULT_API_KEY = "aiq_test_key"
DEFAULT_UID = "1234"
DEFAULT_RATE_LIMIT = 20
DEFAULT_BULK_LIMIT = 1000

#: Member fields holding a string, replaced when given.
STRING_FIELDS = (
    "srcID",
    "mobilePhone",
    "email",
    "firstName",
    "lastName",
    "birthday",
    "address",
    "city",
    "state",
    "zip",
    "favoriteStore",
)
#: Fields that can find a persona; at least one is required.
IDENTIFIERS = ("contactID", "mobilePhone", "email", "srcID")
MEMBER_FIELDS = frozenset(
    {
        *STRING_FIELDS,
        "contactID",
        "loyaltyPoints",
        "tags",
        "customAttributes",
        "emailOptIn",
        "smsOptIn",
    }
)

# the one store location of the fake's account (the shape of Alpine IQ's documented example)
STORE: dict[str, Any] = {
    "id": 16,
    "name": "Fake Dispensary - Main St",
    "nickname": "Main St",
    "avatar": "https://lab.alpineiq.com/avatar/1",
    "addr": {
        "city": "los angeles",
        "country": "US",
        "zipCode": "90012",
        "state": "CA",
        "street": "1 main st",
        "lat": 34.05,
        "long": -118.24,
    },
    "reviewLinks": {},
    "sourceMapping": {"treez": "partnersandbox3"},
    "onlineShopURL": "https://dispensary.example.com/shop",
    "phone": "5550000000",
}

_E164 = re.compile(r"\+[1-9]\d{7,14}")
_TEN_DIGITS = re.compile(r"\d{10}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_HEX24 = re.compile(r"[0-9a-f]{24}")

_LOYALTY = re.compile(r"/api/v2/loyalty")
_BULK = re.compile(r"/api/v1\.1/createUpdateMembers/(?P<uid>[^/]+)")
_CONTACT = re.compile(r"/api/(?:v2|v1\.1)/loyaltyContact/(?P<uid>[^/]+)")
_PERSONA = re.compile(r"/api/v2/persona/(?P<id>[^/]+)")
_STORES = re.compile(r"/api/v1\.1/stores/(?P<uid>[^/]+)")


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One request received by the fake, whatever it was answered."""

    method: str
    path: str
    status: int
    body: Any  # the decoded JSON body; the raw text when not JSON; None when empty
    at: float  # the fake's clock when the request arrived
    response: Any = None  # the JSON answered


@dataclasses.dataclass(frozen=True, slots=True)
class ConsentChange:
    """One change of a persona's consent, or a refused SMS re-opt-in."""

    at: float
    contact_id: str
    channel: Channel
    action: ConsentAction
    phone: str | None = None  # the persona's phone (E.164) for the sms channel


class ApiError(Exception):
    """An error answer: ``{"success": false, "error": {"code": code, "message": message}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def phone_key(value: Any) -> str | None:
    """The E.164 form of a phone as sent (10 digits are a North American number), None when
    absent or malformed."""
    if not isinstance(value, str):
        return None
    if _E164.fullmatch(value):
        return value
    if _TEN_DIGITS.fullmatch(value):
        return "+1" + value
    return None


def _email_key(value: Any) -> str | None:
    return value.strip().lower() if isinstance(value, str) and value.strip() else None


def _match_keys(persona: dict[str, Any]) -> list[tuple[str, str]]:
    """The keys a persona is matched by: its phone, e-mail and source id, normalised."""
    keys = []
    if (phone := phone_key(persona["mobilePhone"])) is not None:
        keys.append(("phone", phone))
    if (email := _email_key(persona["email"])) is not None:
        keys.append(("email", email))
    if persona["srcID"] is not None:
        keys.append(("src", str(persona["srcID"])))
    return keys


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", f"{field}: {message}")


def validate_member(member: Any, *, where: str = "", strict: bool = True) -> dict[str, Any]:
    """``member`` checked as a member object; raises a 400 :class:`ApiError` naming the field
    (prefixed by ``where``, e.g. ``[3].``)."""
    if not isinstance(member, dict):
        raise _invalid(where.rstrip(".") or "body", "must be a JSON object")
    if strict:
        for name in member:
            if name not in MEMBER_FIELDS:
                raise _invalid(f"{where}{name}", "unknown field")
    for name in (*STRING_FIELDS, "contactID"):
        value = member.get(name)
        if value is not None and not isinstance(value, str):
            raise _invalid(f"{where}{name}", "must be a string")
    for name in IDENTIFIERS:
        if member.get(name) == "":
            raise _invalid(f"{where}{name}", "must not be empty")
    if not any(member.get(name) is not None for name in IDENTIFIERS):
        raise _invalid(f"{where}{'|'.join(IDENTIFIERS)}", "one of them is required")
    phone = member.get("mobilePhone")
    if phone is not None and phone_key(phone) is None:
        raise _invalid(f"{where}mobilePhone", "must be E.164 (+15551234567) or 10 digits")
    birthday = member.get("birthday")
    if birthday is not None:
        try:
            if not _DATE.fullmatch(birthday):
                raise ValueError(birthday)
            datetime.date.fromisoformat(birthday)
        except ValueError:
            raise _invalid(f"{where}birthday", "must be a date YYYY-MM-DD") from None
    points = member.get("loyaltyPoints")
    if points is not None and (isinstance(points, bool) or not isinstance(points, int | float)):
        raise _invalid(f"{where}loyaltyPoints", "must be a number")
    tags = member.get("tags")
    if tags is not None and (
        not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)
    ):
        raise _invalid(f"{where}tags", "must be an array of strings")
    attributes = member.get("customAttributes")
    if attributes is not None and not isinstance(attributes, dict):
        raise _invalid(f"{where}customAttributes", "must be an object")
    for name in ("emailOptIn", "smsOptIn"):
        value = member.get(name)
        if value is not None and not isinstance(value, bool):
            raise _invalid(f"{where}{name}", "must be a boolean")
    return member


def _new_persona(contact_id: str, seq: int, at: float) -> dict[str, Any]:
    persona: dict[str, Any] = {"contactID": contact_id}
    persona.update(dict.fromkeys(STRING_FIELDS))
    persona.update(
        loyaltyPoints=None,
        tags=[],
        customAttributes={},
        emailOptIn=None,
        smsOptIn=None,
        merged_from=[],
        createdAt=at,
        updatedAt=at,
    )
    persona["_seq"] = seq
    return persona


def _public(persona: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in persona.items() if not k.startswith("_")}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class AlpineIQFake:
    """The fake's state, records and ASGI app (:attr:`app`).

    ``bulk_limit``: the most items ``createUpdateMembers`` accepts; Alpine IQ does not publish
    one, 1000 is our assumption. ``rate_limit_per_second``: requests allowed in any sliding
    one-second window over all endpoints (None: no limit); Alpine IQ publishes none either.
    ``clock``: seconds, monotonic; inject one to test the rate limit without sleeping.
    ``strict``: refuse member fields outside the documented assumption (400 ``unknown field``).
    ``seed``: persona ids are drawn from a generator seeded with it (reproducible ids).

    Thread-safe: the records may be read from another thread while a server runs the app.
    """

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        uid: str = DEFAULT_UID,
        rate_limit_per_second: int | None = DEFAULT_RATE_LIMIT,
        bulk_limit: int = DEFAULT_BULK_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        *,
        strict: bool = True,
        seed: int = 0,
    ) -> None:
        if rate_limit_per_second is not None and rate_limit_per_second < 1:
            raise ValueError("rate_limit_per_second must be at least 1 (or None)")
        if bulk_limit < 1:
            raise ValueError("bulk_limit must be at least 1")
        self.api_key = api_key
        self.uid = uid
        self.rate_limit_per_second = rate_limit_per_second
        self.bulk_limit = bulk_limit
        self.clock = clock
        self.strict = strict
        self.seed = seed
        self._lock = threading.RLock()
        self._reset_state()

    def _reset_state(self) -> None:
        self._rng = random.Random(self.seed)
        self._seq = 0
        self._personas: dict[str, dict[str, Any]] = {}
        # matching keys -> persona ids, so a match is a lookup, not a scan of every persona
        self._index: dict[tuple[str, str], set[str]] = {}
        self._merged_into: dict[str, str] = {}
        self._sms_opted_out: set[str] = set()
        self._consent_log: list[ConsentChange] = []
        self._calls: list[Call] = []
        self._texted: list[Call] = []
        self._failures: collections.deque[tuple[int, int]] = collections.deque()
        self._window: collections.deque[float] = collections.deque()
        self._retry_after = 1

    # ---- control ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget personas, consent, records, scripted failures and the rate window (the
        configuration is kept; persona ids start again from the seed)."""
        with self._lock:
            self._reset_state()

    def fail_next(self, status: int, count: int = 1, *, retry_after: int = 1) -> None:
        """Answer the next ``count`` requests that pass the rate limit with ``status`` (a 429
        carries ``Retry-After: retry_after``), before any other check. Calls add up in order."""
        if not 400 <= status <= 599:
            raise ValueError(f"fail_next takes a 4xx or 5xx status, got {status}")
        if count < 1 or retry_after < 0:
            raise ValueError("count must be at least 1 and retry_after not negative")
        with self._lock:
            self._failures.extend([(status, retry_after)] * count)

    def run_nightly_merge(self) -> dict[str, list[str]]:
        """Merge personas sharing a mobile phone, as Alpine IQ does overnight: the oldest
        persona of each group survives and keeps its id and its non-null fields; the others'
        fields fill its gaps, tags are unioned, custom attributes added where missing, an
        opt-out on either side wins, and their ids are appended to its ``merged_from``. The
        absorbed ids are gone (404). Returns ``{surviving id: [absorbed ids]}``."""
        with self._lock:
            groups: dict[str, list[dict[str, Any]]] = {}
            for persona in sorted(self._personas.values(), key=lambda p: p["_seq"]):
                key = phone_key(persona["mobilePhone"])
                if key is not None:
                    groups.setdefault(key, []).append(persona)
            merged: dict[str, list[str]] = {}
            now = self.clock()
            for survivor, *absorbed in groups.values():
                if not absorbed:
                    continue
                for other in absorbed:
                    self._absorb(survivor, other)
                survivor["updatedAt"] = now
                merged[survivor["contactID"]] = [p["contactID"] for p in absorbed]
            return merged

    def _absorb(self, survivor: dict[str, Any], other: dict[str, Any]) -> None:
        before = _match_keys(survivor)
        for name in (*STRING_FIELDS, "loyaltyPoints"):
            if survivor[name] is None:
                survivor[name] = other[name]
        survivor["tags"] += [t for t in other["tags"] if t not in survivor["tags"]]
        for name, value in other["customAttributes"].items():
            survivor["customAttributes"].setdefault(name, value)
        for name in ("emailOptIn", "smsOptIn"):
            values = {survivor[name], other[name]}
            survivor[name] = False if False in values else (True if True in values else None)
        survivor["merged_from"] += [other["contactID"], *other["merged_from"]]
        for gone in (other["contactID"], *other["merged_from"]):
            self._merged_into[gone] = survivor["contactID"]
        self._reindex(other, _match_keys(other), ())
        self._reindex(survivor, before, _match_keys(survivor))
        del self._personas[other["contactID"]]

    # ---- records ---------------------------------------------------------------------------

    @property
    def personas(self) -> dict[str, dict[str, Any]]:
        """Every persona by id (a deep copy), oldest first."""
        with self._lock:
            return {cid: _public(p) for cid, p in self._personas.items()}

    def persona(self, contact_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._personas.get(contact_id)
            return None if found is None else _public(found)

    def persona_by_src(self, src_id: str) -> dict[str, Any] | None:
        """The oldest persona whose ``srcID`` is ``src_id`` (a copy), None when there is none."""
        with self._lock:
            found = self._find("src", str(src_id))
            return None if found is None else _public(found)

    def consent(self, contact_id: str) -> dict[str, bool | None]:
        """``{"email": bool | None, "sms": bool | None}`` (None: never set); KeyError when
        there is no such persona."""
        with self._lock:
            persona = self._personas[contact_id]
            return {"email": persona["emailOptIn"], "sms": persona["smsOptIn"]}

    @property
    def consent_log(self) -> list[ConsentChange]:
        with self._lock:
            return list(self._consent_log)

    @property
    def sms_opted_out_numbers(self) -> set[str]:
        """Every phone number (E.164) that ever opted out of SMS."""
        with self._lock:
            return set(self._sms_opted_out)

    @property
    def texted(self) -> list[Call]:
        """The accepted ``loyaltyContact`` calls: each texted a customer in real life."""
        with self._lock:
            return list(self._texted)

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def calls_to(self, prefix: str) -> list[Call]:
        """The calls whose path starts with ``prefix``."""
        with self._lock:
            return [c for c in self._calls if c.path.startswith(prefix)]

    def statuses(self) -> list[int]:
        with self._lock:
            return [c.status for c in self._calls]

    # ---- ASGI ------------------------------------------------------------------------------

    @property
    def app(self) -> ASGIApp:
        """The ASGI 3 app: the fake itself."""
        return self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await http_body(scope, receive, send)
        if raw is None:
            return
        api_key: str | None = None
        for name, value in scope["headers"]:
            if name.lower() == b"x-apikey":
                api_key = value.decode("latin-1")
        method: str = scope["method"]
        path: str = scope["path"]
        body: Any = None
        decoded = False
        if raw:
            try:
                body, decoded = json.loads(raw), True
            except ValueError:
                body = raw.decode("utf-8", "replace")

        headers = [(b"content-type", b"application/json")]
        with self._lock:
            at = self.clock()
            try:
                response = self._handle(method, path, api_key, body, decoded, at)
                status = 200
            except ApiError as error:
                status = error.status
                response = {
                    "success": False,
                    "error": {"code": error.code, "message": error.message},
                }
                if status == 429:
                    headers.append((b"retry-after", str(self._retry_after).encode()))
                elif status == 405:
                    reads = _PERSONA.fullmatch(path) or _STORES.fullmatch(path)
                    headers.append((b"allow", b"GET" if reads else b"POST"))
            call = Call(method, path, status, body, at, response)
            self._calls.append(call)
            if status == 200 and _CONTACT.fullmatch(path):
                self._texted.append(call)
        payload = _dumps(response)
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _handle(
        self, method: str, path: str, api_key: str | None, body: Any, decoded: bool, at: float
    ) -> dict[str, Any]:
        self._retry_after = 1
        self._check_rate(at)
        if self._failures:
            status, self._retry_after = self._failures.popleft()
            code = {429: "rate_limited"}.get(
                status, "server_error" if status >= 500 else "injected"
            )
            raise ApiError(status, code, f"injected failure ({status})")
        if api_key is None or api_key != self.api_key:
            raise ApiError(401, "unauthorized", "missing or invalid X-APIKEY header")

        if match := _PERSONA.fullmatch(path):
            self._require(method, "GET")
            return self._get_persona(match["id"])
        if match := _STORES.fullmatch(path):
            self._require(method, "GET")
            self._check_uid(match["uid"])
            return {"data": {"stores": [dict(STORE, userID=self.uid)]}}
        route = None
        for pattern in (_LOYALTY, _BULK, _CONTACT):
            if match := pattern.fullmatch(path):
                route = pattern
                break
        if route is None or match is None:
            raise ApiError(404, "not_found", f"no route {path}")
        self._require(method, "POST")
        if "uid" in match.groupdict():
            self._check_uid(match["uid"])
        if route is _CONTACT:
            return {"success": True, "data": {}}
        if not decoded:
            raise _invalid("body", "must be JSON")
        if route is _BULK:
            return self._bulk(body, at)
        if not isinstance(body, dict):
            raise _invalid("body", "must be a JSON object")
        if "uid" not in body:
            raise _invalid("uid", "required")
        if not isinstance(body["uid"], str):
            raise _invalid("uid", "must be a string")
        self._check_uid(body["uid"])
        member = validate_member({k: v for k, v in body.items() if k != "uid"}, strict=self.strict)
        self._check_contact(member, "")
        contact_id, created = self._upsert(member, at)
        return {"success": True, "data": {"contactID": contact_id, "created": created}}

    @staticmethod
    def _require(method: str, allowed: str) -> None:
        if method != allowed:
            raise ApiError(405, "method_not_allowed", f"use {allowed}")

    def _check_rate(self, at: float) -> None:
        limit = self.rate_limit_per_second
        if limit is None:
            return
        window = self._window
        while window and window[0] <= at - 1.0:
            window.popleft()
        if len(window) >= limit:
            raise ApiError(429, "rate_limited", f"more than {limit} requests per second")
        window.append(at)

    def _check_uid(self, uid: str) -> None:
        if uid != self.uid:
            raise ApiError(403, "forbidden", f"the API key has no access to uid {uid}")

    def _check_contact(self, member: dict[str, Any], where: str) -> None:
        contact_id = member.get("contactID")
        if contact_id is not None and contact_id not in self._personas:
            raise ApiError(404, "not_found", f"{where}contactID: no persona {contact_id}")

    def _get_persona(self, contact_id: str) -> dict[str, Any]:
        persona = self._personas.get(contact_id)
        if persona is None:
            merged = self._merged_into.get(contact_id)
            detail = f" (merged into {merged})" if merged else ""
            raise ApiError(404, "not_found", f"no persona {contact_id}{detail}")
        return {"success": True, "data": _public(persona)}

    def _bulk(self, body: Any, at: float) -> dict[str, Any]:
        if not isinstance(body, list) or not body:
            raise _invalid("body", "must be a non-empty JSON array of member objects")
        if len(body) > self.bulk_limit:
            raise ApiError(
                413, "too_large", f"{len(body)} members: at most {self.bulk_limit} per request"
            )
        members = [
            validate_member(item, where=f"[{i}].", strict=self.strict)
            for i, item in enumerate(body)
        ]
        for i, member in enumerate(members):
            self._check_contact(member, f"[{i}].")
        results = []
        for member in members:
            contact_id, created = self._upsert(member, at)
            results.append(
                {"srcID": member.get("srcID"), "contactID": contact_id, "created": created}
            )
        return {"success": True, "data": {"results": results}}

    # ---- matching and updates ----------------------------------------------------------------

    def _find(self, kind: str, key: str) -> dict[str, Any] | None:
        ids = self._index.get((kind, key))
        if not ids:
            return None
        return min((self._personas[i] for i in ids), key=lambda p: p["_seq"])

    def _reindex(
        self,
        persona: dict[str, Any],
        before: Sequence[tuple[str, str]],
        after: Sequence[tuple[str, str]],
    ) -> None:
        contact_id = persona["contactID"]
        for key in before:
            if key not in after:
                self._index[key].discard(contact_id)
        for key in after:
            self._index.setdefault(key, set()).add(contact_id)

    def _match(self, member: dict[str, Any]) -> dict[str, Any] | None:
        contact_id = member.get("contactID")
        if contact_id is not None:
            return self._personas[contact_id]  # checked by _check_contact
        phone = phone_key(member.get("mobilePhone"))
        if phone is not None and (found := self._find("phone", phone)):
            return found
        email = _email_key(member.get("email"))
        if email is not None and (found := self._find("email", email)):
            return found
        src_id = member.get("srcID")
        if src_id is not None:
            return self._find("src", str(src_id))
        return None

    def _new_id(self) -> str:
        while True:
            contact_id = f"{self._rng.getrandbits(96):024x}"
            if contact_id not in self._personas and contact_id not in self._merged_into:
                return contact_id

    def _upsert(self, member: dict[str, Any], at: float) -> tuple[str, bool]:
        persona = self._match(member)
        created = persona is None
        if persona is None:
            self._seq += 1
            persona = _new_persona(self._new_id(), self._seq, at)
            self._personas[persona["contactID"]] = persona
        before = _match_keys(persona)
        for name in (*STRING_FIELDS, "loyaltyPoints"):
            if member.get(name) is not None:
                persona[name] = member[name]
        for tag in member.get("tags") or ():
            if tag not in persona["tags"]:
                persona["tags"].append(tag)
        persona["customAttributes"].update(copy.deepcopy(member.get("customAttributes") or {}))
        persona["updatedAt"] = at
        self._reindex(persona, before, _match_keys(persona))
        self._apply_consent(persona, member, at)
        return persona["contactID"], created

    def _apply_consent(self, persona: dict[str, Any], member: dict[str, Any], at: float) -> None:
        email = member.get("emailOptIn")
        if email is not None:
            self._set_consent(persona, "email", email, at)
        sms = member.get("smsOptIn")
        if sms is None:
            return
        phone = phone_key(persona["mobilePhone"])
        if sms is False:
            if phone is not None:
                self._sms_opted_out.add(phone)
            self._set_consent(persona, "sms", False, at)
        elif phone is not None and phone in self._sms_opted_out:
            self._consent_log.append(
                ConsentChange(at, persona["contactID"], "sms", "reopt_refused", phone)
            )
        else:
            self._set_consent(persona, "sms", True, at)

    def _set_consent(
        self, persona: dict[str, Any], channel: Channel, value: bool, at: float
    ) -> None:
        name = "emailOptIn" if channel == "email" else "smsOptIn"
        if persona[name] is value:
            return
        persona[name] = value
        phone = phone_key(persona["mobilePhone"]) if channel == "sms" else None
        action: ConsentAction = "opt_in" if value else "opt_out"
        self._consent_log.append(ConsentChange(at, persona["contactID"], channel, action, phone))


def is_contact_id(value: str) -> bool:
    """Whether ``value`` looks like an id this fake gives (24 lower-case hex digits)."""
    return _HEX24.fullmatch(value) is not None


# ---- process mode ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.alpineiq", description="A local fake of Alpine IQ's API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--uid", default=DEFAULT_UID)
    parser.add_argument("--rate-limit", type=int, default=DEFAULT_RATE_LIMIT, help="per second")
    parser.add_argument("--no-rate-limit", action="store_true")
    parser.add_argument("--bulk-limit", type=int, default=DEFAULT_BULK_LIMIT)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        fake = AlpineIQFake(
            api_key=args.api_key,
            uid=args.uid,
            rate_limit_per_second=None if args.no_rate_limit else args.rate_limit,
            bulk_limit=args.bulk_limit,
        )
    except ValueError as exc:
        parser.error(str(exc))
    sock = bind_socket(args.host, args.port)
    return serve_until_signalled(make_server(fake.app, quiet=False), sock)


if __name__ == "__main__":
    sys.exit(main())
