"""``config.yaml``: one file per deployment, validated once at load.

Every problem is reported together, each with the file, the line, the key path
(``dispensaries.partnersandbox3.destinations[0].url``) and what is wrong. Secrets are written
as ``${ENV_VAR}`` (or ``${ENV_VAR:-default}``), held as ``SecretStr`` and never printed.
Relative paths (the SQLite file, mappings, sink files) resolve against the config file's folder.

A section that is switched off (``enabled: false`` on a dispensary or a destination, or
``reconcile: {enabled: false}`` for the ``treez`` section) is not validated, so the
variables it refers to need not be set.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union
from urllib.parse import unquote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    BeforeValidator,
    Field,
    HttpUrl,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from connector._env import interpolate
from connector._yaml import LoadedYaml, Location, YamlProblem, load_yaml
from connector.config_base import (
    NAME,
    NAME_LENGTH,
    DestinationConfig,
    Model,
    PolicyConfig,
)
from connector.destinations import DESTINATION_TYPES
from connector.errors import ConfigError, Problem
from connector.treez import format_location

DEFAULT_CONFIG = "config.yaml"
CONFIG_ENV_VAR = "CONNECTOR_CONFIG"
DEV_WEBHOOK_TOKEN = "dev-only-token-change-me"  # noqa: S105 - the documented development token
DEFAULT_SCHEDULE = "15 * * * *"


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class ServerConfig(Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=600)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # plan and deliver in a second process beside the receiver, so each gets a core (one
    # Python process is bound by its interpreter lock); false: everything in one process
    pipeline_process: bool = True
    # how far past its receipt an event's last_update may order it: a clock set wrong at
    # the till (a 2099 date) must not make every later event of that customer stale
    max_future_skew_seconds: float = Field(default=300.0, ge=0, le=86_400)
    # limits on clients (README, "Limits on clients"; connector/http_protocol.py): what one
    # connection may hold of the listener's time and memory, and its answer past each
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)  # 413
    max_headers: int = Field(default=100, ge=10, le=10_000)  # 413
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)  # 400
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)  # 400
    keep_alive_seconds: int = Field(default=5, ge=1, le=600)  # closed, no answer
    max_connections: int = Field(default=1000, ge=10, le=100_000)  # 503


class TreezApiConfig(Model):
    api_url: HttpUrl
    client_id: str = Field(min_length=1)
    api_key: SecretStr
    requests_per_second: int = Field(default=10, ge=1, le=10)

    @field_validator("api_key")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value


class ReconcileConfig(Model):
    enabled: bool = True
    schedule: str = DEFAULT_SCHEDULE
    timezone: str = "UTC"
    # a run pulls from its checkpoint minus this, so a late-visible change is not skipped
    overlap_minutes: float = Field(default=10.0, ge=0, le=24 * 60)
    # the first run (no checkpoint yet) pulls what changed in this many hours
    initial_lookback_hours: float = Field(default=24.0, gt=0, le=24 * 366)
    page_size: int = Field(default=50, ge=1, le=50)
    # anchored: each page asks again from the last customer's last_update (never skips one
    # that moves meanwhile; right only if Treez lists in last_update order, unconfirmed);
    # numbered: pages 1, 2, 3... of one query (right in any order, but a customer changing
    # during the run shifts the pages and can make it skip one); auto: anchored while the
    # pages come in last_update order, numbered from the first page that does not
    paging: Literal["auto", "anchored", "numbered"] = "auto"
    # dead letters older than this are sent again once per run, at most redrive_max of them
    redrive_after_minutes: float = Field(default=60.0, ge=0)
    redrive_max: int = Field(default=100, ge=0)
    # contacts looked up per run and destination (where the destination can look up)
    lookup_sample: int = Field(default=20, ge=0, le=1000)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as America/Los_Angeles)"
            ) from None
        return value

    @model_validator(mode="after")
    def _cron(self) -> ReconcileConfig:
        try:
            CronTrigger.from_crontab(self.schedule, timezone=self.timezone)
        except ValueError as exc:
            raise ValueError(
                f"schedule {self.schedule!r} is not a cron expression: {exc}"
            ) from None
        return self


AnyDestination = DestinationConfig
"""A destination block: to the type checker, what every type shares; at run time, the type's
own model (one of the registry's)."""
if not TYPE_CHECKING:  # the union of every registered type's model, told apart by ``type``
    AnyDestination = Annotated[
        Union[tuple(t.config for t in DESTINATION_TYPES.values())],  # noqa: UP007
        Field(discriminator="type"),
    ]


class DispensaryConfig(Model):
    enabled: Literal[True] = True
    webhook_token: Annotated[list[SecretStr], BeforeValidator(_as_list)] = Field(min_length=1)
    treez: TreezApiConfig | None = None
    reconcile: ReconcileConfig = ReconcileConfig()
    policy: PolicyConfig = PolicyConfig()
    destinations: list[AnyDestination] = Field(min_length=1)

    @field_validator("webhook_token")
    @classmethod
    def _tokens(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(not t.get_secret_value().strip() for t in value):
            raise ValueError("a webhook token must not be empty")
        return value

    @model_validator(mode="after")
    def _check(self) -> DispensaryConfig:
        names = [d.name for d in self.destinations]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(twice)}")
        return self

    @property
    def reconciles(self) -> bool:
        return self.treez is not None and self.reconcile.enabled

    @property
    def uses_dev_token(self) -> bool:
        return any(t.get_secret_value() == DEV_WEBHOOK_TOKEN for t in self.webhook_token)

    def policy_for(self, destination: str) -> PolicyConfig:
        """The dispensary's policy with the destination's overrides applied."""
        for dest in self.destinations:
            if dest.name == destination:
                overrides = dest.policy.model_dump(exclude_none=True)
                return self.policy.model_copy(update=overrides)
        raise KeyError(destination)

    def destination(self, name: str) -> AnyDestination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)


class RetentionConfig(Model):
    """How long raw customer payloads and finished work are kept (the payloads hold names,
    birthdays, licences and medical ids: keep them no longer than needed to investigate)."""

    raw_payload_days: float = Field(default=30.0, gt=0, le=3650)
    delivered_days: float = Field(default=7.0, gt=0, le=3650)


CONSOLE_TOKEN_LENGTH = 16
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - compared against, not bound


class ConsoleConfig(Model):
    """The operator's web console (:mod:`connector.console`): its own listener, never the
    webhook port, which faces Treez over the internet. Off while the token is empty."""

    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=1, le=65535)
    # one shared sign-in token: whoever holds it sees dead letters and can reveal customer
    # values (every reveal is audited), so it must not be guessable
    token: SecretStr = SecretStr("")
    session_idle_hours: float = Field(default=8.0, gt=0, le=24 * 7)

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if secret and len(secret.strip()) < CONSOLE_TOKEN_LENGTH:
            raise ValueError(
                f"must be at least {CONSOLE_TOKEN_LENGTH} characters "
                "(or empty, which turns the console off)"
            )
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.token.get_secret_value().strip())

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the console."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def same_listener(host_a: str, port_a: int, host_b: str, port_b: int) -> bool:
    """Whether two listeners would take the same address (a wildcard host takes them all)."""
    if port_a != port_b:
        return False
    return host_a == host_b or host_a in _WILDCARDS or host_b in _WILDCARDS


class Config(Model):
    # repr=False: a PostgreSQL URL may carry a password; store_display hides it
    store: str = Field(default="sqlite:///connector.db", validate_default=True, repr=False)
    # how long a write waits for a lock held by another process before the receiver
    # answers 503 (SQLite: busy timeout)
    store_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    # PostgreSQL: wake the other replicas with LISTEN/NOTIFY (false: poll only, for a pooler
    # such as PgBouncer in transaction mode, which has no LISTEN)
    store_listen: bool = True
    server: ServerConfig = ServerConfig()
    retention: RetentionConfig = RetentionConfig()
    # absent: no console (and none either while its token is empty)
    console: ConsoleConfig | None = None
    dispensaries: dict[str, DispensaryConfig] = Field(min_length=1)

    _path: Path | None = PrivateAttr(default=None)
    _disabled: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("store")
    @classmethod
    def _store(cls, value: str, info: ValidationInfo) -> str:
        scheme, _, rest = value.partition("://")
        backend = scheme.split("+", 1)[0].lower()
        if not rest and not value.startswith("sqlite:"):
            raise ValueError("is not a database URL (sqlite:///file.db or postgresql://...)")
        if backend == "postgres":
            backend = "postgresql"
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"database {backend!r} is not supported (use sqlite or postgresql)")
        if backend == "sqlite":
            if scheme != "sqlite" or not rest.startswith("/"):
                raise ValueError(
                    "needs a file, such as sqlite:///connector.db (the store must be durable)"
                )
            database, _, query = rest[1:].partition("?")
            if database in ("", ":memory:") or database.startswith("file:"):
                raise ValueError(
                    "needs a file, such as sqlite:///connector.db (the store must be durable)"
                )
            base = info.context.get("base_dir") if info.context else None
            if not Path(database).is_absolute() and base is not None:
                database = str(Path(base) / database)
            return f"sqlite:///{database}" + (f"?{query}" if query else "")
        if scheme.lower() not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise ValueError(
                f"driver {scheme!r} is not supported: use postgresql:// or postgresql+psycopg://"
            )
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("has a port that is not a number") from None
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError("names no host (postgresql://user@host:5432/database)")
        if not parts.path.strip("/"):
            raise ValueError("names no database (postgresql://user@host:5432/database)")
        return value

    @field_validator("dispensaries")
    @classmethod
    def _names(cls, value: dict[str, DispensaryConfig]) -> dict[str, DispensaryConfig]:
        bad = [name for name in value if not NAME.match(name)]
        if bad:
            raise ValueError(
                f"dispensary names are Treez short names (letters, digits, _ . -): {', '.join(bad)}"
            )
        long = [name for name in value if len(name) > NAME_LENGTH]
        if long:
            raise ValueError(
                f"dispensary names are at most {NAME_LENGTH} characters: {', '.join(long)}"
            )
        return value

    @property
    def path(self) -> Path | None:
        """The file this configuration was read from."""
        return self._path

    @property
    def disabled(self) -> tuple[str, ...]:
        """Key paths of the sections switched off with ``enabled: false``."""
        return self._disabled

    @property
    def console_on(self) -> bool:
        return self.console is not None and self.console.enabled

    def console_clash(self) -> str | None:
        """Why the console cannot listen beside the webhook receiver, or None."""
        console, server = self.console, self.server
        if console is None or not console.enabled:
            return None
        if same_listener(console.host, console.port, server.host, server.port):
            return (
                f"must differ from server.port ({server.port}) on the same host: the console "
                "never shares the webhook listener"
            )
        return None

    def console_token_reused(self) -> str | None:
        """Why the console's token cannot be what it is (a dispensary's webhook token, which
        Treez holds, would open the console), or None."""
        console = self.console
        if console is None or not console.enabled:
            return None
        secret = console.token.get_secret_value()
        for name, disp in self.dispensaries.items():
            if any(secret == t.get_secret_value() for t in disp.webhook_token):
                return (
                    f"must not be a webhook token (it is dispensary {name}'s, which Treez "
                    "holds): give the console a token of its own"
                )
        return None

    @property
    def store_display(self) -> str:
        """The store URL with any password hidden, for logs and summaries."""
        return display_url(self.store)


# libpq's parameters that hold a secret, which a URL's query may carry as well as its user part
_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def display_url(url: str) -> str:
    """A store URL with any password (in its user part or its query) replaced by ``***``;
    a URL without one as it is."""
    parts = urlsplit(url)
    if parts.password is not None:
        user = unquote(parts.username or "")
        host = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    if not parts.query:
        return url
    pairs = [pair.partition("=") for pair in parts.query.split("&")]
    secret = [bool(eq) and unquote(name).lower() in _SECRET_PARAMETERS for name, eq, _ in pairs]
    if not any(secret):
        return url
    query = "&".join(
        f"{name}=***" if hide else name + eq + value
        for (name, eq, value), hide in zip(pairs, secret, strict=True)
    )
    head, _, tail = url.partition("?")
    fragment = tail.partition("#")[1:]
    return f"{head}?{query}{''.join(fragment)}"


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--config``, else ``$CONNECTOR_CONFIG``, else ``./config.yaml``."""
    return Path(explicit or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a configuration file; raise :class:`ConfigError`."""
    path = Path(path)
    source = str(path)
    try:
        loaded = load_yaml(path)
    except YamlProblem as exc:
        raise ConfigError(source, [exc.problem]) from None
    if not isinstance(loaded.data, dict):
        raise ConfigError(
            source, [Problem("config", "must be a table with at least 'dispensaries'", 1)]
        )
    data, missing = interpolate(loaded.data, os.environ if environ is None else environ)
    data, disabled, index_maps = _drop_disabled(data)
    unused = [d[1] for d in disabled]

    problems: list[Problem] = []
    missing_locs: list[Location] = []
    for var in missing:
        if any(var.loc[: len(prefix)] == prefix for prefix in unused):
            continue
        missing_locs.append(var.loc)
        problems.append(
            Problem(
                format_location(var.loc),
                f"environment variable {var.name} is not set "
                f"(set it, or write ${{{var.name}:-default}})",
                loaded.line_of(var.loc),
            )
        )
    try:
        config = Config.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        problems.extend(_problems(exc, loaded, index_maps, missing_locs))
        raise ConfigError(source, _dedupe(problems)) from None
    clash = config.console_clash()
    if clash is not None:
        problems.append(Problem("console.port", clash, loaded.line_of(("console", "port"))))
    reused = config.console_token_reused()
    if reused is not None:
        problems.append(Problem("console.token", reused, loaded.line_of(("console", "token"))))
    if problems:
        raise ConfigError(source, problems)
    config._path = path
    config._disabled = tuple(d[0] for d in disabled)
    return config


_ON = frozenset({"true", "yes", "on", "1"})
_OFF = frozenset({"false", "no", "off", "0"})


def _is_off(section: Any) -> bool:
    """``enabled: false`` (or its text, as ``${VAR:-false}`` gives it); text "true" is
    turned into ``True`` in place so that validation accepts it."""
    if not isinstance(section, dict):
        return False
    flag = section.get("enabled", True)
    if isinstance(flag, str):
        text = flag.strip().lower()
        if text in _ON:
            section["enabled"] = True
        return text in _OFF
    return flag is False


def _drop_disabled(
    data: dict[str, Any],
) -> tuple[dict[str, Any], list[tuple[str, Location]], dict[str, list[int]]]:
    """Remove switched-off sections; keep how destination indexes map back to the file."""
    disabled: list[tuple[str, Location]] = []
    index_maps: dict[str, list[int]] = {}
    dispensaries = data.get("dispensaries")
    if not isinstance(dispensaries, dict):
        return data, disabled, index_maps
    kept: dict[str, Any] = {}
    for name, section in dispensaries.items():
        loc: Location = ("dispensaries", name)
        section = dict(section) if isinstance(section, dict) else section
        if _is_off(section):
            disabled.append((format_location(loc), loc))
            continue
        if isinstance(section, dict):
            reconcile = section.get("reconcile")
            if isinstance(reconcile, dict):
                reconcile = section["reconcile"] = dict(reconcile)
            if "treez" in section and _is_off(reconcile):
                disabled.append((format_location((*loc, "treez")), (*loc, "treez")))
                section.pop("treez")
            destinations = section.get("destinations")
            if isinstance(destinations, list):
                keep = []
                destinations = [dict(d) if isinstance(d, dict) else d for d in destinations]
                for index, dest in enumerate(destinations):
                    dest_loc = (*loc, "destinations", index)
                    if _is_off(dest):
                        label = format_location(dest_loc)
                        if isinstance(dest, dict) and isinstance(dest.get("name"), str):
                            label += f" ({dest['name']})"
                        disabled.append((label, dest_loc))
                    else:
                        keep.append(index)
                section["destinations"] = [destinations[i] for i in keep]
                index_maps[name] = keep
        kept[name] = section
    return {**data, "dispensaries": kept}, disabled, index_maps


def _problems(
    exc: ValidationError,
    loaded: LoadedYaml,
    index_maps: dict[str, list[int]],
    skip: list[Location],
) -> list[Problem]:
    problems = []
    parents = {s[:-1] for s in skip}
    for error in exc.errors(include_url=False, include_input=False, include_context=True):
        loc = _file_location(tuple(error["loc"]), index_maps)
        if any(loc[: len(s)] == s for s in skip) or loc in parents:
            continue  # a knock-on of a variable already reported as missing
        if error["type"] == "union_tag_invalid":
            loc = (*loc, "type")
        problems.append(Problem(format_location(loc), _message(error), loaded.line_of(loc)))
    return problems


def _file_location(loc: tuple[Any, ...], index_maps: dict[str, list[int]]) -> Location:
    """Undo what validation adds or shifts: union tags, indexes of dropped destinations."""
    out: list[str | int] = []
    for i, part in enumerate(loc):
        if (
            isinstance(part, str)
            and part in DESTINATION_TYPES
            and i >= 2
            and isinstance(loc[i - 1], int)
            and loc[i - 2] == "destinations"
        ):
            continue
        if isinstance(part, int) and i >= 3 and loc[i - 1] == "destinations":
            keep = index_maps.get(str(loc[i - 2]))
            if keep is not None and part < len(keep):
                part = keep[part]
        out.append(part)
    return tuple(out)


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known key (check its spelling)"
    if kind == "union_tag_invalid":
        tag = error.get("ctx", {}).get("tag", "")
        return f"{tag!r} is not a destination type (known: {', '.join(DESTINATION_TYPES)})"
    if kind == "union_tag_not_found":
        return f"type is required (one of: {', '.join(DESTINATION_TYPES)})"
    if kind == "literal_error" and error["loc"] and error["loc"][-1] == "enabled":
        return "must be true or false"
    message: str = error["msg"]
    return message.removeprefix("Value error, ")


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen = set()
    out = []
    for problem in problems:
        key = (problem.where, problem.what)
        if key not in seen:
            seen.add(key)
            out.append(problem)
    return out
