"""The operator's commands: ``explain``, ``quarantine list/show/replay`` and ``conflicts
list/ack`` (mounted on ``connector``'s group by :mod:`connector.cli`).

What people do here is recorded in the store's audit table (``who``: the command line's user
and host), as the console's actions are: a replay, an acknowledgement, and every reveal of
customer values (``--show-values``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from connector._who import who
from connector.cli import _fail, _load, config_option, main
from connector.config import Config
from connector.errors import ConnectorError
from connector.explain import iso
from connector.store import Store, open_store


def _iso(moment: float | None) -> str:
    return iso(moment) or "-"


@contextmanager
def _store(config: Config) -> Iterator[Store]:
    try:
        store = open_store(config.store, timeout=config.store_timeout_seconds, listen=False)
    except ConnectorError as exc:
        _fail(str(exc))
    try:
        yield store
    finally:
        store.close()


# --- explain ---


@main.command()
@config_option
@click.option("--dispensary", "-d", help="The dispensary (default: the one that knows the id).")
@click.option(
    "--show-values", is_flag=True, help="Show the customer's field values (recorded in the audit)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the story as JSON.")
@click.argument("customer_id")
def explain(
    config_file: Path, dispensary: str | None, show_values: bool, as_json: bool, customer_id: str
) -> None:
    """One customer's story, oldest first: each event received and its outcome, what was
    decided for each destination and why, each operation with its attempts and answers,
    and where it stands now. Field names only, unless --show-values."""
    from connector.explain import build_story, story_json, story_lines

    config = _load(config_file)
    with _store(config) as store:
        if dispensary is None:
            known = store.customer_dispensaries(customer_id)
            if len(known) > 1:
                _fail(f"customer {customer_id} is known at {', '.join(known)}: say which with -d")
            if known:
                dispensary = known[0]
            elif len(config.dispensaries) == 1:
                dispensary = next(iter(config.dispensaries))
            else:
                _fail(f"customer {customer_id} is not known at any dispensary: say which with -d")
        configured = config.dispensaries.get(dispensary)
        names = [d.name for d in configured.destinations] if configured else []
        record = store.customer_record(dispensary, customer_id, names)
        if show_values:
            store.audit(who(), "reveal", f"customer {dispensary}/{customer_id}", "explain")
    story = build_story(record, names)
    if as_json:
        click.echo(json.dumps(story_json(story, show_values), indent=2, ensure_ascii=False))
        return
    for line in story_lines(story, show_values):
        click.echo(line)


# --- quarantine ---


@main.group()
def quarantine() -> None:
    """Bodies the receiver (or the planner) refused, kept with their reason."""


@quarantine.command(name="list")
@config_option
@click.option("--dispensary", "-d")
@click.option("--all", "include_replayed", is_flag=True, help="Include replayed ones.")
@click.option("--limit", type=int, default=100, show_default=True)
def quarantine_list(
    config_file: Path, dispensary: str | None, include_replayed: bool, limit: int
) -> None:
    """List refused bodies, oldest first (the reason; never the body)."""
    config = _load(config_file)
    with _store(config) as store:
        rows = store.quarantined(
            dispensary=dispensary, include_replayed=include_replayed, limit=limit
        )
    if not rows:
        click.echo("quarantine is empty" + ("" if include_replayed else " (open ones)"))
    for row in rows:
        size = "body purged" if row.size is None else f"{row.size} bytes"
        replayed = (
            f", replayed {_iso(row.replayed_at)} as event #{row.replayed_event_id}"
            if row.replayed_at is not None
            else ""
        )
        click.echo(
            f"#{row.id} {_iso(row.received_at)} {row.dispensary} {row.status_code} ({size})"
            f"{replayed}: {row.reason}"
        )


def _shape(body: bytes) -> str:
    """What a refused body holds, by field names: the envelope's keys and ``data``'s."""
    try:
        found: Any = json.loads(body)
    except ValueError:
        return "not JSON"
    if not isinstance(found, dict):
        return f"JSON {type(found).__name__}, not an object"
    parts = [f"keys: {', '.join(sorted(map(str, found)))}"]
    data = found.get("data")
    if isinstance(data, dict):
        parts.append(f"data keys: {', '.join(sorted(map(str, data)))}")
    return "; ".join(parts)


@quarantine.command(name="show")
@config_option
@click.option("--show-values", is_flag=True, help="Print the body (recorded in the audit).")
@click.argument("quarantine_id", type=int)
def quarantine_show(config_file: Path, show_values: bool, quarantine_id: int) -> None:
    """One refused body: why, when, and its field names (its text with --show-values)."""
    config = _load(config_file)
    with _store(config) as store:
        found = store.quarantined(ids=[quarantine_id], include_replayed=True, limit=1)
        if not found:
            _fail(f"no quarantined body #{quarantine_id}")
        row = found[0]
        body = store.quarantined_body(quarantine_id)
        if show_values:
            store.audit(who(), "reveal", f"quarantine #{quarantine_id}", "show")
    if show_values:
        click.echo("CUSTOMER VALUES SHOWN (--show-values)")
    click.echo(f"quarantine #{row.id} of {row.dispensary}, received {_iso(row.received_at)}")
    click.echo(f"refused with {row.status_code}: {row.reason}")
    click.echo(f"content type: {row.content_type or '-'}")
    if row.replayed_at is not None:
        click.echo(f"replayed {_iso(row.replayed_at)} as event #{row.replayed_event_id}")
    if body is None:
        click.echo("body: purged (past retention)")
    elif show_values:
        click.echo("body:")
        click.echo(body.decode("utf-8", errors="replace"))
    else:
        click.echo(f"body: {len(body)} bytes; {_shape(body)}")


@quarantine.command(name="replay")
@config_option
@click.option("--dispensary", "-d")
@click.option("--all", "everything", is_flag=True, help="Every open refused body.")
@click.argument("quarantine_ids", type=int, nargs=-1)
def quarantine_replay(
    config_file: Path, dispensary: str | None, everything: bool, quarantine_ids: tuple[int, ...]
) -> None:
    """Judge refused bodies again by today's rules and configuration; move the ones that
    now pass into the inbox (once: a replayed body is never replayed again)."""
    from connector.quarantine import judge

    if not (everything or dispensary or quarantine_ids):
        _fail("say which bodies: their ids, --dispensary, or --all")
    config = _load(config_file)
    ids = list(quarantine_ids) or None
    target = ", ".join(f"#{i}" for i in quarantine_ids) or (
        f"dispensary {dispensary}" if dispensary else "all"
    )
    with _store(config) as store:
        # what was asked is recorded first, each move with it: a replay stopped half-way
        # leaves a row for every body it moved
        store.audit(who(), "quarantine_replay_asked", target)
        done = store.replay_quarantined(judge(config), dispensary=dispensary, ids=ids, who=who())
    for quarantine_id in done.missing:
        click.echo(f"#{quarantine_id}: no such open body (unknown, or replayed already)")
    for quarantine_id, event_id in done.moved:
        click.echo(f"#{quarantine_id}: moved to the inbox as event #{event_id}")
    for quarantine_id, reason in done.refused:
        click.echo(f"#{quarantine_id}: still refused: {reason}")
    click.echo(
        f"moved {len(done.moved)}, still refused {len(done.refused)}, skipped {done.skipped}"
    )


# --- conflicts ---


@main.group()
def conflicts() -> None:
    """What the connector met and did not overwrite: external-id conflicts, 409 collisions,
    unknown contacts, opt-outs a destination cannot take."""


_filters = [
    click.option("--dispensary", "-d"),
    click.option("--destination", "-t"),
    click.option("--kind", "-k", help="external_id_mismatch, sms_consent_unsupported..."),
    click.option("--customer", "-c"),
]


def _with_filters(command: Any) -> Any:
    for option in reversed(_filters):
        command = option(command)
    return command


@conflicts.command(name="list")
@config_option
@_with_filters
@click.option("--all", "include_acked", is_flag=True, help="Include acknowledged ones.")
@click.option("--limit", type=int, default=100, show_default=True)
def conflicts_list(
    config_file: Path,
    dispensary: str | None,
    destination: str | None,
    kind: str | None,
    customer: str | None,
    include_acked: bool,
    limit: int,
) -> None:
    """List conflicts, oldest first (open ones unless --all)."""
    config = _load(config_file)
    with _store(config) as store:
        rows = store.conflict_records(
            dispensary=dispensary,
            destination=destination,
            kind=kind,
            customer=customer,
            include_acked=include_acked,
            limit=limit,
        )
    if not rows:
        click.echo("no conflicts" + ("" if include_acked else " open"))
    for row in rows:
        acked = f" (acknowledged {_iso(row.acked_at)} by {row.acked_by})" if row.acked_at else ""
        click.echo(
            f"#{row.id} {_iso(row.created_at)} {row.dispensary}/{row.destination} customer "
            f"{row.customer_id} {row.kind}: {row.detail}{acked}"
        )


@conflicts.command(name="ack")
@config_option
@_with_filters
@click.option("--all", "everything", is_flag=True, help="Every open conflict matching.")
@click.argument("conflict_ids", type=int, nargs=-1)
def conflicts_ack(
    config_file: Path,
    dispensary: str | None,
    destination: str | None,
    kind: str | None,
    customer: str | None,
    everything: bool,
    conflict_ids: tuple[int, ...],
) -> None:
    """Acknowledge conflicts: by id, or every open one matching the filters (--all alone:
    every open conflict)."""
    filtered = any((dispensary, destination, kind, customer))
    if not (conflict_ids or everything):
        _fail("say which conflicts: their ids, or --all (with filters to narrow it)")
    if conflict_ids and (filtered or everything):
        _fail("give conflict ids, or --all with filters: not both")
    config = _load(config_file)
    with _store(config) as store:
        if conflict_ids:
            ids = list(conflict_ids)
        else:
            ids = [
                c.id
                for c in store.conflict_records(
                    dispensary=dispensary,
                    destination=destination,
                    kind=kind,
                    customer=customer,
                    limit=1_000_000,
                )
            ]
        done = store.ack_conflicts(ids, who())
    click.echo(f"acknowledged {done}")
