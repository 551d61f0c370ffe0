"""Progress of ``connector reconcile`` and ``connector dlq replay``: a rich bar with counts and
a rate on a terminal (the commands run under a pseudo-terminal), plain lines in a log (the
same commands with their output in pipes), counts only, never a customer's value."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from fakes.treez_api import TreezFake, serve
from test_reconcile import DISPENSARY, in_process

from connector.config import load_config
from connector.reconcile import RunOptions
from connector.runner import CommandProgress, reconcile_now
from connector.store import open_store
from connector.store.runs import REPLAY_CHUNK

ROOT = Path(__file__).resolve().parent.parent
BAR = "━"  # what rich draws a bar with
ESCAPE = "\x1b"
# what would make rich draw into a pipe, or not draw on a terminal
UNSET = (
    "CONNECTOR_CONFIG",
    "TREEZ_WEBHOOK_TOKEN",
    "FORCE_COLOR",
    "NO_COLOR",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
    "COLUMNS",
    "LINES",
)


def write_config(work: Path, store: str, api_url: str, rate: str = "") -> Path:
    path = work / "config.yaml"
    path.write_text(
        f"""
store: "{store}"
dispensaries:
  {DISPENSARY}:
    webhook_token: tok
    treez:
      api_url: {api_url}
      client_id: treez_test_client
      api_key: treez_test_apikey
    destinations:
      - name: file
        type: jsonl
        path: {work}/out.jsonl
        mapping: m.yaml
        rate_limit: [{rate}]
"""
    )
    (work / "m.yaml").write_text("email: email\nfirst_name: first_name\n")
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "connector", *(str(a) for a in args)]


def in_terminal(args: list[str], cwd: Path, timeout: float = 120.0) -> tuple[int, str]:
    """Run ``args`` with stdin, stdout and stderr on a pseudo-terminal 120 columns wide:
    its exit code and everything it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = _env() | {"TERM": "xterm-256color", "COLUMNS": "120"}
    try:
        proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
    finally:
        os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal on the child's side is closed
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            proc.wait()
            pytest.fail(f"{args[3:]} still running after {timeout:.0f} s")
    finally:
        os.close(master)
    return proc.wait(timeout=10), b"".join(chunks).decode("utf-8", "replace")


def in_pipes(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = _env() | {"TERM": "xterm-256color"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# --- the plain lines, in-process -----------------------------------------------------------


def test_a_log_gets_a_line_per_interval_and_one_at_the_end() -> None:
    stream = io.StringIO()
    progress = CommandProgress(stream, every=0.0)
    progress.start("replaying", "dead letters", 120)
    progress.update(50)
    progress.update(100)
    progress.done()
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "replaying: 50/120 dead letters",
        "replaying: 100/120 dead letters",
        "replaying: 100/120 dead letters",
    ]
    assert all(line.endswith(" s)") and "/s, " in line for line in lines)


def test_a_log_gets_only_the_last_line_of_a_short_step() -> None:
    stream = io.StringIO()
    progress = CommandProgress(stream, every=3600.0)
    progress.start("pulling from Treez", "customers")
    for page in range(1, 4):
        progress.update(page * 50, pages=page)
    progress.start("delivering", "operations", 7)  # ends the step before
    progress.update(7)
    progress.done()
    progress.done()  # a step ends once
    text = stream.getvalue()
    assert [line.split(" (")[0] for line in text.splitlines()] == [
        "pulling from Treez: 150 customers, 3 pages",
        "delivering: 7/7 operations",
    ]
    assert "\r" not in text
    assert ESCAPE not in text


# --- reconcile -------------------------------------------------------------------------------


@pytest.fixture
def treez() -> TreezFake:
    return TreezFake.generate(60, seed=5, history_days=0.5)


def _emails(fake: TreezFake) -> list[str]:
    found = [(fake.customer(i) or {}).get("email") for i in fake.customer_ids()]
    return [e for e in found if e]


def test_reconcile_on_a_terminal_draws_bars_with_counts_and_rates(
    tmp_path: Path, treez: TreezFake
) -> None:
    # 20 deliveries a second: the pull ends with most of the run's operations still open
    with serve(treez) as url:
        config = write_config(tmp_path, f"sqlite:///{tmp_path}/c.db", url, rate='"20/s"')
        code, out = in_terminal(command("reconcile", "--config", config), tmp_path)
    assert code == 0, out
    assert "reconcile partnersandbox3: succeeded" in out
    assert "pulling from Treez" in out
    assert "60 customers, 2 pages" in out
    assert "delivering" in out
    assert BAR in out
    last = out.rsplit("delivering", 1)[1].splitlines()[0]
    assert "operations" in last
    assert "/s" in last
    assert ESCAPE in out  # drawn in place, not line after line
    emails = _emails(treez)
    assert emails
    assert not [e for e in emails if e in out]


def test_reconcile_in_a_log_writes_plain_lines(tmp_path: Path, treez: TreezFake) -> None:
    with serve(treez) as url:
        config = write_config(tmp_path, f"sqlite:///{tmp_path}/c.db", url, rate='"20/s"')
        done = in_pipes(command("reconcile", "--config", config), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "reconcile partnersandbox3: succeeded" in done.stdout
    lines = done.stderr.splitlines()
    pulled = [line for line in lines if line.startswith("pulling from Treez: ")]
    assert pulled[-1].startswith("pulling from Treez: 60 customers, 2 pages (")
    delivered = [line for line in lines if line.startswith("delivering: ")]
    assert delivered
    assert "/s, " in delivered[-1]
    count = delivered[-1].split(" (")[0].removeprefix("delivering: ")
    done_ops, total = count.removesuffix(" operations").split("/")
    assert done_ops == total  # it waited for all of them
    for text in (done.stdout, done.stderr):
        assert "\r" not in text
        assert ESCAPE not in text
        assert not [e for e in _emails(treez) if e in text]


# --- dlq replay --------------------------------------------------------------------------------


@pytest.fixture
def dead(store_url: str, tmp_path: Path) -> tuple[Path, int]:
    """A store whose reconciled operations a destination refused (the store's own API marks
    them dead, as a worker does): the config and how many dead letters."""
    fake = TreezFake.generate(130, seed=9, history_days=0.5, rate_limit=None)
    config_path = write_config(tmp_path, store_url, fake.base_url)
    config = load_config(config_path)
    asyncio.run(
        reconcile_now(
            config,
            DISPENSARY,
            RunOptions(),
            wait=False,
            timeout=30,
            echo=lambda _: None,
            reconciler_options={"client_for": in_process(fake)},
        )
    )
    store = open_store(store_url)
    try:
        store.register_process()
        while rows := store.claim(DISPENSARY, "file", 500):
            store.finish(DISPENSARY, "file", dead=[(r, "refused", 400, None) for r in rows])
        number = sum(store.dead_counts().values())
    finally:
        store.close()
    assert number > 2 * REPLAY_CHUNK  # three chunks at least
    return config_path, number


def test_replay_tells_progress_after_each_chunk(dead: tuple[Path, int], store_url: str) -> None:
    _, number = dead
    store = open_store(store_url)
    calls: list[int] = []
    try:
        done = store.replay(dispensary=DISPENSARY, progress=calls.append)
    finally:
        store.close()
    assert calls == [*range(REPLAY_CHUNK, number, REPLAY_CHUNK), number]
    assert done.replayed + done.superseded + done.unreplayable == number


def test_dlq_replay_on_a_terminal_draws_a_bar(dead: tuple[Path, int], tmp_path: Path) -> None:
    config, number = dead
    code, out = in_terminal(command("dlq", "replay", "--all", "--config", config), tmp_path)
    assert code == 0, out
    assert BAR in out
    assert "replaying" in out
    last = out.rsplit("replaying", 1)[1].splitlines()[0]
    assert f"{number}/{number} dead letters" in last
    assert "/s" in last
    assert f"replayed {number}, superseded 0, not replayable 0" in out


def test_dlq_replay_in_a_log_writes_plain_lines(dead: tuple[Path, int], tmp_path: Path) -> None:
    config, number = dead
    done = in_pipes(command("dlq", "replay", "-t", "file", "--config", config), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"replayed {number}, superseded 0, not replayable 0"
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"replaying: {number}/{number} dead letters (")
    assert "/s, " in last
    assert "\r" not in done.stderr + done.stdout
    assert ESCAPE not in done.stderr + done.stdout


def test_dlq_replay_of_one_customer_counts_only_theirs(
    dead: tuple[Path, int], tmp_path: Path, store_url: str
) -> None:
    config, _ = dead
    store = open_store(store_url)
    try:
        customer = store.dead_letters(limit=1)[0].customer_id
        theirs = len(store.dead_letters(customer=customer))
    finally:
        store.close()
    done = in_pipes(command("dlq", "replay", "-c", customer, "--config", config), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"replaying: {theirs}/{theirs} dead letters (")
