"""The closed set of transforms a mapping may use, compiled once into plain functions.

Each transform receives the current value (and the context, which only ``first_non_null``
reads) and returns the next. ``None`` passes through every transform unchanged, except
``first_non_null`` which exists to replace it. Transforms that work on text apply to each
element of a list. A value a transform cannot handle raises :class:`TransformFailed` with a
reason that never quotes the value (it is customer data).

=================  ==========================================  =================================
name               argument                                    does
=================  ==========================================  =================================
strip              -                                           trims white space
lower/upper/title  -                                           changes case
null_if            a value or a list of values                 null when the value is one of them
e164               region (default US) or {region: XX}         phone in E.164; null if invalid
date               strftime format, or {format, tz, parse}     formats a date or timestamp;
                                                               ``iso`` gives ISO 8601
int/float/bool/str -                                           converts
join               separator (default ", ")                    list → text, skipping nulls
split              separator (default ",")                     text → list, trimmed, no empties
map                {values: {from: to}, default: v}            looks the value up (``default``
                                                               for misses, else passes through)
sha256             -                                           hex digest of the text
first_non_null     a list of paths                             the first non-null of the value
                                                               and those paths
truncate           a maximum length                            cuts text (or a list) to it
=================  ==========================================  =================================
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

from connector.mapping._paths import Context, PathError, check_path, compile_path, parse_path
from connector.treez import has_non_finite

Transform = Callable[[Any, Context], Any]


@dataclass(slots=True)
class BuildEnv:
    """What a transform may need at load time: the field's placeholders, a place for warnings."""

    placeholders: frozenset[str]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Shortcut:
    """What a transform returns for a value of exactly one of some classes, for the mapping's
    written apply to do inline instead of calling it (connector/mapping/_engine.py): the value
    itself (``keep``), what a method of the value returns, called without arguments
    (``call``: class and method name), or for text, the entry of ``table``, or when there is
    none ``miss`` (the value itself if ``keep_miss``). Any other value is the transform's."""

    keep: tuple[type, ...] = (type(None),)
    call: tuple[tuple[type, str], ...] = ()
    table: Mapping[str, Any] | None = None
    miss: Any = None
    keep_miss: bool = True


# the shortcut of each built transform that has one (the function itself is the key)
SHORTCUTS: weakref.WeakKeyDictionary[Callable[..., Any], Shortcut] = weakref.WeakKeyDictionary()


def _shortcut(transform: Transform, shortcut: Shortcut) -> Transform:
    SHORTCUTS[transform] = shortcut
    return transform


class TransformFailed(ValueError):
    """The value does not fit the transform; the reason names no value."""


class TransformSpecError(ValueError):
    """A transform is unknown or has a bad argument (a load-time error)."""


_NO_ARG = object()


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a true/false value"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, datetime | date):
        return "a date"
    return type(value).__name__


def _text_op(*ops: Callable[[str], str], what: str) -> Transform:
    """Text transforms in a row (``[strip, title]``) run as one call."""

    def apply(value: Any, _ctx: Context) -> Any:
        if value.__class__ is str or isinstance(value, str):
            for op in ops:
                value = op(value)
            return value
        if value is None:
            return None
        if isinstance(value, list):
            return [apply(v, _ctx) for v in value]
        raise TransformFailed(f"{what} works on text, got {_type_name(value)}; add 'str' first")

    return _shortcut(apply, Shortcut())


TEXT_OPS: Mapping[str, Callable[[str], str]] = {
    "strip": str.strip,
    "lower": str.lower,
    "upper": str.upper,
    "title": str.title,
}


def _each(one: Callable[[Any], Any], shortcut: Shortcut | None = None) -> Transform:
    """A transform of single values, applied to each non-null element of a list;
    ``shortcut`` says what ``one`` returns for some classes (null passes through)."""

    def apply(value: Any, _ctx: Context) -> Any:
        if value is None:
            return None
        if isinstance(value, list):
            return [one(v) for v in value if v is not None]
        return one(value)

    return _shortcut(apply, shortcut or Shortcut())


def _no_arg(name: str, arg: Any) -> None:
    if arg is not _NO_ARG and arg is not None:
        raise TransformSpecError(f"transform {name!r} takes no argument")


# --- builders: (argument, load-time env) → transform; they raise TransformSpecError ---


def _strip(arg: Any, _env: BuildEnv) -> Transform:
    _no_arg("strip", arg)
    return _text_op(str.strip, what="strip")


def _lower(arg: Any, _env: BuildEnv) -> Transform:
    _no_arg("lower", arg)
    return _text_op(str.lower, what="lower")


def _upper(arg: Any, _env: BuildEnv) -> Transform:
    _no_arg("upper", arg)
    return _text_op(str.upper, what="upper")


def _title(arg: Any, _env: BuildEnv) -> Transform:
    _no_arg("title", arg)
    return _text_op(str.title, what="title")


def _key(value: Any) -> str:
    """Lookup key: booleans as YAML and JSON write them, everything else as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _null_if(arg: Any, _env: BuildEnv) -> Transform:
    if arg is _NO_ARG:
        raise TransformSpecError("transform 'null_if' needs a value or a list of values")
    values = arg if isinstance(arg, list) else [arg]
    if any(isinstance(v, dict | list) for v in values):
        raise TransformSpecError("transform 'null_if' takes plain values (text, numbers)")
    keys = frozenset(_key(v) for v in values)

    def apply(value: Any, _ctx: Context) -> Any:
        if value is None:
            return None
        if isinstance(value, list):
            return [v for v in value if v is None or _key(v) not in keys]
        return None if _key(value) in keys else value

    return _shortcut(apply, Shortcut())


def _e164(arg: Any, _env: BuildEnv) -> Transform:
    region = "US"
    if isinstance(arg, dict):
        unknown = set(arg) - {"region"}
        if unknown:
            raise TransformSpecError(f"transform 'e164' has unknown option(s) {sorted(unknown)}")
        region = arg.get("region", region)
    elif arg is not _NO_ARG and arg is not None:
        region = arg
    if not isinstance(region, str) or region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise TransformSpecError(
            f"transform 'e164': region must be a two-letter country code such as US, got {region!r}"
        )
    region = region.upper()

    def one(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise TransformFailed(f"e164 works on text or numbers, got {_type_name(value)}")
        try:
            number = phonenumbers.parse(str(value), region)
        except phonenumbers.NumberParseException:
            return None  # not a phone number: null, so it never overwrites a good one
        if not phonenumbers.is_valid_number(number):
            return None
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

    return _each(one)


def _parse_date(value: Any, parse_format: str | None) -> date | datetime:
    if isinstance(value, datetime | date):
        return value
    if not isinstance(value, str):
        raise TransformFailed(f"date works on dates and text, got {_type_name(value)}")
    text = value.strip()
    try:
        if parse_format is not None:
            return datetime.strptime(text, parse_format)
        if len(text) == 10:
            return date.fromisoformat(text)
        # ISO 8601 with or without offset; also Treez's "2000-01-01 00:00:00.000"
        return datetime.fromisoformat(text)
    except ValueError:
        expected = parse_format or "YYYY-MM-DD or ISO 8601"
        raise TransformFailed(f"not a date in the expected form ({expected})") from None


def _date(arg: Any, _env: BuildEnv) -> Transform:
    fmt = "%Y-%m-%d"
    tz: ZoneInfo | None = None
    parse_format: str | None = None
    if isinstance(arg, dict):
        unknown = set(arg) - {"format", "tz", "parse"}
        if unknown:
            raise TransformSpecError(f"transform 'date' has unknown option(s) {sorted(unknown)}")
        fmt = arg.get("format", fmt)
        if "tz" in arg:
            try:
                tz = ZoneInfo(str(arg["tz"]))
            except (ZoneInfoNotFoundError, ValueError):
                raise TransformSpecError(
                    f"transform 'date': unknown time zone {arg['tz']!r}"
                ) from None
        parse_format = arg.get("parse")
        if parse_format is not None and not isinstance(parse_format, str):
            raise TransformSpecError("transform 'date': parse must be a strptime format")
    elif arg is not _NO_ARG and arg is not None:
        fmt = arg
    if not isinstance(fmt, str) or not fmt:
        raise TransformSpecError("transform 'date': format must be a strftime format or 'iso'")
    if fmt != "iso":
        try:
            datetime(2001, 2, 3, 4, 5, 6).strftime(fmt)
        except ValueError:
            raise TransformSpecError(f"transform 'date': bad strftime format {fmt!r}") from None

    iso_date = fmt == "%Y-%m-%d"
    iso = fmt == "iso"

    def one(value: Any) -> str:
        parsed = _parse_date(value, parse_format)
        if parsed.__class__ is date and (iso_date or iso):
            return parsed.isoformat()  # same text as strftime("%Y-%m-%d"), several times faster
        if tz is not None and isinstance(parsed, datetime) and parsed.tzinfo is not None:
            try:
                parsed = parsed.astimezone(tz)
            except OverflowError:  # a time near year 1 or 9999 moved past the calendar
                raise TransformFailed("the time in this zone is outside years 1 to 9999") from None
        return parsed.isoformat() if iso else parsed.strftime(fmt)

    def apply(value: Any, _ctx: Context) -> Any:
        # the model's dates and timestamps (the usual values) without a call; as _each(one)
        cls = value.__class__
        if cls is date and (iso_date or iso):
            return value.isoformat()
        if cls is datetime and iso and tz is None:
            return value.isoformat()
        if value is None:
            return None
        if cls is list or isinstance(value, list):
            return [one(v) for v in value if v is not None]
        return one(value)

    call: list[tuple[type, str]] = []
    if iso_date or iso:
        call.append((date, "isoformat"))
    if iso and tz is None:
        call.append((datetime, "isoformat"))
    return _shortcut(apply, Shortcut(call=tuple(call)))


_TRUE = frozenset({"true", "yes", "y", "1", "t", "on"})
_FALSE = frozenset({"false", "no", "n", "0", "f", "off"})


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise TransformFailed("not a whole number")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise TransformFailed("text is not a number") from None
        if number.is_integer():
            return int(number)
        raise TransformFailed("not a whole number")
    raise TransformFailed(f"int works on numbers and text, got {_type_name(value)}")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TransformFailed("float works on numbers and text, got a true/false value")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            raise TransformFailed("not a finite number") from None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise TransformFailed("text is not a number") from None
    else:
        raise TransformFailed(f"float works on numbers and text, got {_type_name(value)}")
    if not math.isfinite(number):
        raise TransformFailed("not a finite number")
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise TransformFailed("text is not a yes/no value")
    raise TransformFailed(f"bool works on true/false values, 0/1 and text, got {_type_name(value)}")


def to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        # a number past a float's range (1e400 is JSON) is no text: "inf" means nothing
        raise TransformFailed("not a finite number (past a float's range): no text for it")
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TransformFailed(f"str works on single values, got {_type_name(value)}; use join")


def _converter(name: str, convert: Callable[[Any], Any]) -> Callable[[Any, BuildEnv], Transform]:
    def build(arg: Any, _env: BuildEnv) -> Transform:
        _no_arg(name, arg)

        if name == "str":  # str of a list is an error (use join), not a list of texts
            return _shortcut(
                lambda value, _ctx: None if value is None else convert(value),
                Shortcut(keep=(type(None), str)),
            )
        # int of an int and bool of a bool are the value itself
        kept = {"int": int, "bool": bool}.get(name)
        return _each(convert, Shortcut(keep=(type(None), kept)) if kept else None)

    return build


def _separator(name: str, arg: Any, default: str) -> str:
    if arg is _NO_ARG or arg is None:
        return default
    if isinstance(arg, dict):
        unknown = set(arg) - {"separator"}
        if unknown:
            raise TransformSpecError(f"transform {name!r} has unknown option(s) {sorted(unknown)}")
        arg = arg.get("separator", default)
    if not isinstance(arg, str):
        raise TransformSpecError(f"transform {name!r}: the separator must be text")
    return arg


def _join(arg: Any, _env: BuildEnv) -> Transform:
    sep = _separator("join", arg, ", ")

    def apply(value: Any, _ctx: Context) -> Any:
        if not isinstance(value, list):
            return value
        parts = [to_str(v) for v in value if v is not None]
        return sep.join(p for p in parts if p)

    return _shortcut(apply, Shortcut(keep=(type(None), str, int, float, bool)))


def _split(arg: Any, _env: BuildEnv) -> Transform:
    sep = _separator("split", arg, ",")
    if not sep:
        raise TransformSpecError("transform 'split': the separator must not be empty")

    def apply(value: Any, _ctx: Context) -> Any:
        if value is None or isinstance(value, list):
            return value
        if not isinstance(value, str):
            raise TransformFailed(f"split works on text, got {_type_name(value)}")
        return [part.strip() for part in value.split(sep) if part.strip()]

    return _shortcut(apply, Shortcut(keep=(type(None), list)))


def _map(arg: Any, _env: BuildEnv) -> Transform:
    if not isinstance(arg, dict) or "values" not in arg:
        raise TransformSpecError(
            "transform 'map' needs {values: {from: to, ...}} and optionally default"
        )
    unknown = set(arg) - {"values", "default"}
    if unknown:
        raise TransformSpecError(f"transform 'map' has unknown option(s) {sorted(unknown)}")
    table = arg["values"]
    if not isinstance(table, dict) or not table:
        raise TransformSpecError("transform 'map': values must be a non-empty table")
    lookup = {_key(k): v for k, v in table.items()}
    has_default = "default" in arg
    default = arg.get("default")
    # YAML's .nan and .inf: a value no JSON body can carry, refused when the file is loaded
    if has_non_finite([*lookup.values(), default]):
        raise TransformSpecError(
            "transform 'map': values and default must hold finite numbers only"
            " (.nan and .inf have no JSON form)"
        )

    def one(value: Any) -> Any:
        key = _key(value)
        if key in lookup:
            return lookup[key]
        return default if has_default else value

    # text is its own key
    return _each(one, Shortcut(table=lookup, miss=default, keep_miss=not has_default))


def _sha256(arg: Any, _env: BuildEnv) -> Transform:
    _no_arg("sha256", arg)

    def one(value: Any) -> str:
        return hashlib.sha256(to_str(value).encode("utf-8")).hexdigest()

    return _each(one)


def _first_non_null(arg: Any, env: BuildEnv) -> Transform:
    paths = arg if isinstance(arg, list) else [arg]
    if arg is _NO_ARG or not paths or not all(isinstance(p, str) for p in paths):
        raise TransformSpecError("transform 'first_non_null' needs a list of paths")
    getters = []
    for text in paths:
        try:
            steps = parse_path(text)
            env.warnings.extend(check_path(steps, text))
        except PathError as exc:
            raise TransformSpecError(f"transform 'first_non_null': {exc}") from None
        getters.append(compile_path(steps))
    placeholders = env.placeholders

    def apply(value: Any, ctx: Context) -> Any:
        if value is not None:
            return value
        for get in getters:
            found = get(ctx)
            if found is not None and not (isinstance(found, str) and found.strip() in placeholders):
                return found
        return None

    return apply


def _truncate(arg: Any, _env: BuildEnv) -> Transform:
    if isinstance(arg, bool) or not isinstance(arg, int) or arg < 1:
        raise TransformSpecError("transform 'truncate' needs a maximum length of 1 or more")
    limit = arg

    def apply(value: Any, _ctx: Context) -> Any:
        if isinstance(value, str | list):
            return value[:limit]
        if value is None:
            return None
        raise TransformFailed(f"truncate works on text and lists, got {_type_name(value)}")

    return _shortcut(apply, Shortcut())


BUILDERS: Mapping[str, Callable[[Any, BuildEnv], Transform]] = {
    "strip": _strip,
    "lower": _lower,
    "upper": _upper,
    "title": _title,
    "null_if": _null_if,
    "e164": _e164,
    "date": _date,
    "int": _converter("int", _to_int),
    "float": _converter("float", _to_float),
    "bool": _converter("bool", _to_bool),
    "str": _converter("str", to_str),
    "join": _join,
    "split": _split,
    "map": _map,
    "sha256": _sha256,
    "first_non_null": _first_non_null,
    "truncate": _truncate,
}


def build_transform(spec: Any, env: BuildEnv) -> tuple[str, Transform]:
    """Compile one entry of a ``transform:`` list: ``name`` or ``{name: argument}``."""
    if isinstance(spec, str):
        name, arg = spec, _NO_ARG
    elif isinstance(spec, dict) and len(spec) == 1:
        ((name, arg),) = spec.items()
    else:
        raise TransformSpecError(
            "each transform is a name (strip) or a one-key table ({date: '%m/%d/%Y'})"
        )
    builder = BUILDERS.get(name) if isinstance(name, str) else None
    if builder is None:
        known = ", ".join(sorted(BUILDERS))
        raise TransformSpecError(f"unknown transform {name!r} (known: {known})")
    return name, builder(arg, env)


def build_transforms(specs: list[Any], env: BuildEnv) -> list[tuple[str, Transform]]:
    """Compile a ``transform:`` list, running consecutive text transforms as one step."""
    built: list[tuple[str, Transform]] = []
    run: list[str] = []

    def flush() -> None:
        if len(run) == 1:
            built.append((run[0], _text_op(TEXT_OPS[run[0]], what=run[0])))
        elif run:
            label = ", ".join(run)
            built.append((label, _text_op(*(TEXT_OPS[n] for n in run), what=label)))
        run.clear()

    for spec in specs:
        if isinstance(spec, str) and spec in TEXT_OPS:
            run.append(spec)
            continue
        flush()
        built.append(build_transform(spec, env))
    flush()
    return built
