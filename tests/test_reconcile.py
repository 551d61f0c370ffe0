"""Reconciliation through the fake Treez Customer API (tests/fakes/treez_api.py): the real
store (SQLite file), planner and workers, a ``jsonl`` destination as the sink, and the Treez
client talking to the fake in-process (``httpx.ASGITransport``)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import respx
import tenacity
from click.testing import CliRunner
from fakes.treez_api import TreezFake, serve

from connector.cli import main as cli
from connector.config import Config, DispensaryConfig, TreezApiConfig, load_config
from connector.reconcile import ReconcileBusy, Reconciler, RunOptions
from connector.runner import reconcile_now, status_lines
from connector.store import open_store
from connector.store.runs import counts_from
from connector.treez_api import TreezApiError, TreezClient, format_after

DISPENSARY = "partnersandbox3"
CLIENT_ID, API_KEY = "treez_test_client", "treez_test_apikey"


def write_config(work: Path, api_url: str, *, paging: str = "auto", extra: str = "") -> Path:
    path = work / "config.yaml"
    path.write_text(
        f"""
store: sqlite:///{work}/c.db
dispensaries:
  {DISPENSARY}:
    webhook_token: tok
    treez:
      api_url: {api_url}
      client_id: {CLIENT_ID}
      api_key: {API_KEY}
    reconcile:
      paging: {paging}
      redrive_after_minutes: 0
{extra}
    destinations:
      - name: file
        type: jsonl
        path: {work}/out.jsonl
        mapping: m.yaml
"""
    )
    (work / "m.yaml").write_text(
        "first_name: first_name\nlast_name: last_name\nemail: email\n"
        "external_id: {template: 'treez-{dispensary}-{customer_id}'}\n"
    )
    return path


def lines(work: Path) -> list[dict[str, Any]]:
    path = work / "out.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def in_process(fake: TreezFake) -> Callable[[str, DispensaryConfig], TreezClient]:
    def build(_: str, disp: DispensaryConfig) -> TreezClient:
        assert disp.treez is not None
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app))
        return TreezClient(
            disp.treez,
            client=client,
            retry_wait=tenacity.wait_none(),
            attempts=3,
            pace=fake.rate_limit is not None,
        )

    return build


def run(
    config: Config,
    fake: TreezFake,
    options: RunOptions | None = None,
    *,
    echo: Callable[[str], None] | None = None,
) -> Any:
    return asyncio.run(
        reconcile_now(
            config,
            DISPENSARY,
            options or RunOptions(),
            wait=True,
            timeout=30,
            echo=echo or (lambda _: None),
            reconciler_options={"client_for": in_process(fake)},
        )
    )


def store_rows(work: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(work / "c.db") as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
def fake() -> TreezFake:
    # everything changed within the last 12 hours: inside the first run's 24-hour look-back
    return TreezFake.generate(230, seed=7, history_days=0.5, rate_limit=None)


def test_first_run_pulls_the_lookback_and_delivers_each_customer_once(
    tmp_path: Path, fake: TreezFake
) -> None:
    config = load_config(write_config(tmp_path, fake.base_url))
    report = run(config, fake)
    assert report.outcome == "succeeded"
    listed = fake.ids_after(datetime.now(UTC) - timedelta(hours=24))
    assert report.counts["pulled"] == len(listed) == 230
    assert report.pages == 5  # 50, 50, 50, 50, 30
    upserts = Counter(op["customer_id"] for op in lines(tmp_path) if op["op"] == "upsert")
    active = {c for c in listed if (fake.customer(c) or {}).get("status") != "DEACTIVATED"}
    assert set(upserts) == active
    assert set(upserts.values()) == {1}
    # the opt-outs of the population are unsubscribed
    opted = {c for c in listed if (fake.customer(c) or {}).get("opt_out") == "true"}
    unsubscribed = {op["customer_id"] for op in lines(tmp_path) if op["op"] == "unsubscribe"}
    assert opted
    assert opted <= unsubscribed
    assert report.counts["created"] + report.counts["unchanged"] <= 230
    assert report.counts["opted_out"] == len(unsubscribed)
    # the checkpoint is the newest change pulled; the run is stored with its counts
    newest = max(
        datetime.fromisoformat(str((fake.customer(c) or {})["last_update"])) for c in listed
    )
    assert report.checkpoint_after_us == int(newest.timestamp() * 1_000_000)
    (stored,) = store_rows(tmp_path, "select outcome, counts from reconcile_runs")
    assert stored[0] == "succeeded"
    assert json.loads(stored[1])["pulled"] == 230


def test_incremental_run_pulls_only_the_changes_and_the_overlap(
    tmp_path: Path, fake: TreezFake
) -> None:
    config = load_config(write_config(tmp_path, fake.base_url))
    first = run(config, fake)
    before = len(lines(tmp_path))
    changed = fake.customer_ids()[:3]
    for customer_id in changed:
        fake.update(customer_id, first_name="Renamed")
    second = run(config, fake)
    assert second.checkpoint_before_us == first.checkpoint_after_us
    # the window is checkpoint - 10 minutes: the changes plus what changed just before
    overlap = fake.ids_after(
        datetime.fromtimestamp(first.checkpoint_after_us / 1e6, UTC) - timedelta(minutes=10)
    )
    assert second.counts["pulled"] == len(overlap)
    assert second.counts["updated"] == 3
    assert second.counts["unchanged"] == len(overlap) - 3
    new = lines(tmp_path)[before:]
    assert sorted(op["customer_id"] for op in new) == sorted(changed)
    assert {op["fields"]["first_name"] for op in new} == {"Renamed"}


def test_a_pulled_customer_with_a_wrong_field_is_applied_without_it(
    tmp_path: Path, fake: TreezFake
) -> None:
    """As for a webhook: a wrong field outside the rules (here an object for a first name)
    is dropped when planned, so the opt-out the customer also carries is applied."""
    config = load_config(write_config(tmp_path, fake.base_url))
    run(config, fake)
    before = len(lines(tmp_path))
    customer_id = fake.customer_ids()[5]
    fake.update(customer_id, first_name={"given": "Ann"}, last_name="Moved", opt_out=True)
    report = run(config, fake)
    assert report.outcome == "succeeded"
    new = [op for op in lines(tmp_path)[before:] if op["customer_id"] == customer_id]
    assert [op["op"] for op in new] == ["upsert", "unsubscribe"]
    assert "first_name" not in new[0]["fields"]
    assert new[0]["fields"]["last_name"] == "Moved"
    assert store_rows(tmp_path, "SELECT count(*) FROM quarantine") == [(0,)]


@pytest.mark.parametrize("paging", ["auto", "anchored", "numbered"])
def test_a_run_failing_half_way_resumes_and_skips_nothing(
    tmp_path: Path, fake: TreezFake, paging: str
) -> None:
    config = load_config(write_config(tmp_path, fake.base_url, paging=paging))

    def fail_on_third(faked: TreezFake, request: Any) -> None:
        if request.number == 3:
            faked.fail_next(500, count=5)

    fake.on_page(fail_on_third)
    with pytest.raises(TreezApiError, match="500"):
        run(config, fake)
    (failed,) = store_rows(tmp_path, "select outcome, error from reconcile_runs")
    assert failed[0] == "failed"
    assert "500" in failed[1]
    checkpoint = store_rows(tmp_path, "select after_us from checkpoints")
    if paging == "numbered":
        assert checkpoint == []  # nothing is known to be complete in an unknown order
    else:
        assert len(checkpoint) == 1  # pages in last_update order: what came in is done
    fake.clear_hooks()
    with sqlite3.connect(tmp_path / "c.db") as conn:  # as if the process had been killed
        conn.execute("update reconcile_runs set outcome = 'running'")
    resumed = run(config, fake)
    assert resumed.outcome == "succeeded"
    outcomes = store_rows(tmp_path, "select outcome from reconcile_runs order by id")
    assert outcomes == [("interrupted",), ("succeeded",)]
    upserts = Counter(op["customer_id"] for op in lines(tmp_path) if op["op"] == "upsert")
    listed = fake.ids_after(datetime.now(UTC) - timedelta(hours=24))
    active = {c for c in listed if (fake.customer(c) or {}).get("status") != "DEACTIVATED"}
    assert set(upserts) == active  # nothing skipped
    assert set(upserts.values()) == {1}  # nothing sent twice


@pytest.mark.parametrize("paging", ["auto", "anchored", "numbered"])
def test_customers_changed_while_the_run_pages_are_not_lost(
    tmp_path: Path, fake: TreezFake, paging: str
) -> None:
    config = load_config(write_config(tmp_path, fake.base_url, paging=paging))
    early = fake.customer_ids()[:2]  # listed on the first page

    def change_while_paging(faked: TreezFake, request: Any) -> None:
        if request.number == 3:
            for customer_id in early:
                faked.update(customer_id, first_name="Moved")

    fake.on_page(change_while_paging)
    run(config, fake)
    fake.clear_hooks()
    run(config, fake)  # the next run's overlap window covers what the first could miss
    latest = {}
    for op in lines(tmp_path):
        if op["op"] == "upsert":
            latest[op["customer_id"]] = op["fields"]
    for customer_id in early:
        assert latest[customer_id]["first_name"] == "Moved"
    listed = fake.ids_after(datetime.now(UTC) - timedelta(hours=24))
    active = {c for c in listed if (fake.customer(c) or {}).get("status") != "DEACTIVATED"}
    assert set(latest) == active


def test_an_expired_token_is_renewed_once_and_the_run_goes_on(
    tmp_path: Path, fake: TreezFake
) -> None:
    config = load_config(write_config(tmp_path, fake.base_url))

    def expire(faked: TreezFake, request: Any) -> None:
        if request.number == 2:
            faked.expire_tokens()

    fake.on_page(expire)
    report = run(config, fake)
    assert report.outcome == "succeeded"
    assert fake.token_requests == 2
    assert report.counts["pulled"] == 230


def test_the_token_is_reused_across_pages(tmp_path: Path, fake: TreezFake) -> None:
    config = load_config(write_config(tmp_path, fake.base_url))
    run(config, fake)
    assert fake.token_requests == 1


def test_an_invalid_date_format_is_a_clear_error(
    tmp_path: Path, fake: TreezFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tmp_path, fake.base_url))
    monkeypatch.setattr("connector.treez_api.format_after", lambda moment: "2026/05/01")
    with pytest.raises(TreezApiError) as caught:
        run(config, fake)
    message = str(caught.value)
    assert "400" in message
    assert "INVALID_DATE_FORMAT" in message
    assert "page 1" in message
    assert caught.value.code == "INVALID_DATE_FORMAT"


def test_a_dry_run_stores_and_sends_nothing(tmp_path: Path, fake: TreezFake) -> None:
    config = load_config(write_config(tmp_path, fake.base_url))
    printed: list[str] = []
    report = run(config, fake, RunOptions(dry_run=True), echo=printed.append)
    assert report.run_id is None
    assert report.counts["pulled"] == 230
    assert report.planned_ops[("file", "upsert")] > 0
    assert lines(tmp_path) == []
    assert store_rows(tmp_path, "select count(*) from inbox") == [(0,)]
    assert store_rows(tmp_path, "select count(*) from reconcile_runs") == [(0,)]
    assert store_rows(tmp_path, "select count(*) from checkpoints") == [(0,)]
    text = "\n".join(printed)
    assert "would send file:" in text
    assert "upsert" in text
    # never a customer value: names and e-mails stay out of what is printed
    first = fake.customer(fake.customer_ids()[0]) or {}
    assert str(first.get("email")) not in text
    assert str(first.get("last_name")) not in text


def test_resend_sends_unchanged_customers_again(tmp_path: Path, fake: TreezFake) -> None:
    config = load_config(write_config(tmp_path, fake.base_url))
    run(config, fake)
    before = len(lines(tmp_path))
    again = run(config, fake, RunOptions(full=True))
    assert len(lines(tmp_path)) == before  # change detection: nothing new
    assert again.counts["unchanged"] == again.counts["pulled"]
    resent = run(config, fake, RunOptions(full=True, resend=True))
    upserts = [op for op in lines(tmp_path)[before:] if op["op"] == "upsert"]
    assert len(upserts) == resent.counts["updated"] > 0


def test_two_runs_of_one_dispensary_at_once_one_runs(tmp_path: Path, fake: TreezFake) -> None:
    """Two schedulers (two processes: two reconcilers) firing together: one runs, the other
    is refused by the store lock."""
    config = load_config(write_config(tmp_path, fake.base_url))

    async def both() -> list[Any]:
        from connector.pipeline import Deployment, process_batch
        from connector.store import AsyncStore

        stores = [AsyncStore(open_store(config.store)) for _ in range(2)]
        deployment = Deployment.from_config(config)

        async def plan() -> None:
            while (await stores[0].call(process_batch, stores[0].store, deployment)).events:
                pass

        reconcilers = [
            Reconciler(config, s, deployment, plan=plan, client_for=in_process(fake))
            for s in stores
        ]
        results = await asyncio.gather(
            *(r.run(DISPENSARY, RunOptions(trigger="schedule")) for r in reconcilers),
            return_exceptions=True,
        )
        for s in stores:
            s.close()
        return results

    results = asyncio.run(both())
    assert sorted(type(r).__name__ for r in results) == ["ReconcileBusy", "RunReport"]
    assert store_rows(tmp_path, "select count(*) from reconcile_runs") == [(1,)]
    # the lock is released: the next run goes
    assert run(config, fake).outcome == "succeeded"


def test_the_lock_of_a_dead_holder_expires(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/c.db")
    runs = store
    assert runs.acquire("reconcile:x", "a", ttl=60)
    assert not runs.acquire("reconcile:x", "b", ttl=60)
    assert runs.acquire("reconcile:x", "a", ttl=60)  # its holder may take it again
    assert runs.acquire("reconcile:x", "b", ttl=-1) is False
    with store.transaction() as conn:
        conn.exec_driver_sql("update locks set expires_at = 0")
    assert runs.acquire("reconcile:x", "b", ttl=60)
    runs.release("reconcile:x", "a")  # not a's any more: nothing happens
    assert not runs.acquire("reconcile:x", "a", ttl=60)
    runs.release("reconcile:x", "b")
    assert runs.acquire("reconcile:x", "a", ttl=60)
    store.close()


def test_counts_from_event_outcomes() -> None:
    counts = counts_from(
        [
            ("applied", "new upsert", 5),
            ("applied", "new upsert unsubscribe", 2),
            ("applied", "upsert", 3),
            ("duplicate", None, 7),
            ("stale", None, 1),
            ("applied", "", 4),
            ("applied", "merge upsert", 1),
            ("absorbed", "merged", 1),
            ("applied", "merged", 1),
            ("applied", "upsert conflict", 1),
            ("failed", None, 2),
        ]
    )
    assert counts == {
        "pulled": 28,
        "unchanged": 13,
        "created": 7,
        "updated": 6,
        "opted_out": 2,
        "merged": 3,
        "conflicts": 1,
        "errors": 2,
    }


def test_dead_letters_are_replayed_unless_superseded(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/c.db")
    now = time.time()
    with store.transaction() as conn:
        for oid, customer, op, status in [
            (1, "a", "upsert", "dead"),
            (2, "b", "upsert", "dead"),
            (3, "b", "upsert", "done"),  # a later upsert of b went through
            (4, "c", "unsubscribe", "dead"),
        ]:
            conn.exec_driver_sql(
                "insert into outbox (id, dispensary, destination, order_key, customer_id, op,"
                " payload, idempotency_key, status, attempts, created_at, next_attempt_at)"
                " values (?, 'd', 'x', ?, ?, ?, '{}', ?, ?, 8, ?, ?)",
                (oid, customer, customer, op, f"k{oid}", status, now, now),
            )
        for oid, customer, op in [(1, "a", "upsert"), (2, "b", "upsert"), (4, "c", "unsubscribe")]:
            conn.exec_driver_sql(
                "insert into dead_letters (outbox_id, dispensary, destination, customer_id, op,"
                " payload, idempotency_key, attempts, reason, created_at)"
                " values (?, 'd', 'x', ?, ?, '{}', ?, 8, 'refused', ?)",
                (oid, customer, op, f"k{oid}", now - 7200),
            )
        conn.exec_driver_sql(
            "insert into dead_letters (outbox_id, dispensary, destination, customer_id, op,"
            " payload, idempotency_key, attempts, reason, created_at)"
            " values (null, 'd', 'x', 'e', 'upsert', '{}', 'm', 0, 'mapping failed', ?)",
            (now,),
        )
    runs = store
    assert [d.customer_id for d in runs.dead_letters()] == ["a", "b", "c", "e"]
    # only the old ones, and at most 1
    assert runs.replay(older_than=now - 3600, limit=1).replayed == 1
    done = runs.replay(older_than=now - 3600)
    assert (done.replayed, done.superseded, done.unreplayable) == (1, 1, 0)
    statuses = {
        r[0]: r[1]
        for r in store.query(__import__("sqlalchemy").text("select id, status from outbox"))
    }
    assert statuses == {1: "pending", 2: "dead", 3: "done", 4: "pending"}
    assert runs.replay(customer="e").unreplayable == 1
    # a mapping failure stays open: it needs the mapping fixed and reconcile --resend
    assert [d.customer_id for d in runs.dead_letters()] == ["e"]
    assert len(runs.dead_letters(include_replayed=True)) == 4
    store.close()


def test_status_shows_the_last_run_queues_and_dead_letters(tmp_path: Path, fake: TreezFake) -> None:
    config = load_config(write_config(tmp_path, fake.base_url))
    assert "never reconciled" in "\n".join(status_lines(config))
    run(config, fake)
    text = "\n".join(status_lines(config))
    assert "last run 1: succeeded" in text
    assert "pulled 230" in text
    assert "file: pending 0, in flight 0, dead letters 0" in text


def test_the_reconcile_command_over_http(tmp_path: Path) -> None:
    """The CLI as a user runs it: the real Treez client over HTTP to the fake, paced at
    10 requests a second, delivering to the file, then status and dlq list."""
    fake = TreezFake.generate(120, seed=3, history_days=0.5)
    with serve(fake) as base_url:
        config = write_config(tmp_path, base_url)
        runner = CliRunner()
        result = runner.invoke(cli, ["reconcile", "--config", str(config)])
        assert result.exit_code == 0, result.output
        assert "reconcile partnersandbox3: succeeded" in result.output
        assert "pulled 120" in result.output
        dry = runner.invoke(cli, ["reconcile", "--config", str(config), "--dry-run", "--full"])
        assert dry.exit_code == 0, dry.output
        assert "dry run" in dry.output
        bad = runner.invoke(cli, ["reconcile", "--config", str(config), "--since", "yesterday"])
        assert bad.exit_code == 1
        assert "--since 'yesterday'" in bad.output
    assert max(_in_window(fake, 1.0)) <= 10  # the client paced itself
    status = CliRunner().invoke(cli, ["status", "--config", str(config)])
    assert status.exit_code == 0
    assert "succeeded" in status.output
    listed = CliRunner().invoke(cli, ["dlq", "list", "--config", str(config)])
    assert listed.exit_code == 0
    assert "no dead letters" in listed.output
    refused = CliRunner().invoke(cli, ["dlq", "replay", "--config", str(config)])
    assert refused.exit_code == 1
    assert "--all" in refused.output


def _in_window(fake: TreezFake, width: float) -> list[int]:
    times = sorted(c.at for c in fake.calls)
    return [sum(1 for u in times if t <= u < t + width) for t in times]


def test_reconcile_without_treez_credentials_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"store: sqlite:///{tmp_path}/c.db\ndispensaries:\n  {DISPENSARY}:\n"
        "    webhook_token: tok\n    destinations:\n      - name: file\n        type: jsonl\n"
        f"        path: {tmp_path}/out.jsonl\n        mapping: m.yaml\n"
    )
    (tmp_path / "m.yaml").write_text("email: email\n")
    result = CliRunner().invoke(cli, ["reconcile", "--config", str(config)])
    assert result.exit_code == 1
    assert f"dispensaries.{DISPENSARY}.treez is not set" in result.output


@respx.mock
def test_client_turns_fail_envelopes_and_statuses_into_clear_errors() -> None:
    base = "https://api.treez.io/v2.0/dispensary/s1"
    config = TreezApiConfig(api_url=base, client_id="c", api_key="secret-key-value")  # type: ignore[arg-type]
    respx.post(f"{base}/config/api/gettokens").respond(
        200, json={"resultCode": "SUCCESS", "access_token": "t", "expires_in": "7200"}
    )
    page = respx.get(url__startswith=f"{base}/customer/lastUpdated/after/")
    page.respond(
        200,
        json={
            "resultCode": "FAIL",
            "resultReason": "MODEL_VALIDATION_FAIL",
            "resultDetail": "jane@example.com is bad",
            "data": None,
        },
    )

    async def go() -> str:
        client = TreezClient(config, retry_wait=tenacity.wait_none(), attempts=2)
        try:
            await client.page(datetime(2026, 5, 1, tzinfo=UTC), 1)
        except TreezApiError as exc:
            return str(exc)
        finally:
            await client.aclose()
        return ""

    message = asyncio.run(go())
    assert "MODEL_VALIDATION_FAIL" in message
    assert "jane@example.com" not in message
    sent = page.calls.last.request
    assert sent.headers["authorization"] == "t"
    assert sent.headers["client_id"] == "c"
    assert "2026-05-01T00%3A00%3A00.000%2B00%3A00" in str(sent.url)
    assert "secret-key-value" not in repr(TreezClient(config))


def test_format_after_is_the_documented_date_form() -> None:
    moment = datetime(2026, 5, 1, 10, 0, 0, 123456, tzinfo=UTC) + timedelta(hours=0)
    assert format_after(moment) == "2026-05-01T10:00:00.123+00:00"
    pacific = moment.astimezone(__import__("zoneinfo").ZoneInfo("America/Los_Angeles"))
    assert format_after(pacific) == "2026-05-01T10:00:00.123+00:00"


def test_a_second_reconciler_waits_for_nothing_when_busy(tmp_path: Path, fake: TreezFake) -> None:
    """ReconcileBusy is raised at once, before any call to Treez."""
    config = load_config(write_config(tmp_path, fake.base_url))
    store = open_store(config.store)
    store.acquire(f"reconcile:{DISPENSARY}", "someone-else", ttl=60)
    with pytest.raises(ReconcileBusy):
        run(config, fake)
    assert fake.calls == []
    store.close()


def test_serve_schedules_one_cron_job_per_reconciling_dispensary(
    tmp_path: Path, fake: TreezFake
) -> None:
    from connector.service import Service

    extra = '      schedule: "15 3 * * *"\n      timezone: America/Los_Angeles'
    config = load_config(write_config(tmp_path, fake.base_url, extra=extra))

    async def go() -> tuple[list[Any], bool]:
        service = Service(config, role="pipeline")
        service._start_scheduler()
        assert service.scheduler is not None
        jobs = service.scheduler.get_jobs()
        # a run already going (another process holds the lock): the tick is skipped quietly
        service.astore.store.acquire(f"reconcile:{DISPENSARY}", "other", ttl=60)
        await service.scheduled_reconcile(DISPENSARY)
        service.scheduler.shutdown(wait=False)
        service.astore.close()
        return jobs, bool(fake.calls)

    jobs, called = asyncio.run(go())
    (job,) = jobs
    assert job.id == f"reconcile:{DISPENSARY}"
    assert (job.coalesce, job.max_instances) == (True, 1)
    assert str(job.trigger.timezone) == "America/Los_Angeles"
    assert "hour='3'" in str(job.trigger)
    assert "minute='15'" in str(job.trigger)
    assert not called  # skipped before any call to Treez
    assert store_rows(tmp_path, "select count(*) from reconcile_runs") == [(0,)]


def test_contacts_a_destination_no_longer_has_are_reported(tmp_path: Path, fake: TreezFake) -> None:
    from connector.delivery.base import Capabilities
    from connector.pipeline import Deployment, process_batch
    from connector.store import AsyncStore

    config = load_config(write_config(tmp_path, fake.base_url))
    run(config, fake)
    with sqlite3.connect(tmp_path / "c.db") as conn:  # as if the destination had given ids
        conn.execute("update contacts set contact_id = 'p-' || customer_id")

    class Lookup:
        """A destination that can look contacts up and has lost those with an odd id."""

        capabilities = Capabilities(can_lookup=True)
        asked: ClassVar[list[str]] = []

        async def lookup(self, contact_id: str) -> dict[str, Any] | None:
            self.asked.append(contact_id)
            return None if int(contact_id[2:]) % 2 else {"id": contact_id}

    async def go() -> Any:
        astore = AsyncStore(open_store(config.store))
        deployment = Deployment.from_config(config)

        async def plan() -> None:
            while (await astore.call(process_batch, astore.store, deployment)).events:
                pass

        reconciler = Reconciler(
            config,
            astore,
            deployment,
            plan=plan,
            client_for=in_process(fake),
            destinations={(DISPENSARY, "file"): Lookup()},  # type: ignore[dict-item]
        )
        try:
            return await reconciler.run(DISPENSARY, RunOptions(full=True))
        finally:
            astore.close()

    report = asyncio.run(go())
    assert report.looked_up == len(Lookup.asked) == 20  # lookup_sample
    odd = [c for c in Lookup.asked if int(c[2:]) % 2]
    assert report.missing == len(odd) == report.counts["missing_contacts"]
    rows = store_rows(tmp_path, "select customer_id, kind from conflicts")
    assert sorted(rows) == sorted((c[2:], "missing_contact") for c in odd)


def test_replay_never_resends_what_the_customers_state_has_overtaken(tmp_path: Path) -> None:
    """Judged on the customer's state, not only on outbox rows (delivered ones are purged):
    no subscribe after an opt-out, nothing to a merged-away customer, no old upsert over a
    newer one; an old unsubscribe is resent without its stale fields."""
    from connector.planner import payload_hash

    store = open_store(f"sqlite:///{tmp_path}/c.db")
    now = time.time()
    old, new = {"email": "old"}, {"email": "new"}
    rows = [  # outbox id, customer, op, payload
        (1, "optout", "subscribe", {"op": "subscribe"}),
        (2, "absorbed", "upsert", {"op": "upsert", "fields": new}),
        (3, "stale", "upsert", {"op": "upsert", "fields": old}),
        (4, "consent", "unsubscribe", {"op": "unsubscribe", "fields": old}),
        (5, "current", "upsert", {"op": "upsert", "fields": new}),
        (6, "deactivated", "upsert", {"op": "upsert", "fields": new}),
    ]
    with store.transaction() as conn:
        for oid, customer, op, payload in rows:
            conn.exec_driver_sql(
                "insert into outbox (id, dispensary, destination, order_key, customer_id, op,"
                " payload, idempotency_key, status, attempts, created_at, next_attempt_at)"
                " values (?, 'd', 'x', ?, ?, ?, ?, ?, 'dead', 8, ?, ?)",
                (oid, customer, customer, op, json.dumps(payload), f"k{oid}", now, now),
            )
            conn.exec_driver_sql(
                "insert into dead_letters (outbox_id, dispensary, destination, customer_id, op,"
                " payload, idempotency_key, attempts, reason, created_at)"
                " values (?, 'd', 'x', ?, ?, '{}', ?, 8, 'refused', ?)",
                (oid, customer, op, f"k{oid}", now),
            )
        for customer, opt_out, merged_into in [
            ("optout", True, None),
            ("absorbed", False, "survivor"),
            ("stale", False, None),
            ("consent", True, None),
            ("current", False, None),
            ("deactivated", False, None),
        ]:
            conn.exec_driver_sql(
                "insert into customers (dispensary, customer_id, opt_out, merged_into, merges,"
                " updated_at) values ('d', ?, ?, ?, '[]', ?)",
                (customer, opt_out, merged_into, now),
            )
            unsubscribed = customer in ("optout", "consent")
            conn.exec_driver_sql(
                "insert into contacts (dispensary, customer_id, destination, delivered_hash,"
                " unsubscribed, deactivated, ops_planned, updated_at)"
                " values ('d', ?, 'x', ?, ?, ?, 1, ?)",
                (customer, payload_hash(new), unsubscribed, customer == "deactivated", now),
            )
    done = store.replay(dispensary="d")
    assert (done.replayed, done.superseded, done.unreplayable) == (2, 4, 0)
    found = {
        r[0]: (r[1], json.loads(r[2]))
        for r in store_rows(tmp_path, "select id, status, payload from outbox")
    }
    assert found[1][0] == found[2][0] == found[3][0] == "dead"  # superseded: not resent
    assert found[4] == ("pending", {"op": "unsubscribe"})  # resent without stale fields
    assert found[5] == ("pending", {"op": "upsert", "fields": new})
    assert found[6][0] == "dead"  # never reactivates a customer deactivated since
    store.close()


def test_auto_paging_on_a_listing_in_id_order_skips_no_one(tmp_path: Path) -> None:
    """treez.md documents no order: a listing by customer id whose first page happens to
    look sorted by last_update must not make auto paging jump past later ids."""
    from zoneinfo import ZoneInfo

    from fakes.treez_api import format_timestamp

    from connector.pipeline import Deployment, process_batch
    from connector.store import AsyncStore

    fake = TreezFake.generate(8, seed=3, history_days=0.1, rate_limit=None)
    t0 = datetime.now(UTC) - timedelta(hours=2)
    minutes = [1, 2, 3, 4, 60, 10, 11, 12]  # ids in order; the fifth was edited later
    records = {}
    for customer_id, minute in zip(fake.customer_ids(), minutes, strict=True):
        record = dict(fake.customer(customer_id) or {})
        record.update(status="ACTIVE", merged_into_customer_id=None, merged_customer_ids=[])
        moment = int((t0 + timedelta(minutes=minute)).timestamp() * 1000)
        record["last_update"] = format_timestamp(moment, ZoneInfo("America/Los_Angeles"))
        records[customer_id] = record

    class IdOrdered:
        async def page(self, after: datetime, number: int, size: int) -> list[dict[str, Any]]:
            listed = [
                r
                for _, r in sorted(records.items(), key=lambda kv: int(kv[0]))
                if datetime.fromisoformat(r["last_update"]) > after
            ]
            return listed[(number - 1) * size : number * size]

        async def aclose(self) -> None:
            return None

    extra = "      page_size: 5"  # page 1 (ids 1-5) looks sorted; ids 6-8 changed earlier
    config = load_config(write_config(tmp_path, fake.base_url, extra=extra))

    async def go() -> None:
        astore = AsyncStore(open_store(config.store))
        deployment = Deployment.from_config(config)

        async def plan() -> None:
            while (await astore.call(process_batch, astore.store, deployment)).events:
                pass

        reconciler = Reconciler(
            config,
            astore,
            deployment,
            plan=plan,
            client_for=lambda _d, _c: IdOrdered(),  # type: ignore[arg-type,return-value]
        )
        await reconciler.run(DISPENSARY, RunOptions())
        astore.close()

    asyncio.run(go())
    pulled = {r[0] for r in store_rows(tmp_path, "select customer_id from inbox")}
    assert pulled == set(records)
