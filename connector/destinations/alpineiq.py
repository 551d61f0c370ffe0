"""The ``alpineiq`` destination: Alpine IQ's loyalty API (``X-APIKEY``, account uid).

Alpine IQ does not publish its request bodies, limits or error shapes; what is built here
follows its public endpoint list, and every path is a setting (README, "Alpine IQ"):

- **upsert**: ``POST /api/v2/loyalty`` (real time) with the mapped member, plus ``uid``,
  ``srcID`` (the Treez customer id) and ``contactID`` when the persona is known: from the
  identity map, else from Treez's ``external_ids.aiq_contact_id`` (the planner seeds the map
  with it). The persona id Alpine IQ answers is recorded. Consent never travels with an
  upsert: ``emailOptIn`` and ``smsOptIn`` are dropped from it (joining a loyalty programme
  is not marketing consent).
- **unsubscribe**: the same call with ``emailOptIn: false`` and ``smsOptIn: false``;
  **subscribe** (only under ``resubscribe: on_source_opt_in``) with ``true``.
- **merge**: Alpine IQ has no merge API and merges personas that share a phone or e-mail by
  itself; the planner plans none (``native_merge`` false): the survivor is updated by its own
  payload and the absorbed Treez id resolves to the survivor's persona in the identity map.
- **deactivate**: no Alpine IQ equivalent is published; the member's
  ``customAttributes.treezStatus`` is set to ``DEACTIVATED`` so that campaigns can exclude it.
- **a gone persona** (404 for the ``contactID`` sent: a stale ``aiq_contact_id``, a persona
  Alpine IQ merged away overnight): whatever the operation, it is sent again without
  ``contactID``, matched by phone, e-mail and ``srcID`` (a deactivation with only those of
  the mapped contact), and the persona that answers replaces the gone id in the identity map
  (:attr:`Sent.replaces`).
- **backfill**: ``POST /api/v1.1/createUpdateMembers/{uid}``, ``bulk_size`` members a call.
- ``/loyaltyContact`` is never called (it texts the customer a double opt-in at once); the
  configuration refuses such a path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import Field, HttpUrl, SecretStr, field_validator

from connector.config_base import DestinationConfig, Rate, Rates, secret_set
from connector.delivery._http import identifier
from connector.delivery.base import Capabilities, Delivery, DestinationType, Result, Sent
from connector.destinations._probe import Probe
from connector.destinations._vendor import VendorClient, host_of
from connector.destinations._vendor import json_object as _json
from connector.errors import DeliveryError, FatalDelivery

CONSENT_KEYS = ("emailOptIn", "smsOptIn")
# what Alpine IQ finds a persona by besides contactID and srcID; a deactivation whose persona
# is gone sends only these of the mapped contact (it changes nothing else of the person)
MATCH_KEYS = ("mobilePhone", "email")


def describe_error(data: Any) -> str:
    """``code`` of an Alpine IQ error body when it reads as a code (its message, and a code
    that is text, may quote what was sent: it goes to logs, dead letters and ``explain``)."""
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            return identifier(error.get("code")) or ""
    return ""


class AlpineIQDestination(DestinationConfig):
    """Alpine IQ: real-time upserts through ``/api/v2/loyalty``, backfills through
    ``createUpdateMembers``. Alpine IQ does not publish its request bodies or limits: the
    paths are settings (defaults from its public endpoint list), the pace a guess."""

    type: Literal["alpineiq"]
    api_key: SecretStr
    uid: str = Field(min_length=1)
    base_url: HttpUrl = HttpUrl("https://lab.alpineiq.com")
    upsert_path: str = "/api/v2/loyalty"
    bulk_path: str = "/api/v1.1/createUpdateMembers/{uid}"
    lookup_path: str = "/api/v2/persona/{contact_id}"
    bulk_size: int = Field(default=500, ge=1, le=10_000)
    timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    # unpublished: a conservative pace until Alpine IQ says otherwise
    rate_limit: Rates = (Rate(20, 1.0),)

    _key = field_validator("api_key")(secret_set)

    @field_validator("upsert_path", "bulk_path", "lookup_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        if "loyaltycontact" in value.lower():
            raise ValueError(
                "must not be /loyaltyContact: that endpoint texts the customer a double "
                "opt-in at once"
            )
        return value


class AlpineIQSink:
    kind = "alpineiq"

    def __init__(
        self,
        config: AlpineIQDestination,
        client: httpx.AsyncClient | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = config.name
        self.config = config
        self.capabilities = self.capabilities_for(config)
        # every request is paced here, one slot each, whatever the batch (the worker's
        # limiter counts batches): default 20/s, as Alpine IQ publishes none
        self.rate_limit: tuple[Rate, ...] = ()
        self.api = VendorClient(
            str(config.base_url),
            {
                "x-apikey": config.api_key.get_secret_value(),
                "content-type": "application/json",
                "accept": "application/json",
            },
            timeout=config.timeout_seconds,
            limits={"*": config.rate_limit} if config.rate_limit else {},
            describe=describe_error,
            client=client,
            clock=clock,
            max_connections=config.concurrency,
        )
        self.blank = self.api.blank  # the worker blanks what it keeps with it too

    @staticmethod
    def capabilities_for(config: AlpineIQDestination) -> Capabilities:
        return Capabilities(
            coalesce_upserts=True,  # a profile keeps state: only the newest upsert matters
            batch_size=config.batch_size,
            native_merge=False,
            channels=("email", "sms"),
            matches_on=("contactID", "mobilePhone", "email", "srcID"),
            external_id_key="aiq_contact_id",
            consent_needs_fields=True,
            bulk_size=config.bulk_size,
            can_lookup=True,
            bulk_for_backlog=True,
            default_rate_limit=(Rate(20, 1.0),),
        )

    def __repr__(self) -> str:
        return f"AlpineIQSink(name={self.name!r})"  # never the key

    @property
    def batch_size(self) -> int:
        return self.capabilities.batch_size

    # --- the port -------------------------------------------------------------------------

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        results: list[Result] = []
        for delivery in deliveries:
            try:
                results.append(await self._one(delivery))
            except DeliveryError as exc:
                results.append(exc)
        return results

    async def lookup(self, contact_id: str) -> dict[str, Any] | None:
        path = self.config.lookup_path.format(contact_id=contact_id, uid=self.config.uid)
        response = await self.api.request("GET", path, "lookup", ok_statuses=frozenset({404}))
        if response.status_code == 404:
            return None
        data = _json(response).get("data")
        return data if isinstance(data, dict) else None

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        """Upserts ``bulk_size`` members a call; other operations one by one."""
        results: list[Result | None] = [None] * len(deliveries)
        upserts = [i for i, d in enumerate(deliveries) if d.op == "upsert"]
        for index, delivery in enumerate(deliveries):
            if delivery.op != "upsert":
                results[index] = (await self.send([delivery]))[0]
        path = self.config.bulk_path.format(uid=self.config.uid)

        async def bulk(chunk: Sequence[int]) -> list[Result]:
            members = [self._member(deliveries[i], with_uid=False) for i in chunk]
            try:
                response = await self.api.request("POST", path, "bulk", body=members)
                data = _json(response).get("data")
                found = data.get("results") if isinstance(data, dict) else None
                ids = [_contact_id(r) for r in found] if isinstance(found, list) else []
                return [
                    Sent(ids[n] if n < len(ids) and ids[n] else deliveries[i].contact_id)
                    for n, i in enumerate(chunk)
                ]
            except FatalDelivery:
                # one member refused (a stale contactID is a 404 for the whole call, a bad
                # field a 400): the real-time path, member by member, with its fallbacks,
                # so one bad member never dead-letters the others
                return await self.send([deliveries[i] for i in chunk])
            except DeliveryError as exc:
                return [exc] * len(chunk)

        size = self.config.bulk_size
        chunks = [upserts[start : start + size] for start in range(0, len(upserts), size)]
        # one call at a time: Alpine IQ matches members to personas it already holds by
        # phone or e-mail (two customers can be one persona there, unseen from here), so
        # only calls in sequence keep each persona's writes in the order they were sent
        for chunk in chunks:
            outcome = await bulk(chunk)
            for index, result in zip(chunk, outcome, strict=True):
                results[index] = result
        return [r if r is not None else Sent() for r in results]

    async def probe(self) -> Probe:
        """The account's store locations (``GET /api/v1.1/stores/{uid}``, Alpine IQ's store
        locations API): the key and the uid together; no persona is read or written."""
        return await self.api.probe(f"/api/v1.1/stores/{quote(self.config.uid, safe='')}")

    async def aclose(self) -> None:
        await self.api.aclose()

    # --- operations -----------------------------------------------------------------------

    def _member(self, delivery: Delivery, *, with_uid: bool = True) -> dict[str, Any]:
        member = {k: v for k, v in delivery.fields.items() if k not in CONSENT_KEYS}
        member["srcID"] = delivery.customer_id
        if delivery.contact_id is not None:
            member["contactID"] = delivery.contact_id
        if with_uid:
            member = {"uid": self.config.uid, **member}
        return member

    async def _one(self, delivery: Delivery) -> Result:
        op = delivery.op
        if op == "upsert":
            member = self._member(delivery)
        elif op in ("unsubscribe", "subscribe"):
            if op == "subscribe" and delivery.contact_id is None:
                # Alpine IQ matches a member by phone, then e-mail: a family sharing a phone
                # shares a persona, and a subscribe sent that way could lift the opt-out of
                # another person. Only a persona we know to be this customer's is opted in.
                return Sent(None, conflict=_NO_SUBSCRIBE_BY_IDENTIFIERS)
            member = self._member(delivery)
            channels = set(delivery.body.get("channels") or ("email", "sms"))
            opted_in = op == "subscribe"
            if "email" in channels:
                member["emailOptIn"] = opted_in
            if "sms" in channels:
                member["smsOptIn"] = opted_in
        elif op == "deactivate":
            if delivery.contact_id is None:
                return Sent()  # never reached Alpine IQ
            # an attribute, not a tag: a later upsert (reactivation) maps treezStatus again
            # and so replaces it, where tags are only ever added to
            member = {
                "uid": self.config.uid,
                "contactID": delivery.contact_id,
                "srcID": delivery.customer_id,
                "customAttributes": {"treezStatus": "DEACTIVATED"},
            }
        elif op == "merge":
            # planned only for destinations with a native merge; Alpine IQ has none
            return Sent(delivery.body.get("into_contact_id"))
        else:
            return FatalDelivery(f"unknown operation {op!r}")
        statuses = frozenset({404}) if "contactID" in member else frozenset()
        response = await self.api.request(
            "POST", self.config.upsert_path, "upsert", body=member, ok_statuses=statuses
        )
        if response.status_code != 404:
            return Sent(_contact_id(_json(response).get("data")) or delivery.contact_id)
        # The persona id we hold (from Treez's aiq_contact_id, or one Alpine IQ has since
        # merged away) names no persona: match by phone, e-mail and srcID instead, whatever
        # the operation, and the persona that answers replaces the gone id in the identity
        # map (the store reports it), so the next operation names it at once.
        stale = member.pop("contactID")
        if op == "subscribe":
            return Sent(None, conflict=f"{_NO_SUBSCRIBE_BY_IDENTIFIERS} (persona {stale} is gone)")
        if op == "deactivate":
            fields = delivery.fields
            member.update({k: fields[k] for k in MATCH_KEYS if fields.get(k) is not None})
        response = await self.api.request("POST", self.config.upsert_path, "upsert", body=member)
        found = _contact_id(_json(response).get("data"))
        if found is None:
            return Sent(None, conflict=f"unknown_contact: persona {stale} not found")
        return Sent(found, replaces=stale)


_NO_SUBSCRIBE_BY_IDENTIFIERS = (
    "unknown_contact: no persona of this customer's is known, and a subscribe is never sent "
    "by phone or e-mail (it could opt in another person sharing them); the customer stays "
    "unsubscribed in Alpine IQ"
)


def _contact_id(data: Any) -> str | None:
    if isinstance(data, dict):
        found = data.get("contactID") or data.get("id")
        if isinstance(found, str | int) and not isinstance(found, bool) and str(found):
            return str(found)
    return None


DESTINATION = DestinationType(
    tag="alpineiq",
    config=AlpineIQDestination,
    build=AlpineIQSink,
    capabilities=AlpineIQSink.capabilities_for,
    where=lambda config: f"{host_of(config.base_url)}, uid {config.uid}",
    summary="Alpine IQ loyalty members (real-time upserts, bulk backfills)",
)
