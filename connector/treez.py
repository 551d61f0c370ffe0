"""The Treez customer and webhook envelope, faithful to what Treez really sends.

Quirks handled here (see docs/treez.md of the project's shared notes and the seed delivery):

- ``opt_out`` arrives as ``"true"``/``"false"`` strings in webhooks, booleans in the write API and
  ``null`` in some reads; it is normalised to ``bool | None``: the text in any case with
  surrounding spaces, ``""`` (or spaces) read as ``None``, and anything else (``"yes"``, ``"0"``,
  ``1``, ``"N/A"``) is refused, because guessing about consent is not acceptable.
- ids (``customer_id``, ``merged_customer_ids``, ``merged_into_customer_id``, external ids) come
  as strings or integers and are normalised to strings.
- ``last_update`` is ISO 8601 with an offset and milliseconds; it orders events, so it must be a
  valid timestamp with an offset. ``signup_date`` has the same form; ``last_visit_date`` has no
  zone, and its year-2000 value means "never visited" (normalised to ``None``).
- ``"N/A"`` and ``""`` are placeholders: date fields holding one become ``None``; text fields
  keep the text as sent (the mapping engine nulls placeholders), so nothing is lost here.
- Enumerations (``status``, ``gender``, ``patient_type``...) are kept as text: the known values
  are listed in the ``StrEnum`` classes below, and a value Treez adds tomorrow is kept, not refused.
- Unknown fields are kept (``model_extra``), and ``dispensary_short_name`` may be missing from
  older deliveries.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    GetPydanticSchema,
    PlainValidator,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import SchemaValidator, core_schema

from connector.errors import EventValidationError, Problem

PLACEHOLDERS = frozenset({"N/A", ""})


class CustomerStatus(StrEnum):
    ACTIVE = "ACTIVE"
    DEACTIVATED = "DEACTIVATED"  # deleted, or merged away
    MERGED = "MERGED"  # others were merged into it; still active


class VerificationStatus(StrEnum):
    VERIFIED = "VERIFIED"
    VERIFICATION_PENDING = "VERIFICATION_PENDING"
    NOT_APPLICABLE = "NOT_APPLICABLE"


class Gender(StrEnum):
    MALE = "M"
    FEMALE = "F"
    UNKNOWN = "U"
    NOT_SAID = "N"


class PatientType(StrEnum):
    ADULT = "ADULT"
    MEDICAL = "MEDICAL"
    MEDICAL_MMID = "MEDICAL_MMID"


# --- value normalisers: each raises ValueError only, so pydantic reports it with the path ---


def _opt_out(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "true":
            return True
        if text == "false":
            return False
        if text == "":
            return None  # says nothing, as null does; never read as false
    # "yes", "n", "1", 1, "N/A"...: a guess either way, and consent is never guessed
    raise ValueError('must be true or false (a boolean, or the text "true" or "false")')


MAX_ID_CHARS = 128  # the store keeps ids in columns of this width (PostgreSQL enforces it)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # no id holds these; PostgreSQL's text takes no NUL


def _id(value: Any) -> str:
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("must not be empty")
        if len(text) > MAX_ID_CHARS:
            raise ValueError(f"must be an id of at most {MAX_ID_CHARS} characters")
        if _CONTROL.search(text):
            raise ValueError("must be an id without control characters")
        return text
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
        if len(text) > MAX_ID_CHARS:
            raise ValueError(f"must be an id of at most {MAX_ID_CHARS} characters")
        return text
    raise ValueError("must be an id (text or a whole number)")


def _optional_id(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip() in PLACEHOLDERS):
        return None
    return _id(value)


_DATE_TIME = re.compile(r"\s*[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]")


def _timestamp(value: Any) -> Any:
    # Only a date and a time in text is a Treez timestamp; pydantic alone would also take
    # epoch numbers, and digits as text ("1700000000"): the order of events is never guessed
    if not isinstance(value, str) or _DATE_TIME.match(value) is None:
        raise ValueError("must be an ISO 8601 timestamp with an offset, as text")
    return value


_NEVER_VISITED = date(2000, 1, 1)
_MIDNIGHT = time(0)


NOT_FINITE = "is not a finite number (NaN, Infinity, or past a float's range): JSON has none"


def _finite(value: Any) -> Any:
    # A float that is not finite has no JSON form: json.dumps writes NaN (invalid JSON) and
    # msgspec writes null, so it would reach a destination as garbage or as a silent null.
    # It comes from text ("NaN") that pydantic reads as a float, or a number past a float's
    # range (1e400); the literals NaN and Infinity are refused earlier, as not JSON.
    if value.__class__ is float and not math.isfinite(value):
        raise ValueError(NOT_FINITE)
    return value


def _list_or_empty(value: Any) -> Any:
    return [] if value is None else value


def _object_or_empty(value: Any) -> Any:
    return {} if value is None else value


def _null_first(source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
    """The type's schema behind a null check in pydantic's core: a null is taken as it is,
    without calling the type's Python validator (or its Before one) at all."""
    return core_schema.nullable_schema(handler(source))


def _schema_as_declared(
    schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
) -> JsonSchemaValue:
    """The JSON Schema of the type behind :func:`_null_first`'s check, as before it."""
    assert schema["type"] == "nullable"
    return handler(schema["schema"])


# A null taken in the core, the rest as the type says. In Customer, a null list becomes empty
# in its after-validator (one call, not one a field); the JSON Schema stays the type's own.
NullFirst = GetPydanticSchema(_null_first)
NullAsEmpty = GetPydanticSchema(_null_first, _schema_as_declared)

Id = Annotated[str, PlainValidator(_id, json_schema_input_type=str | int)]
OptionalId = Annotated[
    str | None,
    PlainValidator(_optional_id, json_schema_input_type=str | int | None),
    NullFirst,
]
# Dates parse in pydantic's core; text it cannot read as a date is kept as sent (a bad permit
# date must not block a customer's consent change), and placeholders become None below.
LenientDate = Annotated[date | str | None, Field(union_mode="left_to_right")]
LenientDatetime = Annotated[datetime | str | None, Field(union_mode="left_to_right")]
OptOut = Annotated[
    bool | None, PlainValidator(_opt_out, json_schema_input_type=bool | str | None), NullFirst
]
IdList = Annotated[list[Id], BeforeValidator(_list_or_empty)]

_LENIENT = ConfigDict(extra="allow", coerce_numbers_to_str=True, frozen=True)


class Address(BaseModel):
    model_config = _LENIENT

    type: str | None = None  # "address_of_record" (lowercase in reads)
    street1: str | None = None
    street2: str | None = None
    city: str | None = None
    state: str | None = None
    zipcode: str | None = None
    primary: bool | None = None


class ExternalIds(BaseModel):
    model_config = _LENIENT

    aiq_contact_id: OptionalId = None  # Alpine IQ persona id, set when staff link the customer
    sticky_cards_contact_id: OptionalId = None


_DATE_FIELDS = (
    "birthday",
    "drivers_license_expiration",
    "permit_expiration",
    "signup_date",
    "last_visit_date",
)


class Customer(BaseModel):
    """A Treez customer as sent in a CUSTOMER webhook or read from the Customer API."""

    model_config = _LENIENT

    customer_id: Id
    last_update: Annotated[AwareDatetime, BeforeValidator(_timestamp)]
    status: str | None = None
    verification_status: str | None = None
    verification_reasons: Annotated[list[Any], NullAsEmpty] = Field(default_factory=list)
    first_name: str | None = None
    middle_name: str | None = None
    nickname: str | None = None
    last_name: str | None = None
    birthday: LenientDate = None
    email: str | None = None
    phone: str | None = None
    gender: str | None = None
    drivers_license: str | None = None
    drivers_license_expiration: LenientDate = None
    state_medical_id: str | None = None
    permit_expiration: LenientDate = None
    patient_type: str | None = None
    notes: str | None = None
    physician_first_name: str | None = None
    physician_last_name: str | None = None
    physician_license: str | None = None
    physician_address: str | None = None
    physician_phone: str | None = None
    is_caregiver: bool | None = None
    caregiver_license_number: str | None = None
    caregiver_name_1: str | None = None
    caregiver_name_2: str | None = None
    caregiver_details: Annotated[list[Any], NullAsEmpty] = Field(default_factory=list)
    rewards_balance: Annotated[int | float | None, AfterValidator(_finite)] = None
    rewards_type: str | None = None
    signup_date: LenientDatetime = None
    last_visit_date: LenientDatetime = None
    opt_out: OptOut = None
    referral_source: str | None = None
    banned: bool | None = None
    warning_1: bool | None = None
    warning_2: bool | None = None
    addresses: Annotated[list[Address], NullAsEmpty] = Field(default_factory=list)
    merged_customer_ids: Annotated[list[Id], NullAsEmpty] = Field(default_factory=list)
    merged_into_customer_id: OptionalId = None
    customer_groups: Annotated[list[str], NullAsEmpty] = Field(default_factory=list)
    imageList: Annotated[list[Any], NullAsEmpty] = Field(default_factory=list)  # Treez's spelling
    external_ids: Annotated[ExternalIds, BeforeValidator(_object_or_empty)] = Field(
        default_factory=ExternalIds
    )

    @model_validator(mode="after")
    def _placeholders_and_sentinels(self) -> Customer:
        # One pass over the few fields whose raw form needs care (cheaper than a validator each).
        fields = self.__dict__
        for name in _NULL_AS_EMPTY:
            if fields[name] is None:  # null, taken as such in the core (NullAsEmpty)
                fields[name] = []
        for name in _DATE_FIELDS:
            value = fields[name]
            if value.__class__ is str and value.strip() in PLACEHOLDERS:
                fields[name] = None
        visit = fields["last_visit_date"]
        if (
            visit.__class__ is datetime
            and visit.date() == _NEVER_VISITED
            and visit.time() == _MIDNIGHT
        ):
            fields["last_visit_date"] = None  # Treez writes 2000-01-01 00:00:00.000 for "never"
        return self

    @property
    def is_deactivated(self) -> bool:
        return self.status == CustomerStatus.DEACTIVATED

    @property
    def is_merged_away(self) -> bool:
        """The absorbed side of a merge: deactivated and pointing at its survivor."""
        return self.merged_into_customer_id is not None

    @property
    def primary_address(self) -> Address | None:
        for address in self.addresses:
            if address.primary:
                return address
        return self.addresses[0] if self.addresses else None


_NULL_AS_EMPTY = tuple(
    name for name, field in Customer.model_fields.items() if NullAsEmpty in field.metadata
)


class _CustomerEnvelope(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    event_type: str
    dispensary_short_name: str | None = None
    data: Customer


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    event_type: Annotated[str, Field(min_length=1)]
    dispensary_short_name: str | None = None


class _RuledCustomer(BaseModel):
    """The customer fields the planner's rules stand on: ordering (``customer_id``,
    ``last_update``: contract 1), consent, merges, deactivation and identity. The receiver
    refuses a body when one of them is wrong (:func:`check_event_json`); any other field is
    data to map, and a wrong one is dropped when the event is planned
    (:func:`parse_stored_event`) rather than holding up a consent change."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True, frozen=True)

    customer_id: Id
    last_update: Annotated[AwareDatetime, BeforeValidator(_timestamp)]
    opt_out: OptOut = None  # consent is never guessed
    status: str | None = None
    merged_customer_ids: IdList = Field(default_factory=list)
    merged_into_customer_id: OptionalId = None
    external_ids: Annotated[ExternalIds, BeforeValidator(_object_or_empty)] = Field(
        default_factory=ExternalIds
    )


RULE_FIELDS = frozenset(_RuledCustomer.model_fields)


class _CheckedEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    event_type: str
    dispensary_short_name: str | None = None
    test: Any = None  # only its presence matters: a ping
    data: _RuledCustomer


@dataclass(slots=True)  # not frozen: built for each webhook, where frozen's __init__ costs 4x
class ReceivedCustomer:
    """A CUSTOMER webhook as the receiver checks it before answering (:func:`check_event_json`)."""

    customer_id: str
    last_update: datetime
    dispensary_short_name: str | None
    kind: Literal["customer"] = "customer"


@dataclass(frozen=True, slots=True)
class CustomerEvent:
    """A CUSTOMER webhook: the customer as of ``customer.last_update``."""

    customer: Customer
    dispensary_short_name: str | None
    kind: Literal["customer"] = "customer"


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """A webhook of another type (PRODUCT, TICKET...): recorded, never applied."""

    event_type: str
    dispensary_short_name: str | None
    kind: Literal["other"] = "other"


@dataclass(frozen=True, slots=True)
class TestPing:
    """The body the Treez portal's "Test" button sends (it has a ``test`` key)."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    dispensary_short_name: str | None
    kind: Literal["test"] = "test"


TreezEvent = CustomerEvent | OtherEvent | TestPing


def parse_event(body: Any, *, source: str = "webhook body") -> TreezEvent:
    """Classify and validate a decoded webhook body.

    Raises :class:`EventValidationError` naming each bad field path (``data.last_update``),
    and nothing else, whatever JSON value it is given.
    """
    if not isinstance(body, Mapping):
        raise EventValidationError(source, [Problem("body", "must be a JSON object")])
    if "test" in body:
        name = body.get("dispensary_short_name")
        return TestPing(name if isinstance(name, str) else None)
    event_type = body.get("event_type")
    if isinstance(event_type, str) and event_type.strip().upper() == "CUSTOMER":
        if "data" not in body:
            raise EventValidationError(source, [Problem("data", "is missing")])
        try:
            envelope = _CustomerEnvelope.model_validate(body)
        except ValidationError as exc:
            raise EventValidationError(source, problems_from(exc)) from None
        return CustomerEvent(envelope.data, envelope.dispensary_short_name)
    return _other_event(body, source)


def _other_event(body: Mapping[str, Any], source: str) -> OtherEvent:
    try:
        other = _Envelope.model_validate(body)
    except ValidationError as exc:
        raise EventValidationError(source, problems_from(exc)) from None
    return OtherEvent(other.event_type.strip().upper(), other.dispensary_short_name)


class NotJsonError(EventValidationError):
    """The body is not JSON at all (the receiver answers 400, not 422)."""


def parse_event_json(raw: bytes | str, *, source: str = "webhook body") -> TreezEvent:
    """Decode and classify a webhook body in one step.

    The common case, a sound CUSTOMER event of the usual shape, is read by msgspec's decoder
    (:func:`_fast_customer_event`); whatever it is not sure of is validated by the models
    (:func:`_parse_event_json_model`), which decide as before. Raises :class:`NotJsonError`
    for a body that is not JSON, :class:`EventValidationError` for the rest.
    """
    return _fast_customer_event(raw) or _parse_event_json_model(raw, source)


def _parse_event_json_model(raw: bytes | str, source: str = "webhook body") -> TreezEvent:
    """:func:`parse_event_json` by the models: a CUSTOMER event is validated straight from
    the bytes (pydantic's JSON parser, no intermediate dicts); anything else takes the general
    path of :func:`parse_event`."""
    if not _may_hold_constant(raw):  # pydantic's parser reads NaN as a number
        try:
            envelope = _CustomerEnvelope.model_validate_json(raw)
        except ValidationError:
            pass
        else:
            extra = envelope.model_extra
            if envelope.event_type == "CUSTOMER" and not (extra and "test" in extra):
                return CustomerEvent(envelope.data, envelope.dispensary_short_name)
    return parse_event(_json_body(raw, source), source=source)


# --- NaN and Infinity: not JSON ---
#
# Python's json and pydantic's JSON parser read the literals NaN, Infinity and -Infinity as
# floats, but RFC 8259 has no such numbers and no destination reads them: json.dumps writes
# them back as they are (invalid JSON) and msgspec as null (a value silently lost). Before
# the receiver answers (check_event_json, and parse_event_json, the quarantine's replay
# alike), a body holding one is not JSON: 400, kept in quarantine, naming each path where one
# stands and never the value. msgspec's decoder (the quick and fast paths) refuses them
# already; the model paths keep them from pydantic's parser (:func:`_may_hold_constant`) and
# read such a body with json (:func:`_json_body`), which marks where they stand. An event
# already stored is planned, not refused (parse_stored_event): such a value outside the
# rules' fields is left out (:func:`_screen`), as any wrong field is. A float past its range
# (1e400) is JSON: left out of rewards_balance (:func:`_finite`) as a wrong value, and the
# mapping refuses it anywhere else (connector/mapping/_engine.py).

NOT_JSON_NUMBER = "is not JSON (NaN and Infinity are not JSON numbers, RFC 8259)"
_PLACES_NAMED = 20  # in a refusal; the rest are counted


class _Constant:
    """Where json read NaN, Infinity or -Infinity (its ``parse_constant``)."""

    __slots__ = ()


_CONSTANT = _Constant()


def _constant(_literal: str) -> _Constant:
    return _CONSTANT


def _may_hold_constant(raw: bytes | str) -> bool:
    """Whether the UTF-8 text ``raw`` may hold NaN or Infinity as a number (never False
    when it does; a name or a text holding the word is a false alarm, harmless)."""
    if isinstance(raw, bytes):
        return b"NaN" in raw or b"Infinity" in raw
    return "NaN" in raw or "Infinity" in raw


def _is_constant(item: Any) -> bool:
    return item is _CONSTANT


def _is_not_finite(item: Any) -> bool:
    return item.__class__ is float and not math.isfinite(item)


def _places(
    value: Any, where: str, test: Callable[[Any], bool], *, first: bool = False
) -> list[str]:
    """The paths in ``value`` (found at ``where``; "" for its top) of the values ``test``
    holds for, in the text's order; with ``first``, the first only (iterative: ``value`` may
    nest as deep as json goes). A path is spelled only for a container walked into or a
    value found, not for every value passed."""
    found = []
    # (item, the path of its container, its name or index there: None for the top)
    stack: list[tuple[Any, str, str | int | None]] = [(value, where, None)]
    while stack:
        item, parent, step = stack.pop()
        hit = test(item)
        if not hit and not isinstance(item, dict | list):
            continue
        if step is None:
            path = parent
        elif isinstance(step, int):
            path = f"{parent or 'body'}[{step}]"
        else:
            path = f"{parent}.{_readable(step)}" if parent else _readable(step)
        if hit:
            found.append(_shortened(path or "body"))
            if first:
                return found
        elif isinstance(item, dict):
            stack.extend((child, path, str(name)) for name, child in reversed(item.items()))
        else:
            stack.extend((item[index], path, index) for index in reversed(range(len(item))))
    return found


def non_finite(value: Any, where: str = "") -> list[str]:
    """The paths in ``value`` (found at ``where``) of the floats that are not finite: what
    json reads from NaN, Infinity or a number past a float's range, which no JSON writer
    can write back."""
    return _places(value, where, _is_not_finite)


def has_non_finite(value: Any) -> bool:
    """Whether ``value`` holds a float that is not finite anywhere (:func:`non_finite`,
    stopping at the first, no path spelled on the way)."""
    return bool(_places(value, "", _is_not_finite, first=True))


# --- what the model takes and no serializer does: lone surrogates, deep nesting ---
#
# JSON text may escape half of a surrogate pair on its own ("\ud800"): Python's parsers read
# it as a str that is not Unicode text, and pydantic keeps it in a field it validates as text
# or as Any. So does nesting a few hundred levels deep. Either is accepted, and then fails
# every serializer the planner uses (the content hash, the mapped contact, the outbox row).
# :func:`_screen` decides them before the model sees the body, alike in the receiver and
# when the stored event is planned: in the envelope or in a rule field, the event is refused
# (422, naming the path); in any other customer field, that field (or that element of a
# list) is left out, as the model's own refusals are.

MAX_DEPTH = 128
"""Containers within containers that a customer field's value (or an envelope field's) may
hold: pydantic's serializer stops at 255 levels, and the outbox's json.dumps at the
interpreter's recursion limit."""
_MOST_OPENERS = MAX_DEPTH + 2  # "{" and "[" anywhere: the envelope and data, then MAX_DEPTH
# the cheap test of whether a body needs screening: a surrogate escaped or as such (a valid
# pair, or an escaped backslash before "ud8", also sends it to the screen, which finds nothing)
_SUSPECT = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_TEXT = "is not Unicode text (it holds a lone surrogate, \\ud800-\\udfff)"
_NAME_NOT_TEXT = "has a name that is not Unicode text (it holds a lone surrogate)"
_TOO_DEEP = f"is nested more than {MAX_DEPTH} levels deep"


def _suspect(raw: bytes | str) -> bool:
    """Whether ``raw`` may hold what :func:`_screen` looks for (never False when it does)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return False  # not JSON: refused as such wherever it is parsed
    if raw.count("{") + raw.count("[") > _MOST_OPENERS:
        return True
    if _may_hold_constant(raw):  # not JSON: refused by _json_body, with its paths
        return True
    # substring and ASCII tests first: a regex with an alternation scans the whole body
    # slowly, and almost every body is ASCII without escapes
    if "\\" in raw and _SUSPECT.search(raw) is not None:  # one character: a memchr
        return True
    return not raw.isascii() and _SURROGATE.search(raw) is not None


def readable_name(name: str) -> str:
    """A field name as logs and paths show it: its lone surrogates as their escapes."""
    return _readable(name)


def _readable(name: str) -> str:
    """A field name for a path: its lone surrogates as their escapes."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _hazard(value: Any, where: str, depth: int = 0, *, finite: bool = False) -> Problem | None:
    """The first place in ``value`` (found at ``where``, inside ``depth`` containers) that no
    serializer takes; nesting too deep is reported at ``where``. With ``finite``, a float
    that is not finite too (no JSON writer writes it back). Iterative: the value may be
    nested as deep as json.loads goes."""
    stack = [(value, where, depth)]
    while stack:
        item, path, level = stack.pop()
        if item.__class__ is float:
            if finite and not math.isfinite(item):
                return Problem(_shortened(path), NOT_FINITE)
        elif isinstance(item, str):
            if _SURROGATE.search(item) is not None:
                return Problem(_shortened(path), _NOT_TEXT)
        elif isinstance(item, dict):
            if level >= MAX_DEPTH:
                return Problem(_shortened(where), _TOO_DEEP)
            for name, child in item.items():
                if _SURROGATE.search(name) is not None:
                    return Problem(_shortened(f"{path}.{_readable(name)}"), _NAME_NOT_TEXT)
                stack.append((child, f"{path}.{name}", level + 1))
        elif isinstance(item, list):
            if level >= MAX_DEPTH:
                return Problem(_shortened(where), _TOO_DEEP)
            stack.extend((child, f"{path}[{i}]", level + 1) for i, child in enumerate(item))
    return None


def _shortened(path: str, most: int = 200) -> str:
    return path if len(path) <= most else path[: most - 3] + "..."


def _is_customer_body(body: Any) -> bool:
    """Whether :func:`parse_event` reads ``body`` as a CUSTOMER event (valid or not)."""
    if not isinstance(body, Mapping) or "test" in body or "data" not in body:
        return False
    event_type = body.get("event_type")
    return isinstance(event_type, str) and event_type.strip().upper() == "CUSTOMER"


def _screen(body: dict[str, Any], source: str) -> list[Problem]:
    """Leave out of a decoded CUSTOMER ``body``, in place, each customer field outside
    :data:`RULE_FIELDS` (or element of such a list) that no serializer takes, and return the
    problems of what was left out. Raises :class:`EventValidationError` when such a thing
    is in the envelope or in a rule field."""
    refused = []
    for name, value in body.items():
        if _SURROGATE.search(name) is not None:
            refused.append(Problem(_shortened(_readable(name)), _NAME_NOT_TEXT))
        elif name != "data" and (problem := _hazard(value, _shortened(name))) is not None:
            refused.append(problem)
    data = body["data"]
    dropped: list[Problem] = []
    if isinstance(data, dict):
        refused += _rule_hazards(data, "data.")
        for name in list(data):
            value = data[name]
            if _SURROGATE.search(name) is not None:
                dropped.append(Problem(_shortened(f"data.{_readable(name)}"), _NAME_NOT_TEXT))
                del data[name]
            elif name in RULE_FIELDS:
                continue
            elif isinstance(value, list):
                bad = [
                    (index, problem)
                    for index, item in enumerate(value)
                    if (problem := _hazard(item, f"data.{name}[{index}]", 1, finite=True))
                    is not None
                ]
                for index, _ in reversed(bad):
                    del value[index]
                dropped += [problem for _, problem in bad]
            elif (problem := _hazard(value, f"data.{name}", finite=True)) is not None:
                dropped.append(problem)
                del data[name]
    if refused:
        raise EventValidationError(source, refused)
    return dropped


def _rule_hazards(customer: Mapping[str, Any], prefix: str) -> list[Problem]:
    """What no serializer takes in the fields the rules stand on (never left out), a float
    that is not finite included: the models would read it as the text "nan" or "inf" (a
    status that reads as a reactivation)."""
    return [
        problem
        for name in RULE_FIELDS
        if name in customer
        and (problem := _hazard(customer[name], f"{prefix}{name}", finite=True)) is not None
    ]


# A JSON object may repeat a name. Every parser here reads it as Python's json does, the last
# copy wins: json.loads, pydantic's JSON parser and msgspec's decoder (into a Struct too), the
# name spelled with escapes ("opt\u005fout") included. The receiver, the planner, the
# reconciliation and the quarantine's replay all read one body alike, so what is stored
# (the inbox row's customer_id) and what is planned agree; tests/test_treez.py holds them to it.


def check_event_json(
    raw: bytes | str, *, source: str = "webhook body"
) -> ReceivedCustomer | OtherEvent | TestPing:
    """What the receiver decides before answering: contract 1 (the envelope, ``customer_id``,
    ``last_update``) and the other fields the planner's rules stand on (:data:`RULE_FIELDS`);
    a ping; another event type. Raises as :func:`parse_event_json` does, for those fields.

    The common case, a sound CUSTOMER event, is recognised by :func:`_quick_check`; whatever
    it is not sure of, refusals included, is decided by the pydantic rule model
    (:func:`_check_with_model`), which stays the one authority.
    """
    return _quick_check(raw) or _check_with_model(raw, source)


# --- the quick check: the same rules, on msgspec's decoder ---
#
# In the receiver, under load, validating a body with the pydantic rule model cost about
# 20 us of the event loop a request (6-7 us on its own in a loop: the rest is caches and the
# wake-ups a slower loop causes), the largest part of what a durable webhook costs beyond
# answering. msgspec decodes the same fields in a quarter of that; the values are then judged
# by the rule model's own functions (_id, _opt_out, _optional_id) and a strict timestamp
# form. It only ever says yes: a body it cannot decode, a value of another shape than these
# (a number as status, which the model turns into text), a timestamp outside the strict form,
# goes to the model, which accepts or refuses it with its paths. tests/test_ingest.py holds
# the two to the same answers over generated bodies.


class _QuickExternalIds(msgspec.Struct):
    aiq_contact_id: str | int | None = None
    sticky_cards_contact_id: str | int | None = None


class _QuickCustomer(msgspec.Struct):
    """:class:`_RuledCustomer`'s fields (:data:`RULE_FIELDS`), as JSON shapes."""

    customer_id: str | int
    last_update: str
    opt_out: bool | str | None = None
    status: str | None = None
    merged_customer_ids: list[str | int] | None = None
    merged_into_customer_id: str | int | None = None
    external_ids: _QuickExternalIds | None = None


class _QuickEnvelope(msgspec.Struct):
    event_type: str
    data: _QuickCustomer
    dispensary_short_name: str | None = None
    test: Any = msgspec.UNSET  # only its presence matters: a ping


_QUICK = msgspec.json.Decoder(_QuickEnvelope)
# RFC 3339 with an offset, ASCII digits, no leap second, at most microseconds: a form the
# model's parser and datetime.fromisoformat read alike (the day of the month is left to it)
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)


# What msgspec takes in a field it skips and the model's JSON parsers refuse: a number of
# more than 4,300 digits (Python's int limit; msgspec never converts it), and nesting past the
# depth json.loads reaches (msgspec's own limit is a little deeper); and what the model takes
# and cannot be planned: nesting past MAX_DEPTH (:func:`_screen`). Such bodies go to the model.
_INT_DIGITS = 4300
_LONG_NUMBER = re.compile(rf"(?<![0-9])[0-9]{{{_INT_DIGITS + 1}}}")  # tried at run starts only


def _quick_check(raw: bytes | str) -> ReceivedCustomer | None:
    """A sound CUSTOMER event as :func:`_check_with_model` would return it, or None when not
    sure (which is no verdict: the model decides)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")  # msgspec would skip bad UTF-8 in a field it ignores
        except UnicodeDecodeError:
            return None
    if raw.count("{") + raw.count("[") > _MOST_OPENERS:
        return None
    if len(raw) > _INT_DIGITS and _LONG_NUMBER.search(raw) is not None:  # 7 ns a character
        return None
    try:
        envelope = _QUICK.decode(raw)
    # not JSON, or a shape the model may still accept; a lone surrogate in the text
    except (msgspec.DecodeError, RecursionError, UnicodeError):
        return None
    if envelope.event_type != "CUSTOMER" or envelope.test is not msgspec.UNSET:
        return None
    data = envelope.data
    if _TIMESTAMP.fullmatch(data.last_update) is None:
        return None
    try:
        last_update = datetime.fromisoformat(data.last_update)
        customer_id = _id(data.customer_id)
        _opt_out(data.opt_out)
        _optional_id(data.merged_into_customer_id)
        for merged in data.merged_customer_ids or ():
            _id(merged)
        if data.external_ids is not None:
            _optional_id(data.external_ids.aiq_contact_id)
            _optional_id(data.external_ids.sticky_cards_contact_id)
    except ValueError:
        return None
    return ReceivedCustomer(customer_id, last_update, envelope.dispensary_short_name)


# --- the fast path of parse_event_json: msgspec's decoder, the models built as pydantic would ---
#
# Validating the seed event with the pydantic models cost about 1.5 times json.loads of the
# same bytes, the larger half of parsing and mapping an event. msgspec decodes the body into
# Structs whose fields take only the JSON shapes the models keep as they are (text or null
# for text, true/false/null for booleans...) and refuses any other; the few values the models
# change (ids, consent, timestamps, dates, null lists) are converted by the models' own
# functions, and timestamps and dates by pydantic's own parser; the models are then built as
# their validation builds them (the same __dict__, fields set and extras). It only ever says
# yes: a body with an unknown or a missing field, a value of another shape (a number as
# text, "yes" as a boolean, a fraction among any values), a refused id or timestamp, is left
# to the models, which decide with their paths and messages. tests/test_perf2_parse_fast.py
# holds the two to the same results over generated bodies.


# What the fast path takes in a list of any values (verification_reasons...): text, whole
# numbers, booleans and nulls, and lists or objects of them. A number with a fraction (the
# parsers may round its last digit apart) or deeper nesting (their depth limits differ) is
# left to the models.
_FastScalar = str | int | bool | None
_FastElement = list[_FastScalar] | dict[str, _FastScalar] | _FastScalar


class _FastAddress(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """:class:`Address`, every field present."""

    type: str | None
    street1: str | None
    street2: str | None
    city: str | None
    state: str | None
    zipcode: str | None
    primary: bool | None


class _FastExternalIds(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """:class:`ExternalIds`, a field missing left unset."""

    aiq_contact_id: str | int | msgspec.UnsetType | None = msgspec.UNSET
    sticky_cards_contact_id: str | int | msgspec.UnsetType | None = msgspec.UNSET


class _FastCustomer(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """:class:`Customer`'s fields in its order, every one present, as the JSON shapes the
    fast path takes."""

    customer_id: str | int
    last_update: str
    status: str | None
    verification_status: str | None
    verification_reasons: list[_FastElement] | None
    first_name: str | None
    middle_name: str | None
    nickname: str | None
    last_name: str | None
    birthday: str | None
    email: str | None
    phone: str | None
    gender: str | None
    drivers_license: str | None
    drivers_license_expiration: str | None
    state_medical_id: str | None
    permit_expiration: str | None
    patient_type: str | None
    notes: str | None
    physician_first_name: str | None
    physician_last_name: str | None
    physician_license: str | None
    physician_address: str | None
    physician_phone: str | None
    is_caregiver: bool | None
    caregiver_license_number: str | None
    caregiver_name_1: str | None
    caregiver_name_2: str | None
    caregiver_details: list[_FastElement] | None
    rewards_balance: int | float | None
    rewards_type: str | None
    signup_date: str | None
    last_visit_date: str | None
    opt_out: bool | str | None
    referral_source: str | None
    banned: bool | None
    warning_1: bool | None
    warning_2: bool | None
    addresses: list[_FastAddress] | None
    merged_customer_ids: list[str | int] | None
    merged_into_customer_id: str | int | None
    customer_groups: list[str] | None
    imageList: list[_FastElement] | None
    external_ids: _FastExternalIds | None


class _FastEnvelope(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    event_type: str
    data: _FastCustomer
    dispensary_short_name: str | None = None


assert _FastCustomer.__struct_fields__ == tuple(Customer.model_fields)
assert _FastAddress.__struct_fields__ == tuple(Address.model_fields)
assert _FastExternalIds.__struct_fields__ == tuple(ExternalIds.model_fields)


_FAST = msgspec.json.Decoder(_FastEnvelope)
# the fields set of a model with every field given (a copy for each model: pydantic's own
# model_copy(update=...) adds to it)
_FAST_FIELDS = set(Customer.model_fields)
_FAST_ADDRESS_FIELDS = set(Address.model_fields)
_EXTERNAL_IDS_FIELDS = set(ExternalIds.model_fields)
_as_dict = msgspec.structs.asdict
_new_object = object.__new__
# a model's slots, set as its validation sets them (a frozen model refuses setattr)
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
# and a CustomerEvent's, as its __init__ sets them (a frozen dataclass's __init__ sets each
# through object.__setattr__, twice as slow)
_set_event_customer = CustomerEvent.__dict__["customer"].__set__
_set_event_dispensary = CustomerEvent.__dict__["dispensary_short_name"].__set__
_set_event_kind = CustomerEvent.__dict__["kind"].__set__
assert CustomerEvent.__slots__ == ("customer", "dispensary_short_name", "kind")
# the text of timestamps and dates is read by pydantic's own parser, as in the models:
# Customer.last_update (AwareDatetime) and the datetime or date first in LenientDatetime
# and LenientDate
_AWARE_DATETIME = SchemaValidator(core_schema.datetime_schema(tz_constraint="aware"))
_DATETIME = SchemaValidator(core_schema.datetime_schema())
_DATE = SchemaValidator(core_schema.date_schema())


def _fast_lenient(text: str, parser: SchemaValidator) -> Any:
    """A :data:`LenientDate` or :data:`LenientDatetime` given as text, as the model leaves it
    (null stays null: the callers leave it where it is)."""
    if text.strip() in PLACEHOLDERS:
        return None  # no date nor time: the model keeps the text, then nulls it
    try:
        return parser.validate_python(text)
    except ValidationError:
        return text  # the model keeps text it cannot read as a date


_Model = TypeVar("_Model", bound=BaseModel)


def _built(cls: type[_Model], fields: dict[str, Any], fields_set: set[str]) -> _Model:
    """An instance of ``cls`` as its validation builds it, without extras."""
    model = _new_object(cls)
    _set_dict(model, fields)
    _set_fields_set(model, fields_set)
    _set_extra(model, {})
    _set_private(model, None)
    return model


def _fast_external_ids(ids: _FastExternalIds | None) -> ExternalIds:
    if ids is None:  # null, as {}
        return _built(ExternalIds, {"aiq_contact_id": None, "sticky_cards_contact_id": None}, set())
    aiq, sticky = ids.aiq_contact_id, ids.sticky_cards_contact_id
    fields = {
        "aiq_contact_id": None if aiq is msgspec.UNSET else _optional_id(aiq),
        "sticky_cards_contact_id": None if sticky is msgspec.UNSET else _optional_id(sticky),
    }
    if aiq is not msgspec.UNSET and sticky is not msgspec.UNSET:
        return _built(ExternalIds, fields, _EXTERNAL_IDS_FIELDS.copy())
    fields_set = set()
    if aiq is not msgspec.UNSET:
        fields_set.add("aiq_contact_id")
    if sticky is not msgspec.UNSET:
        fields_set.add("sticky_cards_contact_id")
    return _built(ExternalIds, fields, fields_set)


def _fast_customer_event(raw: bytes | str) -> CustomerEvent | None:
    """A sound CUSTOMER event as :func:`_parse_event_json_model` returns it, or None when not
    sure (which is no verdict: the models decide)."""
    if not raw.isascii():
        if isinstance(raw, str):
            if _SURROGATE.search(raw) is not None:
                return None  # not Unicode text: the parsers take it apart
        else:
            try:
                raw = raw.decode("utf-8")  # msgspec does not check the UTF-8 of every byte
            except UnicodeDecodeError:
                return None
    if len(raw) > _INT_DIGITS and _LONG_NUMBER.search(
        raw if isinstance(raw, str) else raw.decode("ascii")
    ):
        return None
    try:
        envelope = _FAST.decode(raw)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return None
    if envelope.event_type != "CUSTOMER":
        return None
    data = envelope.data
    # The values the models change, each as they change it; a null (or an empty list) is left
    # as decoded where the model keeps it. The checks before the calls only spare calls that
    # would return the value as it is (an id of letters and digits, a null, consent as a
    # boolean) or as the check says ("true").
    value: Any
    try:
        fields = _as_dict(data)
        value = data.customer_id
        if not (value.__class__ is str and value.isascii() and value.isalnum()):
            fields["customer_id"] = _id(value)  # isalnum: not empty, no space nor control
        elif len(value) > MAX_ID_CHARS:
            return None
        value = data.last_update
        if _DATE_TIME.match(value) is None:  # as _timestamp: str is all the Struct takes
            return None
        fields["last_update"] = _AWARE_DATETIME.validate_python(value)
        if data.verification_reasons is None:
            fields["verification_reasons"] = []
        if (value := data.birthday) is not None:
            fields["birthday"] = _fast_lenient(value, _DATE)
        if (value := data.drivers_license_expiration) is not None:
            fields["drivers_license_expiration"] = _fast_lenient(value, _DATE)
        if (value := data.permit_expiration) is not None:
            fields["permit_expiration"] = _fast_lenient(value, _DATE)
        if data.caregiver_details is None:
            fields["caregiver_details"] = []
        if (value := data.signup_date) is not None:
            fields["signup_date"] = _fast_lenient(value, _DATETIME)
        if (value := data.last_visit_date) is not None:
            visit = fields["last_visit_date"] = _fast_lenient(value, _DATETIME)
            if (
                visit.__class__ is datetime
                and visit.date() == _NEVER_VISITED
                and visit.time() == _MIDNIGHT
            ):
                fields["last_visit_date"] = None  # as Customer._placeholders_and_sentinels
        value = data.opt_out
        if value == "true":  # as Treez writes it, and as _opt_out reads it
            fields["opt_out"] = True
        elif value is not None and value.__class__ is not bool:
            fields["opt_out"] = _opt_out(value)
        addresses = data.addresses
        if addresses is None:
            fields["addresses"] = []
        elif addresses:
            built = []
            for address in addresses:
                model = _new_object(Address)
                _set_dict(model, _as_dict(address))
                _set_fields_set(model, _FAST_ADDRESS_FIELDS.copy())
                _set_extra(model, {})
                _set_private(model, None)
                built.append(model)
            fields["addresses"] = built
        ids = data.merged_customer_ids
        if ids is None:
            fields["merged_customer_ids"] = []
        elif ids:
            fields["merged_customer_ids"] = [_id(id) for id in ids]
        if (value := data.merged_into_customer_id) is not None:
            fields["merged_into_customer_id"] = _optional_id(value)
        if data.customer_groups is None:
            fields["customer_groups"] = []
        if data.imageList is None:
            fields["imageList"] = []
        external = data.external_ids
        if (
            external is None
            or external.aiq_contact_id is not None
            or external.sticky_cards_contact_id is not None
        ):
            fields["external_ids"] = _fast_external_ids(external)
        else:  # both given as null (the usual): as _fast_external_ids makes them
            ids_model = _new_object(ExternalIds)
            _set_dict(ids_model, {"aiq_contact_id": None, "sticky_cards_contact_id": None})
            _set_fields_set(ids_model, _EXTERNAL_IDS_FIELDS.copy())
            _set_extra(ids_model, {})
            _set_private(ids_model, None)
            fields["external_ids"] = ids_model
    except ValueError:  # pydantic's ValidationError included
        return None
    customer = _new_object(Customer)
    _set_dict(customer, fields)
    _set_fields_set(customer, _FAST_FIELDS.copy())
    _set_extra(customer, {})
    _set_private(customer, None)
    event = _new_object(CustomerEvent)
    _set_event_customer(event, customer)
    _set_event_dispensary(event, envelope.dispensary_short_name)
    _set_event_kind(event, "customer")
    return event


def _check_with_model(raw: bytes | str, source: str) -> ReceivedCustomer | OtherEvent | TestPing:
    """:func:`check_event_json` by the pydantic rule model: the authority, on a body
    screened as the planner screens it (:func:`_screen`)."""
    if not _suspect(raw):
        try:
            envelope = _CheckedEnvelope.model_validate_json(raw)
        except ValidationError:
            pass
        else:
            if envelope.event_type == "CUSTOMER" and "test" not in envelope.model_fields_set:
                data = envelope.data
                return ReceivedCustomer(
                    data.customer_id, data.last_update, envelope.dispensary_short_name
                )
    body = _json_body(raw, source)
    if _is_customer_body(body):
        _screen(body, source)
        try:
            checked = _CheckedEnvelope.model_validate(body)
        except ValidationError as exc:
            raise EventValidationError(source, problems_from(exc)) from None
        data = checked.data
        return ReceivedCustomer(data.customer_id, data.last_update, checked.dispensary_short_name)
    event = parse_event(body, source=source)  # the rest never reaches the customer model
    assert not isinstance(event, CustomerEvent)
    return event


def _depth(value: Any) -> int:
    """How deep lists and objects nest in ``value`` (iteratively: any depth)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def leave_out_deep(record: dict[str, Any]) -> list[str]:
    """Remove from a pulled customer the fields outside :data:`RULE_FIELDS` nested deeper
    than :data:`MAX_DEPTH` (the planner would leave them out; stored as they are, the event
    could nest past what any parser here reads); the names removed."""
    removed = [
        name
        for name, value in record.items()
        if name not in RULE_FIELDS
        and isinstance(value, dict | list)
        and _depth(value) > MAX_DEPTH - 2  # the event wraps the customer in two levels
    ]
    for name in removed:
        del record[name]
    return removed


def check_customer(record: Any, *, source: str = "customer record") -> tuple[str, datetime]:
    """A customer object (as the Customer API returns it) checked as the receiver checks a
    webhook's: its id and ``last_update``, once the fields the rules stand on
    (:data:`RULE_FIELDS`) are sound. The rest is applied when planned
    (:func:`parse_stored_event`)."""
    if isinstance(record, Mapping) and (refused := _rule_hazards(record, "")):
        raise EventValidationError(source, refused)
    try:
        checked = _RuledCustomer.model_validate(record)
    except ValidationError as exc:
        raise EventValidationError(source, problems_from(exc)) from None
    return checked.customer_id, checked.last_update


def parse_stored_event(
    raw: bytes | str, *, source: str = "stored event"
) -> tuple[TreezEvent, list[Problem]]:
    """Parse an event from the inbox with the whole customer model, and the problems of what
    was dropped to do so: a customer field outside :data:`RULE_FIELDS` that the model refuses
    (a ``first_name`` that is an object) is left out, as if Treez had not sent it, instead of
    refusing the whole event with its consent; in a list (``addresses``), only the elements
    refused are; likewise what no serializer takes (:func:`_screen`). Raises
    :class:`EventValidationError` when anything else is wrong."""
    if _suspect(raw):
        # NaN and Infinity, refused by the receiver before answering, are left out here, as
        # any wrong field outside the rules: an event stored is planned (one accepted before
        # they were refused, or pulled by the reconciliation, which writes a float past its
        # range as Infinity), and a field no destination can be sent never holds it up
        body = _json_body(raw, source, constants=True)
        screened = _screen(body, source) if _is_customer_body(body) else []
        event, dropped = _parse_leaving_out(body, source)
        return event, screened + dropped
    try:
        return parse_event_json(raw, source=source), []
    except NotJsonError:
        raise
    except EventValidationError as exc:
        if _data_fields(exc.problems) is None:
            raise
    return _parse_leaving_out(_json_body(raw, source), source)


def _parse_leaving_out(body: Any, source: str) -> tuple[TreezEvent, list[Problem]]:
    """:func:`parse_event`, leaving out the customer fields outside :data:`RULE_FIELDS` (or
    their list elements) that the model refuses; the problems of those left out."""
    try:
        return parse_event(body, source=source), []
    except EventValidationError as exc:
        dropped = _data_fields(exc.problems)
        if dropped is None:
            raise
        data = body["data"]
        for name, elements in dropped.items():
            value = data[name]
            if elements is not None and isinstance(value, list):
                for index in sorted(elements, reverse=True):
                    del value[index]
            else:
                del data[name]
        return parse_event(body, source=source), list(exc.problems)


_ELEMENT = re.compile(r"\[(\d+)\]")


def _data_fields(problems: Sequence[Problem]) -> dict[str, set[int] | None] | None:
    """What ``problems`` are about, if each is a customer field outside :data:`RULE_FIELDS`:
    by field, the list elements at fault, or None for the whole field; None otherwise."""
    fields: dict[str, set[int] | None] = {}
    for problem in problems:
        if not problem.where.startswith("data."):
            return None
        path = problem.where[len("data.") :]
        name = path.split(".", 1)[0].split("[", 1)[0]
        if not name or name in RULE_FIELDS:
            return None
        element = _ELEMENT.match(path, len(name))
        if element is None:
            fields[name] = None
        elif name not in fields or fields[name] is not None:
            fields[name] = (fields.get(name) or set()) | {int(element.group(1))}
    return fields


# How deep json.loads may be asked to go. Its own limit is the interpreter's recursion limit
# less the frames already on the stack, which differ between the receiver and the planner: a
# body one of them could read and the other not would be answered 202 and never planned.
MAX_JSON_DEPTH = 512
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def _nesting(text: str) -> int:
    """How deep the arrays and objects of JSON ``text`` nest (for valid JSON; at C speed)."""
    brackets = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", text)).encode().translate(_STEPS)
    # each opener steps +1 and each closer -1: the running sum of (step - 1)
    return max(map(operator.sub, itertools.accumulate(brackets), itertools.count(1)), default=0)


def _json_body(raw: bytes | str, source: str, *, constants: bool = False) -> Any:
    """``raw`` decoded, the same wherever it is: nesting past :data:`MAX_JSON_DEPTH` is
    refused as not JSON, as json.loads refuses nesting past the recursion limit; so are NaN
    and Infinity (naming their paths), unless ``constants``: then they are read as floats
    (a stored event's, for :func:`_screen` to leave out)."""
    text = raw
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            text = ""  # json.loads refuses it
    if text.count("{") + text.count("[") > MAX_JSON_DEPTH and _nesting(text) > MAX_JSON_DEPTH:
        problem = Problem("body", f"is not JSON we read (nested past {MAX_JSON_DEPTH} levels)")
        raise NotJsonError(source, [problem])
    try:
        body = json.loads(raw) if constants else json.loads(raw, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:
        where = (
            f"line {exc.lineno}, column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else "body"
        )
        raise NotJsonError(source, [Problem("body", f"is not JSON ({where})")]) from None
    # text that is not UTF-8 (json reads UTF-16 and UTF-32 too) is looked through as well
    if constants:
        return body
    if (not text or _may_hold_constant(text)) and (found := _places(body, "", _is_constant)):
        problems = [Problem(where, NOT_JSON_NUMBER) for where in found[:_PLACES_NAMED]]
        if len(found) > _PLACES_NAMED:  # the reason stays short, whatever the body holds
            more = len(found) - _PLACES_NAMED
            problems.append(Problem("body", f"{more} more places hold NaN or Infinity"))
        raise NotJsonError(source, problems)
    return body


def webhook_body_schema() -> dict[str, Any]:
    """JSON Schema of a CUSTOMER webhook body (for the OpenAPI document); its sub-schemas
    are under ``$defs`` with refs of the form ``#/components/schemas/{model}``."""
    return _CustomerEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")


def parse_customer(record: Any, *, source: str = "customer record") -> Customer:
    """Validate one customer object (as the Customer API returns it)."""
    try:
        return Customer.model_validate(record)
    except ValidationError as exc:
        raise EventValidationError(source, problems_from(exc)) from None


def format_location(loc: tuple[str | int, ...]) -> str:
    """``("data", "addresses", 0, "city")`` → ``data.addresses[0].city``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def problems_from(exc: ValidationError) -> list[Problem]:
    """Turn pydantic's errors into problems without the input values (they are customer data)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        message = error["msg"]
        if error["type"] == "missing":
            message = "is missing"
        elif error["type"] == "model_type" or error["type"] == "dict_type":
            message = "must be an object"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        problems.append(Problem(format_location(error["loc"]), message))
    return problems
