"""Webhook token rotation through a real ``connector serve`` process: a list of tokens, a
reload on SIGHUP (connector/reload.py) or a restart, an invalid file on SIGHUP; and secrets
that never reach a traceback, a repr or ``connector check``'s output.

SQLite only: what is under test is the receiver's token table and the process's signals, the
same on either store.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from test_e2e import (
    DISPENSARY,
    MAPPING,
    ROOT,
    SEED,
    Proc,
    Procs,
    Server,
    connector_command,
    pipeline_child,
    procs,  # noqa: F401 - a fixture
    query,
    sigterm,
    start_server,
)

OLD = "old-token-4f1c9a7e2b"
NEW = "new-token-8d3e6b0c51"
WAIT = 20.0


def write(folder: Path, tokens: Any, **extra: Any) -> Path:
    (folder / "http.yaml").write_bytes(MAPPING.read_bytes())
    config = {
        "store": "sqlite:///connector.db",
        "server": {"host": "127.0.0.1", "shutdown_grace_seconds": 2, "pipeline_process": True},
        "dispensaries": {
            DISPENSARY: {
                "webhook_token": tokens,
                "destinations": [
                    {"name": "sink", "type": "jsonl", "path": "out.jsonl", "mapping": "http.yaml"}
                ],
            }
        },
        **extra,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def body(customer_id: str) -> bytes:
    envelope = json.loads(json.dumps(SEED))
    envelope["data"]["customer_id"] = customer_id
    return json.dumps(envelope).encode()


def post(server: Server, token: str, customer_id: str) -> int:
    response = httpx.post(
        server.webhook,
        content=body(customer_id),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=10.0,
    )
    return response.status_code


def wait_for_line(proc: Proc, event: str, count: int = 1) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        lines = [line for line in proc.log_lines() if line.get("event") == event]
        if len(lines) >= count:
            return lines[count - 1]
        if not proc.running():
            break
        time.sleep(0.05)
    pytest.fail(f"no {event!r} line (x{count}) within {WAIT} s\n{proc.tail()}")


def output_of(proc: Proc) -> str:
    return proc.out_path.read_text(errors="replace") + proc.err_path.read_text(errors="replace")


def inbox_count(folder: Path) -> int:
    return int(query(f"sqlite:///{folder / 'connector.db'}", "SELECT count(*) FROM inbox")[0][0])


def test_sighup_swaps_the_tokens_in_place_and_loses_nothing(tmp_path: Path, procs: Procs) -> None:  # noqa: F811
    config = write(tmp_path, [OLD, NEW])
    server = start_server(procs, config, "serve")
    assert post(server, OLD, "1") == 202
    assert post(server, NEW, "2") == 202

    # a steady stream with the token that stays, across the reload
    statuses: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        n = 100
        while not stop.is_set():
            statuses.append(post(server, NEW, str(n)))
            n += 1

    poster = threading.Thread(target=stream)
    poster.start()
    try:
        # the old token removed, and a change that a reload does not apply
        write(tmp_path, [NEW], retention={"delivered_days": 3})
        server.proc.popen.send_signal(signal.SIGHUP)
        line = wait_for_line(server.proc, "config_reloaded")
        time.sleep(0.3)  # a few more posts after the swap
    finally:
        stop.set()
        poster.join(30.0)

    assert server.proc.running(), "SIGHUP must not stop the server"
    assert line["applied"] == [f"{DISPENSARY}: 1 webhook token(s)"]
    partial = wait_for_line(server.proc, "config_reload_partial")
    assert partial["level"] == "warning"
    assert "retention" in partial["reason"]
    assert "dispensaries" not in partial["reason"]  # only its tokens changed
    assert post(server, OLD, "3") == 403
    assert post(server, NEW, "4") == 202
    assert statuses
    assert set(statuses) == {202}, statuses
    assert inbox_count(tmp_path) == 2 + len(statuses) + 1
    # a second reload, and the server still runs
    server.proc.popen.send_signal(signal.SIGHUP)
    wait_for_line(server.proc, "config_reloaded", count=2)
    assert post(server, NEW, "5") == 202
    code, _ = sigterm(server)
    assert code == 0
    text = output_of(server.proc)
    assert OLD not in text
    assert NEW not in text


def test_an_invalid_config_on_sighup_keeps_the_old_tokens(tmp_path: Path, procs: Procs) -> None:  # noqa: F811
    config = write(tmp_path, [OLD, NEW])
    server = start_server(procs, config, "serve")
    assert post(server, OLD, "1") == 202
    write(tmp_path, [NEW], server={"host": "127.0.0.1", "port": "not-a-port"})
    server.proc.popen.send_signal(signal.SIGHUP)
    line = wait_for_line(server.proc, "config_reload_failed")
    assert line["level"] == "error"
    assert any(e.startswith(f"{config}:") and "server.port" in e for e in line["errors"]), line
    assert server.proc.running()
    assert post(server, OLD, "2") == 202, "the previous tokens stay in use"
    assert post(server, NEW, "3") == 202
    assert not [x for x in server.proc.log_lines() if x.get("event") == "config_reloaded"]
    text = output_of(server.proc)
    assert OLD not in text
    assert NEW not in text


def test_a_restart_applies_the_new_tokens(tmp_path: Path, procs: Procs) -> None:  # noqa: F811
    config = write(tmp_path, [OLD, NEW])
    first = start_server(procs, config, "first")
    assert post(first, OLD, "1") == 202
    assert post(first, NEW, "2") == 202
    write(tmp_path, [NEW])
    assert sigterm(first)[0] == 0
    second = start_server(procs, config, "second")
    assert post(second, OLD, "3") == 403
    assert post(second, NEW, "4") == 202
    assert inbox_count(tmp_path) == 3


def test_sighup_stops_neither_a_restarted_pipeline_process_nor_the_receiver(
    tmp_path: Path,
    procs: Procs,  # noqa: F811
) -> None:
    """A pipeline process restarted after a crash starts with SIGHUP's default action (die)
    unless it sets its own: a hangup of the process group would kill it each time."""
    config = write(tmp_path, [OLD, NEW])
    server = start_server(procs, config, "serve")
    first = pipeline_child(server)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30.0
    second = first
    while second == first:
        assert time.monotonic() < deadline, f"no new pipeline process\n{server.proc.tail()}"
        time.sleep(0.2)
        try:
            second = pipeline_child(server)
        except (AssertionError, OSError):
            continue
    wait_for_line(server.proc, "started", count=3)  # the receiver, then each pipeline process
    # as a terminal's hangup reaches the group (the test's own group: each one by name)
    os.kill(second, signal.SIGHUP)
    server.proc.popen.send_signal(signal.SIGHUP)
    wait_for_line(server.proc, "config_reloaded")
    time.sleep(1.0)  # long enough for a dying child to be seen and restarted
    assert server.proc.running()
    assert pipeline_child(server) == second, "the restarted pipeline process died of SIGHUP"
    exited = [x for x in server.proc.log_lines() if x.get("event") == "pipeline_process_exited"]
    assert len(exited) == 1, exited
    assert post(server, NEW, "1") == 202


# --- secrets never in output ---

SECRET = "s3cr3t-Value-9b7f2"


def run_connector(*args: str, env: dict[str, str] | None = None, cwd: Path) -> tuple[int, str]:
    environ = {**os.environ, **(env or {})}
    environ.pop("CONNECTOR_CONFIG", None)
    done = subprocess.run(
        [*connector_command(), *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_check_never_prints_a_token_beside_a_wrong_type(tmp_path: Path) -> None:
    config = write(tmp_path, [SECRET, NEW], server={"port": "not-a-port"})
    code, out = run_connector("check", "--config", str(config), cwd=tmp_path)
    assert code == 1
    assert "server.port" in out
    assert SECRET not in out
    assert NEW not in out
    # a token of the wrong type itself: named by its key, its value never shown
    config = write(tmp_path, {"nested": SECRET})
    code, out = run_connector("check", "--config", str(config), cwd=tmp_path)
    assert code == 1
    assert "webhook_token" in out
    assert SECRET not in out
    # a valid file: the summary counts the tokens
    config = write(tmp_path, [SECRET, NEW])
    code, out = run_connector("check", "--config", str(config), cwd=tmp_path)
    assert code == 0
    assert "2 tokens" in out
    assert SECRET not in out
    assert NEW not in out


def start_klaviyo(procs: Procs, api_key: str) -> str:  # noqa: F811
    args = [sys.executable, "-m", "tests.fakes.klaviyo", "--port", "0", "--api-key", api_key]
    proc = procs.start("klaviyo", args, ROOT)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        match = re.search(r"^LISTENING (\d+)$", proc.out_path.read_text(), re.MULTILINE)
        if match:
            return f"http://127.0.0.1:{match[1]}"
        if not proc.running():
            break
        time.sleep(0.05)
    pytest.fail(f"the Klaviyo fake did not start\n{proc.tail()}")


def test_a_refused_api_key_is_never_shown(
    tmp_path: Path,
    procs: Procs,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The destination's first call is refused (401: the fake holds another key): the dead
    letter, the logs and the operator's commands name the refusal, never the key."""
    base = start_klaviyo(procs, "pk_the_right_one")
    monkeypatch.setenv("KLAVIYO_KEY", SECRET)
    (tmp_path / "klaviyo.yaml").write_bytes((MAPPING.parent / "klaviyo.yaml").read_bytes())
    config = write(tmp_path, [OLD])
    data = yaml.safe_load(config.read_text())
    data["dispensaries"][DISPENSARY]["destinations"] = [
        {
            "name": "k",
            "type": "klaviyo",
            "api_key": "${KLAVIYO_KEY}",
            "mapping": "klaviyo.yaml",
            "base_url": base,
            "pace": False,
        }
    ]
    config.write_text(yaml.safe_dump(data))
    server = start_server(procs, config, "serve")
    assert post(server, OLD, "1") == 202
    db = f"sqlite:///{tmp_path / 'connector.db'}"
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not query(db, "SELECT count(*) FROM dead_letters")[0][0]:
        time.sleep(0.1)
    reasons = [str(row) for row in query(db, "SELECT * FROM dead_letters")]
    assert reasons, f"no dead letter\n{server.proc.tail()}"
    assert "401" in " ".join(reasons)
    _, listed = run_connector("dlq", "list", "--config", str(config), cwd=tmp_path)
    _, checked = run_connector("check", "--config", str(config), cwd=tmp_path)
    assert sigterm(server)[0] == 0
    for text in (output_of(server.proc), listed, checked, *reasons):
        assert SECRET not in text
        assert OLD not in text


def test_a_crash_in_serve_shows_no_secret_even_with_locals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config object is a local of serve when something under it fails: neither the
    traceback Python prints nor one rendered with every frame's locals holds a secret."""
    from click.testing import CliRunner

    from connector import cli, service

    monkeypatch.setenv("KLAVIYO_KEY", SECRET)
    config = write(tmp_path, [OLD, NEW])
    data = yaml.safe_load(config.read_text())
    data["dispensaries"][DISPENSARY]["destinations"].append(
        {"name": "k", "type": "klaviyo", "api_key": "${KLAVIYO_KEY}", "mapping": "http.yaml"}
    )
    (tmp_path / "http.yaml").write_bytes((MAPPING.parent / "klaviyo.yaml").read_bytes())
    config.write_text(yaml.safe_dump(data))

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the service could not start")

    monkeypatch.setattr(service, "Service", broken)
    result = CliRunner().invoke(cli.main, ["serve", "--config", str(config)])
    assert isinstance(result.exception, RuntimeError), result.output
    assert result.exc_info is not None
    plain = "".join(traceback.format_exception(*result.exc_info))
    with_locals = "".join(
        traceback.TracebackException(*result.exc_info, capture_locals=True).format()
    )
    assert "config = " in with_locals  # the config object is there, as its repr
    for text in (plain, with_locals, result.output):
        for secret in (SECRET, OLD, NEW):
            assert secret not in text


def test_reprs_and_strs_hold_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from connector.config import load_config
    from connector.receiver import WebhookTokens

    secrets = {f"S_{i}": f"{SECRET}-{i}" for i in range(8)}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    for vendor in ("klaviyo", "hubspot", "braze", "alpineiq", "http"):
        (tmp_path / f"{vendor}.yaml").write_bytes((MAPPING.parent / f"{vendor}.yaml").read_bytes())
    (tmp_path / "jsonl.yaml").write_bytes(MAPPING.read_bytes())
    destinations = [
        {"name": "k", "type": "klaviyo", "api_key": "${S_1}", "mapping": "klaviyo.yaml"},
        {"name": "h", "type": "hubspot", "token": "${S_2}", "mapping": "hubspot.yaml"},
        {
            "name": "b",
            "type": "braze",
            "api_key": "${S_3}",
            "mapping": "braze.yaml",
            "rest_endpoint": "https://rest.iad-01.braze.com",
        },
        {
            "name": "a",
            "type": "alpineiq",
            "api_key": "${S_4}",
            "mapping": "alpineiq.yaml",
            "uid": "1234",
        },
        {
            "name": "w",
            "type": "http",
            "url": "https://crm.example.com/ops",
            "mapping": "http.yaml",
            "headers": {"Authorization": "Bearer ${S_5}"},
        },
        {"name": "j", "type": "jsonl", "path": "out.jsonl", "mapping": "jsonl.yaml"},
    ]
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "store": "postgresql://u:${S_6}@127.0.0.1:5432/db",
                "console": {"token": "${S_7}"},
                "dispensaries": {
                    DISPENSARY: {
                        "webhook_token": ["${S_0}", NEW],
                        "treez": {
                            "api_url": "https://api.treez.io/v2.0/dispensary/x",
                            "client_id": "c",
                            "api_key": "${S_1}",
                        },
                        "destinations": destinations,
                    }
                },
            }
        )
    )
    config = load_config(config_path)
    disp = config.dispensaries[DISPENSARY]
    objects: list[Any] = [config, disp, disp.treez, config.console, WebhookTokens(config)]
    objects.extend(disp.destinations)
    assert {d.type for d in disp.destinations} == {
        "klaviyo",
        "hubspot",
        "braze",
        "alpineiq",
        "http",
        "jsonl",
    }
    for item in objects:
        for text in (repr(item), str(item)):
            for secret in (*secrets.values(), NEW):
                assert secret not in text, f"{type(item).__name__} shows a secret"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_reload_never_makes_the_console_token_a_webhook_token(tmp_path: Path) -> None:
    """The console keeps the token it started with (a reload does not touch it): a file whose
    webhook tokens would include it is refused, even when its own console token differs."""
    from connector.config import load_config
    from connector.reload import changed_keys, reload_tokens

    console = "console-token-0123456789"
    path = write(tmp_path, [OLD], console={"token": console, "port": 18081})
    running = load_config(path)
    replaced: list[Any] = []
    write(tmp_path, [OLD, console], console={"token": "another-console-token-99", "port": 18081})
    assert reload_tokens(path, running, replaced.append) is False
    assert replaced == []
    write(tmp_path, [OLD, NEW], console={"token": console, "port": 18081})
    assert reload_tokens(path, running, replaced.append) is True
    assert [len(c.dispensaries[DISPENSARY].webhook_token) for c in replaced] == [2]
    assert changed_keys(running, load_config(path)) == []
