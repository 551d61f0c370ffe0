"""The ``hubspot`` destination: HubSpot's CRM contacts v3 and Communication Preferences v4,
with a private app's token (``Authorization: Bearer``).

- **upsert**: ``POST /crm/v3/objects/contacts/batch/upsert``, up to ``inputs_per_request``
  (100) inputs a call, each keyed by the unique custom property ``id_property`` (default
  ``treez_customer_key``) holding the value the mapping writes to it (the customer's external
  id). HubSpot's contact ``id`` from the answer is the contact recorded in the identity map.
  The answer's results are matched to the inputs by the ``objectWriteTraceId`` each input
  carries (its index), never by position. A 207 fails only the inputs its errors name (by
  ``objectWriteTraceId``, else by the idProperty value in ``context.ids``); an input neither
  answered nor named is retried. Consent is never written as a contact property; but an
  upsert whose mapping carries ``hs_email_optout`` (the planner's consent state: true once
  the customer opted out) also unsubscribes the e-mail it writes, and is done only once that
  is, so an address changed or added after an opt-out is opted out too. ``setup`` never
  creates ``hs_email_optout`` (HubSpot's own).
- **one bad input fails a whole batch** (400 or 409): the batch is split in halves,
  recursively, until the bad input stands alone; the rest is delivered. An input that still
  fails alone is that operation's failure (``FatalDelivery`` naming the status and HubSpot's
  category, never HubSpot's message, which can quote an e-mail). A lone 409 because another
  HubSpot contact holds the e-mail is sent again without it, cleared (``""``: an old
  address it held may be another customer's now) when HubSpot names the holder, and reported
  (``duplicate_email``): the other person's contact is never written.
- **one e-mail twice in one batch** is a 409 for the whole batch in HubSpot: a batch never
  holds two inputs with the same e-mail; the second holder goes in a later request (nothing
  is dropped).
- **unsubscribe**: ``POST /communication-preferences/v4/statuses/batch/unsubscribe-all
  ?channel=EMAIL`` with the e-mail (the mapped one, else the contact's own, read back; a
  mapped one that is not shaped like an address counts as none). The
  public API has no SMS consent: an SMS opt-out is reported on the operation
  (``sms_consent_unsupported``: a conflict row and the conflicts metric), never dropped
  silently. **subscribe** (planned only under ``resubscribe: on_source_opt_in``):
  ``POST /communication-preferences/v4/statuses/batch/write`` ``SUBSCRIBED`` for the
  subscription type ``subscription_id`` (with ``legal_basis`` when set); without a
  ``subscription_id`` it is reported (``no_subscription_type``) and nothing is written.
  Consent operations of one send go in runs, in the order planned (a subscribe and a later
  unsubscribe of one shared address end unsubscribed). An answer listing ``errors`` leaves
  each address without a result undone (failed when an error names it, else retried). One
  conflict a result: with SMS in the channels the kind is always ``sms_consent_unsupported``,
  and what happened to the e-mail (``no_identifier``...) goes in its detail.
- **merge**: ``POST /crm/v3/objects/contacts/merge`` with ``primaryObjectId`` the final
  survivor's contact and ``objectIdToMerge`` the absorbed one's. An absorbed contact that is
  gone already (merged on HubSpot's side) is nothing to merge.
- **deactivate**: an upsert of ``treez_status: DEACTIVATED`` (``status_property``) alone.
- **a gone contact** (merged or deleted on HubSpot's side): the upsert by ``id_property``
  finds or makes the right contact and its id replaces the gone one in the identity map
  (``Sent.replaces``; the store reports ``contact_replaced``), once a read of the held id
  says it is gone; a held contact that still exists is kept (``contact_id_changed``).
- **pacing**: every request takes a slot of ``rate_limit`` (190 per 10 s by default; 100 per
  10 s for Free and Starter accounts), counted across every sink of one token (HubSpot counts
  per app). A 429 is read by its ``policyName``: the ten-second policy is an ordinary retry
  after ``X-HubSpot-RateLimit-Interval-Milliseconds``; the daily one (or
  ``X-HubSpot-RateLimit-Daily-Remaining: 0``, or ``daily_limit`` requests made today) raises
  :class:`~connector.errors.QuotaPause` until the next midnight in ``daily_reset_time_zone``
  (the account's time zone, America/New_York by default).

``setup`` (``connector hubspot setup``) creates the property group, the unique
``id_property`` and the custom properties the mapping writes, through the properties API,
and changes nothing that exists.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import weakref
import zoneinfo
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal
from urllib.parse import quote

import httpx
from pydantic import BeforeValidator, Field, HttpUrl, SecretStr, field_validator

from connector.config_base import DestinationConfig, Rate, parse_rates, secret_set
from connector.delivery._http import identifier
from connector.delivery.base import Capabilities, Delivery, DestinationType, Result, Sent
from connector.destinations._probe import Probe
from connector.destinations._vendor import VendorClient, account_digest, account_limiters, host_of
from connector.destinations._vendor import json_object as _json
from connector.errors import DeliveryError, FatalDelivery, QuotaPause, RetriableDelivery
from connector.mapping import Mapping

UPSERT = "/crm/v3/objects/contacts/batch/upsert"
MERGE = "/crm/v3/objects/contacts/merge"
CONTACT = "/crm/v3/objects/contacts/{contact_id}"
PROPERTIES = "/crm/v3/properties/contacts"
UNSUBSCRIBE_ALL = "/communication-preferences/v4/statuses/batch/unsubscribe-all?channel=EMAIL"
STATUS_WRITE = "/communication-preferences/v4/statuses/batch/write"
MAX_INPUTS = 100
DEFAULT_RATE = (Rate(190, 10.0),)
TEN_SECONDS = 10.0
CONSENT_FIELDS = ("hs_email_optout",)  # never written by an upsert
# HubSpot's default contact properties a mapping may write; setup creates every other one
DEFAULT_PROPERTIES = frozenset(
    {
        *("email", "firstname", "lastname", "phone", "mobilephone", "address", "city"),
        *("state", "zip", "country", "company", "jobtitle", "website", "lifecyclestage"),
        *("hs_language", "fax", "salutation", "industry"),
    }
)
LEGAL_BASES = Literal[
    "CONSENT_WITH_NOTICE",
    "LEGITIMATE_INTEREST_CLIENT",
    "LEGITIMATE_INTEREST_OTHER",
    "LEGITIMATE_INTEREST_PQL",
    "NON_GDPR",
    "PERFORMANCE_OF_CONTRACT",
    "PROCESS_AND_STORE",
]
_PROPERTY_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_EXISTING_ID = re.compile(r"Existing ID: ?(\d+)")
_ADDRESS = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")  # the shape of an e-mail address, no more


class _Daily:
    """One app's day: the requests counted against ``daily_limit``."""

    __slots__ = ("__weakref__", "day", "requests")

    def __init__(self) -> None:
        self.day: dt.date | None = None
        self.requests = 0


_APP_DAYS: weakref.WeakValueDictionary[tuple[str, int, str], _Daily] = weakref.WeakValueDictionary()


class HubSpotDestination(DestinationConfig):
    """HubSpot: batch upserts keyed by a unique custom property, Communication Preferences v4
    for e-mail consent, contact merges; paced to the app's ten-second limit and daily cap."""

    type: Literal["hubspot"]
    token: SecretStr  # a private app's access token (from the environment: ${HUBSPOT_TOKEN})
    base_url: HttpUrl = HttpUrl("https://api.hubapi.com")
    id_property: str = "treez_customer_key"
    status_property: str = "treez_status"  # what a deactivation sets to DEACTIVATED
    property_group: str = "treez"  # the group setup puts the properties it creates in
    batch_size: int = Field(default=100, ge=1, le=10_000)
    inputs_per_request: int = Field(default=MAX_INPUTS, ge=1, le=MAX_INPUTS)
    rate_limit: Annotated[tuple[Rate, ...], BeforeValidator(parse_rates)] = DEFAULT_RATE
    daily_limit: int | None = Field(default=None, ge=1)  # requests a day, when known
    daily_reset_time_zone: str = "America/New_York"  # the account's time zone
    subscription_id: int | None = Field(default=None, ge=1)  # the type a subscribe writes
    legal_basis: LEGAL_BASES | None = None
    legal_basis_explanation: str | None = None
    timeout_seconds: float = Field(default=15.0, gt=0, le=300)

    _token = field_validator("token")(secret_set)

    @field_validator("id_property", "status_property", "property_group")
    @classmethod
    def _property_name(cls, value: str) -> str:
        if not _PROPERTY_NAME.match(value):
            raise ValueError("must be a HubSpot internal name: lowercase letters, digits, _")
        return value

    @field_validator("daily_reset_time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as America/New_York)"
            ) from None
        return value


def describe_error(data: Any) -> str:
    """HubSpot's ``category`` (and ``subCategory``, ``policyName``) of an error body: never
    its ``message``, which can quote an e-mail that was sent."""
    if not isinstance(data, dict):
        return ""
    parts = [identifier(data.get(k)) for k in ("category", "subCategory", "policyName")]
    return "/".join(p for p in parts if p)


def capabilities_for(config: HubSpotDestination) -> Capabilities:
    return Capabilities(
        coalesce_upserts=True,  # a profile keeps state: only the newest upsert matters
        batch_size=config.batch_size,
        native_merge=True,
        channels=("email", "sms"),  # SMS is told to us so that it is reported, not dropped
        matches_on=(config.id_property,),
        consent_needs_fields=True,
        can_lookup=True,
        default_rate_limit=config.rate_limit,
    )


def where(config: HubSpotDestination) -> str:
    return f"{host_of(config.base_url)}, idProperty {config.id_property}"


def next_midnight(now: float, zone: str) -> float:
    """Epoch seconds of the next midnight in ``zone`` after ``now``."""
    tz = zoneinfo.ZoneInfo(zone)
    local = dt.datetime.fromtimestamp(now, tz)
    return dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), tz).timestamp()


class _Input:
    """One operation's input to a batch upsert."""

    __slots__ = ("email", "index", "key", "properties")

    def __init__(self, index: int, key: str, properties: dict[str, str], email: str | None):
        self.index, self.key, self.properties, self.email = index, key, properties, email


class HubSpotSink:
    kind = "hubspot"

    def __init__(
        self,
        config: HubSpotDestination,
        client: httpx.AsyncClient | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.name = config.name
        self.config = config
        self.capabilities = capabilities_for(config)
        self.rate_limit: tuple[Rate, ...] = ()  # every request is paced here, not per batch
        token = config.token.get_secret_value()
        app = account_digest(token)
        limits = {"*": config.rate_limit} if config.rate_limit else {}
        # HubSpot counts its ten-second limit per app (token): every sink of one token shares it
        shared = account_limiters("hubspot", app, limits, clock)
        self.api = VendorClient(
            str(config.base_url),
            {
                "authorization": f"Bearer {token}",
                "content-type": "application/json",
                "accept": "application/json",
            },
            timeout=config.timeout_seconds,
            limits=limits,
            describe=describe_error,
            client=client,
            clock=clock,
            max_connections=config.concurrency,
            shared=shared,
        )
        self.blank = self.api.blank  # the worker blanks what it keeps with it too
        self._wall = wall
        # HubSpot's daily cap is the app's: the requests counted against daily_limit are
        # shared by every sink of one token (one per dispensary), as the ten-second limiter
        # is; each sink learns of a 429 DAILY on its own (a refused request costs nothing)
        day_key = (app, id(wall), config.daily_reset_time_zone)
        daily = _APP_DAYS.get(day_key)
        if daily is None:
            daily = _APP_DAYS[day_key] = _Daily()
        self._daily = daily
        self._paused_until: float | None = None

    def __repr__(self) -> str:
        return f"HubSpotSink(name={self.name!r})"  # never the token

    @property
    def batch_size(self) -> int:
        return self.capabilities.batch_size

    # --- the port ---------------------------------------------------------------------------

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        results: list[Result | None] = [None] * len(deliveries)
        inputs: list[_Input] = []
        # consent in runs of one operation, in the order planned: a subscribe and a later
        # unsubscribe of one address (two customers sharing it) end as the later one says
        consent: list[tuple[str, list[int]]] = []
        for index, delivery in enumerate(deliveries):
            op = delivery.op
            if op in ("upsert", "deactivate"):
                found = self._input(index, delivery)
                if isinstance(found, _Input):
                    inputs.append(found)
                else:
                    results[index] = found
            elif op in ("unsubscribe", "subscribe"):
                if consent and consent[-1][0] == op:
                    consent[-1][1].append(index)
                else:
                    consent.append((op, [index]))
            elif op != "merge":
                results[index] = FatalDelivery(f"unknown operation {op!r}")
        for round_ in _rounds(inputs):
            step = self.config.inputs_per_request
            for start in range(0, len(round_), step):
                chunk = round_[start : start + step]
                for item, result in zip(chunk, await self._upsert(chunk), strict=True):
                    results[item.index] = self._upsert_result(deliveries[item.index], result)
        for item in inputs:
            upserted = results[item.index]
            if isinstance(upserted, Sent) and upserted.replaces is not None:
                results[item.index] = await self._replaced(upserted)
        await self._opt_out_upserted(inputs, deliveries, results)
        for op, indexes in consent:
            done = await self._consent(op, [deliveries[i] for i in indexes])
            for i, result in zip(indexes, done, strict=True):
                results[i] = result
        for index, delivery in enumerate(deliveries):
            if delivery.op == "merge":
                try:
                    results[index] = await self.merge(delivery)
                except QuotaPause:
                    raise
                except DeliveryError as exc:
                    results[index] = exc
        return [r if r is not None else Sent() for r in results]

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        """HubSpot's batch upsert is its bulk path: the same calls as :meth:`send`."""
        return await self.send(deliveries)

    async def lookup(self, contact_id: str) -> dict[str, Any] | None:
        response = await self._request(
            "GET", CONTACT.format(contact_id=contact_id) + "?properties=email", ok=(404,)
        )
        if response.status_code == 404:
            return None
        data = _json(response)
        return data if data.get("id") else None

    async def probe(self) -> Probe:
        """The definition of the ``id_property`` (``GET /crm/v3/properties/contacts/{name}``):
        the token and its schema scope, and whether setup made the property; no contact is
        read or written. A 404 is a reachable portal without the property yet."""
        name = self.config.id_property
        return await self.api.probe(
            f"/crm/v3/properties/contacts/{quote(name, safe='')}",
            {404: f"but the property {name} is missing: run connector hubspot setup"},
        )

    async def aclose(self) -> None:
        await self.api.aclose()

    # --- requests ---------------------------------------------------------------------------

    async def _request(
        self, method: str, path: str, *, body: Any = None, ok: Sequence[int] = ()
    ) -> httpx.Response:
        """One request; a 429 becomes a retriable error (ten-second policy) or a
        :class:`QuotaPause` (daily cap); other errors as :class:`VendorClient` raises them,
        except the statuses in ``ok``, handed back."""
        self._check_daily()
        response = await self.api.request(
            method, path, "*", body=body, ok_statuses=frozenset({429, *ok})
        )
        self._count_daily(response)
        if response.status_code == 429:
            raise self._throttled(response)
        return response

    def _today(self) -> dt.date:
        zone = zoneinfo.ZoneInfo(self.config.daily_reset_time_zone)
        return dt.datetime.fromtimestamp(self._wall(), zone).date()

    def _check_daily(self) -> None:
        now = self._wall()
        if self._paused_until is not None:
            if now < self._paused_until:
                raise self._pause("the daily request cap is used up")
            self._paused_until = None
        limit = self.config.daily_limit
        if limit is not None:
            today = self._today()
            if today != self._daily.day:
                self._daily.day, self._daily.requests = today, 0
            if self._daily.requests >= limit:
                self._paused_until = next_midnight(now, self.config.daily_reset_time_zone)
                raise self._pause(f"daily_limit ({limit} requests) reached")
            self._daily.requests += 1

    def _count_daily(self, response: httpx.Response) -> None:
        left = response.headers.get("x-hubspot-ratelimit-daily-remaining")
        if response.status_code != 429 and left is not None and left.strip() == "0":
            # the request went through, and it was the last of the day
            self._paused_until = next_midnight(self._wall(), self.config.daily_reset_time_zone)

    def _pause(self, why: str, response: httpx.Response | None = None) -> QuotaPause:
        until = self._paused_until or next_midnight(self._wall(), self.config.daily_reset_time_zone)
        self._paused_until = until
        return QuotaPause(
            f"HubSpot: {why}; paused until midnight {self.config.daily_reset_time_zone}",
            until=until,
            status_code=429,
            body=None if response is None else self.api.kept(response),
        )

    def _throttled(self, response: httpx.Response) -> DeliveryError:
        data = _json(response)
        policy = str(data.get("policyName") or "")
        if policy.upper() == "DAILY":
            return self._pause("HTTP 429, policy DAILY", response)
        interval = response.headers.get("x-hubspot-ratelimit-interval-milliseconds")
        try:
            wait = float(interval) / 1000 if interval else TEN_SECONDS
        except ValueError:
            wait = TEN_SECONDS
        error = RetriableDelivery(
            f"HTTP 429 from {self.api.host}: {describe_error(data) or 'RATE_LIMIT'}",
            status_code=429,
            body=self.api.kept(response),
            retry_after=max(1.0, min(wait, 60.0)),
        )
        return self.api.blank.error(error)

    def _fatal(self, response: httpx.Response) -> FatalDelivery:
        what = describe_error(_json(response))
        error = FatalDelivery(
            f"HTTP {response.status_code} from {self.api.host}" + (f": {what}" if what else ""),
            status_code=response.status_code,
            body=self.api.kept(response),
        )
        return self.api.blank.error(error)

    # --- upserts ----------------------------------------------------------------------------

    def _input(self, index: int, delivery: Delivery) -> _Input | Result:
        fields = delivery.fields
        key = _text(fields.get(self.config.id_property))
        if key is None:
            if delivery.op == "deactivate" and delivery.contact_id is None:
                return Sent()  # never reached HubSpot
            return FatalDelivery(
                f"the mapping gives no {self.config.id_property} (the upsert key) for this customer"
            )
        if delivery.op == "deactivate":
            if delivery.contact_id is None:
                return Sent()  # never reached HubSpot: nothing to deactivate
            properties = {self.config.status_property: "DEACTIVATED"}
            return _Input(index, key, properties, None)
        properties = {}
        for name, value in fields.items():
            if name == self.config.id_property or name in CONSENT_FIELDS:
                continue
            properties[name] = _property_value(value)
        email = _text(properties.get("email"))
        return _Input(index, key, properties, email.lower() if email else None)

    def _body(self, chunk: Sequence[_Input], *, email: str | None = None) -> dict[str, Any]:
        """The batch upsert's body; ``email`` given: every input's e-mail replaced by it
        (``""`` clears it), or left out when it is ``"omit"``."""

        def properties(item: _Input) -> dict[str, str]:
            if email is None:
                return item.properties
            rest = {k: v for k, v in item.properties.items() if k != "email"}
            return rest if email == "omit" else {**rest, "email": email}

        return {
            "inputs": [
                {
                    "idProperty": self.config.id_property,
                    "id": item.key,
                    "objectWriteTraceId": str(item.index),
                    "properties": properties(item),
                }
                for item in chunk
            ]
        }

    async def _upsert(self, chunk: list[_Input]) -> list[Result]:
        """Upsert ``chunk``; one result per input. A whole-batch 400 or 409 splits the chunk
        in halves until the bad input stands alone."""
        try:
            response = await self._request("POST", UPSERT, body=self._body(chunk), ok=(400, 409))
        except QuotaPause:
            raise
        except DeliveryError as exc:
            return [exc] * len(chunk)
        if response.status_code in (400, 409):
            if len(chunk) > 1:
                half = len(chunk) // 2
                return [*await self._upsert(chunk[:half]), *await self._upsert(chunk[half:])]
            if response.status_code == 409 and chunk[0].email:
                return [await self._without_email(chunk[0], response)]
            return [self._fatal(response)]
        return self._answers(chunk, response)

    def _answers(self, chunk: list[_Input], response: httpx.Response) -> list[Result]:
        data = _json(response)
        by_trace = {str(item.index): item for item in chunk}
        by_key = {item.key: item for item in chunk}
        found: dict[int, Result] = {}
        for result in data.get("results") or []:
            if not isinstance(result, dict):
                continue
            trace = result.get("objectWriteTraceId")
            props = result.get("properties")
            item = by_trace.get(str(trace)) if trace is not None else None
            if item is None and isinstance(props, dict):
                item = by_key.get(str(props.get(self.config.id_property)))
            contact_id = result.get("id")
            if item is not None and isinstance(contact_id, str | int) and str(contact_id):
                found[item.index] = Sent(str(contact_id))
        for error in data.get("errors") or []:
            if not isinstance(error, dict):
                continue
            context = _dict(error.get("context"))
            named = [by_trace.get(str(t)) for t in context.get("objectWriteTraceId") or []]
            named += [by_key.get(str(k)) for k in context.get("ids") or []]
            what = describe_error(error) or "error"
            for item in named:
                if item is not None and item.index not in found:
                    found[item.index] = FatalDelivery(
                        f"HTTP {response.status_code} from {self.api.host}: {what} (this input)",
                        status_code=response.status_code,
                        body=None,
                    )
        return [
            found.get(
                item.index,
                RetriableDelivery(
                    f"HTTP {response.status_code} from {self.api.host}: no result for this "
                    "input; trying again"
                ),
            )
            for item in chunk
        ]

    async def _without_email(self, item: _Input, refused: httpx.Response) -> Result:
        """A lone input refused with 409: another contact holds its e-mail. Sent again
        without it (the other person's contact is never written) and reported. When HubSpot
        names that other contact, the e-mail is cleared rather than left out: the contact
        never keeps an old address that is someone else's now (two customers swapped)."""
        data = _json(refused)
        context = _dict(data.get("context"))
        ids = context.get("id") or []
        holder = str(ids[0]) if ids else None
        if holder is None:
            match = _EXISTING_ID.search(str(data.get("message") or ""))
            holder = match[1] if match else None
        body = self._body([item], email="omit" if holder is None else "")
        try:
            response = await self._request("POST", UPSERT, body=body, ok=(400, 409))
        except QuotaPause:
            raise
        except DeliveryError as exc:
            return exc
        if response.status_code in (400, 409):
            return self._fatal(response)
        result = self._answers([item], response)[0]
        if not isinstance(result, Sent):
            return result
        other = f"contact {holder}" if holder else "another contact"
        return Sent(
            result.contact_id,
            f"duplicate_email: this customer's e-mail belongs to HubSpot {other}; "
            "its contact was written with no e-mail",
        )

    async def _opt_out_upserted(
        self, inputs: list[_Input], deliveries: list[Delivery], results: list[Result | None]
    ) -> None:
        """An upsert whose mapping says the customer opted out (``hs_email_optout`` true, as
        the planner computes it from the connector's consent state) unsubscribes the e-mail
        it carries: HubSpot's consent is per address, so a new address after an opt-out
        would otherwise be open to marketing. Until that is written the upsert is not done."""
        owed: dict[str, list[int]] = {}
        for item in inputs:
            done = isinstance(results[item.index], Sent)
            if item.email and done and _opted_out(deliveries[item.index].fields):
                owed.setdefault(item.email, []).append(item.index)
        addresses = list(owed)
        step = self.config.inputs_per_request
        for start in range(0, len(addresses), step):
            part = addresses[start : start + step]
            for email, outcome in zip(
                part, await self._consent_call("unsubscribe", part), strict=True
            ):
                if outcome is not None:
                    for index in owed[email]:
                        results[index] = outcome

    async def _replaced(self, result: Sent) -> Sent:
        """``result`` names another contact than the one held: it replaces the held one only
        if that one is gone (merged or deleted in HubSpot). A held contact that still exists
        (its key edited in HubSpot, say) is kept; the store reports contact_id_changed."""
        try:
            alive = await self.lookup(str(result.replaces)) is not None
        except QuotaPause:
            raise
        except DeliveryError:
            alive = True  # not known to be gone: never moved on a guess
        return Sent(result.contact_id, result.conflict) if alive else result

    def _upsert_result(self, delivery: Delivery, result: Result) -> Result:
        held = delivery.contact_id
        if isinstance(result, Sent) and held and result.contact_id and result.contact_id != held:
            # the contact we held is gone (merged or deleted on HubSpot's side): the upsert
            # by id_property found or made the right one, which replaces it
            return Sent(result.contact_id, result.conflict, replaces=held)
        return result

    # --- consent ----------------------------------------------------------------------------

    async def _held_email(self, delivery: Delivery) -> str | None:
        """The e-mail the customer's HubSpot contact holds now (None when it is not known)."""
        if delivery.contact_id is None:
            return None
        contact = await self.lookup(delivery.contact_id)
        props = contact.get("properties") if contact else None
        held = _text(props.get("email")) if isinstance(props, dict) else None
        return held.lower() if held else None

    async def _emails_of(self, delivery: Delivery, op: str) -> list[str]:
        """The addresses a consent call is for: the mapped e-mail; for an unsubscribe, the
        contact's own as well when it holds another (a version without an e-mail leaves the
        one before it in HubSpot, and a stale opt-out maps the address of its own time:
        every address the contact may be mailed at is unsubscribed). A subscribe goes to
        the mapped address only, or the contact's when none is mapped."""
        email = _text(delivery.fields.get("email"))
        mapped = email.lower() if email and _ADDRESS.fullmatch(email) else None
        if mapped is not None and op != "unsubscribe":
            return [mapped]
        held = await self._held_email(delivery)
        return list(dict.fromkeys(e for e in (mapped, held) if e))

    async def _consent(self, op: str, deliveries: list[Delivery]) -> list[Result]:
        results: list[Result | None] = [None] * len(deliveries)
        emails: dict[str, list[int]] = {}
        for index, delivery in enumerate(deliveries):
            channels = set(delivery.body.get("channels") or ("email", "sms"))
            if "email" not in channels:
                results[index] = self._consent_sent(delivery, channels, op)
                continue
            try:
                found = await self._emails_of(delivery, op)
            except QuotaPause:
                raise
            except DeliveryError as exc:
                results[index] = exc
                continue
            email = found[0] if found else None
            if email is None and delivery.contact_id is None:
                # no e-mail mapped and the contact not made yet (its upsert is queued,
                # retrying or dead-lettered): wait for it, never count the opt-out as done
                results[index] = RetriableDelivery(
                    f"{op}: no e-mail mapped and this customer's HubSpot contact is not known "
                    "yet; trying again"
                )
            elif email is None:
                results[index] = self._consent_sent(
                    delivery,
                    channels,
                    op,
                    f"no_identifier: no e-mail known for this customer's HubSpot contact; the "
                    f"{op} was not sent",
                )
            elif op == "subscribe" and self.config.subscription_id is None:
                results[index] = self._consent_sent(
                    delivery,
                    channels,
                    op,
                    "no_subscription_type: subscription_id is not set; the subscribe was not sent",
                )
            else:
                for address in found:
                    emails.setdefault(address, []).append(index)
        addresses = list(emails)
        step = self.config.inputs_per_request
        for start in range(0, len(addresses), step):
            part = addresses[start : start + step]
            for email, outcome in zip(part, await self._consent_call(op, part), strict=True):
                for index in emails[email]:
                    if isinstance(results[index], DeliveryError):
                        continue  # another of its addresses failed: the call is owed again
                    delivery = deliveries[index]
                    channels = set(delivery.body.get("channels") or ("email", "sms"))
                    results[index] = (
                        self._consent_sent(delivery, channels, op) if outcome is None else outcome
                    )
        return [
            r if r is not None else Sent(d.contact_id)
            for r, d in zip(results, deliveries, strict=True)
        ]

    @staticmethod
    def _consent_sent(
        delivery: Delivery, channels: set[str], op: str, email_note: str | None = None
    ) -> Sent:
        """Done; an SMS opt-out (or opt-in) is always reported as sms_consent_unsupported
        (one conflict a result: what happened to the e-mail goes in its detail)."""
        if "sms" not in channels:
            return Sent(delivery.contact_id, email_note)
        what = "opt-out" if op == "unsubscribe" else "opt-in"
        detail = (
            f"sms_consent_unsupported: HubSpot's public API has no SMS consent; this "
            f"customer's SMS {what} was not sent and must be recorded in HubSpot by hand"
        )
        if email_note is not None:
            detail += f" (e-mail: {email_note})"
        return Sent(delivery.contact_id, detail)

    async def _consent_call(self, op: str, emails: list[str]) -> list[Result | None]:
        """None for each address written; a whole-call 400 splits the call like upserts."""
        body: dict[str, Any]
        if op == "unsubscribe":
            path, body = UNSUBSCRIBE_ALL, {"inputs": emails}
        else:
            statuses = []
            for email in emails:
                status: dict[str, Any] = {
                    "subscriberIdString": email,
                    "subscriptionId": self.config.subscription_id,
                    "statusState": "SUBSCRIBED",
                    "channel": "EMAIL",
                }
                if self.config.legal_basis:
                    status["legalBasis"] = self.config.legal_basis
                if self.config.legal_basis_explanation:
                    status["legalBasisExplanation"] = self.config.legal_basis_explanation
                statuses.append(status)
            path, body = STATUS_WRITE, {"inputs": statuses}
        try:
            response = await self._request("POST", path, body=body, ok=(400,))
        except QuotaPause:
            raise
        except DeliveryError as exc:
            return [exc] * len(emails)
        if response.status_code == 400:
            if len(emails) > 1:
                half = len(emails) // 2
                return [
                    *await self._consent_call(op, emails[:half]),
                    *await self._consent_call(op, emails[half:]),
                ]
            return [self._fatal(response)]
        return self._consent_answers(emails, response)

    def _consent_answers(self, emails: list[str], response: httpx.Response) -> list[Result | None]:
        """None for each address written. An answer that lists ``errors`` (HubSpot's batch
        answers may, next to ``results``) leaves undone every address without a result: a
        failure (its category) when an error names it, else tried again."""
        data = _json(response)
        errors = [e for e in data.get("errors") or [] if isinstance(e, dict)]
        if not errors and not data.get("numErrors"):
            return [None] * len(emails)
        answered = {
            str(r.get("subscriberIdString") or "").lower()
            for r in data.get("results") or []
            if isinstance(r, dict)
        }
        named: dict[str, str] = {}
        for error in errors:
            for values in _dict(error.get("context")).values():
                for value in values if isinstance(values, list) else [values]:
                    named.setdefault(str(value).lower(), describe_error(error) or "error")
        status = response.status_code
        outcomes: list[Result | None] = []
        for email in emails:
            if email in answered:
                outcomes.append(None)
            elif email in named:
                outcomes.append(
                    FatalDelivery(
                        f"HTTP {status} from {self.api.host}: {named[email]} (this address)",
                        status_code=status,
                        body=None,
                    )
                )
            else:
                outcomes.append(
                    RetriableDelivery(
                        f"HTTP {status} from {self.api.host}: no result for this address; "
                        "trying again"
                    )
                )
        return outcomes

    # --- merges -----------------------------------------------------------------------------

    async def merge(self, delivery: Delivery) -> Result:
        source = delivery.body.get("from_contact_id")
        target = delivery.body.get("into_contact_id")
        if source is None:  # the absorbed customer never reached HubSpot: nothing to merge
            return Sent(None if target is None else str(target))
        if target is None:
            return RetriableDelivery(
                "merge: the survivor's HubSpot contact is not known yet (its upsert has not "
                "been delivered); trying again"
            )
        if str(source) == str(target):
            return Sent(str(target))
        body = {"primaryObjectId": str(target), "objectIdToMerge": str(source)}
        response = await self._request("POST", MERGE, body=body, ok=(400, 404))
        if response.status_code == 200:
            return Sent(str(target))
        if await self.lookup(str(source)) is None:
            return Sent(str(target))  # merged away already (on HubSpot's side): nothing to do
        if await self.lookup(str(target)) is None:
            return RetriableDelivery(
                f"merge: the survivor's contact {target} is gone; trying again once the "
                "survivor's next update has found its contact again"
            )
        return self._fatal(response)


def _rounds(inputs: list[_Input]) -> list[list[_Input]]:
    """The inputs in rounds that never hold one e-mail twice: a later holder of an e-mail
    goes in a later round (HubSpot fails a batch holding one e-mail twice with a 409)."""
    rounds: list[list[_Input]] = []
    seen: list[set[str]] = []
    for item in inputs:
        n = 0
        if item.email is not None:
            while n < len(seen) and item.email in seen[n]:
                n += 1
        if n == len(rounds):
            rounds.append([])
            seen.append(set())
        rounds[n].append(item)
        if item.email is not None:
            seen[n].add(item.email)
    return rounds


def _opted_out(fields: dict[str, Any]) -> bool:
    """Whether the mapped consent field (``hs_email_optout``) says the customer opted out."""
    for name in CONSENT_FIELDS:
        value = fields.get(name)
        if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
            return True
    return False


def _property_value(value: Any) -> str:
    """A mapped value as HubSpot's properties take it: text; a list joined by ``;`` (the
    separator of multiple-checkbox properties); null as the empty string (clears it)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(_property_value(v) for v in value if v is not None)
    if isinstance(value, dict):
        return ";".join(f"{k}={_property_value(v)}" for k, v in value.items())
    return str(value)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# --- setup ----------------------------------------------------------------------------------


async def setup(
    config: HubSpotDestination,
    mapping: Mapping,
    client: httpx.AsyncClient | None = None,
) -> list[str]:
    """Create what the destination needs in the HubSpot account, idempotently: the property
    group, the unique ``id_property``, and every custom property the mapping writes that
    HubSpot's default contact properties do not hold. Lines of what
    it did or found; a property that exists is never changed (a unique ``id_property``
    without ``hasUniqueValue`` is refused: HubSpot cannot change that afterwards)."""
    sink = HubSpotSink(config, client)
    lines: list[str] = []
    try:
        group = config.property_group
        path = f"{PROPERTIES}/groups/{group}"
        if (await sink._request("GET", path, ok=(404,))).status_code == 404:
            body = {"name": group, "label": "Treez", "displayOrder": -1}
            answer = await sink._request("POST", f"{PROPERTIES}/groups", body=body, ok=(409,))
            lines.append(
                f"property group {group}: "
                + ("already present" if answer.status_code == 409 else "created")
            )
        else:
            lines.append(f"property group {group}: already present")
        wanted = [config.id_property, config.status_property]
        wanted += [
            t for t in mapping.targets if t not in DEFAULT_PROPERTIES and t not in CONSENT_FIELDS
        ]
        for name in dict.fromkeys(wanted):
            if not _PROPERTY_NAME.match(name):
                lines.append(f"property {name}: skipped, not a HubSpot property name")
                continue
            unique = name == config.id_property
            response = await sink._request("GET", f"{PROPERTIES}/{name}", ok=(404,))
            if response.status_code != 404:
                if unique and not _json(response).get("hasUniqueValue"):
                    raise FatalDelivery(
                        f"property {name} exists without unique values (hasUniqueValue); "
                        "id_property must name a unique property: choose another name"
                    )
                lines.append(f"property {name}: already present")
                continue
            body = {
                "name": name,
                "label": _label(name),
                "type": "string",
                "fieldType": "text",
                "groupName": group,
                "hasUniqueValue": unique,
                "description": (
                    "Treez customer key (the connector's upsert key)"
                    if unique
                    else "Written by the Treez connector"
                ),
            }
            answer = await sink._request("POST", PROPERTIES, body=body, ok=(409,))
            made = "already present" if answer.status_code == 409 else "created"
            lines.append(f"property {name}: {made}" + (" (unique)" if unique else ""))
    finally:
        if client is None:
            await sink.aclose()
    created = sum(1 for line in lines if ": created" in line)
    lines.append(
        f"done: {created} created"
        if created
        else "nothing to change: everything is already present"
    )
    return lines


def _label(name: str) -> str:
    return name.replace("_", " ").strip().capitalize()


DESTINATION = DestinationType(
    tag="hubspot",
    config=HubSpotDestination,
    build=HubSpotSink,
    capabilities=capabilities_for,
    where=where,
    summary="HubSpot contacts (batch upserts by a unique property, merges, e-mail consent)",
    setup=setup,
    setup_help=(
        "Create the unique upsert property (id_property) and the custom properties the "
        "mapping writes, through HubSpot's properties API. Idempotent: what exists is left "
        "as it is, and a second run says so."
    ),
)
