"""The ``klaviyo`` destination: Klaviyo's JSON:API (revision pinned, default 2026-07-15).

- **upsert**: ``POST /api/profile-import``, one profile per call. Keyed by the mapping's
  Treez-derived ``external_id`` (and email / phone) until Klaviyo's profile id is known, then
  by that id, and ``external_id`` is never sent again: two dispensaries of one operator that
  share an account update one profile without re-keying it back and forth. The adapter adds
  ``properties.treez_id_<dispensary>`` (the Treez customer id), so a profile shared by two
  stores holds both ids. Consent never travels with an upsert (``subscriptions`` are dropped).
- **409 duplicate_profile** (the e-mail and the phone belong to different profiles, or the
  profile found by e-mail or phone carries another ``external_id``), never dead-lettered:
  with our profile id known, ours is updated without the e-mail or phone the other profile
  holds (read back from Klaviyo), which is never written. Without it, the profile the 409
  names is read: one that the identity map (resolved through Treez merges) or its own
  ``treez_id_<dispensary>`` links to **another customer of this dispensary** is another
  person's and is never written; this customer gets a profile of its own, keyed by its
  ``external_id``, without the colliding identifiers. Any other profile (no customer of this
  dispensary: another store of the account, another integration) is the same person found
  by e-mail or phone: it is updated without moving its identifiers and recorded as the
  contact (one profile per person across the stores of an account). Either way the
  collision is reported as a conflict, once: identifiers withheld from our profile are
  named in the conflict's detail by a keyed digest (never the value), read back from the
  conflicts table, and left out of every later upsert until they change.
- **unsubscribe**: ``POST /api/profile-subscription-bulk-delete-jobs`` (up to 100 profiles a
  call), e-mail and SMS marketing. **subscribe** (only under ``resubscribe:
  on_source_opt_in``): ``POST /api/profile-subscription-bulk-create-jobs``; Klaviyo's bulk
  subscribe removes suppressions, which is why the planner never plans it for an opted-out
  customer. The jobs address profiles by e-mail and phone, so each goes by what our own
  profile holds (read with ``GET /api/profiles/{id}``), never by the mapped identifiers a 409
  gave to someone else; a profile holding neither is reported (``no_identifier``).
- **merge**: ``POST /api/profile-merge`` (the absorbed profile into the survivor's).
- **deactivate**: no Klaviyo equivalent; the profile gets ``properties.treez_status``.
- **a gone profile** (404: merged away, deleted by a marketer or a data-privacy request):
  an upsert imports by the mapped identifiers again, which finds or makes the profile (a
  409 resolved as above). **No other operation ever makes a profile**: a deactivation or a
  consent change looks the customer's profile up by external id, e-mail and phone
  (``GET /api/profiles?filter=``, a read; ``profile-import`` and the subscription jobs
  make a profile when none matches), skips one that is another customer's of this store
  (as above), returns the one found with ``Sent.replaces`` naming the gone id, and when
  none exists marks nothing and reports ``unknown_contact`` (a consent change for a
  profile not made yet waits for its upsert instead). A merge whose absorbed profile is
  gone has nothing to merge; one whose survivor is gone is retried (the survivor's next
  update finds its profile again). A consent change of a customer Treez merged away goes to
  its own profile while that lives on (its merge not landed), and nowhere once it is gone
  (or was never made).
- **backfill**: ``POST /api/profile-bulk-import-jobs`` (10,000 profiles, 5 MB a job), then
  the job is polled until it completes.

Every endpoint is paced to Klaviyo's documented limits (profile-import 75/s and 700/min,
profile-merge 10/s and 150/min, the others treated like profile-import), and a 429's
``Retry-After`` goes back to the worker, which never retries earlier.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any, Literal
from urllib.parse import urlencode

import httpx
from pydantic import Field, HttpUrl, SecretStr, field_validator

from connector.config_base import DestinationConfig, Rate, secret_set
from connector.delivery._http import identifier, json_body, safe_text
from connector.delivery.base import Capabilities, Delivery, DestinationType, Result, Sent
from connector.destinations._probe import Probe
from connector.destinations._vendor import (
    VendorClient,
    account_digest,
    account_limiters,
    host_of,
)
from connector.destinations._vendor import json_object as _json
from connector.errors import DeliveryError, FatalDelivery, RetriableDelivery

IMPORT_LIMITS = (Rate(75, 1.0), Rate(700, 60.0))
MERGE_LIMITS = (Rate(10, 1.0), Rate(150, 60.0))
JOB_LIMITS = (Rate(10, 1.0), Rate(150, 60.0))  # bulk import jobs and their status (the spec)
SUBSCRIPTION_BATCH = 100  # profiles per subscription job
MAX_JOB_BYTES = 5 * 1024 * 1024
CONSENT_KEYS = ("subscriptions",)  # never sent with an upsert
IDENTIFIERS = ("email", "phone_number", "external_id")
MARKETABLE = ("email", "phone_number")  # what the subscription jobs address a profile by
DUPLICATE = "duplicate_profile"
# the identifiers a duplicate_profile conflict withheld, as keyed digests: "email:0123abcd..."
WITHHELD = re.compile(r"\bwithheld((?: (?:email|phone_number):[0-9a-f]{16})+)")
# the identity map's answers, bound by the worker: (contact id, conflict kind) -> the
# customers of this dispensary linked to that contact, and (customer, detail) of the
# conflicts of that kind (see Store.contact_claims)
Claims = Callable[[str | None, str | None], Awaitable[tuple[list[str], list[tuple[str, str]]]]]
# whether Treez merged a customer away (Store.merged_away), bound by the worker
MergedAway = Callable[[str], Awaitable[bool]]
JSONAPI = "application/vnd.api+json"


def describe_errors(data: Any) -> str:
    """``code: title (at pointer)`` of each JSON:API error object (``detail`` is left out:
    Klaviyo's details can quote the e-mail or phone that was sent)."""
    if not isinstance(data, dict) or not isinstance(data.get("errors"), list):
        return ""
    parts = []
    for error in data["errors"][:3]:
        if not isinstance(error, dict):
            continue
        code = identifier(error.get("code")) or "error"
        text = f"{code}: {safe_text(error.get('title'))}".strip()
        source = error.get("source")
        pointer = source.get("pointer") if isinstance(source, dict) else None
        if pointer:
            text += f" (at {pointer})"
        parts.append(text)
    return "; ".join(parts)


def duplicate_profile_id(response: httpx.Response) -> str | None:
    """``meta.duplicate_profile_id`` of a 409 ``duplicate_profile`` answer."""
    try:
        data = response.json()
    except ValueError:
        return None
    for error in data.get("errors", []) if isinstance(data, dict) else []:
        if isinstance(error, dict) and error.get("code") == "duplicate_profile":
            meta = error.get("meta")
            found = meta.get("duplicate_profile_id") if isinstance(meta, dict) else None
            if isinstance(found, str) and found:
                return found
    return None


KLAVIYO_REVISION = "2026-07-15"  # the revision of vendor-specs/klaviyo/profiles.openapi.json
_FIRST_KLAVIYO_REVISION = date(2023, 2, 22)  # Klaviyo's first stable revision


class KlaviyoDestination(DestinationConfig):
    """Klaviyo: profile-import upserts, bulk subscription jobs for consent, profile-merge,
    bulk import jobs for backfills; each endpoint paced to its documented limits."""

    type: Literal["klaviyo"]
    api_key: SecretStr
    revision: str = KLAVIYO_REVISION
    base_url: HttpUrl = HttpUrl("https://a.klaviyo.com")
    list_id: str | None = None  # a list a resubscribed profile joins (policy on_source_opt_in)
    pace: bool = True  # per-endpoint pacing from Klaviyo's documented limits
    bulk_size: int = Field(default=10_000, ge=1, le=10_000)
    job_poll_seconds: float = Field(default=2.0, gt=0, le=600)
    job_timeout_seconds: float = Field(default=1800.0, gt=0, le=86_400)
    timeout_seconds: float = Field(default=15.0, gt=0, le=300)

    _key = field_validator("api_key")(secret_set)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a revision date (YYYY-MM-DD, such as {KLAVIYO_REVISION})"
            ) from None
        if len(value) != 10 or day < _FIRST_KLAVIYO_REVISION or day > date.today():
            raise ValueError(
                f"{value!r} is not a Klaviyo API revision (between "
                f"{_FIRST_KLAVIYO_REVISION} and today; this connector is built and tested "
                f"against {KLAVIYO_REVISION})"
            )
        return value


class KlaviyoSink:
    kind = "klaviyo"

    def __init__(
        self,
        config: KlaviyoDestination,
        client: httpx.AsyncClient | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.name = config.name
        self.config = config
        self.capabilities = self.capabilities_for(config)
        self.rate_limit: tuple[Rate, ...] = config.rate_limit  # the worker's; off by default
        limits = (
            {
                "import": IMPORT_LIMITS,
                "merge": MERGE_LIMITS,
                "subscriptions": IMPORT_LIMITS,
                "bulk": JOB_LIMITS,
                "jobs": JOB_LIMITS,
                "profiles": IMPORT_LIMITS,
            }
            if config.pace
            else {}
        )
        # Klaviyo counts its limits per account: every sink of one private key (several
        # stores of an operator) shares them, so together they keep to the limits
        account = account_digest(config.api_key.get_secret_value())
        self.api = VendorClient(
            str(config.base_url),
            {
                "authorization": f"Klaviyo-API-Key {config.api_key.get_secret_value()}",
                "revision": config.revision,
                "accept": JSONAPI,
                "content-type": JSONAPI,
            },
            timeout=config.timeout_seconds,
            limits=limits,
            describe=describe_errors,
            client=client,
            clock=clock,
            max_connections=config.concurrency,
            shared=account_limiters("klaviyo", account, limits, clock),
            public=("revision",),
        )
        self.blank = self.api.blank  # the worker blanks what it keeps with it too
        self._sleep = sleep
        self._claims: Claims | None = None
        self._merged: MergedAway | None = None
        self._withheld: dict[str, set[str]] | None = None  # customer -> marks, once read
        self._withheld_lock = asyncio.Lock()
        secret = config.api_key.get_secret_value().encode()
        self._digest_key = hashlib.sha256(b"treez-connector withheld\0" + secret).digest()

    @staticmethod
    def capabilities_for(config: KlaviyoDestination) -> Capabilities:
        return Capabilities(
            coalesce_upserts=True,  # a profile keeps state: only the newest upsert matters
            batch_size=config.batch_size,
            native_merge=True,
            channels=("email", "sms"),
            matches_on=("id", "email", "phone_number", "external_id"),
            consent_needs_fields=True,
            bulk_size=config.bulk_size,
            can_lookup=True,
            default_rate_limit=IMPORT_LIMITS,
        )

    def __repr__(self) -> str:
        return f"KlaviyoSink(name={self.name!r})"  # never the key

    @property
    def batch_size(self) -> int:
        return self.capabilities.batch_size

    # --- the port ---------------------------------------------------------------------------

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        results: list[Result | None] = [None] * len(deliveries)
        consent: dict[str, list[int]] = {"unsubscribe": [], "subscribe": []}
        for index, delivery in enumerate(deliveries):
            op = delivery.op
            if op in consent:
                consent[op].append(index)
                continue
            try:
                if op == "upsert":
                    results[index] = await self.upsert(delivery)
                elif op == "merge":
                    results[index] = await self.merge(delivery)
                elif op == "deactivate":
                    results[index] = await self.deactivate(delivery)
                else:
                    results[index] = FatalDelivery(f"unknown operation {op!r}")
            except DeliveryError as exc:
                results[index] = exc
        for op, indexes in consent.items():
            for start in range(0, len(indexes), SUBSCRIPTION_BATCH):
                part = indexes[start : start + SUBSCRIPTION_BATCH]
                try:
                    done = await self.set_consent([deliveries[i] for i in part], op)
                except DeliveryError as exc:
                    done = [exc] * len(part)
                for i, result in zip(part, done, strict=True):
                    results[i] = result
        return [r if r is not None else Sent() for r in results]

    async def lookup(self, contact_id: str) -> dict[str, Any] | None:
        response = await self.api.request(
            "GET", f"/api/profiles/{contact_id}", "profiles", ok_statuses=frozenset({404})
        )
        if response.status_code == 404:
            return None
        data = response.json().get("data")
        return data if isinstance(data, dict) else None

    async def probe(self) -> Probe:
        """The account of the key (``GET /api/accounts/``, scope ``accounts:read``): no
        profile is read or written."""
        return await self.api.probe("/api/accounts/")

    async def aclose(self) -> None:
        await self.api.aclose()

    # --- operations -----------------------------------------------------------------------

    def _attributes(self, delivery: Delivery, *, keyed: bool) -> dict[str, Any]:
        attributes = {k: v for k, v in delivery.fields.items() if k not in CONSENT_KEYS}
        if keyed:  # the profile id is known: never re-key it
            attributes.pop("external_id", None)
        properties = dict(attributes.get("properties") or {})
        properties[_treez_key(delivery)] = delivery.customer_id
        attributes["properties"] = properties
        return attributes

    async def upsert(self, delivery: Delivery) -> Result:
        contact_id = delivery.contact_id
        attributes = self._attributes(delivery, keyed=contact_id is not None)
        self._withhold(attributes, await self._remembered(delivery.customer_id))
        if contact_id is None:
            result, _ = await self._import(delivery, attributes)
            return result
        data = {"type": "profile", "id": contact_id, "attributes": attributes}
        response = await self._post_profile(data, 409, 404)
        if response.status_code == 404:
            # the profile we hold is gone (merged by another store of the account, or by a
            # marketer): import by the identifiers again and record the profile that answers
            attributes = self._attributes(delivery, keyed=False)
            self._withhold(attributes, await self._remembered(delivery.customer_id))
            result, _ = await self._import(delivery, attributes)
            return _replacing(result, contact_id, "its update")
        if response.status_code == 409:
            return await self._onto_own(delivery, response, contact_id, attributes)
        return Sent(_profile_id(response) or contact_id)

    async def _post_profile(self, data: dict[str, Any], *handled: int) -> httpx.Response:
        """``POST /api/profile-import`` of one profile; ``handled``: the statuses the caller
        reads itself (a 404, a 409) instead of a raised delivery error."""
        return await self.api.request(
            "POST",
            "/api/profile-import",
            "import",
            body={"data": data},
            ok_statuses=frozenset(handled),
        )

    async def _import(
        self, delivery: Delivery, attributes: dict[str, Any]
    ) -> tuple[Result, dict[str, Any]]:
        """Create or find this customer's profile by its identifiers (no profile id known);
        the result and the attributes of the profile it ended on."""
        if not any(_text(attributes.get(name)) for name in IDENTIFIERS):
            # all it could be keyed by was withheld (reported when it was): nothing to send
            return Sent(None), {}
        data = {"type": "profile", "attributes": attributes}
        response = await self._post_profile(data, 409)
        if response.status_code == 409:
            return await self._onto_duplicate(delivery, response, attributes)
        found = _profile_id(response)
        if found is not None and await self._claimed_by_another(delivery, found):
            # matched by e-mail or phone with no 409 (a sign-up profile recorded for a
            # store-mate before its external_id was set): written already, but never recorded
            # for this customer; our external_id is taken off it again (it held none, or
            # Klaviyo would have answered 409) and this customer gets a profile of its own
            matched = _json(response).get("data")
            sent = _text(attributes.get("external_id"))
            if sent and _held(response).get("external_id") == sent:
                unkey: dict[str, Any] = {
                    "type": "profile",
                    "id": found,
                    "attributes": {"external_id": None},
                }
                await self._post_profile(unkey)
            return await self._own_instead(delivery, found, matched, attributes)
        return Sent(found), _held(response)

    async def _onto_duplicate(
        self, delivery: Delivery, response: httpx.Response, attributes: dict[str, Any]
    ) -> tuple[Result, dict[str, Any]]:
        """A 409 duplicate_profile for a customer whose profile is not known yet.

        A profile the identity map (or the profile's own ``treez_id_<dispensary>``) links to
        another customer of this dispensary is another person: it is never written; this
        customer gets a profile of its own, keyed by its external id, without the identifiers
        that collide (remembered, so they are not sent again until they change). Any other
        profile is the same person found by e-mail or phone (another store of the account,
        another integration): it is updated without moving its identifiers, as one profile
        per person across the stores of an account."""
        duplicate = duplicate_profile_id(response)
        if duplicate is None:
            return self._refused_409(response), {}
        profile = await self.lookup(duplicate)
        if profile is None:
            return RetriableDelivery(
                f"duplicate_profile: profile {duplicate} named by the 409 is gone; trying again"
            ), {}
        if not await self._another_customers(delivery, duplicate, profile):
            kept = {k: v for k, v in attributes.items() if k not in IDENTIFIERS}
            external_id = _text(attributes.get("external_id"))
            if external_id and not _text((profile.get("attributes") or {}).get("external_id")):
                # a profile no one keyed (a sign-up form): keyed now by this customer, so a
                # store-mate's import by the same e-mail or phone is a 409, never a match
                kept["external_id"] = external_id
            retry = {"type": "profile", "id": duplicate, "attributes": kept}
            again = await self._post_profile(retry)
            detail = (
                "Klaviyo matched this customer's identifiers to more than one profile; "
                f"profile {duplicate} was updated without moving e-mail, phone or external_id"
            )
            return Sent(_profile_id(again) or duplicate, f"{DUPLICATE}: {detail}"), _held(again)
        return await self._own_instead(delivery, duplicate, profile, attributes)

    async def _own_instead(
        self,
        delivery: Delivery,
        duplicate: str,
        profile: dict[str, Any] | None,
        attributes: dict[str, Any],
    ) -> tuple[Result, dict[str, Any]]:
        """This customer's own profile, keyed by its external id without the identifiers
        it shares with ``duplicate`` (another customer's of this store), which is never
        written for it; the identifiers withheld are reported once and remembered."""
        colliding = _colliding(attributes, profile)
        own = {k: v for k, v in attributes.items() if k not in colliding}
        answer = await self._import_own(own)
        if answer is not None and answer.status_code == 409:
            # what was left collides with a third profile: keyed by the external id alone
            colliding = [name for name in MARKETABLE if _text(attributes.get(name))]
            own = {k: v for k, v in attributes.items() if k not in colliding}
            answer = await self._import_own(own)
            if answer is not None and answer.status_code == 409:
                return self._refused_409(answer), {}
        contact = None if answer is None else _profile_id(answer)
        made = (
            "a profile of its own was made without them"
            if contact
            else "no profile made: it has nothing else to be keyed by"
        )
        detail = (
            f"this customer's {_names(colliding)} belong to profile {duplicate}, another "
            f"customer's of this store; {made}"
        )
        marks = self._marks(attributes, colliding)
        conflict = await self._report(delivery.customer_id, marks, detail)
        return Sent(contact, conflict), ({} if answer is None else _held(answer))

    async def _import_own(self, attributes: dict[str, Any]) -> httpx.Response | None:
        if not any(_text(attributes.get(name)) for name in IDENTIFIERS):
            return None
        return await self._post_profile({"type": "profile", "attributes": attributes}, 409)

    async def _onto_own(
        self,
        delivery: Delivery,
        response: httpx.Response,
        contact_id: str,
        attributes: dict[str, Any],
    ) -> Result:
        """A 409 for our own profile: its new e-mail or phone belongs to another profile.
        Ours is updated without them (the other person's profile is never written to), and
        they are remembered so that they are not sent again until they change."""
        duplicate = duplicate_profile_id(response)
        if duplicate is None or duplicate == contact_id:
            return self._refused_409(response)
        colliding = _colliding(attributes, await self.lookup(duplicate))
        kept = {k: v for k, v in attributes.items() if k not in colliding}
        retry = {"type": "profile", "id": contact_id, "attributes": kept}
        again = await self._post_profile(retry, 409)
        if again.status_code == 409:
            colliding = [name for name in MARKETABLE if _text(attributes.get(name))]
            kept = {k: v for k, v in attributes.items() if k not in colliding}
            retry["attributes"] = kept
            again = await self._post_profile(retry)
        detail = (
            f"profile {contact_id}'s new {_names(colliding)} belong to profile {duplicate}; "
            "updated without them"
        )
        conflict = await self._report(
            delivery.customer_id, self._marks(attributes, colliding), detail
        )
        return Sent(_profile_id(again) or contact_id, conflict)

    def _refused_409(self, response: httpx.Response) -> FatalDelivery:
        error = FatalDelivery(
            f"HTTP 409 from {self.api.host}: {describe_errors(_json(response))}",
            status_code=409,
            body=self.api.kept(response),
        )
        return self.api.blank.error(error)

    async def _claimed_by_another(self, delivery: Delivery, profile_id: str) -> bool:
        """Whether the identity map links the profile to another customer of this
        dispensary (followed through Treez merges)."""
        if self._claims is None:
            return False
        owners, _ = await self._claims(profile_id, None)
        return any(owner != delivery.customer_id for owner in owners)

    async def _another_customers(
        self, delivery: Delivery, profile_id: str, profile: dict[str, Any]
    ) -> bool:
        """Whether the profile is linked to another customer of this dispensary: by the
        identity map, or by its ``treez_id_<dispensary>`` (a profile a bulk job created,
        whose id the map never got)."""
        mine = delivery.customer_id
        if await self._claimed_by_another(delivery, profile_id):
            return True
        properties = (profile.get("attributes") or {}).get("properties")
        named = properties.get(_treez_key(delivery)) if isinstance(properties, dict) else None
        return named is not None and str(named) != mine

    # --- identifiers withheld after a 409 -------------------------------------------------

    def bind_identity_map(self, claims: Claims) -> None:
        """Give the adapter the identity map's answers (the worker does, for its dispensary):
        who owns a profile, and the conflicts reported before (identifiers withheld)."""
        self._claims = claims
        self._withheld = None

    def bind_merges(self, merged_away: MergedAway) -> None:
        """Whether Treez merged a customer away (the worker binds it): a consent change of
        such a customer whose own profile is gone or was never made goes nowhere else (see
        :meth:`_consent_target`)."""
        self._merged = merged_away

    def _digest(self, name: str, value: str) -> str:
        """A keyed digest of an identifier: the conflicts table remembers which ones were
        withheld without holding them (a bare hash of a phone number is easily reversed)."""
        text = value.strip().lower() if name == "email" else value.strip()
        message = f"{name}\0{text}".encode()
        return hmac.new(self._digest_key, message, hashlib.sha256).hexdigest()[:16]

    def _marks(self, attributes: dict[str, Any], names: list[str]) -> set[str]:
        return {
            f"{name}:{self._digest(name, attributes[name])}"
            for name in names
            if isinstance(attributes.get(name), str)
        }

    async def _remembered(self, customer_id: str, *, fresh: bool = False) -> set[str]:
        """The identifiers of a customer withheld after a 409 (as marks), read from the
        conflicts reported before: once per process, and again before reporting one."""
        async with self._withheld_lock:
            if self._withheld is None or fresh:
                memory = self._withheld or {}
                rows = [] if self._claims is None else (await self._claims(None, DUPLICATE))[1]
                for customer, detail in rows:
                    found = WITHHELD.search(detail)
                    if found:
                        memory.setdefault(customer, set()).update(found.group(1).split())
                self._withheld = memory
            return set(self._withheld.get(customer_id, ()))

    def _withhold(self, attributes: dict[str, Any], remembered: set[str]) -> None:
        for name in MARKETABLE:
            value = attributes.get(name)
            if isinstance(value, str) and f"{name}:{self._digest(name, value)}" in remembered:
                del attributes[name]

    async def _report(self, customer_id: str, marks: set[str], detail: str) -> str | None:
        """The conflict to report for identifiers withheld, once: not again when another
        process reported the same ones already."""
        if marks and marks <= await self._remembered(customer_id, fresh=True):
            return None
        if self._withheld is not None:
            self._withheld.setdefault(customer_id, set()).update(marks)
        suffix = f"; withheld {' '.join(sorted(marks))}" if marks else ""
        return f"{DUPLICATE}: {detail}{suffix}"

    # --- consent --------------------------------------------------------------------------

    async def set_consent(self, deliveries: list[Delivery], op: str) -> list[Result]:
        """Unsubscribe (or subscribe) e-mail and SMS marketing, in one job call. Each is
        addressed by the e-mail and phone its own profile holds (read back from Klaviyo):
        the jobs take identifiers, not ids, and an identifier a 409 gave to another profile
        would reach another person."""
        consent = "UNSUBSCRIBED" if op == "unsubscribe" else "SUBSCRIBED"
        profiles: list[dict[str, Any]] = []
        results: list[Result] = []
        for delivery in deliveries:
            try:
                result, email, phone = await self._consent_target(delivery)
            except DeliveryError as exc:
                result, email, phone = exc, None, None
            if isinstance(result, Sent) and result.contact_id and not (email or phone):
                detail = (
                    f"profile {result.contact_id} holds no e-mail and no phone: Klaviyo cannot "
                    f"market to it, so there is nothing to {op}"
                )
                result = Sent(
                    result.contact_id,
                    result.conflict or f"no_identifier: {detail}",
                    result.replaces,
                )
            results.append(result)
            channels = set(delivery.body.get("channels") or ("email", "sms"))
            subscriptions: dict[str, Any] = {}
            attributes: dict[str, Any] = {}
            if email and "email" in channels:
                attributes["email"] = email
                subscriptions["email"] = {"marketing": {"consent": consent}}
            if phone and "sms" in channels:
                attributes["phone_number"] = phone
                subscriptions["sms"] = {"marketing": {"consent": consent}}
            if subscriptions and isinstance(result, Sent):
                attributes["subscriptions"] = subscriptions
                profiles.append({"type": "profile", "attributes": attributes})
        if not profiles:
            return results
        kind = f"profile-subscription-bulk-{'delete' if op == 'unsubscribe' else 'create'}-job"
        data: dict[str, Any] = {"type": kind, "attributes": {"profiles": {"data": profiles}}}
        if op == "subscribe" and self.config.list_id:
            data["relationships"] = {"list": {"data": {"type": "list", "id": self.config.list_id}}}
        path = f"/api/{kind}s"
        await self.api.request("POST", path, "subscriptions", body={"data": data})
        return results

    async def _consent_target(self, delivery: Delivery) -> tuple[Result, str | None, str | None]:
        """The profile a consent change goes to, and the e-mail and phone it holds: our
        profile when its id is known and it exists; else (never reached Klaviyo, or gone) the
        profile found by the mapped identifiers that is not another customer's. None is ever
        made: the job then goes nowhere (the profile is gone) or waits (not made yet)."""
        contact_id = delivery.contact_id
        if contact_id is not None:
            found = await self.lookup(contact_id)
            if found is not None:
                held = found.get("attributes") or {}
                email, phone = _text(held.get("email")), _text(held.get("phone_number"))
                if not await self._claimed_by_another(delivery, contact_id):
                    return Sent(contact_id), email, phone
                if delivery.op == "subscribe":
                    return Sent(contact_id, _shared(contact_id, "not subscribed")), None, None
                # an opt-out is never dropped: unsubscribing a store-mate too costs marketing,
                # leaving this customer's e-mail or phone subscribed would not be lawful
                detail = _shared(contact_id, "unsubscribed all the same")
                return Sent(contact_id, detail), email, phone
        if self._merged is not None and await self._merged(delivery.customer_id):
            # Treez merged this customer away and its own profile is gone (merged into the
            # survivor's, which is owed its own unsubscribe) or was never made: finding one
            # by the mapped identifiers could make a profile no merge would ever absorb
            return Sent(None), None, None
        identifiers = await self._identifiers(delivery)
        # never made by a consent change: Klaviyo's subscription jobs make a profile for
        # identifiers no profile holds, and one someone deleted (maybe for a data-privacy
        # request) would come back holding the e-mail and phone
        searched = await self._find(delivery, identifiers) if identifiers else None
        if searched is None:
            if contact_id is None:
                # an opt-out owed to a customer whose profile is not made yet (its upsert is
                # queued, retrying or dead-lettered: a customer's operations go in order):
                # wait for it, never drop the opt-out
                why = (
                    "is not made yet (its upsert has not been delivered)"
                    if identifiers
                    else "is not known yet (its upsert has not been delivered) and this "
                    "operation carries nothing to find it by"
                )
                return (
                    RetriableDelivery(
                        f"{delivery.op}: the customer's Klaviyo profile {why}; trying again"
                    ),
                    None,
                    None,
                )
            if not identifiers:
                return (
                    FatalDelivery(
                        f"profile {contact_id} is gone and this operation carries no e-mail, "
                        "phone or external id to find it again; replay it after the "
                        "customer's next update"
                    ),
                    None,
                    None,
                )
            # gone, and nothing of this customer's left to market to (reported); the
            # customer's next upsert makes a profile that was never subscribed
            return _replacing(Sent(None), contact_id, "the consent change"), None, None
        again, profile = searched
        result: Result = Sent(again)
        if contact_id is not None:
            result = _replacing(result, contact_id, "the consent change")
        email, phone = _text(profile.get("email")), _text(profile.get("phone_number"))
        if delivery.op == "subscribe":
            # found by one identifier (a household's phone), the profile may hold another
            # person's e-mail: a subscribe goes only to what this customer's own mapped
            # identifiers say (an opt-out goes to all it holds: the safe side)
            mapped_email = _text(identifiers.get("email"))
            if email is None or mapped_email is None or email.casefold() != mapped_email.casefold():
                email = None
            if phone != _text(identifiers.get("phone_number")):
                phone = None
        return result, email, phone

    async def _identifiers(self, delivery: Delivery) -> dict[str, str]:
        """The mapped identifiers of the operation, less those withheld after a 409 (they
        belong to another customer's profile)."""
        fields = delivery.fields
        found: dict[str, Any] = {n: fields[n] for n in IDENTIFIERS if _text(fields.get(n))}
        self._withhold(found, await self._remembered(delivery.customer_id))
        return found

    async def _find(
        self, delivery: Delivery, identifiers: dict[str, str]
    ) -> tuple[str, dict[str, Any]] | None:
        """This customer's profile found by ``identifiers``, read with ``GET /api/profiles``
        and never made: its id and attributes, or None when none of this customer's exists.
        A profile the identity map (or its own ``treez_id_<dispensary>``) links to another
        customer of this store is another person's, never this customer's.
        ``profile-import`` is no way to look: it makes the profile when none matches, and an
        operation other than an upsert must never make one (a deactivation or an opt-out
        would bring back a profile someone deleted, maybe for a data-privacy request)."""
        seen: set[str] = set()
        # the external id first: it is this customer's own key, the others may be shared
        for name in ("external_id", "email", "phone_number"):
            value = identifiers.get(name)
            if not isinstance(value, str):
                continue
            for profile in await self._search(name, value):
                found = profile.get("id")
                if not isinstance(found, str) or not found or found in seen:
                    continue
                seen.add(found)
                if not await self._another_customers(delivery, found, profile):
                    held = profile.get("attributes")
                    return found, held if isinstance(held, dict) else {}
        return None

    async def _search(self, name: str, value: str) -> list[dict[str, Any]]:
        """The profiles holding ``value`` as ``name`` (``GET /api/profiles?filter=``), a
        read that makes nothing."""
        # Klaviyo's filters quote text in double or single quotes and document no escape:
        # a value is quoted in the kind it does not hold; one holding both, or a backslash
        # (whose meaning there is not documented), cannot be looked up, which is no proof
        # that no profile holds it: the operation fails, to the dead letters, not done
        quote = '"' if '"' not in value else "'"
        if quote in value or "\\" in value:
            raise FatalDelivery(
                f"the customer's {name} holds quotes or a backslash that Klaviyo's filter "
                "syntax cannot carry: the profile cannot be looked up"
            )
        query = urlencode({"filter": f"equals({name},{quote}{value}{quote})", "page[size]": "10"})
        response = await self.api.request("GET", f"/api/profiles?{query}", "profiles")
        data = _json(response).get("data")
        return [p for p in data if isinstance(p, dict)] if isinstance(data, list) else []

    # --- merge and deactivate -------------------------------------------------------------

    async def merge(self, delivery: Delivery) -> Result:
        source = delivery.body.get("from_contact_id")
        target = delivery.body.get("into_contact_id")
        if source is None:  # the absorbed customer never reached Klaviyo: nothing to merge
            return Sent(None if target is None else str(target))
        if target is None:
            return RetriableDelivery(
                "merge: the survivor's Klaviyo profile is not known yet (its upsert has not "
                "been delivered); trying again"
            )
        if source == target:
            return Sent(str(target))
        data = {
            "type": "profile-merge",
            "id": str(target),
            "relationships": {"profiles": {"data": [{"type": "profile", "id": str(source)}]}},
        }
        response = await self.api.request(
            "POST",
            "/api/profile-merge",
            "merge",
            body={"data": data},
            ok_statuses=frozenset({404}),
        )
        if response.status_code != 404:
            return Sent(str(target))
        if await self.lookup(str(source)) is None:
            # merged away already (by another store of the account, by a marketer)
            return Sent(str(target))
        if await self.lookup(str(target)) is None:
            return RetriableDelivery(
                f"merge: the survivor's profile {target} is gone; trying again once the "
                "survivor's next update has found its profile again"
            )
        return RetriableDelivery("merge: Klaviyo answered 404 for profiles that exist")

    async def deactivate(self, delivery: Delivery) -> Result:
        contact_id = delivery.contact_id
        if contact_id is None:
            return Sent()  # never reached Klaviyo
        if await self._claimed_by_another(delivery, contact_id):
            return Sent(contact_id, _shared(contact_id, "not marked deactivated"))
        status = {"treez_status": "DEACTIVATED"}
        data = {"type": "profile", "id": contact_id, "attributes": {"properties": status}}
        response = await self._post_profile(data, 404)
        if response.status_code != 404:
            return Sent(contact_id)
        identifiers = await self._identifiers(delivery)
        if not identifiers:
            return Sent(
                None,
                f"unknown_contact: profile {contact_id} is gone and the deactivation carries "
                "nothing to find it again by; nothing was marked",
            )
        found = await self._find(delivery, identifiers)
        if found is None:
            # deleted (by a marketer, for a data-privacy request) and not made again: a
            # deactivation never brings a profile back, only the customer's next upsert does
            return Sent(
                None,
                f"unknown_contact: profile {contact_id} is gone and no profile of this "
                "customer's exists; nothing was marked",
            )
        again, _ = found
        properties = {_treez_key(delivery): delivery.customer_id, **status}
        data = {"type": "profile", "id": again, "attributes": {"properties": properties}}
        # by id: an update or a 404, never a create (deleted since it was found)
        if (await self._post_profile(data, 404)).status_code == 404:
            return Sent(
                None,
                f"unknown_contact: profile {contact_id} is gone, and so is profile {again} "
                "found by this customer's identifiers; nothing was marked",
            )
        return _replacing(Sent(again), contact_id, "the deactivation")

    # --- backfill -------------------------------------------------------------------------

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        """Upserts through bulk import jobs (at most ``bulk_size`` profiles and 5 MB each),
        each polled until it completes; other operations go through :meth:`send`."""
        results: list[Result | None] = [None] * len(deliveries)
        upserts = [i for i, d in enumerate(deliveries) if d.op == "upsert"]
        others = [i for i, d in enumerate(deliveries) if d.op != "upsert"]
        for index, result in zip(
            others, await self.send([deliveries[i] for i in others]), strict=True
        ):
            results[index] = result
        # one job at a time: each is complete before the next is created
        for job in self._jobs(deliveries, upserts):
            chunk = list(job)
            try:
                refused = await self._run_job([deliveries[i] for i in chunk], list(job.values()))
                outcome: list[Result] = [Sent(deliveries[i].contact_id) for i in chunk]
                if refused:
                    # what the job refused (a duplicate_profile, a bad field) goes through
                    # the real-time path, which resolves a 409 and reports the rest itself
                    again = await self.send([deliveries[chunk[n]] for n in sorted(refused)])
                    for n, result in zip(sorted(refused), again, strict=True):
                        outcome[n] = result
            except FatalDelivery:
                # the job was refused as a whole (one bad profile can do it): profile by
                # profile through the real-time path, so no profile is lost for another
                outcome = await self.send([deliveries[i] for i in chunk])
            except DeliveryError as exc:
                outcome = [exc] * len(chunk)
            for index, result in zip(chunk, outcome, strict=True):
                results[index] = result
        return [r if r is not None else Sent() for r in results]

    def bulk_profile(self, delivery: Delivery) -> dict[str, Any]:
        """The profile object a bulk import job carries for an upsert."""
        profile: dict[str, Any] = {
            "type": "profile",
            "attributes": self._attributes(delivery, keyed=delivery.contact_id is not None),
        }
        if delivery.contact_id is not None:
            profile["id"] = delivery.contact_id
        return profile

    def _jobs(self, deliveries: list[Delivery], indexes: list[int]) -> list[dict[int, bytes]]:
        """Split into jobs of at most ``bulk_size`` profiles and under 5 MB of body (counted
        as ASCII JSON); each profile encoded once, as the job's body carries it."""
        jobs: list[dict[int, bytes]] = []
        current: dict[int, bytes] = {}
        size = 0
        for index in indexes:
            profile = self.bulk_profile(deliveries[index])
            part = json_body(profile)
            # the length of the profile in ASCII JSON (non-ASCII text as \u escapes)
            length = (
                len(part) if part.isascii() else len(json.dumps(profile, separators=(",", ":")))
            )
            if current and (
                len(current) >= self.config.bulk_size or size + length > MAX_JOB_BYTES - 4096
            ):
                jobs.append(current)
                current, size = {}, 0
            current[index] = part
            size += length + 1
        if current:
            jobs.append(current)
        return jobs

    async def _run_job(
        self, deliveries: list[Delivery], parts: list[bytes]
    ) -> dict[int, DeliveryError]:
        """Run one bulk import job (its profiles encoded in ``parts``) to its end; the
        profiles it refused, by their index."""
        # the body json_body writes for {"data": {"type": ..., "attributes": {"profiles":
        # {"data": [profile, ...]}}}}, put together from the profiles' own encodings
        body = b"".join(
            (
                b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":[',
                b",".join(parts),
                b"]}}}}",
            )
        )
        response = await self.api.request(
            "POST", "/api/profile-bulk-import-jobs", "bulk", encoded=body
        )
        job_id = (_json(response).get("data") or {}).get("id")
        if not isinstance(job_id, str):
            raise FatalDelivery(f"bulk import: no job id in the answer of {self.api.host}")
        deadline = time.monotonic() + self.config.job_timeout_seconds
        while True:
            await self._sleep(self.config.job_poll_seconds)
            polled = await self.api.request(
                "GET", f"/api/profile-bulk-import-jobs/{job_id}", "jobs"
            )
            attributes = (_json(polled).get("data") or {}).get("attributes") or {}
            status = attributes.get("status")
            if status == "complete":
                if not attributes.get("failed_count"):
                    return {}
                return await self._import_errors(job_id, deliveries)
            if status in ("cancelled", "failed"):
                raise RetriableDelivery(f"bulk import job {job_id} ended {status}")
            if time.monotonic() > deadline:
                raise RetriableDelivery(
                    f"bulk import job {job_id} still {status} after "
                    f"{self.config.job_timeout_seconds:.0f} s"
                )

    async def _import_errors(
        self, job_id: str, deliveries: list[Delivery]
    ) -> dict[int, DeliveryError]:
        """A completed job's refused profiles, from its import-errors (all pages), matched to
        the job's profiles by the pointer's index, else by the original payload's external_id,
        e-mail or phone. Each is fatal (dead-lettered) with Klaviyo's code and title."""
        keys: dict[tuple[str, str], int] = {}
        for index, delivery in enumerate(deliveries):
            fields = delivery.fields
            for name in IDENTIFIERS:
                if isinstance(fields.get(name), str):
                    keys.setdefault((name, fields[name].lower()), index)
        refused: dict[int, DeliveryError] = {}
        path: str | None = f"/api/profile-bulk-import-jobs/{job_id}/import-errors?page[size]=100"
        while path:
            page = _json(await self.api.request("GET", path, "jobs"))
            for error in page.get("data") or []:
                attributes = error.get("attributes") if isinstance(error, dict) else None
                if not isinstance(attributes, dict):
                    continue
                at = _pointer_index(attributes.get("source"))
                if at is None:
                    original = attributes.get("original_payload") or {}
                    found = (original.get("attributes") or {}) if isinstance(original, dict) else {}
                    at = next(
                        (
                            keys[(n, found[n].lower())]
                            for n in IDENTIFIERS
                            if isinstance(found.get(n), str) and (n, found[n].lower()) in keys
                        ),
                        None,
                    )
                if at is not None and 0 <= at < len(deliveries):
                    what = describe_errors({"errors": [attributes]})
                    refused[at] = FatalDelivery(f"bulk import job {job_id} refused it: {what}")
            after = (page.get("links") or {}).get("next")
            path = str(httpx.URL(after).raw_path.decode()) if isinstance(after, str) else None
        return refused


def _pointer_index(source: Any) -> int | None:
    pointer = source.get("pointer") if isinstance(source, dict) else None
    found = re.search(r"/profiles/data/(\d+)", pointer) if isinstance(pointer, str) else None
    return int(found.group(1)) if found else None


def _profile_id(response: httpx.Response) -> str | None:
    found = (_json(response).get("data") or {}).get("id")
    return found if isinstance(found, str) and found else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _treez_key(delivery: Delivery) -> str:
    return f"treez_id_{delivery.body.get('dispensary')}"


def _held(response: httpx.Response) -> dict[str, Any]:
    """The attributes of the profile an answer names (its e-mail and phone)."""
    attributes = (_json(response).get("data") or {}).get("attributes")
    return attributes if isinstance(attributes, dict) else {}


def _colliding(attributes: dict[str, Any], profile: dict[str, Any] | None) -> list[str]:
    """Which of the e-mail and phone sent another profile holds (all that were sent when
    that profile cannot be read or holds none of them: the 409 said one of them does)."""
    held = (profile or {}).get("attributes") or {}
    sent = [name for name in MARKETABLE if _text(attributes.get(name))]
    same = [
        name
        for name in sent
        if isinstance(held.get(name), str)
        and _normal(name, held[name]) == _normal(name, attributes[name])
    ]
    return same or sent


def _normal(name: str, value: str) -> str:
    return value.strip().lower() if name == "email" else value.strip()


def _names(names: list[str]) -> str:
    words = {"email": "e-mail", "phone_number": "phone"}
    return " and ".join(words[name] for name in names) or "identifiers"


def _shared(contact_id: str, what: str) -> str:
    """The conflict of an operation for a profile the identity map also links to another
    customer of this store (recorded before that was refused)."""
    return (
        f"shared_contact: profile {contact_id} is also another customer's of this store "
        f"in the identity map; {what}"
    )


def _replacing(result: Result, gone: str, what: str) -> Result:
    """A result found again by identifiers for a profile id that is gone: the new id
    replaces the gone one in the identity map, and that is reported."""
    if not isinstance(result, Sent):
        return result
    if result.contact_id is None:
        return Sent(
            None,
            result.conflict
            or f"unknown_contact: profile {gone} is gone and {what} "
            "found no profile of this customer's to go to",
        )
    if result.contact_id == gone:
        return result
    # the store reports the replacement itself (contact_replaced): only another work-around
    # the adapter made (a 409) is reported here, once
    return Sent(result.contact_id, result.conflict, replaces=gone)


DESTINATION = DestinationType(
    tag="klaviyo",
    config=KlaviyoDestination,
    build=KlaviyoSink,
    capabilities=KlaviyoSink.capabilities_for,
    where=lambda config: f"{host_of(config.base_url)}, revision {config.revision}",
    summary="Klaviyo profiles (profile-import, bulk jobs, subscription jobs, merges)",
)
