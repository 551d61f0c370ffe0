"""Mapping files: target field → source, validated and compiled once, applied per event.

A field is written as one of::

    email: email                                   # shorthand: a source path
    phone: {from: phone, transform: [e164]}        # a path through transforms
    external_id: {template: "treez-{dispensary}-{customer_id}"}
    source: {value: treez}                         # a constant

with the options ``transform`` (a list), ``default`` (used when the result is null),
``on_null`` (``omit``, the default, or ``send`` to send an explicit null), ``on_error``
(``fail``, the default, or ``null``) and ``placeholders`` (texts read as null; default
``["N/A", ""]``). A dotted target (``location.city``) builds a nested object.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from connector._yaml import LoadedYaml, YamlProblem, load_yaml, parse_yaml
from connector.errors import FieldMappingError, MappingError, Problem
from connector.mapping._paths import (
    ROOT_DISPENSARY,
    Attr,
    Context,
    Getter,
    PathError,
    Step,
    _attr,
    _compile_step,
    check_path,
    compile_path,
    parse_path,
)
from connector.mapping._transforms import (
    SHORTCUTS,
    TEXT_OPS,
    BuildEnv,
    TransformFailed,
    TransformSpecError,
    build_transforms,
    to_str,
)
from connector.treez import Customer, format_location, has_non_finite

DEFAULT_PLACEHOLDERS = ("N/A", "")
# What a field's value may not be: a float that is not finite has no JSON form (json.dumps
# writes NaN, invalid JSON; msgspec writes null), so it would reach a destination as garbage
# or as a silent null. The parser refuses NaN and Infinity; this is the last gate before the
# outbox, for whatever else yields one (a number past a float's range in an unknown field).
NOT_FINITE = "not a finite number (NaN or Infinity), which JSON cannot carry"


def _finite_constant(value: Any) -> Any:
    if has_non_finite(value):
        raise ValueError("must hold finite numbers only (.nan and .inf have no JSON form)")
    return value


class FieldSpec(BaseModel):
    """The long form of one field of a mapping file."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: str | None = Field(default=None, alias="from")
    template: str | None = None
    value: Any = None
    transform: list[str | dict[str, Any]] = Field(default_factory=list)
    default: Any = None
    on_null: Literal["omit", "send"] = "omit"
    on_error: Literal["fail", "null"] = "fail"
    placeholders: list[str] = Field(default_factory=lambda: list(DEFAULT_PLACEHOLDERS))

    @field_validator("value", "default")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        return _finite_constant(value)

    @field_validator("on_error", mode="before")
    @classmethod
    def _bare_null(cls, value: Any) -> Any:
        return "null" if value is None else value  # YAML reads an unquoted null as None

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [k for k in ("from", "template", "value") if k in data]
            if len(given) != 1:
                found = ", ".join(given) if given else "none of them"
                raise ValueError(f"needs exactly one of from, template or value (found {found})")
        return data


@dataclass(frozen=True, slots=True)
class CompiledField:
    target: str
    keys: tuple[str, ...]
    run: Callable[[Context], Any]
    send_null: bool
    # set when the field reads one declared customer field as it is: read inline by apply()
    direct: str | None = None
    placeholders: frozenset[str] = frozenset()
    default: Any = None
    # what run() is made of, for apply() to write it inline (see _generate_apply)
    parts: _Parts | None = None


_Template = tuple[str | tuple[Step, ...], ...]


@dataclass(frozen=True, slots=True)
class _Parts:
    read: str | None  # the source as an expression of apply()'s locals; None: call source
    path: tuple[Step, ...]  # a path from a declared field, to write inline; () if not
    source: Callable[[Context], Any]
    template: _Template | None  # a template's literals and paths, to write inline
    transforms: tuple[tuple[str, Callable[[Any, Context], Any]], ...]
    swallow: bool
    settle: Callable[[Any], Any]
    clean: Callable[[Any], Any]


class Mapping:
    """A compiled mapping: call :meth:`apply` with a customer and the event's dispensary.

    ``apply(customer, dispensary)`` maps one customer, and raises :class:`FieldMappingError`
    for a value that cannot be mapped. Deterministic: the same customer and dispensary always
    give the same dict, with keys in the order of the mapping file: each field's ``run`` in
    turn, a null result left out unless the field sends nulls, a dotted target nested. It is
    a function written for the mapping's fields (:func:`_generate_apply`).
    """

    apply: Callable[[Customer, str], dict[str, Any]]

    def __init__(self, name: str, fields: tuple[CompiledField, ...], warnings: tuple[str, ...]):
        self.name = name
        self.fields = fields
        self.warnings = warnings
        self.apply = _generate_apply(fields)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(f.target for f in self.fields)

    def apply_partial(self, customer: Customer, dispensary: str) -> dict[str, Any]:
        """Map what can be mapped: a field whose value cannot be mapped is left out instead
        of failing the contact (for consent calls, which need the identifiers only)."""
        try:
            return self.apply(customer, dispensary)
        except FieldMappingError:
            pass
        ctx = Context(customer, dispensary)
        out: dict[str, Any] = {}
        for field in self.fields:
            try:
                value = field.run(ctx)
            except FieldMappingError:
                continue
            if value is None and not field.send_null:
                continue
            node = out
            for key in field.keys[:-1]:
                node = node.setdefault(key, {})
            node[field.keys[-1]] = value
        return out

    def __repr__(self) -> str:
        return f"<Mapping {self.name} ({len(self.fields)} fields)>"


def _generate_apply(fields: tuple[CompiledField, ...]) -> Callable[[Customer, str], dict[str, Any]]:
    """Write :meth:`Mapping.apply` for ``fields`` as one function of straight-line code: no
    loop over the fields, and a field reading one declared customer field as it is (``direct``)
    read inline, its common values (text, numbers, null) settled without a call. The
    :class:`Context` the fields' functions take is made the first time one is called."""
    env: dict[str, Any] = {
        "Context": Context,
        "TransformFailed": TransformFailed,
        "FieldMappingError": FieldMappingError,
        "isfinite": math.isfinite,
    }
    lines = [
        "def apply(customer, dispensary):",
        "    ctx = None",
        "    fields = customer.__dict__",
        "    out = {}",
    ]
    for i, field in enumerate(fields):
        env[f"run{i}"] = field.run
        env[f"placeholders{i}"] = field.placeholders
        env[f"default{i}"] = field.default
        if field.direct is None and field.parts is not None:
            lines += _inline_run(i, field, field.parts, env)
        elif field.direct is None or field.parts is None:
            lines += _with_ctx("    ", f"value = run{i}(ctx)")
        else:
            # run() reads the field (this value) and settles it
            env[f"settle{i}"] = field.parts.settle
            lines += [f"    value = fields[{field.direct!r}]", *_settled(i, "    ")]
        indent = "    "
        if not field.send_null:
            lines.append("    if value is not None:")
            indent = "        "
        node = "out"
        for key in field.keys[:-1]:
            node = f"{node}.setdefault({key!r}, {{}})"
        lines.append(f"{indent}{node}[{field.keys[-1]!r}] = value")
    lines.append("    return out")
    exec(compile("\n".join(lines), "<mapping apply>", "exec"), env)  # noqa: S102 - our own text
    apply: Callable[[Customer, str], dict[str, Any]] = env["apply"]
    return apply


def _with_ctx(indent: str, statement: str) -> list[str]:
    """``statement`` (which reads ``ctx``), the context made first if it is not yet."""
    return [
        f"{indent}if ctx is None:",
        f"{indent}    ctx = Context(customer, dispensary)",
        f"{indent}{statement}",
    ]


def _settled(i: int, indent: str) -> list[str]:
    """The lines of ``settle{i}(value)``, its common values (text, null, numbers) inline: a
    float that is not finite goes to settle, which refuses it."""
    return [
        f"{indent}cls = value.__class__",
        f"{indent}if cls is str:",
        f"{indent}    if value in placeholders{i} or value.strip() in placeholders{i}:",
        f"{indent}        value = default{i}",
        f"{indent}elif value is None:",
        f"{indent}    value = default{i}",
        f"{indent}elif cls is not int and cls is not bool and (",
        f"{indent}    cls is not float or not isfinite(value)",
        f"{indent}):",
        f"{indent}    value = settle{i}(value)",
    ]


_MOST_INLINED = 32
"""The most parts of a template, or steps of a path, written into apply() (each nests a block;
Python refuses 100 levels)."""


def _inline_run(i: int, field: CompiledField, parts: _Parts, env: dict[str, Any]) -> list[str]:
    """The lines of ``field.run`` written into apply(): the same steps, leaving ``value``."""
    env.update({f"source{i}": parts.source, f"settle{i}": parts.settle, f"clean{i}": parts.clean})
    # a template of many parts, or a long path, nests a block a part (a step): past
    # _MOST_INLINED, Python's parser refuses it, and the field's own source reads it
    if parts.template is not None and len(parts.template) <= _MOST_INLINED:
        lines = _inline_template(i, parts.template, env)
    elif parts.template is None and parts.path and len(parts.path) <= _MOST_INLINED:
        lines = _inline_path(i, parts.path, env)
    elif parts.read is not None:
        lines = [f"    value = {parts.read}"]
    else:
        lines = _with_ctx("    ", f"value = source{i}(ctx)")
    if not parts.transforms:
        return [*lines, *_settled(i, "    ")]
    lines += [
        "    cls = value.__class__",
        "    if cls is str:",
        "        stripped = value.strip()",
        f"        if value in placeholders{i} or stripped in placeholders{i}:",
        "            value = None",
        "    elif cls is list:",
        f"        value = clean{i}(value)",
        "    try:",
    ]
    for n, (name, transform) in enumerate(parts.transforms):
        env[f"transform{i}_{n}"] = transform
        if len(parts.transforms) > 1:
            lines.append(f"        step = {name!r}")
        # text still at the first transform is the field's own: its strip is known
        lines += _inline_transform(f"{i}_{n}", name, transform, env, stripped=n == 0)
    lines.append("    except TransformFailed as exc:")
    if parts.swallow:
        lines.append(f"        value = default{i}")
    else:
        step = "step" if len(parts.transforms) > 1 else repr(parts.transforms[0][0])
        lines.append(
            f"        raise FieldMappingError({field.target!r}, {step}, str(exc)) from None"
        )
    return [*lines, "    else:", *_settled(i, "        ")]


def _inline_transform(
    tag: str,
    name: str,
    transform: Callable[[Any, Context], Any],
    env: dict[str, Any],
    *,
    stripped: bool = False,
) -> list[str]:
    """The lines of one transform, inside apply()'s try: what its :class:`Shortcut` says it
    does to some classes of values written inline, a call for the rest. ``stripped``: text
    here has its strip in the local ``stripped``."""
    call = _with_ctx("            ", f"value = transform{tag}(value, ctx)")
    ops = name.split(", ")
    shortcut = SHORTCUTS.get(transform)
    if all(op in TEXT_OPS for op in ops):  # text's own methods, for text (_text_op)
        # (which returns null as it is)
        calls = "".join(f".{op}()" for op in ops)
        if stripped and ops[0] == "strip":
            calls = "stripped" + calls.removeprefix(".strip()")
        else:
            calls = "value" + calls
        return [
            "        if value.__class__ is str:",
            f"            value = {calls}",
            "        elif value is not None:",
            *call,
        ]
    if shortcut is None:
        return [line[4:] for line in call]
    lines = ["        cls = value.__class__"]
    branch = "if"
    if shortcut.keep:
        tests = []
        for k, kept in enumerate(shortcut.keep):
            if kept is type(None):
                tests.append("value is None")
            else:
                env[f"kept{tag}_{k}"] = kept
                tests.append(f"cls is kept{tag}_{k}")
        lines += [f"        if {' or '.join(tests)}:", "            pass"]
        branch = "elif"
    for k, (cls, method) in enumerate(shortcut.call):
        env[f"called{tag}_{k}"] = cls
        lines += [
            f"        {branch} cls is called{tag}_{k}:",
            f"            value = value.{method}()",
        ]
        branch = "elif"
    if shortcut.table is not None:
        env[f"table{tag}"] = shortcut.table
        env[f"miss{tag}"] = shortcut.miss
        miss = "value" if shortcut.keep_miss else f"miss{tag}"
        lines += [
            f"        {branch} cls is str:",
            f"            value = table{tag}.get(value, {miss})",
        ]
        branch = "elif"
    if branch == "if":
        return [line[4:] for line in call]
    return [*lines, "        else:", *call]


def _inline_template(
    i: int, template: tuple[str | tuple[Step, ...], ...], env: dict[str, Any]
) -> list[str]:
    """The lines of a template's render (:func:`_compile_template`), leaving ``value``: each
    path read in turn while none is null."""
    env["_template_text"] = _template_text
    lines = ["    value = None"]
    indent = "    "
    joined = []
    for k, part in enumerate(template):
        if isinstance(part, str):
            joined.append(repr(part))
            continue
        name = f"part{k}"
        first = part[0]
        if isinstance(first, Attr) and first.name == ROOT_DISPENSARY:
            lines.append(f"{indent}{name} = dispensary")  # as compile_path reads it
        elif len(part) == 1 and isinstance(first, Attr) and first.name in Customer.model_fields:
            lines.append(f"{indent}{name} = fields[{first.name!r}]")
        else:
            env[f"get{i}_{k}"] = compile_path(part)
            lines += _with_ctx(indent, f"{name} = get{i}_{k}(ctx)")
        lines += [
            f"{indent}if (",
            f"{indent}    {name}.__class__ is not str",
            f"{indent}    or {name} in placeholders{i}",
            f"{indent}    or {name}.strip() in placeholders{i}",
            f"{indent}):",
            f"{indent}    {name} = _template_text({name}, placeholders{i})",
            f"{indent}if {name} is not None:",
        ]
        indent += "    "
        joined.append(name)
    return [*lines, f"{indent}value = ''.join(({''.join(j + ', ' for j in joined)}))"]


def _inline_path(i: int, path: tuple[Step, ...], env: dict[str, Any]) -> list[str]:
    """The lines of compile_path's getter for ``path`` (its first step a declared field of
    the customer), leaving ``value``: each step read while the value is not null."""
    if not path:
        return []
    first = path[0]
    assert isinstance(first, Attr)
    env["_attr"] = _attr
    start = 1
    lines = [f"    value = fields[{first.name!r}]"]
    if len(path) > 1 and not isinstance(path[1], Attr):
        # an element picked from a list (addresses[primary=true]) is picked once, by the
        # first field that reads it, for the fields after it: the customer does not change
        picked: dict[tuple[str, Step], str] = env.setdefault("_picked", {})
        name = picked.get((first.name, path[1]))
        if name is None:
            name = picked[(first.name, path[1])] = f"picked{i}"
            env[f"step{i}_1"] = _compile_step(path[1])
            lines = [
                f"    {name} = fields[{first.name!r}]",
                f"    if {name} is not None:",
                f"        {name} = step{i}_1({name})",
            ]
        else:
            lines = []
        lines.append(f"    value = {name}")
        start = 2
    indent = "    "
    for k, step in enumerate(path[start:], start):
        lines.append(f"{indent}if value is not None:")
        indent += "    "
        if isinstance(step, Attr):
            lines += [
                f"{indent}try:",
                f"{indent}    value = value.__dict__[{step.name!r}]",
                f"{indent}except (AttributeError, KeyError):",
                f"{indent}    value = _attr(value, {step.name!r})",
            ]
        else:
            env[f"step{i}_{k}"] = _compile_step(step)
            lines.append(f"{indent}value = step{i}_{k}(value)")
    return lines


# --- compiling ---


def _cleaner(placeholders: frozenset[str]) -> Callable[[Any], Any]:
    def clean(value: Any) -> Any:
        cls = value.__class__
        if cls is str:
            return None if value in placeholders or value.strip() in placeholders else value
        if cls is list:
            if all(v.__class__ is str for v in value):  # the usual list: groups, tags
                return [v for v in value if v not in placeholders and v.strip() not in placeholders]
            cleaned = [clean(v) for v in value]
            return [v for v in cleaned if v is not None]
        return value

    return clean


def _clean_texts(values: list[Any], placeholders: frozenset[str]) -> list[str] | None:
    """A list of texts without its placeholders, in one pass; None when not all are text."""
    out = []
    for value in values:
        if value.__class__ is not str:
            return None
        if value not in placeholders and value.strip() not in placeholders:
            out.append(value)
    return out


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


_TEMPLATE_PART = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def _template_parts(text: str, env: BuildEnv) -> _Template:
    """``"treez-{dispensary}-{customer_id}"``: its literal texts and the paths in braces."""
    parts: list[str | tuple[Step, ...]] = []
    literal = ""
    pos = 0
    for match in _TEMPLATE_PART.finditer(text):
        literal += text[pos : match.start()]
        pos = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal += token[0]
            continue
        if match.group(1) is None:
            raise TransformSpecError(
                f"template {text!r} has an unmatched {token!r} (write {token * 2})"
            )
        path = match.group(1).strip()
        try:
            steps = parse_path(path)
            env.warnings.extend(check_path(steps, path))
        except PathError as exc:
            raise TransformSpecError(f"template {text!r}: {exc}") from None
        if literal:
            parts.append(literal)
            literal = ""
        parts.append(steps)
    literal += text[pos:]
    if literal:
        parts.append(literal)
    return tuple(parts)


def _template_text(value: Any, placeholders: frozenset[str]) -> str | None:
    """A path's value as a template writes it, or None when it makes the whole result null
    (null, a placeholder, a list, an object or a number with no text)."""
    cls = value.__class__
    if cls is str:
        return None if value in placeholders or value.strip() in placeholders else value
    if value is None or cls is list or cls is dict or isinstance(value, BaseModel):
        return None
    if cls is float and not math.isfinite(value):  # past a float's range (1e400): no text
        return None
    result: str = to_str(value)  # true/false as JSON writes them, dates as ISO
    return result


def _compile_template(template: _Template, placeholders: frozenset[str]) -> Getter:
    """A template's render: any null part makes the whole result null."""
    getters = [
        (part, None) if isinstance(part, str) else ("", compile_path(part)) for part in template
    ]

    def render(ctx: Context) -> Any:
        out = []
        for literal, get in getters:
            if get is None:
                out.append(literal)
                continue
            value = get(ctx)
            if value.__class__ is not str or value in placeholders or value.strip() in placeholders:
                value = _template_text(value, placeholders)
                if value is None:
                    return None
            out.append(value)
        return "".join(out)

    return render


def _compile_field(target: str, raw: Any, warnings: list[str]) -> CompiledField:
    spec = FieldSpec.model_validate({"from": raw} if isinstance(raw, str) else raw)
    env = BuildEnv(frozenset(spec.placeholders))
    clean = _cleaner(env.placeholders)
    source: Getter
    template = None
    if spec.from_ is not None:
        steps = parse_path(spec.from_)
        env.warnings.extend(check_path(steps, spec.from_))
        source = compile_path(steps)
    elif spec.template is not None:
        template = _template_parts(spec.template, env)
        source = _compile_template(template, env.placeholders)
    else:
        constant = _jsonable(spec.value)

        def source(_ctx: Context) -> Any:
            return constant

    transforms = build_transforms(spec.transform, env)
    default = _jsonable(spec.default)
    swallow = spec.on_error == "null"
    placeholders = env.placeholders
    # the step a value that is not finite is blamed on: the transform that gave it, or the
    # source read as it is
    last_step = transforms[-1][0] if transforms else "from"

    def not_finite() -> Any:
        # as a transform's failure: the field's default with on_error null, else the field
        # fails (the contact's upsert for this destination; consent still goes out)
        if swallow:
            return default
        raise FieldMappingError(target, last_step, NOT_FINITE)

    # The hot path of every event: one closure per field, the common cases (text, numbers,
    # null) decided by a class check rather than a call.
    def settle(value: Any) -> Any:
        cls = value.__class__
        if cls is str:
            if value in placeholders or value.strip() in placeholders:
                return default
            return value
        if value is None:
            return default
        if cls is int or cls is bool:
            return value
        if cls is float:
            return value if math.isfinite(value) else not_finite()
        if cls is list:
            texts = _clean_texts(value, placeholders)  # the usual list: groups, tags
            if texts is not None:
                return texts
        value = clean(_jsonable(value))
        if has_non_finite(value):  # anywhere in a list or an object
            return not_finite()
        return default if value is None else value

    run: Callable[[Context], Any]
    if not transforms:

        def run(ctx: Context) -> Any:
            value = source(ctx)
            if value.__class__ is str:
                if value in placeholders or value.strip() in placeholders:
                    return default
                return value
            return settle(value)

    else:
        # the source read and the final check are inlined: this runs for most fields
        def run(ctx: Context) -> Any:
            value = source(ctx)
            cls = value.__class__
            if cls is str:
                if value in placeholders or value.strip() in placeholders:
                    value = None
            elif cls is list:
                value = clean(value)
            try:
                for name, transform in transforms:  # noqa: B007 - name is read below
                    value = transform(value, ctx)
            except TransformFailed as exc:
                if swallow:
                    return default
                raise FieldMappingError(target, name, str(exc)) from None
            if value.__class__ is str and value not in placeholders:
                return value if value.strip() not in placeholders else default
            return settle(value)

    warnings.extend(f"field {target!r}: {w}" for w in env.warnings)
    direct = None
    read = None
    path: tuple[Step, ...] = ()
    if spec.from_ is not None:
        steps = parse_path(spec.from_)
        first = steps[0]
        if len(steps) == 1 and isinstance(first, Attr):
            if first.name == ROOT_DISPENSARY:
                read = "dispensary"  # as compile_path reads it
            elif first.name in Customer.model_fields:
                read = f"fields[{first.name!r}]"
                direct = None if transforms else first.name
        elif isinstance(first, Attr) and first.name in Customer.model_fields:
            path = steps
    parts = _Parts(read, path, source, template, tuple(transforms), swallow, settle, clean)
    return CompiledField(
        target,
        tuple(target.split(".")),
        run,
        spec.on_null == "send",
        direct,
        placeholders,
        default,
        parts,
    )


def compile_mapping(data: Any, *, name: str, yaml: LoadedYaml | None = None) -> Mapping:
    """Compile a mapping document; raise :class:`MappingError` listing every problem."""

    def line(*loc: str | int) -> int | None:
        return yaml.line_of(loc) if yaml is not None else None

    if not isinstance(data, dict) or not data:
        raise MappingError(
            name,
            [
                Problem(
                    "mapping",
                    "must be a table of target field → source, with at least one field",
                    line(),
                )
            ],
        )
    problems: list[Problem] = []
    warnings: list[str] = []
    fields: list[CompiledField] = []
    for target, raw in data.items():
        where = f"field {target!r}"
        if not isinstance(target, str) or not target or any(not k for k in target.split(".")):
            problems.append(
                Problem(where, "target names are non-empty text (dots nest)", line(target))
            )
            continue
        try:
            fields.append(_compile_field(target, raw, warnings))
        except ValidationError as exc:
            for error in exc.errors(include_url=False, include_input=False, include_context=False):
                loc = tuple(error["loc"])
                key = format_location(loc) if loc else ""
                message = error["msg"].removeprefix("Value error, ")
                if error["type"] == "extra_forbidden":
                    message = (
                        "is not an option (options: from, template, value, transform, default, "
                        "on_null, on_error, placeholders)"
                    )
                if error["type"] == "model_type":
                    message = "must be a source path or a table such as {from: path}"
                label = f"{where}, {key}" if key else where
                problems.append(Problem(label, message, line(target, *loc)))
        except (PathError, TransformSpecError) as exc:
            problems.append(Problem(where, str(exc), line(target)))
    problems.extend(_clashes([f.target for f in fields], line))
    if problems:
        raise MappingError(name, problems)
    return Mapping(name, tuple(fields), tuple(warnings))


def _clashes(targets: list[str], line: Callable[..., int | None]) -> list[Problem]:
    found = []
    names = set(targets)
    for target in targets:
        keys = target.split(".")
        for i in range(1, len(keys)):
            parent = ".".join(keys[:i])
            if parent in names:
                found.append(
                    Problem(
                        f"field {target!r}",
                        f"clashes with field {parent!r}, which is not an object",
                        line(target),
                    )
                )
    return found


def load_mapping(path: Path) -> Mapping:
    """Read, validate and compile a mapping file."""
    try:
        loaded = load_yaml(path)
    except YamlProblem as exc:
        raise MappingError(str(path), [exc.problem]) from None
    return compile_mapping(loaded.data, name=str(path), yaml=loaded)


def compile_mapping_text(text: str, *, name: str = "<mapping>") -> Mapping:
    """Compile a mapping from YAML text (for tests and ``connector map --mapping``)."""
    try:
        loaded = parse_yaml(text)
    except YamlProblem as exc:
        raise MappingError(name, [exc.problem]) from None
    return compile_mapping(loaded.data, name=name, yaml=loaded)
