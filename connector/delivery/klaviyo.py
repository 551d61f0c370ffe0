"""The ``klaviyo`` destination: Klaviyo's JSON:API (revision pinned, default 2026-07-15).

- **upsert**: ``POST /api/profile-import``, one profile per call. Keyed by the mapping's
  Treez-derived ``external_id`` (and email / phone) until Klaviyo's profile id is known, then
  by that id, and ``external_id`` is never sent again: two dispensaries of one operator that
  share an account update one profile without re-keying it back and forth. The adapter adds
  ``properties.treez_id_<dispensary>`` (the Treez customer id), so a profile shared by two
  stores holds both ids. Consent never travels with an upsert (``subscriptions`` are dropped).
- **409 duplicate_profile** (the e-mail and the phone belong to different profiles, or the
  profile found by e-mail or phone carries another ``external_id``): the update is made again
  against ``meta.duplicate_profile_id`` without the identifiers, that id is recorded as the
  contact, and the collision is reported as a conflict. Never dead-lettered.
- **unsubscribe**: ``POST /api/profile-subscription-bulk-delete-jobs`` (up to 100 profiles a
  call), e-mail and SMS marketing. **subscribe** (only under ``resubscribe:
  on_source_opt_in``): ``POST /api/profile-subscription-bulk-create-jobs``; Klaviyo's bulk
  subscribe removes suppressions, which is why the planner never plans it for an opted-out
  customer.
- **merge**: ``POST /api/profile-merge`` (the absorbed profile into the survivor's).
- **deactivate**: no Klaviyo equivalent; the profile gets ``properties.treez_status``.
- **backfill**: ``POST /api/profile-bulk-import-jobs`` (10,000 profiles, 5 MB a job), then
  the job is polled until it completes.

Every endpoint is paced to Klaviyo's documented limits (profile-import 75/s and 700/min,
profile-merge 10/s and 150/min, the others treated like profile-import), and a 429's
``Retry-After`` goes back to the worker, which never retries earlier.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import weakref
from collections.abc import Callable
from typing import Any

import httpx

from connector.config import KlaviyoDestination as KlaviyoConfig
from connector.config import Rate
from connector.delivery._api import VendorClient
from connector.delivery.base import Capabilities, Delivery, Result, Sent
from connector.delivery.ratelimit import SlidingWindowLimiter
from connector.errors import DeliveryError, FatalDelivery, RetriableDelivery

IMPORT_LIMITS = (Rate(75, 1.0), Rate(700, 60.0))
MERGE_LIMITS = (Rate(10, 1.0), Rate(150, 60.0))
JOB_LIMITS = (Rate(10, 1.0), Rate(150, 60.0))  # bulk import jobs and their status (the spec)
# Klaviyo counts its limits per account: every sink of one private key (several stores of an
# operator) shares these, keyed by a digest of the key, so together they keep to the limits.
_ACCOUNT_LIMITERS: weakref.WeakValueDictionary[tuple[str, str, int], SlidingWindowLimiter] = (
    weakref.WeakValueDictionary()
)
SUBSCRIPTION_BATCH = 100  # profiles per subscription job
MAX_JOB_BYTES = 5 * 1024 * 1024
CONSENT_KEYS = ("subscriptions",)  # never sent with an upsert
IDENTIFIERS = ("email", "phone_number", "external_id")
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
        text = f"{error.get('code') or 'error'}: {error.get('title') or ''}".strip()
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


class KlaviyoSink:
    kind = "klaviyo"

    def __init__(
        self,
        config: KlaviyoConfig,
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
            {"import": IMPORT_LIMITS, "merge": MERGE_LIMITS, "subscriptions": IMPORT_LIMITS,
             "bulk": JOB_LIMITS, "jobs": JOB_LIMITS, "profiles": IMPORT_LIMITS}
            if config.pace
            else {}
        )  # fmt: skip
        account = hashlib.sha256(config.api_key.get_secret_value().encode()).hexdigest()[:16]
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
            shared={
                family: _account_limiter((account, family, id(clock)), rates, clock)
                for family, rates in limits.items()
            },
        )
        self._sleep = sleep

    @staticmethod
    def capabilities_for(config: KlaviyoConfig) -> Capabilities:
        return Capabilities(
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

    async def aclose(self) -> None:
        await self.api.aclose()

    # --- operations -----------------------------------------------------------------------

    def _attributes(self, delivery: Delivery, *, keyed: bool) -> dict[str, Any]:
        attributes = {k: v for k, v in delivery.fields.items() if k not in CONSENT_KEYS}
        if keyed:  # the profile id is known: never re-key it
            attributes.pop("external_id", None)
        properties = dict(attributes.get("properties") or {})
        properties[f"treez_id_{delivery.body.get('dispensary')}"] = delivery.customer_id
        attributes["properties"] = properties
        return attributes

    async def upsert(self, delivery: Delivery) -> Result:
        contact_id = delivery.contact_id
        data: dict[str, Any] = {
            "type": "profile",
            "attributes": self._attributes(delivery, keyed=contact_id is not None),
        }
        if contact_id is not None:
            data["id"] = contact_id
        response = await self.api.request(
            "POST", "/api/profile-import", "import", body={"data": data},
            ok_statuses=frozenset({409, 404}) if contact_id else frozenset({409}),
        )  # fmt: skip
        if response.status_code == 404 and contact_id is not None:
            # the profile we hold is gone (merged by another store of the account, or by a
            # marketer): import by the identifiers again and record the profile that answers
            data = {"type": "profile", "attributes": self._attributes(delivery, keyed=False)}
            again = await self.api.request(
                "POST", "/api/profile-import", "import", body={"data": data},
                ok_statuses=frozenset({409}),
            )  # fmt: skip
            if again.status_code == 409:
                return await self._onto_duplicate(again, data, None)
            found = _profile_id(again)
            return Sent(
                found, conflict=f"unknown_contact: profile {contact_id} is gone, now {found}"
            )
        if response.status_code != 409:
            return Sent(_profile_id(response) or contact_id)
        return await self._onto_duplicate(response, data, contact_id)

    async def _onto_duplicate(
        self, response: httpx.Response, data: dict[str, Any], contact_id: str | None
    ) -> Result:
        """A 409 duplicate_profile: update the right profile without the identifiers that
        belong to another one. With the profile id known, that is ours (never the other
        person's); else the one Klaviyo pointed at (same person, found by e-mail or phone)."""
        duplicate = duplicate_profile_id(response)
        if duplicate is None:
            return FatalDelivery(
                f"HTTP 409 from {self.api.host}: {describe_errors(_json(response))}",
                status_code=409,
                body=response.text[:4096],
            )
        target = contact_id or duplicate
        attributes = {k: v for k, v in data["attributes"].items() if k not in IDENTIFIERS}
        retry = {"type": "profile", "id": target, "attributes": attributes}
        again = await self.api.request(
            "POST", "/api/profile-import", "import", body={"data": retry}
        )
        if contact_id is not None:
            detail = (
                f"profile {contact_id}'s new e-mail or phone belongs to profile {duplicate}; "
                "updated without them"
            )
        else:
            detail = (
                "Klaviyo matched this customer's identifiers to more than one profile; "
                f"profile {duplicate} was updated without moving e-mail, phone or external_id"
            )
        return Sent(_profile_id(again) or target, conflict=f"duplicate_profile: {detail}")

    async def set_consent(self, deliveries: list[Delivery], op: str) -> list[Result]:
        """Unsubscribe (or subscribe) e-mail and SMS marketing, in one job call."""
        consent = "UNSUBSCRIBED" if op == "unsubscribe" else "SUBSCRIBED"
        profiles: list[dict[str, Any]] = []
        results: list[Result] = []
        for delivery in deliveries:
            email, phone = await self._consent_identifiers(delivery)
            channels = set(delivery.body.get("channels") or ("email", "sms"))
            subscriptions: dict[str, Any] = {}
            attributes: dict[str, Any] = {}
            if email and "email" in channels:
                attributes["email"] = email
                subscriptions["email"] = {"marketing": {"consent": consent}}
            if phone and "sms" in channels:
                attributes["phone_number"] = phone
                subscriptions["sms"] = {"marketing": {"consent": consent}}
            results.append(Sent(delivery.contact_id))
            if subscriptions:  # no e-mail and no phone: Klaviyo cannot market to it anyway
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

    async def _consent_identifiers(self, delivery: Delivery) -> tuple[str | None, str | None]:
        fields = delivery.fields
        email, phone = fields.get("email"), fields.get("phone_number")
        if (email or phone) or delivery.contact_id is None:
            return _text(email), _text(phone)
        found = await self.lookup(delivery.contact_id)  # a deactivated customer: no fields
        attributes = found.get("attributes", {}) if found else {}
        return _text(attributes.get("email")), _text(attributes.get("phone_number"))

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
        await self.api.request("POST", "/api/profile-merge", "merge", body={"data": data})
        return Sent(str(target))

    async def deactivate(self, delivery: Delivery) -> Result:
        contact_id = delivery.contact_id
        if contact_id is None:
            return Sent()  # never reached Klaviyo
        data = {
            "type": "profile",
            "id": contact_id,
            "attributes": {"properties": {"treez_status": "DEACTIVATED"}},
        }
        await self.api.request("POST", "/api/profile-import", "import", body={"data": data})
        return Sent(contact_id)

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
        for chunk in self._jobs(deliveries, upserts):
            try:
                refused = await self._run_job([deliveries[i] for i in chunk])
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

    def _jobs(self, deliveries: list[Delivery], indexes: list[int]) -> list[list[int]]:
        """Split into jobs of at most ``bulk_size`` profiles and under 5 MB of body."""
        jobs: list[list[int]] = []
        current: list[int] = []
        size = 0
        for index in indexes:
            length = len(json.dumps(self.bulk_profile(deliveries[index]), separators=(",", ":")))
            if current and (
                len(current) >= self.config.bulk_size or size + length > MAX_JOB_BYTES - 4096
            ):
                jobs.append(current)
                current, size = [], 0
            current.append(index)
            size += length + 1
        if current:
            jobs.append(current)
        return jobs

    async def _run_job(self, deliveries: list[Delivery]) -> dict[int, DeliveryError]:
        """Run one bulk import job to its end; the profiles it refused, by their index."""
        data = {
            "type": "profile-bulk-import-job",
            "attributes": {"profiles": {"data": [self.bulk_profile(d) for d in deliveries]}},
        }
        response = await self.api.request(
            "POST", "/api/profile-bulk-import-jobs", "bulk", body={"data": data}
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
                        (keys[(n, found[n].lower())] for n in IDENTIFIERS
                         if isinstance(found.get(n), str) and (n, found[n].lower()) in keys),
                        None,
                    )  # fmt: skip
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


def _account_limiter(
    key: tuple[str, str, int], rates: tuple[Rate, ...], clock: Callable[[], float]
) -> SlidingWindowLimiter:
    found = _ACCOUNT_LIMITERS.get(key)
    if found is None:
        found = _ACCOUNT_LIMITERS[key] = SlidingWindowLimiter(rates, clock)
    return found


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _profile_id(response: httpx.Response) -> str | None:
    found = (_json(response).get("data") or {}).get("id")
    return found if isinstance(found, str) and found else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None
