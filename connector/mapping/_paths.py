"""Source paths of the mapping language: parsed once, checked against the customer's shape,
compiled into plain getter functions.

Grammar::

    path     := segment ("." segment)*
    segment  := NAME selector*
    selector := "[" INTEGER "]"                 list element (negative counts from the end)
              | "[" NAME "=" LITERAL "]"        first element whose field equals LITERAL

``dispensary`` at the root is the event's dispensary; every other root name is a field of
the Treez customer (``first_name``, ``addresses[primary=true].zipcode``,
``external_ids.aiq_contact_id``). A literal may be quoted ("..." or '...'); unquoted ``true``
and ``false`` also match booleans.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from pydantic import BaseModel

from connector.treez import Address, Customer

ROOT_DISPENSARY = "dispensary"


@dataclass(frozen=True, slots=True)
class Attr:
    name: str


@dataclass(frozen=True, slots=True)
class Index:
    index: int


@dataclass(frozen=True, slots=True)
class Select:
    key: str
    literal: str
    quoted: bool


Step = Attr | Index | Select


class PathError(ValueError):
    """A path that cannot be parsed or cannot exist; the message says why."""


_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_TOKEN = re.compile(
    rf"""
    (?P<dot>\.)
    | (?P<name>{_NAME})
    | \[\s*(?P<index>-?\d+)\s*\]
    | \[\s*(?P<key>{_NAME})\s*=\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[^\]"']*?))\s*\]
    """,
    re.VERBOSE,
)


def parse_path(text: str) -> tuple[Step, ...]:
    """Parse ``text`` into steps; raise :class:`PathError` naming the position of a mistake."""
    if not isinstance(text, str) or not text.strip():
        raise PathError("a path must be non-empty text")
    text = text.strip()
    steps: list[Step] = []
    pos = 0
    expect_name = True
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise PathError(f"cannot read path {text!r} at character {pos + 1}")
        kind = match.lastgroup if match.lastgroup in ("dot", "name", "index") else "select"
        if expect_name and kind != "name":
            raise PathError(f"path {text!r} needs a field name at character {pos + 1}")
        if not expect_name and kind == "name":
            raise PathError(f"path {text!r} needs '.' or '[' at character {pos + 1}")
        if kind == "dot":
            expect_name = True
        elif kind == "name":
            steps.append(Attr(match["name"]))
            expect_name = False
        elif kind == "index":
            steps.append(Index(int(match["index"])))
        else:
            quoted = match["dq"] is not None or match["sq"] is not None
            literal = match["dq"] if match["dq"] is not None else match["sq"] or match["bare"]
            if not quoted and not literal:
                raise PathError(f"path {text!r}: selector [{match['key']}=] needs a value")
            steps.append(Select(match["key"], literal or "", quoted))
        pos = match.end()
    if expect_name:
        raise PathError(f"path {text!r} ends with '.'")
    return tuple(steps)


# --- the customer's shape, derived from the model, for checking paths at load time ---


@dataclass(frozen=True, slots=True)
class Shape:
    kind: str  # "object", "list", "value" or "any"
    fields: dict[str, Shape] = field(default_factory=dict)
    item: Shape | None = None


ANY = Shape("any")
VALUE = Shape("value")


def _shape_of(annotation: Any) -> Shape:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _shape_of(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        shapes = [_shape_of(a) for a in options]
        structured = [s for s in shapes if s.kind != "value"]
        if not structured:
            return VALUE
        return structured[0] if len(structured) == 1 else ANY
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return Shape("list", item=_shape_of(args[0]) if args else ANY)
    if origin is dict or annotation is Any:
        return ANY
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_shape(annotation)
    return VALUE


def model_shape(model: type[BaseModel]) -> Shape:
    return Shape(
        "object", {name: _shape_of(f.annotation) for name, f in model.model_fields.items()}
    )


def customer_shape() -> Shape:
    shape = model_shape(Customer)
    fields = dict(shape.fields)
    fields["primary_address"] = model_shape(Address)  # Customer.primary_address
    return Shape("object", fields)


CUSTOMER_SHAPE = customer_shape()


def check_path(steps: tuple[Step, ...], text: str) -> list[str]:
    """Check steps against the customer's shape.

    Raises :class:`PathError` for a path that can never yield a value (a field inside a plain
    value, an index on an object); returns warnings for names Treez is not known to send
    (they may be fields added after this version: the customer keeps unknown fields).
    """
    warnings: list[str] = []
    first = steps[0]
    if isinstance(first, Attr) and first.name == ROOT_DISPENSARY:
        if len(steps) > 1:
            raise PathError(f"path {text!r}: 'dispensary' is a plain value with no fields inside")
        return warnings
    shape = CUSTOMER_SHAPE
    where = ""
    for step in steps:
        if shape.kind == "any":
            break
        if isinstance(step, Attr):
            if shape.kind == "list":
                raise PathError(
                    f"path {text!r}: {where} is a list; pick an element with [0] or "
                    f"[field=value] before .{step.name}"
                )
            if shape.kind == "value":
                raise PathError(f"path {text!r}: {where} is a plain value with no fields inside")
            known = shape.fields.get(step.name)
            if known is None:
                hint = difflib.get_close_matches(step.name, list(shape.fields), n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                warnings.append(
                    f"path {text!r}: {step.name!r} is not a field Treez is known to send"
                    f"{suggestion}; it reads null unless Treez sends it"
                )
                break
            shape = known
            where = f"{where}.{step.name}" if where else step.name
        else:
            if shape.kind != "list":
                raise PathError(f"path {text!r}: {where} is not a list, so it has no elements")
            item = shape.item or ANY
            if isinstance(step, Select) and item.kind == "object" and step.key not in item.fields:
                warnings.append(
                    f"path {text!r}: the elements of {where} have no known field {step.key!r}"
                )
            elif isinstance(step, Select) and item.kind == "value":
                raise PathError(
                    f"path {text!r}: the elements of {where} are plain values, "
                    f"so [{step.key}=...] cannot match"
                )
            shape = item
            where += f"[{step.index}]" if isinstance(step, Index) else f"[{step.key}=...]"
    return warnings


# --- compiled getters ---


class Context:
    """What a mapping reads: the customer and the event's dispensary."""

    __slots__ = ("customer", "dispensary")

    def __init__(self, customer: Customer, dispensary: str) -> None:
        self.customer = customer
        self.dispensary = dispensary


Getter = Callable[[Context], Any]
_MISSING = object()


def _attr(value: Any, name: str) -> Any:
    if isinstance(value, BaseModel):
        found = value.__dict__.get(name, _MISSING)
        if found is not _MISSING:
            return found
        extra = value.__pydantic_extra__
        if extra and name in extra:
            return extra[name]
        # only our own properties (primary_address); never pydantic's methods or settings
        attribute = getattr(type(value), name, None)
        if isinstance(attribute, property) and attribute.fget is not None:
            return attribute.fget(value)
        return None
    if isinstance(value, dict):
        return value.get(name)
    return None


def _matches(value: Any, literal: str, quoted: bool) -> bool:
    if isinstance(value, bool):
        return not quoted and literal.lower() == ("true" if value else "false")
    if value is None:
        return not quoted and literal == "null"
    return str(value) == literal


def _compile_step(step: Step) -> Callable[[Any], Any]:
    if isinstance(step, Attr):
        name = step.name

        def attr(value: Any) -> Any:
            try:
                return value.__dict__[name]  # a model's declared field: the common case
            except (AttributeError, KeyError):
                return _attr(value, name)

        return attr
    if isinstance(step, Index):
        index = step.index

        def element(value: Any) -> Any:
            if value.__class__ is list and -len(value) <= index < len(value):
                return value[index]
            return None

        return element
    key, literal, quoted = step.key, step.literal, step.quoted
    # the boolean an unquoted true/false matches ([primary=true]), decided here once
    flag = None if quoted or literal.lower() not in ("true", "false") else literal.lower() == "true"

    def select(value: Any) -> Any:
        if value.__class__ is not list:
            return None
        for item in value:
            try:
                found = item.__dict__[key]
            except (AttributeError, KeyError):
                found = _attr(item, key)
            if flag is not None and found.__class__ is bool:
                if found is flag:
                    return item
            elif found.__class__ is str:
                if found == literal:
                    return item
            elif _matches(found, literal, quoted):
                return item
        return None

    return select


def compile_path(steps: tuple[Step, ...]) -> Getter:
    """A function reading the path from a :class:`Context`; a missing step reads ``None``."""
    first = steps[0]
    if isinstance(first, Attr) and first.name == ROOT_DISPENSARY:
        return lambda ctx: ctx.dispensary
    if len(steps) == 1 and isinstance(first, Attr):
        name = first.name
        if name in Customer.model_fields:
            return lambda ctx: ctx.customer.__dict__[name]
        return lambda ctx: _attr(ctx.customer, name)
    functions = tuple(_compile_step(step) for step in steps)

    def get(ctx: Context) -> Any:
        value: Any = ctx.customer
        for function in functions:
            value = function(value)
            if value is None:
                return None
        return value

    return get
