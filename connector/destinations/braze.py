"""The ``braze`` destination: Braze's REST API (``Authorization: Bearer``, one REST endpoint
per instance, such as ``https://rest.iad-01.braze.com``).

The contact id is Braze's ``external_id``, which is ours: the mapping's ``external_id``
(``treez-{dispensary}-{customer_id}``). The identity map records it; once recorded it keys
every call (a changed template never re-keys a profile).

- **upsert**: ``POST /users/track``, one attributes object per operation, all the operations
  of a batch in one call (``objects_per_request``, 75 by default, 50 on newer plans). The
  mapped attributes go as they are, less what only the connector may say (``email_subscribe``,
  ``subscription_groups``, ``push_subscribe``, identifiers other than ``external_id``).
  Braze answers 201 ``success`` with non-fatal ``errors[]`` naming refused objects by index:
  each is that operation's failure (dead-lettered), the others succeed; an error that names
  no object of the call fails them all (it may be an opt-out's).
- **consent**: Braze creates a profile ``email_subscribe: subscribed``. An upsert whose mapped
  ``opt_out_attribute`` (``treez_opt_out``, the planner's consent view) is true carries
  ``email_subscribe: unsubscribed`` and the configured subscription groups ``unsubscribed``
  in the same object, so a customer opted out when first sent (or whose profile was deleted
  in Braze and comes back) is never subscribed for a moment nor left outside a group;
  otherwise Braze's default stands and the connector never sends ``opted_in``.
  **unsubscribe**: ``email_subscribe: unsubscribed`` through ``/users/track`` (which creates
  the profile unsubscribed if it does not exist yet), then ``POST
  /v2/subscription/status/set`` ``unsubscribed`` for the configured SMS (and e-mail)
  subscription groups, by external id (SMS has no global state in Braze), 50 users a call;
  with no SMS group set, an SMS opt-out is reported (``sms_consent_unsupported``).
  **subscribe** (planned only under ``resubscribe: on_source_opt_in``): ``email_subscribe:
  subscribed`` (Braze's default state, never ``opted_in``) and the configured groups joined;
  it never creates a profile.
- **merge**: ``POST /users/merge`` (up to 50 a request): the absorbed customer's external id
  into the final survivor's (the worker resolves it). Braze applies merges later, in no
  guaranteed order; afterwards the absorbed external id names no profile, and a track call
  with it would create a new one. So every operation for a contact the identity map now
  gives to another customer (the customer was merged away: a late or replayed operation)
  goes ``_update_existing_only``: it updates the profile while the merge has not landed, and
  creates nothing once it has. So does an opt-out of a merged-away customer whose profile the
  identity map never got (its create refused, its merge then had nothing to merge): the
  survivor is owed its own unsubscribe.
- **deactivate**: the custom attribute ``status_attribute`` (``treez_status``) set to
  ``DEACTIVATED``, update-only (a deactivation never creates a profile); the next upsert maps
  it again.
- **backfill**: ``/users/track`` in batches of ``objects_per_request``.
- **pacing**: ``/users/track`` 3,000 requests per 3 s; ``/users/merge`` (with delete,
  identify, alias) 20,000 per minute; subscription status 5,000 per minute, counted for
  every sink of one API key. A 429 carries ``X-RateLimit-Reset`` (epoch seconds) and no
  ``Retry-After``: the call raises :class:`~connector.errors.QuotaPause` until that time, a
  second at least and an hour at most (the longest window of these endpoints: a reset
  further ahead is a bad header), and the worker pauses the destination, counting no attempt.

Error messages name Braze's status, the refused object's index and Braze's error text only
when it cannot echo what was sent (no ``@``, no run of digits).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import httpx
from pydantic import Field, HttpUrl, SecretStr, field_validator, model_validator

from connector.config_base import DestinationConfig, Rate, secret_set
from connector.delivery._http import json_or_none, safe_text
from connector.delivery.base import Capabilities, Delivery, DestinationType, Result, Sent
from connector.destinations._probe import Probe, not_checked
from connector.destinations._vendor import (
    VendorClient,
    account_digest,
    account_limiters,
    host_of,
)
from connector.errors import (
    DeliveryError,
    FatalDelivery,
    FieldMappingError,
    QuotaPause,
    RetriableDelivery,
)
from connector.mapping import Mapping
from connector.treez import CustomerEvent, parse_event_json

OBJECTS_PER_REQUEST = 75  # /users/track: 75 attributes objects (50 combined on newer plans)
MERGES_PER_REQUEST = 50
USERS_PER_STATUS_REQUEST = 50  # /v2/subscription/status/set: "up to 50 users" a request
TRACK_LIMITS = (Rate(3_000, 3.0),)
USERS_LIMITS = (Rate(20_000, 60.0),)  # merge, delete, identify, alias: shared
SUBSCRIPTION_LIMITS = (Rate(5_000, 60.0),)
MIN_PAUSE_SECONDS = 1.0  # the shortest pause a 429 with X-RateLimit-Reset causes
MAX_PAUSE_SECONDS = 3600.0  # the longest: Braze's windows are seconds to an hour long
# what only the connector may say (consent), or that would address another profile
RESERVED = frozenset(
    {
        "external_id",
        "braze_id",
        "user_alias",
        "email_subscribe",
        "push_subscribe",
        "subscription_groups",
        "_update_existing_only",
        "push_token_import",
    }
)
# the identity map's answer, bound by the worker: (contact id, conflict kind) -> the
# customers of this dispensary linked to that contact (resolved through Treez merges)
Claims = Callable[[str | None, str | None], Awaitable[tuple[list[str], list[tuple[str, str]]]]]
# whether Treez merged a customer away (Store.merged_away), bound by the worker
MergedAway = Callable[[str], Awaitable[bool]]


class BrazeDestination(DestinationConfig):
    """Braze: ``/users/track`` upserts and e-mail consent, subscription groups for SMS,
    ``/users/merge``; each endpoint paced to its documented limits."""

    type: Literal["braze"]
    api_key: SecretStr
    rest_endpoint: HttpUrl  # the instance's REST endpoint, e.g. https://rest.iad-01.braze.com
    objects_per_request: int = Field(default=OBJECTS_PER_REQUEST, ge=1, le=OBJECTS_PER_REQUEST)
    sms_subscription_groups: tuple[
        str, ...
    ] = ()  # unsubscribed on opt-out (SMS has no global state)
    email_subscription_groups: tuple[str, ...] = ()  # unsubscribed on opt-out too, when set
    opt_out_attribute: str = "treez_opt_out"  # the mapped attribute carrying the opt-out
    status_attribute: str = "treez_status"  # the custom attribute a deactivation sets
    pace: bool = True  # per-endpoint pacing from Braze's documented limits
    timeout_seconds: float = Field(default=15.0, gt=0, le=300)

    _key = field_validator("api_key")(secret_set)

    @field_validator("sms_subscription_groups", "email_subscription_groups")
    @classmethod
    def _groups(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not group.strip() for group in value):
            raise ValueError("a subscription group id must not be empty")
        return tuple(dict.fromkeys(value))

    @model_validator(mode="before")
    @classmethod
    def _batch_default(cls, data: Any) -> Any:
        # a batch is one /users/track call: unset, it is objects_per_request, so that the
        # settings say what is sent (`connector check` reads batch_size), not the generic 1
        if isinstance(data, dict) and "batch_size" not in data:
            return {**data, "batch_size": data.get("objects_per_request", OBJECTS_PER_REQUEST)}
        return data

    @model_validator(mode="after")
    def _batch(self) -> BrazeDestination:
        if self.batch_size > self.objects_per_request:
            raise ValueError(
                f"batch_size ({self.batch_size}) must not exceed objects_per_request "
                f"({self.objects_per_request}): a batch is one /users/track call"
            )
        return self


def describe_error(data: Any) -> str:
    """Braze's ``message`` of an error body, when it cannot echo a customer's value."""
    if not isinstance(data, dict):
        return ""
    return safe_text(data.get("message"))


@dataclass(slots=True)
class _Track:
    """The /users/track objects of one send and the deliveries they stand for."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # delivery index of each object


class BrazeSink:
    kind = "braze"

    def __init__(
        self,
        config: BrazeDestination,
        client: httpx.AsyncClient | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.name = config.name
        self.config = config
        self.capabilities = self.capabilities_for(config)
        self.rate_limit: tuple[Rate, ...] = config.rate_limit  # the worker's; off by default
        limits: dict[str, Sequence[Rate]] = (
            {"track": TRACK_LIMITS, "users": USERS_LIMITS, "subscription": SUBSCRIPTION_LIMITS}
            if config.pace
            else {}
        )
        secret = config.api_key.get_secret_value()
        # Braze counts its limits per workspace: every sink of one REST key (several stores
        # of an operator) shares them
        account = account_digest(secret, str(config.rest_endpoint))
        self.api = VendorClient(
            str(config.rest_endpoint),
            {
                "authorization": f"Bearer {secret}",
                "content-type": "application/json",
                "accept": "application/json",
            },
            timeout=config.timeout_seconds,
            limits=limits,
            describe=describe_error,
            client=client,
            clock=clock,
            max_connections=config.concurrency,
            shared=account_limiters("braze", account, limits, clock),
        )
        self.blank = self.api.blank  # the worker blanks what it keeps with it too
        self._wall = wall
        self._claims: Claims | None = None
        self._merged: MergedAway | None = None

    @staticmethod
    def capabilities_for(config: BrazeDestination) -> Capabilities:
        return Capabilities(
            coalesce_upserts=True,  # a profile keeps state: only the newest upsert matters
            batch_size=config.batch_size,  # objects_per_request unless set
            native_merge=True,
            channels=("email", "sms"),
            matches_on=("external_id",),
            consent_needs_fields=True,  # an opt-out before any upsert needs the external id
            bulk_size=config.objects_per_request,
            can_lookup=False,
            bulk_for_backlog=True,  # /users/track answers at once and the ids are ours
            default_rate_limit=TRACK_LIMITS,
        )

    def __repr__(self) -> str:
        return f"BrazeSink(name={self.name!r})"  # never the key

    @property
    def batch_size(self) -> int:
        return self.capabilities.batch_size

    def bind_identity_map(self, claims: Claims) -> None:
        """The identity map's answers (the worker binds them): who a contact belongs to now,
        so that an operation of a customer merged away never recreates its profile."""
        self._claims = claims

    def bind_merges(self, merged_away: MergedAway) -> None:
        """Whether Treez merged a customer away (the worker binds it): an opt-out of such a
        customer whose own profile the identity map never got (its create refused) must not
        create that profile, which no merge would ever absorb."""
        self._merged = merged_away

    # --- the port ---------------------------------------------------------------------------

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        """Every track object of the batch in one ``/users/track`` call (the batch is at most
        ``objects_per_request``), then the subscription groups of the consent changes that
        went through, then the merges. A 429 anywhere raises :class:`QuotaPause`."""
        results: list[Result | None] = [None] * len(deliveries)
        track = _Track()
        merges: list[int] = []
        for index, delivery in enumerate(deliveries):
            try:
                if delivery.op == "merge":
                    results[index] = self._merge_shortcut(delivery)
                    if results[index] is None:
                        merges.append(index)
                    continue
                done, item = await self._object(delivery)
            except DeliveryError as exc:
                results[index] = exc
                continue
            results[index] = done
            if item is not None:
                track.objects.append(item)
                track.owners.append(index)
        size = self.config.objects_per_request
        for start in range(0, len(track.objects), size):
            await self._track(
                track.objects[start : start + size], track.owners[start : start + size], results
            )
        await self._groups(deliveries, results)
        for start in range(0, len(merges), MERGES_PER_REQUEST):
            chunk = merges[start : start + MERGES_PER_REQUEST]
            await self._merge([deliveries[i] for i in chunk], chunk, results)
        return [r if r is not None else Sent() for r in results]

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        """The bulk path is ``/users/track`` itself: ``objects_per_request`` operations a
        call (a deep backlog hands over more than a batch)."""
        results: list[Result] = []
        size = self.config.objects_per_request
        for start in range(0, len(deliveries), size):
            results += await self.send(deliveries[start : start + size])
        return results

    async def lookup(self, contact_id: str) -> dict[str, Any] | None:
        return None  # can_lookup is False: Braze's export endpoints are not used

    async def probe(self) -> Probe:
        """Braze has no read a REST key can make without naming a user or being granted an
        export permission the connector does not need, so nothing is sent."""
        return not_checked(
            "Braze has no read that proves a REST key without naming a user; a refused key "
            "shows at the first delivery"
        )

    async def aclose(self) -> None:
        await self.api.aclose()

    # --- track objects --------------------------------------------------------------------

    async def _object(self, delivery: Delivery) -> tuple[Result, dict[str, Any] | None]:
        """The operation's /users/track object (None: nothing to send) and its result should
        the object be accepted."""
        op = delivery.op
        key = delivery.contact_id or _text(delivery.fields.get("external_id"))
        # an opt-out of a customer merged away whose profile the identity map never got (its
        # create refused, so its merge had nothing to merge): updated if it exists after all,
        # never created, and no contact recorded for it (the survivor is owed its own)
        unknown = (
            op == "unsubscribe"
            and delivery.contact_id is None
            and self._merged is not None
            and await self._merged(delivery.customer_id)
        )
        if key is None:
            if op == "deactivate" or unknown:
                return Sent(), None  # never reached Braze
            if op == "upsert":
                raise FatalDelivery(
                    "upsert: the mapping gives no external_id (Braze's contact id is the "
                    "mapping's external_id, e.g. {template: 'treez-{dispensary}-{customer_id}'})"
                )
            # an opt-out owed before any upsert was delivered, carrying no mapped contact:
            # wait for the upsert, never drop the opt-out
            raise RetriableDelivery(
                f"{op}: the customer's Braze external id is not known yet (its upsert has not "
                "been delivered); trying again"
            )
        gone = unknown or await self._merged_away(delivery, key)
        item: dict[str, Any] = {"external_id": key}
        if gone or op in ("deactivate", "subscribe"):
            item["_update_existing_only"] = True  # never create a profile for these
        fields = delivery.fields
        note: str | None = None  # what the operation could not do (a conflict row)
        if op == "upsert":
            item.update({k: v for k, v in fields.items() if k not in RESERVED})
            if fields.get(self.config.opt_out_attribute) is True:
                item["email_subscribe"] = "unsubscribed"
                # and out of every configured group in the same call: a profile this call
                # (re)creates, after a deletion in Braze, is never left outside them
                groups = self._configured_groups()
                if groups:
                    item["subscription_groups"] = [
                        {"subscription_group_id": group, "subscription_state": "unsubscribed"}
                        for group in groups
                    ]
        elif op == "unsubscribe":
            for name in ("email", "phone"):  # a profile this call creates holds them
                if _text(fields.get(name)) and delivery.contact_id is None:
                    item[name] = fields[name]
            if "email" in _channels(delivery):
                item["email_subscribe"] = "unsubscribed"
            if "sms" in _channels(delivery) and not self.config.sms_subscription_groups:
                # SMS has no global state in Braze: with no group set, the opt-out reaches
                # nothing, and says so (never silently done)
                note = (
                    "sms_consent_unsupported: no sms_subscription_groups set; this "
                    "customer's SMS opt-out was not sent to Braze and must be recorded there "
                    "by hand"
                )
        elif op == "subscribe":
            if gone:
                detail = (
                    f"shared_contact: external id {key} now belongs to another customer "
                    "(merged away); not subscribed"
                )
                return Sent(key, detail), None
            if "email" in _channels(delivery):
                item["email_subscribe"] = "subscribed"
        elif op == "deactivate":
            item[self.config.status_attribute] = "DEACTIVATED"
        else:
            raise FatalDelivery(f"unknown operation {op!r}")
        mine = None if unknown else key
        if len(item) == 1 + ("_update_existing_only" in item):
            return Sent(mine, note), None  # nothing to say through track (an SMS-only change)
        return Sent(mine, note), item

    def _configured_groups(self) -> list[str]:
        config = self.config
        return list(
            dict.fromkeys((*config.sms_subscription_groups, *config.email_subscription_groups))
        )

    async def _merged_away(self, delivery: Delivery, key: str) -> bool:
        """Whether the identity map gives the contact to another customer now: this
        customer was merged away (the profile is, or will be, merged on Braze's side)."""
        if self._claims is None or delivery.contact_id is None:
            return False
        owners, _ = await self._claims(key, None)
        return bool(owners) and delivery.customer_id not in owners

    async def _track(
        self, objects: list[dict[str, Any]], owners: list[int], results: list[Result | None]
    ) -> None:
        try:
            response = await self._post("/users/track", "track", {"attributes": objects})
        except QuotaPause:
            raise
        except DeliveryError as exc:  # the call as a whole: each of its operations
            for index in owners:
                results[index] = exc
            return
        data = json_or_none(response)
        errors = data.get("errors") if isinstance(data, dict) else None
        unplaced: list[str] = []  # errors that name no object of this call
        for error in errors if isinstance(errors, list) else []:
            found = error if isinstance(error, dict) else {}
            what = safe_text(found.get("type")) or "refused"
            at = _index(found, len(owners))
            if at is None:
                unplaced.append(what)
                continue
            results[owners[at]] = FatalDelivery(
                f"Braze refused the /users/track object attributes[{at}]: {what}",
                status_code=response.status_code,
                body=self.api.kept(response),
            )
        if unplaced:
            # an error naming no object may be any object's (an opt-out's): none of them
            # counts as delivered (dead-lettered, a replay sends them again)
            for index in owners:
                if not isinstance(results[index], DeliveryError):
                    results[index] = FatalDelivery(
                        "Braze reported a /users/track error naming no object of the call "
                        f"({unplaced[0]}): every object of the call counts as refused",
                        status_code=response.status_code,
                        body=self.api.kept(response),
                    )

    async def _groups(self, deliveries: list[Delivery], results: list[Result | None]) -> None:
        """The configured subscription groups of the consent changes that went through:
        ``/v2/subscription/status/set`` calls of at most 50 users each (Braze updates "up to
        50 users" a request, whatever the number of group entries); a failed call fails
        only the operations of its users."""
        wanted: list[tuple[int, str, list[str]]] = []  # delivery index, state, groups
        for index, delivery in enumerate(deliveries):
            result = results[index]
            if delivery.op not in ("unsubscribe", "subscribe") or not isinstance(result, Sent):
                continue
            if result.contact_id is None or (delivery.op == "subscribe" and result.conflict):
                continue
            state = "unsubscribed" if delivery.op == "unsubscribe" else "subscribed"
            channels = _channels(delivery)
            groups = [
                *(self.config.sms_subscription_groups if "sms" in channels else ()),
                *(self.config.email_subscription_groups if "email" in channels else ()),
            ]
            if groups:
                wanted.append((index, state, groups))
        for start in range(0, len(wanted), USERS_PER_STATUS_REQUEST):
            chunk = wanted[start : start + USERS_PER_STATUS_REQUEST]
            by_group: dict[tuple[str, str], list[str]] = {}
            for index, state, groups in chunk:
                for group in groups:
                    by_group.setdefault((group, state), []).append(str(_sent_id(results[index])))
            entries = [
                {"subscription_group_id": group, "subscription_state": state, "external_ids": ids}
                for (group, state), ids in by_group.items()
            ]
            try:
                await self._post(
                    "/v2/subscription/status/set", "subscription", {"subscription_groups": entries}
                )
            except QuotaPause:
                raise
            except DeliveryError as exc:
                for index, _, _ in chunk:
                    results[index] = exc

    # --- merges ---------------------------------------------------------------------------

    def _merge_shortcut(self, delivery: Delivery) -> Result | None:
        """A merge's result when there is nothing to send (None: it goes to Braze)."""
        source = delivery.body.get("from_contact_id")
        target = delivery.body.get("into_contact_id")
        if source is None:  # the absorbed customer never reached Braze: nothing to merge
            return Sent(None if target is None else str(target))
        if target is None:
            return RetriableDelivery(
                "merge: the survivor's Braze external id is not known yet (its upsert has not "
                "been delivered); trying again"
            )
        if source == target:
            return Sent(str(target))
        return None

    async def _merge(
        self, deliveries: list[Delivery], indexes: list[int], results: list[Result | None]
    ) -> None:
        updates = [
            {
                "identifier_to_merge": {"external_id": str(d.body["from_contact_id"])},
                "identifier_to_keep": {"external_id": str(d.body["into_contact_id"])},
            }
            for d in deliveries
        ]
        try:
            await self._post("/users/merge", "users", {"merge_updates": updates})
        except QuotaPause:
            raise
        except DeliveryError as exc:
            for index in indexes:
                results[index] = exc
            return
        # accepted (202): Braze applies it later; the survivor's contact is the result
        for index, delivery in zip(indexes, deliveries, strict=True):
            results[index] = Sent(str(delivery.body["into_contact_id"]))

    # --- HTTP -----------------------------------------------------------------------------

    async def _post(self, path: str, family: str, body: dict[str, Any]) -> httpx.Response:
        """POST; a 429 raises :class:`QuotaPause` until ``X-RateLimit-Reset``."""
        # an error's message and answer come blanked by the client (an auth error's body may
        # quote the key sent)
        response = await self.api.request(
            "POST", path, family, body=body, ok_statuses=frozenset({429})
        )
        if response.status_code != 429:
            return response
        reset = _epoch(response.headers.get("x-ratelimit-reset"))
        if reset is None:  # no reset time: an ordinary retriable 429
            raise self.api.error(response)
        raise QuotaPause(
            f"HTTP 429 from {self.api.host} ({path}): Braze's rate limit is used up until "
            f"{reset:.0f} (X-RateLimit-Reset)",
            # at least a moment: a reset already past (this host's clock ahead of Braze's)
            # would send again at once, as fast as the loop turns, with no attempt counted
            # and at most an hour: a reset further ahead (milliseconds, a bad value) is not
            # a window of Braze's, and would stop the destination for as long
            until=min(
                max(reset, self._wall() + MIN_PAUSE_SECONDS), self._wall() + MAX_PAUSE_SECONDS
            ),
            status_code=429,
            body=self.api.kept(response),
        )


def _channels(delivery: Delivery) -> set[str]:
    return set(delivery.body.get("channels") or ("email", "sms"))


def _index(error: dict[str, Any], size: int) -> int | None:
    """The index of the attributes object a non-fatal error names, None when it names
    none of the ``size`` objects sent."""
    at = error.get("index")
    if error.get("input_array") != "attributes" or type(at) is not int:
        return None
    return at if 0 <= at < size else None


def _sent_id(result: Result | None) -> str | None:
    return result.contact_id if isinstance(result, Sent) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _epoch(value: str | None) -> float | None:
    try:
        found = float(value) if value is not None else None
    except ValueError:
        return None
    return found if found is not None and found > 0 else None


def _where(config: BrazeDestination) -> str:
    groups = len(config.sms_subscription_groups) + len(config.email_subscription_groups)
    return (
        f"{host_of(config.rest_endpoint)}, {config.objects_per_request} objects a request, "
        f"{groups} subscription group(s)"
    )


def _check_mapping(config: BrazeDestination, mapping: Mapping) -> list[str]:
    """The mapping must carry the consent view in ``opt_out_attribute`` (true for a customer
    opted out), or a customer opted out when first sent would be created subscribed."""
    attribute = config.opt_out_attribute
    if attribute not in mapping.targets:
        return [
            f"maps no {attribute!r} (opt_out_attribute): Braze would create a customer "
            f"opted out when first sent as subscribed; add "
            f"'{attribute}: {{from: opt_out, transform: [bool]}}'"
        ]
    sample = json.loads(resources.files("connector").joinpath("samples/06-seed.json").read_text())
    sample["data"]["last_update"] = "2026-01-01T00:00:00.000-08:00"  # the demo fills it in
    seed = parse_event_json(json.dumps(sample))
    assert isinstance(seed, CustomerEvent)
    problems = []
    for opted_out in (True, False):
        customer = seed.customer.model_copy(update={"opt_out": opted_out})
        try:
            value = mapping.apply(customer, seed.dispensary_short_name or "d").get(attribute)
        except FieldMappingError:
            value = None
        if value is not opted_out:
            problems.append(
                f"{attribute!r} (opt_out_attribute) must map opt_out as a boolean "
                f"(true for a customer opted out), as '{{from: opt_out, transform: [bool]}}' does"
            )
            break
    return problems


DESTINATION = DestinationType(
    tag="braze",
    config=BrazeDestination,
    build=BrazeSink,
    capabilities=BrazeSink.capabilities_for,
    where=_where,
    summary="Braze users (users/track, subscription groups, users/merge)",
    check_mapping=_check_mapping,
)
