"""SQLite store faults through a real ``connector serve``: the disk full, the store read-only,
the database locked past ``store_timeout_seconds``, and a corrupt or foreign file at start.

For each fault at run time: the webhook is answered 503 with ``Retry-After`` (never a 500,
never a 2xx without the commit), ``/readyz`` is 503 and names the fault, the log has one
line for it (not one per request, no traceback), nothing acknowledged before is lost, and
once the cause is gone the same process recovers: the next webhook is 202, ``/readyz`` 200,
and the sink receives every acknowledged event. (tests/test_db_outage.py does the same for
PostgreSQL going away.)

The full disk is made two ways: ``PRAGMA max_page_count`` on every connection of the server
(the test-only ``CONNECTOR_TEST_SQLITE_MAX_PAGES``) and a small tmpfs filled with a file. The
read-only store is a read-only bind mount. Mounting needs root (or CAP_SYS_ADMIN): those
tests are skipped, saying so, where the machine does not allow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fakes.http_sink import read_record, unique_ops
from test_e2e import (
    DISPENSARY,
    HEADERS,
    MAPPING,
    TOKEN,
    Event,
    Procs,
    Server,
    connector_command,
    procs,
    start_server,
    start_sink,
)

from connector.errors import StoreUnavailable
from connector.intake import GroupCommitter
from connector.store import NewEvent, open_store
from connector.store._engine import TEST_MAX_PAGES_ENV

STORE_TIMEOUT = 1.0
__all__ = ["procs"]  # the fixture, imported for its tests


# --- helpers ---------------------------------------------------------------------------------


def write_config(folder: Path, store: Path, sink_url: str) -> Path:
    (folder / "http.yaml").write_bytes(MAPPING.read_bytes())
    config = {
        "store": f"sqlite:///{store}",
        "store_timeout_seconds": STORE_TIMEOUT,
        "server": {"host": "127.0.0.1", "shutdown_grace_seconds": 2.0},
        "dispensaries": {
            DISPENSARY: {
                "webhook_token": TOKEN,
                "destinations": [
                    {
                        "name": "sink",
                        "type": "http",
                        "url": sink_url,
                        "mapping": "http.yaml",
                        "retry": {
                            "initial_seconds": 0.1,
                            "max_seconds": 1,
                            "min_attempts": 50,
                            "min_elapsed_seconds": 0,
                        },
                    }
                ],
            }
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def post(client: httpx.Client, server: Server, event: Event) -> httpx.Response:
    return client.post(server.webhook, content=event.body, headers=HEADERS)


def delivered(sink_record: Path) -> set[str]:
    if not sink_record.exists():
        return set()
    ops = unique_ops(read_record(sink_record))
    return {str(op["customer_id"]) for op in ops if op["op"] == "upsert"}


def inbox_customers(store: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True)) as db:
        return {str(r[0]) for r in db.execute("SELECT customer_id FROM inbox")}


def ready(client: httpx.Client, server: Server) -> httpx.Response:
    return client.get(f"{server.base}/readyz")


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(done.stderr.strip() or f"mount exited {done.returncode}")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def mounted_or_skip(*args: str) -> None:
    try:
        mount(*args)
    except (OSError, FileNotFoundError) as exc:
        pytest.skip(f"this machine does not let the tests mount a file system: {exc}")


def events(start: int, count: int) -> list[Event]:
    return [Event(str(start + i), 1) for i in range(count)]


def run_fault(
    server: Server,
    store: Path,
    sink_record: Path,
    *,
    cause: Callable[[], None],
    remedy: Callable[[], None],
    fault: str,
    room_left: bool = False,
    faulty_from_start: bool = False,
) -> None:
    """Events, the fault, refused events, the remedy, events: the contract of a store fault.
    ``room_left``: the store may still take some webhooks after ``cause`` (a full database
    takes a row into room left in a page, or freed by the pipeline): each answer is 202 or
    503 until five in a row are 503, and the 202s are owed like the others."""
    before = [] if faulty_from_start else events(50000, 8)
    after = events(70000, 5)
    with httpx.Client(timeout=STORE_TIMEOUT + 20) as client:
        if not faulty_from_start:
            assert wait_for(lambda: ready(client, server).status_code == 200, 30), ready(
                client, server
            ).text
        for event in before:
            assert post(client, server, event).status_code == 202
        lines_before = len(server.proc.log_lines())
        if faulty_from_start:
            # said from the start, before any webhook fails on it (the start's write probe)
            answer = ready(client, server)
            assert answer.status_code == 503, answer.text
            assert any(p.startswith(fault) for p in answer.json()["problems"]), answer.text
            lines_before = 0
        cause()
        acked_during = []
        refused = 0  # in a row
        for event in events(60000, 60 if room_left else 5):
            response = post(client, server, event)
            if room_left and response.status_code == 202:
                acked_during.append(event.customer_id)
                refused = 0
                continue
            assert response.status_code == 503, (response.status_code, response.text)
            assert response.headers.get("retry-after", "").isdigit()
            assert response.json()["error"] == "store_unavailable"
            refused += 1
            if refused == 5:
                break
        assert refused == 5, acked_during
        answer = ready(client, server)
        assert answer.status_code == 503, answer.text
        problems = answer.json()["problems"]
        assert any(p.startswith(fault) for p in problems), problems
        logged = server.proc.log_lines()[lines_before:]
        faults = [line for line in logged if line.get("event") == "store_fault"]
        assert [line.get("reason") for line in faults] == [fault], faults
        remedy()
        if fault != "store full":  # said without a webhook: readiness probes the store
            assert wait_for(lambda: ready(client, server).status_code == 200, 15), ready(
                client, server
            ).text
        for event in after:
            response = post(client, server, event)
            assert response.status_code == 202, response.text  # the very next one
        assert wait_for(lambda: ready(client, server).status_code == 200, 15), ready(
            client, server
        ).text
        owed = {e.customer_id for e in before + after} | set(acked_during)
        assert wait_for(lambda: owed <= delivered(sink_record), 60), sorted(
            owed - delivered(sink_record)
        )
    assert owed <= inbox_customers(store)  # nothing acknowledged is lost
    recovered = [line for line in server.proc.log_lines() if line.get("event") == "store_recovered"]
    assert [line.get("reason") for line in recovered] == [fault]
    output = server.proc.out_path.read_text() + server.proc.err_path.read_text()
    assert "Traceback" not in output


# --- c. locked past the store timeout ---------------------------------------------------------


def test_a_store_locked_past_the_timeout(tmp_path: Path, procs: Procs) -> None:
    store = tmp_path / "store.sqlite"
    sink = start_sink(procs, "sink")
    server = start_server(procs, write_config(tmp_path, store, sink.url), "serve")
    holder = sqlite3.connect(store, isolation_level=None, check_same_thread=False)

    def lock() -> None:  # another process's long write transaction
        holder.execute("BEGIN EXCLUSIVE")

    try:
        run_fault(
            server,
            store,
            sink.record,
            cause=lock,
            remedy=lambda: holder.execute("COMMIT"),
            fault="store locked",
        )
    finally:
        holder.close()


# --- a. disk full ------------------------------------------------------------------------------


def fill(db: sqlite3.Connection) -> None:
    """Rows into a table of its own until the database takes no more."""
    db.execute("CREATE TABLE IF NOT EXISTS filler (b BLOB)")
    for size in (65536, 4096, 512, 64, 1):
        with contextlib.suppress(sqlite3.OperationalError):  # SQLITE_FULL: the next size down
            while True:
                db.execute("INSERT INTO filler VALUES (zeroblob(?))", (size,))


def test_a_full_database_max_page_count(
    tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store.sqlite"
    open_store(f"sqlite:///{store}").close()
    with contextlib.closing(sqlite3.connect(store)) as db:
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    limit = pages + 300  # room for the events before the fault and their plans
    monkeypatch.setenv(TEST_MAX_PAGES_ENV, str(limit))
    sink = start_sink(procs, "sink")
    server = start_server(procs, write_config(tmp_path, store, sink.url), "serve")
    filler = sqlite3.connect(store, isolation_level=None, check_same_thread=False)
    filler.execute(f"PRAGMA max_page_count={limit}")

    try:
        run_fault(
            server,
            store,
            sink.record,
            cause=lambda: fill(filler),
            remedy=lambda: filler.execute("DELETE FROM filler"),
            fault="store full",
            room_left=True,
        )
    finally:
        filler.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (set up before ``procs``: unmounted after the server is gone)."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted_or_skip("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder))
    try:
        yield folder
    finally:
        unmount(folder)


def test_a_full_disk_tmpfs(tmpfs: Path, tmp_path: Path, procs: Procs) -> None:
    store = tmpfs / "store.sqlite"
    sink = start_sink(procs, "sink")
    server = start_server(procs, write_config(tmp_path, store, sink.url), "serve")
    ballast = tmpfs / "ballast"

    def fill_disk() -> None:
        with contextlib.closing(sqlite3.connect(store, isolation_level=None)) as db:
            # an empty WAL: the next commit must grow it, and finds no room
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with ballast.open("wb") as file, contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                file.write(b"\0" * 65536)
                file.flush()

    run_fault(
        server,
        store,
        sink.record,
        cause=fill_disk,
        remedy=ballast.unlink,
        fault="store full",
        room_left=True,
    )


# --- b. read-only ------------------------------------------------------------------------------


@pytest.fixture
def bind_mount(tmp_path: Path) -> Iterator[Path]:
    """A folder bind-mounted on itself, to be made read-only (set up before ``procs``)."""
    folder = tmp_path / "mounted"
    folder.mkdir()
    mounted_or_skip("--bind", str(folder), str(folder))
    try:
        yield folder
    finally:
        unmount(folder)


def test_a_read_only_store(bind_mount: Path, tmp_path: Path, procs: Procs) -> None:
    """The kernel does not make a mount read-only while a file on it is open for writing
    (EBUSY): the store goes read-only between two processes. A first server acknowledges
    events and is killed (its WAL and shared memory files stay, as after a crash); the
    folder is made read-only; a second server starts on the read-only store, answers 503,
    and recovers when the folder is writable again, without a restart."""
    store = bind_mount / "store.sqlite"
    sink = start_sink(procs, "sink")
    config = write_config(tmp_path, store, sink.url)
    first = start_server(procs, config, "first")
    acked = events(40000, 5)
    with httpx.Client(timeout=20) as client:
        assert wait_for(lambda: ready(client, first).status_code == 200, 30)
        for event in acked:
            assert post(client, first, event).status_code == 202
    crashed = [*_children_of(first.proc.pid), first.proc.pid]  # its pipeline process too
    for pid in crashed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    first.proc.wait(10)
    assert wait_for(lambda: not any(_holds_files(pid) for pid in crashed), 10)
    assert wait_for(lambda: not _open_under(bind_mount), 10), _open_under(bind_mount)
    # the files of a killed process are released a moment after it is gone: until then the
    # kernel answers EBUSY
    assert wait_for(lambda: _remounted_read_only(bind_mount), 10)
    server = start_server(procs, config, "serve")
    run_fault(
        server,
        store,
        sink.record,
        cause=lambda: None,
        remedy=lambda: mount("-o", "remount,bind,rw", str(bind_mount)),
        fault="store read-only",
        faulty_from_start=True,
    )
    assert {e.customer_id for e in acked} <= delivered(sink.record)


def _remounted_read_only(folder: Path) -> bool:
    try:
        mount("-o", "remount,bind,ro", str(folder))
    except OSError as exc:
        if "busy" in str(exc):
            return False
        raise
    return True


def _open_under(folder: Path) -> list[str]:
    """Processes with a file of ``folder`` open (the kernel refuses a read-only remount)."""
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(f"{folder}/"):
                process = fd.parent.parent
                found.append(f"{process.name}: {(process / 'cmdline').read_bytes()[:200]!r}")
    return found


def _holds_files(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie holds no files)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(stat[1]) == pid:
                    found.append(int(entry.name))
    return found


# --- d. a corrupt or foreign file at start -----------------------------------------------------


def _foreign(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO users (name) VALUES ('someone')")
        db.commit()


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda p: p.write_bytes(bytes(range(256)) * 64), "not a SQLite database"),
        (lambda p: p.write_text("store: not this\n"), "not a SQLite database"),
        (_foreign, "SQLite database of another application"),
    ],
    ids=["random-bytes", "text-file", "foreign-sqlite"],
)
def test_a_corrupt_or_foreign_file_at_start(
    tmp_path: Path, make: Callable[[Path], None], said: str
) -> None:
    store = tmp_path / "store.sqlite"
    make(store)
    original = store.read_bytes()
    config = write_config(tmp_path, store, "http://127.0.0.1:9/")
    for command in ("check", "serve"):
        done = subprocess.run(
            [
                *connector_command(),
                command,
                "--config",
                str(config),
                *(["--port", "0"] if command == "serve" else []),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        errors = [line for line in done.stderr.splitlines() if str(store) in line]
        assert len(errors) == 1, (command, done.stderr)
        assert said in errors[0], (command, done.stderr)
        assert "Traceback" not in done.stderr + done.stdout
    assert store.read_bytes() == original  # not switched to WAL, not migrated into
    assert not Path(f"{store}-wal").exists()


# --- the writer thread outlives faults ----------------------------------------------------------


def test_the_commit_thread_survives_a_fault_and_commits_after(tmp_path: Path) -> None:
    """In process: the committer's writer thread takes a locked store, answers its callers
    StoreUnavailable (reason "store locked") and commits the next batch once it is free."""
    store_path = tmp_path / "store.sqlite"
    store = open_store(f"sqlite:///{store_path}", timeout=0.3)
    holder = sqlite3.connect(store_path, isolation_level=None, check_same_thread=False)

    def item(n: int) -> NewEvent:
        return NewEvent(DISPENSARY, "webhook", "CUSTOMER", str(n), n, "{}")

    async def scenario() -> None:
        committer = GroupCommitter(store, timeout=5.0)
        stopping = asyncio.Event()
        task = asyncio.create_task(committer.run(stopping))
        while committer._loop is None:  # started
            await asyncio.sleep(0.01)
        try:
            await committer.submit(item(1))
            holder.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StoreUnavailable) as caught:
                await committer.submit(item(2))
            assert caught.value.reason == "store locked"
            assert committer.fault is not None
            holder.execute("COMMIT")
            await committer.submit(item(3))
            assert committer.fault is None
            assert not task.done()
        finally:
            stopping.set()
            await task

    try:
        asyncio.run(scenario())
    finally:
        holder.close()
        store.close()
    assert inbox_customers(store_path) == {"1", "3"}
