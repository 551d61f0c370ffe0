"""The ``connector`` command line.

Every command takes ``--config PATH`` (default ``$CONNECTOR_CONFIG``, else ``./config.yaml``).
Errors go to stderr with exit code 1; what a command produces goes to stdout.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from connector import __version__, _sighup
from connector.config import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG,
    AnyDestination,
    Config,
    DispensaryConfig,
    load_config,
    same_listener,
)
from connector.delivery.base import DestinationType
from connector.destinations import DESTINATION_TYPES, mapping_problems, where
from connector.errors import ConnectorError, MappingError
from connector.mapping import Mapping, load_mapping
from connector.treez import CustomerEvent, TestPing, parse_stored_event

config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV_VAR,
    default=DEFAULT_CONFIG,
    show_default=True,
    show_envvar=True,
    help="The deployment's configuration file.",
)


def _fail(message: str) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(1)


def _load(config_file: Path) -> Config:
    try:
        return load_config(config_file)
    except ConnectorError as exc:
        _fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="connector")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Keep a dispensary's marketing and loyalty tools in step with Treez."""
    if ctx.invoked_subcommand != "serve" and _sighup.previous is not None:
        # the entry point ignored SIGHUP while loading, for serve's sake: the others take
        # back what they were started with (the default, or nohup's SIG_IGN)
        signal.signal(signal.SIGHUP, _sighup.previous)


# --- check ---


def _dispensary_line(name: str, disp: DispensaryConfig) -> str:
    tokens = len(disp.webhook_token)
    token = "development token" if disp.uses_dev_token else f"{tokens} token{'s' * (tokens > 1)}"
    if disp.reconciles:
        reconcile = f"cron '{disp.reconcile.schedule}' {disp.reconcile.timezone}"
    elif disp.treez is None:
        reconcile = "off (no treez section)"
    else:
        reconcile = "off"
    count = len(disp.destinations)
    return (
        f"dispensary {name}: {count} destination{'s' * (count != 1)}, webhook {token}, "
        f"reconcile {reconcile}, resubscribe {disp.policy.resubscribe}"
    )


def _destination_line(disp: DispensaryConfig, dest: AnyDestination, mapping: Mapping) -> str:
    rate = ", ".join(str(r) for r in dest.rate_limit) or "off"
    return (
        f"  destination {dest.name} ({dest.type} → {where(dest)}): "
        f"mapping {dest.mapping.name} ({len(mapping.fields)} fields), batch {dest.batch_size}, "
        f"rate limit {rate}, resubscribe {disp.policy_for(dest.name).resubscribe}"
    )


def _console_line(config: Config) -> str:
    """Never the token: only whether the console listens, and where."""
    if config.console is None:
        return "console: off (no console section)"
    if not config.console.enabled:
        return "console: off (console.token is empty)"
    return f"console: on at {config.console.url}"


def _types_epilog() -> str:
    width = max(len(tag) for tag in DESTINATION_TYPES)
    lines = [f"  {tag:<{width}}  {kind.summary}" for tag, kind in DESTINATION_TYPES.items()]
    return "\b\nDestination types (a destination block's type):\n" + "\n".join(lines)


@main.command(epilog=_types_epilog())
@config_option
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
@click.option(
    "--online",
    is_flag=True,
    help="Also ask Treez and each destination, with a harmless authenticated read, whether "
    "they answer and take the credentials (without it, nothing leaves this machine).",
)
def check(config_file: Path, strict: bool, online: bool) -> None:
    """Validate the configuration and every mapping it names.

    With --online, each destination and Treez get one harmless read carrying the
    credentials and no customer data; one that refuses them or cannot be reached is an
    error (exit 1), one with no such read is "not checked", which is not.
    """
    config = _load(config_file)
    lines = [
        f"{config_file}: store {config.store_display}, "
        f"server {config.server.host}:{config.server.port}"
    ]
    errors: list[str] = []
    warnings: list[str] = []
    for name, disp in config.dispensaries.items():
        lines.append(_dispensary_line(name, disp))
        if disp.uses_dev_token:
            warnings.append(
                f"dispensaries.{name}.webhook_token: the development token is in use; "
                "set TREEZ_WEBHOOK_TOKEN before Treez can reach this server"
            )
        for dest in disp.destinations:
            try:
                mapping = load_mapping(dest.mapping)
            except MappingError as exc:
                errors.append(str(exc))
                lines.append(f"  destination {dest.name}: mapping has errors")
                continue
            warnings.extend(f"{dest.mapping}: {w}" for w in mapping.warnings)
            errors.extend(
                f"{dest.mapping}: destination {dest.name} ({dest.type}): {problem}"
                for problem in mapping_problems(dest, mapping)
            )
            lines.append(_destination_line(disp, dest, mapping))
    from connector.store.migrate import store_problem, store_warning  # writes nothing

    if (store := store_problem(config.store)) is not None:
        errors.append(store)
    elif (store := store_warning(config.store)) is not None:
        warnings.append(store)
    lines.extend(f"disabled: {section}" for section in config.disabled)
    lines.append(_console_line(config))
    if config.console_on and config.console is not None and not config.console.loopback:
        warnings.append(
            f"console.host: {config.console.host} is not a loopback address: anyone who can "
            "reach it is one token away from the dead letters; keep 127.0.0.1 and use an "
            "SSH tunnel or a TLS proxy that restricts who connects"
        )
    if online:
        import asyncio

        from connector.preflight import preflight

        checked = asyncio.run(preflight(config))
        lines.extend(str(c) for c in checked)
        failed = [c for c in checked if c.probe.failed]
        if failed:
            errors.append(f"{len(failed)} of {len(checked)} online check(s) failed")
    click.echo("\n".join(lines))
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if errors:
        _fail("\n".join(errors))
    if strict and warnings:
        _fail(f"{len(warnings)} warning(s) and --strict given")
    click.echo("OK")


# --- map ---


def _read_event(event_file: str) -> Any:
    try:
        if event_file == "-":
            text = sys.stdin.read().removeprefix("\ufeff")
        else:
            text = Path(event_file).read_text(encoding="utf-8-sig")  # a BOM, as the receiver
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{event_file}: cannot be read ({exc.__class__.__name__})")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"{event_file}: not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})")
    # A whole captured delivery (as in Treez's docs): the body sits under "body".
    if isinstance(body, dict) and "body" in body and ("headers" in body or "method" in body):
        inner = body["body"]
        if isinstance(inner, str):
            try:
                inner = json.loads(inner)
            except json.JSONDecodeError:
                _fail(f"{event_file}: the captured delivery's body is not JSON")
        return inner
    return body


def _pick(options: list[str], given: str | None, what: str, flag: str) -> str:
    if given is not None:
        if given not in options:
            _fail(f"no {what} {given!r} in the configuration (there are: {', '.join(options)})")
        return given
    if len(options) == 1:
        return options[0]
    _fail(f"several {what}s are configured; choose one with {flag} ({', '.join(options)})")


@main.command(name="map")
@config_option
@click.option("--dispensary", "-d", help="The dispensary (default: the event's, or the only one).")
@click.option("--destination", "-t", help="The destination (default: the only one).")
@click.option(
    "--mapping",
    "mapping_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Use this mapping file instead of the configured one (no config needed).",
)
@click.option("--show-values", is_flag=True, help="Print the mapped values, not only their kind.")
@click.argument("event_file", metavar="EVENT_FILE")
def map_command(
    config_file: Path,
    dispensary: str | None,
    destination: str | None,
    mapping_file: Path | None,
    show_values: bool,
    event_file: str,
) -> None:
    """Show what a Treez event becomes for a destination, without sending anything.

    EVENT_FILE is a webhook body, or a whole captured delivery with the body under "body";
    "-" reads standard input. Each mapped field is printed with the kind of its value (text
    and its length, number, list...); --show-values prints the contact as JSON, values and
    all.
    """
    try:
        # as the pipeline reads a stored event: a wrong field outside the rules is left out
        # (and said so), not a reason to refuse what the receiver would accept
        event, dropped = parse_stored_event(json.dumps(_read_event(event_file)), source=event_file)
    except ConnectorError as exc:
        _fail(str(exc))
    for problem in dropped:
        click.echo(f"warning: {problem} (left out, as when the event is planned)", err=True)
    if isinstance(event, TestPing):
        click.echo("a Treez test ping: the server answers it with 200 and maps nothing", err=True)
        return
    if not isinstance(event, CustomerEvent):
        click.echo(f"a {event.event_type} event: recorded and ignored, nothing to map", err=True)
        return
    event_dispensary = event.dispensary_short_name
    name: str
    if mapping_file is not None:
        if not (dispensary or event_dispensary):
            _fail("the event names no dispensary; give one with --dispensary")
        name = dispensary or event_dispensary or ""
        mapping = _load_mapping(mapping_file)
    else:
        config = _load(config_file)
        names = list(config.dispensaries)
        wanted = dispensary or (event_dispensary if event_dispensary in names else None)
        name = _pick(names, wanted, "dispensary", "--dispensary")
        disp = config.dispensaries[name]
        dest_name = _pick(
            [d.name for d in disp.destinations], destination, "destination", "--destination"
        )
        mapping = _load_mapping(disp.destination(dest_name).mapping)
    if event_dispensary is not None and event_dispensary != name:
        click.echo(
            f"warning: the event is from {event_dispensary!r}; the webhook endpoint of "
            f"{name!r} would refuse it",
            err=True,
        )
    try:
        contact = mapping.apply(event.customer, name)
    except ConnectorError as exc:
        _fail(f"{event_file}: {exc}")
    if show_values:
        click.echo(json.dumps(contact, indent=2, ensure_ascii=False))
        return
    for field, value in contact.items():
        click.echo(f"{field}: {_value_kind(value)}")
    click.echo("(kinds only: --show-values prints the values)")


def _value_kind(value: Any) -> str:
    """What a mapped value is, without the value: a dry run's output may be shared."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return f"text ({len(value)} characters)"
    if isinstance(value, list):
        return f"list of {len(value)}"
    if isinstance(value, dict):
        return f"object ({', '.join(sorted(map(str, value)))})"
    return type(value).__name__


def _load_mapping(path: Path) -> Mapping:
    try:
        mapping = load_mapping(path)
    except MappingError as exc:
        _fail(str(exc))
    for warning in mapping.warnings:
        click.echo(f"warning: {path}: {warning}", err=True)
    return mapping


# --- serve ---


@main.command()
@config_option
@click.option("--host", help="Listen on this address instead of server.host.")
@click.option("--port", type=int, help="Listen on this port instead of server.port (0: any).")
def serve(config_file: Path, host: str | None, port: int | None) -> None:
    """Run the webhook receiver, the planner and the delivery workers.

    The planner and the workers run in a child process unless server.pipeline_process is
    false (then all in this one); the child stops with this process. With a console token
    set, the operator's console listens on console.host:console.port as well (never on the
    webhook port).

    Stops on SIGTERM or Ctrl-C: accepts nothing more, finishes or releases the work in
    hand within server.shutdown_grace_seconds, and exits 0. On SIGHUP, reads the
    configuration file again and applies its webhook tokens (nothing else) if it is valid.
    """
    from connector import reload
    from connector.logs import configure_logging
    from connector.receiver import create_app
    from connector.server import (
        CompanionServer,
        ConnectorServer,
        bind,
        console_config,
        run_with_companion,
        uvicorn_config,
    )
    from connector.service import Service

    config = _load(config_file)
    server = config.server
    configure_logging(level=server.log_level, json=server.log_format == "json")
    console = config.console if config.console_on else None
    console_socket = None
    if console is not None:
        webhook_host = host or server.host
        webhook_port = server.port if port is None else port
        if same_listener(console.host, console.port, webhook_host, webhook_port):
            _fail(
                f"console.port {console.port} is the webhook listener's ({webhook_host}:"
                f"{webhook_port}): the console never shares it; choose another port"
            )
        try:
            console_socket = bind(console.host, console.port)
        except OSError as exc:
            _fail(f"console: cannot listen on {console.host}:{console.port} ({exc.strerror})")
        if not console.loopback:
            click.echo(
                f"warning: console.host: {console.host} is not a loopback address: anyone who "
                "can reach it may try the token, and over plain http it crosses the network "
                "in clear (prefer 127.0.0.1 and an SSH tunnel, or a TLS proxy)",
                err=True,
            )
    try:
        service = Service(config, role="receiver" if server.pipeline_process else "all")
    except ConnectorError as exc:
        _fail(str(exc))
    receiver = create_app(service)
    reload.install(receiver, config_file, config)  # SIGHUP: the webhook tokens read again
    webhook = ConnectorServer(uvicorn_config(receiver, config, host=host, port=port))
    if console is None or console_socket is None:
        webhook.run()
        return
    from connector.console import create_console_app

    # the receiver process's store (in either role): it reads the whole cluster's
    app = create_console_app(service.astore.store, config)
    companion = CompanionServer(console_config(app, console, config))
    run_with_companion(webhook, companion, console_socket)


# --- demo ---


@main.command()
@config_option
@click.option("--url", help="A running server (default: server.host and server.port).")
@click.option("--dispensary", "-d", help="The dispensary to post as (default: the first).")
@click.option(
    "--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for delivery."
)
@click.option("--show-values", is_flag=True, help="Print what the file destinations received.")
def demo(
    config_file: Path, url: str | None, dispensary: str | None, timeout: float, show_values: bool
) -> None:
    """Post the bundled sample events and show what each destination received.

    Uses the running server when one answers, else starts one in this process on a free port.
    """
    from connector.demo import run_demo
    from connector.logs import configure_logging

    config = _load(config_file)
    configure_logging(level="warning", json=False)
    name = _pick(list(config.dispensaries), dispensary, "dispensary", "--dispensary")
    try:
        finished = run_demo(
            config,
            dispensary=name,
            url=url,
            timeout=timeout,
            echo=click.echo,
            show_values=show_values,
        )
    except ConnectorError as exc:
        _fail(str(exc))
    if not finished:
        sys.exit(1)


# --- reconcile, status, dlq ---


def _since(value: str | None) -> Any:
    if value is None:
        return None
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--since {value!r} is not an ISO 8601 date or time (2026-05-01T10:00:00-07:00)")
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@main.command()
@config_option
@click.option("--dispensary", "-d", help="The dispensary (default: the only one).")
@click.option("--since", help="Pull changes after this ISO time instead of the checkpoint.")
@click.option("--full", is_flag=True, help="Pull every customer, ignoring the checkpoint.")
@click.option("--resend", is_flag=True, help="Send even unchanged customers (new mapping).")
@click.option("--dry-run", is_flag=True, help="Print the planned operations; send nothing.")
@click.option("--no-wait", is_flag=True, help="Leave delivery to a running serve.")
@click.option(
    "--timeout",
    type=float,
    default=3600.0,
    show_default=True,
    help="Seconds to wait for delivery before leaving it to serve.",
)
def reconcile(
    config_file: Path,
    dispensary: str | None,
    since: str | None,
    full: bool,
    resend: bool,
    dry_run: bool,
    no_wait: bool,
    timeout: float,
) -> None:
    """Pull the customers Treez changed and repair what the destinations missed, now.

    Exits when the run's operations are delivered or dead-lettered (0), or when the run
    fails (1). A run of the same dispensary already going (here or in serve) exits 1, naming
    it; so does a dry run, which pulls as a run does and holds the same lock while it pulls:
    two at once would pass Treez's 10 requests a second.
    """
    import asyncio

    from connector.logs import configure_logging
    from connector.reconcile import RunOptions
    from connector.runner import CommandProgress, reconcile_now

    config = _load(config_file)
    configure_logging(level="warning", json=False)
    name = _pick(list(config.dispensaries), dispensary, "dispensary", "--dispensary")
    if full and since:
        _fail("--full and --since cannot be combined")
    options = RunOptions(since=_since(since), full=full, resend=resend, dry_run=dry_run)
    try:
        asyncio.run(
            reconcile_now(
                config,
                name,
                options,
                wait=not no_wait,
                timeout=timeout,
                echo=click.echo,
                progress=CommandProgress(),
            )
        )
    except ConnectorError as exc:
        _fail(f"reconcile {name}: {exc}")


@main.command()
@config_option
def status(config_file: Path) -> None:
    """Show the last reconciliation per dispensary, queue depths and dead letters."""
    from connector.runner import status_lines

    config = _load(config_file)
    try:
        for line in status_lines(config):
            click.echo(line)
    except ConnectorError as exc:
        _fail(str(exc))


@main.command()
@config_option
@click.option("--sql", is_flag=True, help="Print the DDL for a DBA instead; change nothing.")
def migrate(config_file: Path, sql: bool) -> None:
    """Bring the store's schema up to date (serve and every command also do this at start).

    With --sql, print the DDL from the store's current revision (or an empty database) to the
    newest, for the configured store's database, without writing to it.
    """
    from connector.store.migrate import head, migrate_url, upgrade_sql

    config = _load(config_file)
    try:
        if sql:
            click.echo(upgrade_sql(config.store, timeout=config.store_timeout_seconds), nl=False)
            return
        done = migrate_url(config.store, timeout=config.store_timeout_seconds)
    except ConnectorError as exc:
        _fail(f"migrate: {exc}")
    click.echo(f"{config.store_display}: {done or f'already current (revision {head()})'}")


@main.group()
def dlq() -> None:
    """The dead-letter queue: operations a destination refused or that ran out of retries."""


@dlq.command(name="list")
@config_option
@click.option("--dispensary", "-d")
@click.option("--destination", "-t")
@click.option("--customer", "-c")
@click.option("--all", "include_replayed", is_flag=True, help="Include replayed ones.")
@click.option("--limit", type=int, default=100, show_default=True)
def dlq_list(
    config_file: Path,
    dispensary: str | None,
    destination: str | None,
    customer: str | None,
    include_replayed: bool,
    limit: int,
) -> None:
    """List dead letters, oldest first (the reason; never customer values)."""
    from connector.runner import dlq_lines
    from connector.store import open_store

    config = _load(config_file)
    store = open_store(config.store, listen=False)
    try:
        for line in dlq_lines(
            store,
            dispensary=dispensary,
            destination=destination,
            customer=customer,
            include_replayed=include_replayed,
            limit=limit,
        ):
            click.echo(line)
    finally:
        store.close()


@dlq.command(name="replay")
@config_option
@click.option("--dispensary", "-d")
@click.option("--destination", "-t")
@click.option("--customer", "-c")
@click.option("--all", "everything", is_flag=True, help="Every dead letter (no filter needed).")
def dlq_replay(
    config_file: Path,
    dispensary: str | None,
    destination: str | None,
    customer: str | None,
    everything: bool,
) -> None:
    """Put dead letters back in the queue; serve (or the next reconcile) delivers them.

    An operation superseded by a later one of the same kind for that contact is not resent.
    """
    from connector._who import who
    from connector.runner import CommandProgress, replay_dead_letters
    from connector.store import open_store

    if not (everything or dispensary or destination or customer):
        _fail("say which dead letters: --destination, --customer, --dispensary, or --all")
    config = _load(config_file)
    asked = ", ".join(
        f"{name} {value}"
        for name, value in (
            ("dispensary", dispensary),
            ("destination", destination),
            ("customer", customer),
        )
        if value
    )
    store = open_store(config.store, listen=False)
    try:
        # what was asked is audited before anything moves, what it did after
        store.audit(who(), "dlq_replay_asked", asked or "all")
        done = replay_dead_letters(
            store,
            dispensary=dispensary,
            destination=destination,
            customer=customer,
            progress=CommandProgress(),
        )
        store.audit(
            who(),
            "dlq_replay",
            asked or "all",
            f"replayed {done.replayed}, superseded {done.superseded}, "
            f"not replayable {done.unreplayable}",
        )
    finally:
        store.close()
    click.echo(
        f"replayed {done.replayed}, superseded {done.superseded}, "
        f"not replayable {done.unreplayable}"
    )


# --- what a destination type needs set up on the vendor's side (`connector TAG setup`) ---


def _setup_command(tag: str, kind: DestinationType[Any]) -> click.Group:
    @click.group(name=tag, help=f"{kind.summary} (type: {tag}).")
    def group() -> None:
        pass

    @group.command(name="setup", help=kind.setup_help or f"Prepare {tag} for the first sync.")
    @config_option
    @click.option("--dispensary", "-d", help="The dispensary (default: the only one).")
    @click.option("--destination", "-t", help=f"The {tag} destination (default: the only one).")
    def setup(config_file: Path, dispensary: str | None, destination: str | None) -> None:
        import asyncio

        config = _load(config_file)
        name = _pick(list(config.dispensaries), dispensary, "dispensary", "--dispensary")
        disp = config.dispensaries[name]
        mine = [d.name for d in disp.destinations if d.type == tag]
        if not mine:
            _fail(f"dispensary {name} has no destination of type {tag}")
        dest = disp.destination(_pick(mine, destination, f"{tag} destination", "--destination"))
        mapping = _load_mapping(dest.mapping)
        assert kind.setup is not None
        try:
            lines = asyncio.run(kind.setup(dest, mapping))
        except ConnectorError as exc:
            _fail(f"{tag} setup of {name}/{dest.name} failed: {exc}")
        for line in lines:
            click.echo(line)

    return group


for _tag, _kind in DESTINATION_TYPES.items():
    if _kind.setup is not None:
        main.add_command(_setup_command(_tag, _kind))


# The operator's commands (explain, quarantine, conflicts) live in their own module and
# register themselves on `main` when it is imported.
_OPERATOR_COMMANDS = importlib.import_module("connector.cli_operator")
