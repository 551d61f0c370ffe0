"""A local fake of Braze's REST API (user data and subscription groups), for the tests of the
Braze adapter.

What it enforces follows Braze's public documentation (repository ``braze-inc/braze-docs``:
``_docs/_api/endpoints/user_data/``, ``_docs/_api/api_limits.md``, ``_docs/_api/errors.md``,
the user attributes object and the subscription group endpoints):

==========================================  ===================================================
``POST /users/track``                        201 ``{"message": "success", "attributes_processed"
                                             ...}``; an invalid object is a non-fatal entry of
                                             ``errors[]`` (``type``, ``input_array``, ``index``)
                                             and the other objects are processed
``POST /users/merge``                        202 ``{"message": "success"}``; asynchronous
``POST /users/delete``                       201 ``{"deleted": n, "message": "success"}``
``POST /v2/subscription/status/set``         201 ``{"message": "success"}``
==========================================  ===================================================

- **Auth**: ``Authorization: Bearer <REST API key>``; absent, another scheme or another key is
  a 401. Bodies must be JSON objects (else 400).
- **Object limit**: at most ``objects_per_request`` (75) objects in each of ``attributes``,
  ``events`` and ``purchases`` of a track request, or combined when ``combined_limit`` (the
  newer plans' 50 updates "combined across attribute, event, or purchase objects"): more is
  a fatal 400 ``Max Input Length Exceeded``. At most 50 merge updates, 50 ids to delete, 50
  ids per subscription group entry and 50 distinct users per status request, all entries
  together ("up to 50 users"; fatal 400 with Braze's documented messages).
- **Profiles** are upserted by ``external_id`` (or found by ``braze_id``; an object keyed by
  ``email`` or ``phone`` updates the most recently updated profile holding it, else creates
  one). A profile is created with ``email_subscribe: subscribed`` (Braze's default);
  ``_update_existing_only: true`` never creates one. ``null`` removes an attribute.
- **Consent**: ``email_subscribe`` is ``opted_in``, ``subscribed`` or ``unsubscribed``
  (else a non-fatal error for that object); ``subscription_groups`` inside an attributes
  object and ``/v2/subscription/status/set`` set a group's state (``subscribed`` or
  ``unsubscribed``) per profile. Every change is recorded (:attr:`BrazeFake.consent_log`),
  with what it replaced; :attr:`BrazeFake.subscribes` lists every explicit opt-in (``opted_in``,
  ``subscribed`` set by a call, a group joined) so a test can assert none happened.
  :meth:`BrazeFake.email_history` gives the ``email_subscribe`` states a profile went through,
  from its creation (a profile created unsubscribed in one call never was ``subscribed``).
- **Merges** are asynchronous: a merge update is accepted (202) and applied ``merge_delay``
  seconds later on the fake's clock (at the next request or read after that), or at once by
  :meth:`BrazeFake.settle`; with ``shuffle_merges`` the updates of one request are applied in
  a shuffled order (Braze does not guarantee their sequence), else in the request's order.
  Applied: the fields found only on the absorbed profile (standard ones and custom
  attributes) go to the kept one, and the absorbed profile and its ``external_id`` are gone
  (a later track call with it creates a new profile, as in Braze).
  A merge naming a profile that does not exist (yet, or any more) fails silently when it is
  applied (:attr:`BrazeFake.merge_failures`).
- **Rate limits** (``rate_limits=True``): fixed windows per family, as documented:
  ``/users/track`` 3,000 requests per 3 s; ``/users/merge``, ``/users/delete`` (with identify
  and alias) 20,000 per minute together; ``/v2/subscription/status/set`` 5,000 per minute.
  Every answer carries ``x-ratelimit-limit``, ``x-ratelimit-remaining`` and
  ``x-ratelimit-reset`` (the window's end in epoch seconds on the fake's clock); a 429 carries
  the same headers and **no** ``Retry-After``, and consumes no slot.

Behaviours **assumed** (the documentation does not settle them): the bodies of 401, 429 and
other fatal errors (``{"message": ...}``), the 201 of delete and of subscription status, the
non-fatal error texts (``'email' is not a valid email address``), an unknown subscription
group id (a non-fatal error in track, a fatal 400 in status/set), ids of no profile in
status/set (ignored: no profile is created), an update-only object for no profile (ignored),
that a merge moves no subscription state, and that ``email_subscribe`` set by track also
applies to the other profiles holding the same e-mail (as the docs say of the "Set
subscription groups" example).

In-process::

    fake = BrazeFake(clock=clock)
    transport = httpx.ASGITransport(app=fake.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://rest.iad-01.braze.com")
        ...

As a process (prints ``LISTENING <port>`` once ready, runs until SIGTERM/SIGINT, exits 0)::

    python -m tests.fakes.braze --port 0 [--api-key K] [--no-rate-limits] [--merge-delay S]
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import math
import random
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from ._serve import bind_socket, http_body, make_server, serve_until_signalled

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_API_KEY = "braze-test-rest-key"
OBJECTS_PER_REQUEST = 75
MAX_MERGES = 50
MAX_IDS = 50
EMAIL_STATES = frozenset({"opted_in", "subscribed", "unsubscribed"})
GROUP_STATES = frozenset({"subscribed", "unsubscribed"})
IDENTIFIERS = ("external_id", "braze_id", "user_alias", "email", "phone")
CONTROL_KEYS = frozenset({"_update_existing_only", "push_token_import"})

#: family -> (requests, window seconds), as documented in api_limits.md
RATE_LIMITS: dict[str, tuple[int, float]] = {
    "track": (3_000, 3.0),
    "users": (20_000, 60.0),  # merge, delete, identify, alias: shared
    "subscription": (5_000, 60.0),
}
ROUTES = {
    "/users/track": "track",
    "/users/merge": "users",
    "/users/delete": "users",
    "/v2/subscription/status/set": "subscription",
}
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One request received by the fake, whatever it was answered."""

    method: str
    path: str
    status: int
    body: Any  # the decoded JSON body; the raw text when not JSON; None when empty
    at: float
    response: Any = None


@dataclasses.dataclass(frozen=True, slots=True)
class ConsentChange:
    """One change of a profile's e-mail subscription or of one of its groups."""

    at: float
    braze_id: str
    external_id: str | None
    channel: str  # "email", or a subscription group id
    previous: str | None  # None: the profile was just created (email), or never in the group
    state: str
    path: str  # the endpoint that made it

    @property
    def opts_in(self) -> bool:
        """An explicit opt-in: ``opted_in``, a ``subscribed`` set by a call (not the default
        of a new profile), a group joined."""
        return self.state in ("opted_in", "subscribed") and not (
            self.channel == "email" and self.previous is None and self.state == "subscribed"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Merge:
    merged: str  # external_id absorbed
    kept: str
    requested_at: float
    applied_at: float | None = None
    ok: bool = True


@dataclasses.dataclass(slots=True)
class Profile:
    braze_id: str
    external_id: str | None
    attributes: dict[str, Any]  # standard fields and custom attributes, no consent
    email_subscribe: str = "subscribed"
    groups: dict[str, str] = dataclasses.field(default_factory=dict)
    email_history: list[str] = dataclasses.field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0
    seq: int = 0

    def public(self) -> dict[str, Any]:
        return {
            "braze_id": self.braze_id,
            "external_id": self.external_id,
            **copy.deepcopy(self.attributes),
            "email_subscribe": self.email_subscribe,
            "subscription_groups": dict(self.groups),
        }


class ApiError(Exception):
    """A fatal answer: ``{"message": message, "errors": [...]}`` (errors left out when none)."""

    def __init__(
        self,
        status: int,
        message: str,
        errors: Sequence[Any] = (),
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = list(errors)
        self.headers = list(headers)

    def body(self) -> dict[str, Any]:
        found: dict[str, Any] = {"message": self.message}
        if self.errors:
            found["errors"] = self.errors
        return found


class _Minor(Exception):
    """A non-fatal error of one object: reported in ``errors[]``, the others go on."""


class _Window:
    """A fixed window of ``limit`` requests per ``length`` seconds."""

    __slots__ = ("count", "length", "limit", "start")

    def __init__(self, limit: int, length: float) -> None:
        self.limit = limit
        self.length = length
        self.start = -math.inf
        self.count = 0

    def roll(self, now: float) -> None:
        start = math.floor(now / self.length) * self.length
        if start != self.start:
            self.start, self.count = start, 0

    def headers(self) -> list[tuple[bytes, bytes]]:
        reset = math.ceil(self.start + self.length)
        return [
            (b"x-ratelimit-limit", str(self.limit).encode()),
            (b"x-ratelimit-remaining", str(max(0, self.limit - self.count)).encode()),
            (b"x-ratelimit-reset", str(reset).encode()),
        ]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _email_key(value: Any) -> str | None:
    return value.strip().lower() if isinstance(value, str) and value.strip() else None


class BrazeFake:
    """The fake's state, records and ASGI app (:attr:`app`).

    ``clock``: seconds (epoch by default: ``x-ratelimit-reset`` is epoch seconds); inject a
    hand clock to test windows and merges without sleeping. ``rate_limits``: True for Braze's
    documented limits, False for none, or a mapping family -> (requests, seconds) overriding
    some. ``subscription_groups``: the known group ids (None: any id is known).
    ``merge_delay``: seconds between a merge's 202 and its effect. ``seed``: braze ids (and
    the order ``shuffle_merges`` applies one request's merge updates in).
    Thread-safe: records may be read from another thread while a server runs the app.
    """

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        *,
        clock: Callable[[], float] = time.time,
        rate_limits: bool | Mapping[str, tuple[int, float]] = True,
        objects_per_request: int = OBJECTS_PER_REQUEST,
        combined_limit: bool = False,
        subscription_groups: Iterable[str] | None = None,
        merge_delay: float = 1.0,
        seed: int = 0,
        shuffle_merges: bool = False,
    ) -> None:
        if objects_per_request < 1:
            raise ValueError("objects_per_request must be at least 1")
        if merge_delay < 0:
            raise ValueError("merge_delay must not be negative")
        self.api_key = api_key
        self.clock = clock
        limits: dict[str, tuple[int, float]] = {}
        if rate_limits is not False:
            limits = dict(RATE_LIMITS)
            if isinstance(rate_limits, Mapping):
                limits.update(rate_limits)
        self.rate_limits = limits
        self.objects_per_request = objects_per_request
        self.combined_limit = combined_limit
        self.subscription_groups = (
            None if subscription_groups is None else frozenset(subscription_groups)
        )
        self.merge_delay = merge_delay
        self.shuffle_merges = shuffle_merges
        self.seed = seed
        self._lock = threading.RLock()
        self._reset_state()

    def _reset_state(self) -> None:
        self._rng = random.Random(self.seed)
        self._seq = 0
        self._profiles: dict[str, Profile] = {}  # braze_id -> profile
        self._by_external: dict[str, str] = {}
        self._pending: collections.deque[tuple[float, Merge]] = collections.deque()
        self._merges: list[Merge] = []
        self._consent: list[ConsentChange] = []
        self._calls: list[Call] = []
        self._failures: collections.deque[tuple[int, Any]] = collections.deque()
        self._windows = {family: _Window(*rate) for family, rate in self.rate_limits.items()}

    # ---- control ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget profiles, merges, records, scripted failures and the rate windows."""
        with self._lock:
            self._reset_state()

    def fail_next(self, status: int, count: int = 1, *, body: Any = None) -> None:
        """Answer the next ``count`` requests that pass auth and the rate limit with
        ``status`` (and ``body``, default ``{"message": "injected"}``)."""
        if not 400 <= status <= 599 or count < 1:
            raise ValueError("fail_next takes a 4xx or 5xx status and a count of at least 1")
        with self._lock:
            self._failures.extend([(status, body)] * count)

    def settle(self, *, everything: bool = True) -> list[Merge]:
        """Apply the accepted merges (all of them, or only those due on the clock), in the
        order they were accepted; returns them as applied."""
        with self._lock:
            return self._settle(None if everything else self.clock())

    def delete(self, external_id: str) -> bool:
        """Delete a profile as a marketer would in the dashboard; False when there is none."""
        with self._lock:
            braze_id = self._by_external.pop(external_id, None)
            if braze_id is None:
                return False
            del self._profiles[braze_id]
            return True

    # ---- records ---------------------------------------------------------------------------

    def profile(self, external_id: str) -> dict[str, Any] | None:
        """The profile holding ``external_id`` (a copy), None when there is none."""
        with self._lock:
            self._settle(self.clock())
            found = self._by_external.get(external_id)
            return None if found is None else self._profiles[found].public()

    @property
    def profiles(self) -> list[dict[str, Any]]:
        """Every profile (copies), oldest first."""
        with self._lock:
            self._settle(self.clock())
            return [p.public() for p in sorted(self._profiles.values(), key=lambda p: p.seq)]

    def consent(self, external_id: str) -> dict[str, str]:
        """``{"email": state, <group id>: state, ...}``; KeyError when there is no profile."""
        with self._lock:
            self._settle(self.clock())
            profile = self._profiles[self._by_external[external_id]]
            return {"email": profile.email_subscribe, **profile.groups}

    def email_history(self, external_id: str) -> list[str]:
        """The ``email_subscribe`` states the profile held at the end of each call that
        created or changed it, from its creation."""
        with self._lock:
            self._settle(self.clock())
            return list(self._profiles[self._by_external[external_id]].email_history)

    @property
    def consent_log(self) -> list[ConsentChange]:
        with self._lock:
            return list(self._consent)

    @property
    def subscribes(self) -> list[ConsentChange]:
        """Every explicit opt-in (see :attr:`ConsentChange.opts_in`)."""
        with self._lock:
            return [c for c in self._consent if c.opts_in]

    @property
    def merges(self) -> list[Merge]:
        """The merges applied (successfully)."""
        with self._lock:
            return [m for m in self._merges if m.ok]

    @property
    def merge_failures(self) -> list[Merge]:
        with self._lock:
            return [m for m in self._merges if not m.ok]

    @property
    def pending_merges(self) -> list[Merge]:
        with self._lock:
            return [m for _, m in self._pending]

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def calls_to(self, path: str) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if c.path == path]

    # ---- ASGI ------------------------------------------------------------------------------

    @property
    def app(self) -> ASGIApp:
        return self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await http_body(scope, receive, send)
        if raw is None:
            return
        authorization: str | None = None
        for name, value in scope["headers"]:
            if name.lower() == b"authorization":
                authorization = value.decode("latin-1")
        method: str = scope["method"]
        path: str = scope["path"].rstrip("/") or "/"
        body: Any = None
        decoded = False
        if raw:
            try:
                body, decoded = json.loads(raw), True
            except ValueError:
                body = raw.decode("utf-8", "replace")
        headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
        with self._lock:
            at = self.clock()
            self._settle(at)
            try:
                status, response, more = self._handle(
                    method, path, authorization, body, decoded, at
                )
                headers += more
            except ApiError as error:
                status, response = error.status, error.body()
                headers += error.headers
            self._calls.append(Call(method, path, status, body, at, response))
        payload = _dumps(response)
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _handle(
        self,
        method: str,
        path: str,
        authorization: str | None,
        body: Any,
        decoded: bool,
        at: float,
    ) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() != self.api_key:
            raise ApiError(401, "Unknown or missing REST API Key")
        family = ROUTES.get(path)
        if family is None:
            raise ApiError(404, "Not Found")
        if method != "POST":
            raise ApiError(405, "Method Not Allowed")
        limit_headers = self._check_rate(family, at)
        if self._failures:
            status, injected = self._failures.popleft()
            if injected is None:
                raise ApiError(status, "injected", headers=limit_headers)
            raise _Injected(status, injected, limit_headers)
        try:
            if not decoded or not isinstance(body, dict):
                raise ApiError(400, "Bad Request: the body must be a JSON object")
            if path == "/users/track":
                status, answer = self._track(body, at)
            elif path == "/users/merge":
                status, answer = self._merge(body, at)
            elif path == "/users/delete":
                status, answer = self._delete(body)
            else:
                status, answer = self._status_set(body, at)
        except ApiError as error:
            error.headers += limit_headers
            raise
        return status, answer, limit_headers

    def _check_rate(self, family: str, at: float) -> list[tuple[bytes, bytes]]:
        window = self._windows.get(family)
        if window is None:
            return []
        window.roll(at)
        if window.count >= window.limit:
            raise ApiError(429, "Rate Limit Exceeded", headers=window.headers())
        window.count += 1
        return window.headers()

    # ---- /users/track ----------------------------------------------------------------------

    def _track(self, body: dict[str, Any], at: float) -> tuple[int, Any]:
        arrays: dict[str, list[Any]] = {}
        for name in ("attributes", "events", "purchases"):
            value = body.get(name)
            if value is None:
                continue
            if not isinstance(value, list):
                raise ApiError(400, f"'{name}' must be an array of objects")
            arrays[name] = value
        sizes = [len(v) for v in arrays.values()]
        if (
            sum(sizes) > self.objects_per_request
            if self.combined_limit
            else any(n > self.objects_per_request for n in sizes)
        ):
            raise ApiError(
                400,
                "Max Input Length Exceeded",
                [f"at most {self.objects_per_request} objects per request"],
            )
        if not arrays:
            raise ApiError(400, "Bad Request: no attributes, events or purchases")
        errors: list[dict[str, Any]] = []
        touched: dict[str, Profile] = {}
        processed = dict.fromkeys(arrays, 0)
        for name, objects in arrays.items():
            for index, item in enumerate(objects):
                try:
                    profile = self._track_one(name, item, at)
                except _Minor as minor:
                    errors.append({"type": str(minor), "input_array": name, "index": index})
                    continue
                processed[name] += 1
                if profile is not None:
                    touched[profile.braze_id] = profile
        for profile in touched.values():
            if not profile.email_history or profile.email_history[-1] != profile.email_subscribe:
                profile.email_history.append(profile.email_subscribe)
        answer: dict[str, Any] = {"message": "success"}
        for name, count in processed.items():
            answer[f"{name}_processed"] = count
        if errors:
            answer["errors"] = errors
        return 201, answer

    def _track_one(self, array: str, item: Any, at: float) -> Profile | None:
        if not isinstance(item, dict):
            raise _Minor(f"'{array}' objects must be objects")
        if not any(item.get(name) is not None for name in IDENTIFIERS):
            raise _Minor("'external_id' or 'braze_id' or 'user_alias' is required")
        if array != "attributes":
            # events and purchases: only their user is checked (what the adapter never sends)
            if array == "events" and not isinstance(item.get("name"), str):
                raise _Minor("'name' is required")
            return None
        external_id = item.get("external_id")
        if external_id is not None and (not isinstance(external_id, str) or not external_id):
            raise _Minor("'external_id' must be a non-empty string")
        email = item.get("email")
        if email is not None and (not isinstance(email, str) or not _EMAIL.fullmatch(email)):
            raise _Minor("'email' is not a valid email address")
        state = item.get("email_subscribe")
        if state is not None and state not in EMAIL_STATES:
            raise _Minor("'email_subscribe' must be one of opted_in, subscribed, unsubscribed")
        groups = self._group_entries(item.get("subscription_groups"))
        update_only = item.get("_update_existing_only") is True
        profile = self._find(item)
        if profile is None:
            if update_only or (external_id is None and item.get("braze_id") is not None):
                return None
            profile = self._create(external_id, at)
        for name, value in item.items():
            if name in IDENTIFIERS and name not in ("email", "phone"):
                continue
            if name in CONTROL_KEYS or name in ("email_subscribe", "subscription_groups"):
                continue
            if value is None:
                profile.attributes.pop(name, None)
            else:
                profile.attributes[name] = copy.deepcopy(value)
        if state is not None:
            self._set_email(profile, state, at, "/users/track", spread=True)
        for group, group_state in groups:
            self._set_group(profile, group, group_state, at, "/users/track")
        profile.updated_at = at
        return profile

    def _group_entries(self, value: Any) -> list[tuple[str, str]]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise _Minor("'subscription_groups' must be an array of objects")
        found = []
        for entry in value:
            if not isinstance(entry, dict):
                raise _Minor("'subscription_groups' must be an array of objects")
            group, state = entry.get("subscription_group_id"), entry.get("subscription_state")
            if not isinstance(group, str) or state not in GROUP_STATES:
                raise _Minor(
                    "subscription groups need 'subscription_group_id' and a "
                    "'subscription_state' of subscribed or unsubscribed"
                )
            if self.subscription_groups is not None and group not in self.subscription_groups:
                raise _Minor("unknown subscription group id")
            found.append((group, state))
        return found

    def _find(self, item: dict[str, Any]) -> Profile | None:
        external_id = item.get("external_id")
        if external_id is not None:
            found = self._by_external.get(external_id)
            return None if found is None else self._profiles[found]
        braze_id = item.get("braze_id")
        if braze_id is not None:
            return self._profiles.get(str(braze_id))
        for name in ("email", "phone"):
            value = item.get(name)
            if value is None:
                continue
            holders = [
                p
                for p in self._profiles.values()
                if (
                    _email_key(p.attributes.get(name)) == _email_key(value)
                    if name == "email"
                    else p.attributes.get(name) == value
                )
            ]
            if holders:
                # Braze: the most recently updated profile, one with an external_id first
                return max(holders, key=lambda p: (p.external_id is not None, p.updated_at))
        return None

    def _create(self, external_id: str | None, at: float) -> Profile:
        self._seq += 1
        while True:
            braze_id = f"{self._rng.getrandbits(96):024x}"
            if braze_id not in self._profiles:
                break
        profile = Profile(braze_id, external_id, {}, created_at=at, updated_at=at, seq=self._seq)
        self._profiles[braze_id] = profile
        if external_id is not None:
            self._by_external[external_id] = braze_id
        return profile

    def _set_email(
        self, profile: Profile, state: str, at: float, path: str, *, spread: bool
    ) -> None:
        targets = [profile]
        email = _email_key(profile.attributes.get("email"))
        if spread and email is not None:
            targets += [
                p
                for p in self._profiles.values()
                if p is not profile and _email_key(p.attributes.get("email")) == email
            ]
        for target in targets:
            new = not target.email_history and target is profile
            if target.email_subscribe == state and not new:
                continue
            previous = None if new else target.email_subscribe
            target.email_subscribe = state
            self._consent.append(
                ConsentChange(
                    at, target.braze_id, target.external_id, "email", previous, state, path
                )
            )
            if target is not profile:
                target.email_history.append(state)

    def _set_group(self, profile: Profile, group: str, state: str, at: float, path: str) -> None:
        previous = profile.groups.get(group)
        if previous == state:
            return
        profile.groups[group] = state
        self._consent.append(
            ConsentChange(at, profile.braze_id, profile.external_id, group, previous, state, path)
        )

    # ---- /users/merge and /users/delete ---------------------------------------------------------

    def _merge(self, body: dict[str, Any], at: float) -> tuple[int, Any]:
        updates = body.get("merge_updates")
        if not isinstance(updates, list) or not all(isinstance(u, dict) for u in updates):
            raise ApiError(400, "'merge_updates' must be an array of objects")
        if len(updates) > MAX_MERGES:
            raise ApiError(400, "a single request may not contain more than 50 merge updates")
        accepted = []
        for update in updates:
            if set(update) != {"identifier_to_merge", "identifier_to_keep"}:
                raise ApiError(
                    400,
                    "'merge_updates' must only have 'identifier_to_merge' and 'identifier_to_keep'",
                )
            merged, kept = update["identifier_to_merge"], update["identifier_to_keep"]
            kinds = {_identifier_kind(merged), _identifier_kind(kept)}
            if None in kinds:
                raise ApiError(
                    400,
                    "identifiers must be objects with an 'external_id' property that is a "
                    "string, or 'user_alias' property that is an object",
                )
            if len(kinds) != 1:
                raise ApiError(400, "identifiers must be objects of the same type")
            if kinds != {"external_id"}:
                raise ApiError(400, "this fake merges by external_id only")
            accepted.append(Merge(merged["external_id"], kept["external_id"], at))
        if self.shuffle_merges:
            # Braze does not guarantee the sequence of one request's merge updates
            self._rng.shuffle(accepted)
        for merge in accepted:
            self._pending.append((at + self.merge_delay, merge))
        return 202, {"message": "success"}

    def _settle(self, now: float | None) -> list[Merge]:
        applied = []
        while self._pending and (now is None or self._pending[0][0] <= now):
            due, merge = self._pending.popleft()
            applied.append(self._apply(merge, due))
        return applied

    def _apply(self, merge: Merge, at: float) -> Merge:
        source_id = self._by_external.get(merge.merged)
        target_id = self._by_external.get(merge.kept)
        if source_id is None or target_id is None or source_id == target_id:
            done = dataclasses.replace(merge, applied_at=at, ok=False)
            self._merges.append(done)
            return done
        source, target = self._profiles[source_id], self._profiles[target_id]
        for name, value in source.attributes.items():
            if name not in target.attributes:
                target.attributes[name] = copy.deepcopy(value)
        del self._profiles[source_id]
        del self._by_external[merge.merged]
        target.updated_at = max(target.updated_at, at)
        done = dataclasses.replace(merge, applied_at=at)
        self._merges.append(done)
        return done

    def _delete(self, body: dict[str, Any]) -> tuple[int, Any]:
        kinds = [k for k in ("external_ids", "user_aliases", "braze_ids") if k in body]
        if len(kinds) != 1:
            raise ApiError(400, "one of external_ids, user_aliases or braze_ids is required")
        ids = body[kinds[0]]
        if not isinstance(ids, list):
            raise ApiError(400, f"'{kinds[0]}' must be an array")
        if len(ids) > MAX_IDS:
            raise ApiError(400, "The max number of ids per request was exceeded")
        deleted = 0
        for value in ids:
            if kinds[0] == "external_ids" and isinstance(value, str) and self.delete(value):
                deleted += 1
            elif kinds[0] == "braze_ids" and self._profiles.pop(str(value), None) is not None:
                self._by_external = {k: v for k, v in self._by_external.items() if v != str(value)}
                deleted += 1
        return 201, {"deleted": deleted, "message": "success"}

    # ---- /v2/subscription/status/set -------------------------------------------------------------

    def _status_set(self, body: dict[str, Any], at: float) -> tuple[int, Any]:
        entries = body.get("subscription_groups")
        if not isinstance(entries, list) or not entries:
            raise ApiError(400, "'subscription_groups' must be a non-empty array of objects")
        plan: list[tuple[str, str, list[Profile]]] = []
        users: set[tuple[str, str]] = set()  # the distinct users the request names
        for entry in entries:
            if not isinstance(entry, dict):
                raise ApiError(400, "'subscription_groups' must be an array of objects")
            group, state = entry.get("subscription_group_id"), entry.get("subscription_state")
            if not isinstance(group, str) or not group:
                raise ApiError(400, "'subscription_group_id' is required")
            if state not in GROUP_STATES:
                raise ApiError(400, "'subscription_state' must be subscribed or unsubscribed")
            if self.subscription_groups is not None and group not in self.subscription_groups:
                raise ApiError(400, "Invalid subscription group id")
            if "emails" in entry and "phones" in entry:
                raise ApiError(400, "'emails' and 'phones' cannot both be given")
            given = [k for k in ("external_ids", "emails", "phones") if k in entry]
            if not given:
                raise ApiError(400, "one of external_ids, emails or phones is required")
            targets: list[Profile] = []
            for kind in given:
                values = entry[kind]
                if isinstance(values, str) and kind != "external_ids":
                    values = [values]
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                    raise ApiError(400, f"'{kind}' must be an array of strings")
                if len(values) > MAX_IDS:
                    raise ApiError(
                        400, "The max number of external_ids and aliases per request was exceeded"
                    )
                targets += self._targets(kind, values)
            plan.append((group, state, targets))
            users.update((kind, v) for kind in given for v in _listed(entry[kind]))
        if len(users) > MAX_IDS:
            # "batch update the subscription state of up to 50 users": the request as a
            # whole, whatever the number of group entries
            raise ApiError(
                400, "The max number of external_ids and aliases per request was exceeded"
            )
        for group, state, targets in plan:
            for profile in targets:
                self._set_group(profile, group, state, at, "/v2/subscription/status/set")
                profile.updated_at = at
        return 201, {"message": "success"}

    def _targets(self, kind: str, values: list[str]) -> list[Profile]:
        found: list[Profile] = []
        for value in values:
            if kind == "external_ids":
                braze_id = self._by_external.get(value)
                found += [] if braze_id is None else [self._profiles[braze_id]]
            else:
                name = "email" if kind == "emails" else "phone"
                found += [
                    p
                    for p in self._profiles.values()
                    if (
                        _email_key(p.attributes.get(name)) == _email_key(value)
                        if name == "email"
                        else p.attributes.get(name) == value
                    )
                ]
        return found


class _Injected(ApiError):
    """A scripted failure answering a body given by the test."""

    def __init__(self, status: int, body: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(status, "injected", headers=headers)
        self.injected = body

    def body(self) -> Any:
        return self.injected


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _identifier_kind(value: Any) -> str | None:
    if not isinstance(value, dict) or len(value) != 1:
        return None
    if isinstance(value.get("external_id"), str):
        return "external_id"
    if isinstance(value.get("user_alias"), dict):
        return "user_alias"
    return None


# ---- process mode ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.braze", description="A local fake of Braze's REST API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--no-rate-limits", action="store_true")
    parser.add_argument("--objects-per-request", type=int, default=OBJECTS_PER_REQUEST)
    parser.add_argument("--merge-delay", type=float, default=1.0, help="seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        fake = BrazeFake(
            args.api_key,
            rate_limits=not args.no_rate_limits,
            objects_per_request=args.objects_per_request,
            merge_delay=args.merge_delay,
        )
    except ValueError as exc:
        parser.error(str(exc))
    sock = bind_socket(args.host, args.port)
    return serve_until_signalled(make_server(fake.app, quiet=False), sock)


if __name__ == "__main__":
    sys.exit(main())
