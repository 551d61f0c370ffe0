"""Adversary (attack5): the parent of ``connector reconcile``'s planning child killed,
terminated or interrupted (Ctrl-C to the foreground group) mid-run, as a process of its own:
the child must not outlive it, and a rerun delivers every active customer once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fakes.treez_api import TreezFake
from sqlalchemy import create_engine, text
from test_attack5_child_faults import (
    config_for,
    everything_delivered_once,
    no_process_left,
    rows,
    run,
)

TESTS = Path(__file__).parent
ROOT = TESTS.parent

DRIVER = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    from fakes.treez_api import TreezFake
    from test_attack5_child_faults import config_for, command
    from pathlib import Path
    fake = TreezFake.generate(900, seed=9, history_days=0.5)  # paced: 18+ pages, ~2 s
    config = config_for(Path({work!r}), {url!r}, fake)
    asyncio.run(command(config, fake))
    """
)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _start_driver(work: Path, store_url: str) -> tuple[subprocess.Popen[bytes], int]:
    script = work / "driver.py"
    script.write_text(DRIVER.format(tests=str(TESTS), work=str(work), url=store_url))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{TESTS}"}
    with (work / "driver.err").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = _children(proc.pid)
        try:
            pulling = rows(store_url, "select count(*) from inbox") != [(0,)]
        except Exception:
            pulling = False
        if kids and pulling:
            return proc, kids[0]
        if proc.poll() is not None:
            raise AssertionError((work / "driver.err").read_text())
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError("the run never started pulling")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT-group", "SIGTERM"])
def test_the_parent_stopped_mid_run_leaves_no_child_and_a_rerun_delivers_everything(
    tmp_path: Path, store_url: str, how: str
) -> None:
    proc, child = _start_driver(tmp_path, store_url)
    if how == "SIGKILL":
        proc.kill()
    elif how == "SIGTERM":
        proc.terminate()
    else:  # Ctrl-C in a terminal: the whole foreground group
        os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), f"the planning child {child} outlived its parent ({how})"
    if how != "SIGINT-group":  # its lock lasts its TTL (60 s): let it expire now
        engine = create_engine(store_url)
        with engine.begin() as conn:
            conn.execute(text("delete from locks"))
        engine.dispose()
    fake = TreezFake.generate(900, seed=9, history_days=0.5)
    config = config_for(tmp_path, store_url, fake)
    again = run(config, fake)
    assert again.outcome == "succeeded"
    no_process_left()
    everything_delivered_once(tmp_path, fake)
