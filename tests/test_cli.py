"""The ``connector`` command line: ``check`` and ``map``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from connector.cli import main

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SHIPPED_CONFIG = ROOT / "config.yaml"
HTTP_MAPPING = ROOT / "mappings" / "http.yaml"
SEED_BODY = DATA / "seed_body.json"
HTTP_FIELDS = len(yaml.safe_load(HTTP_MAPPING.read_text(encoding="utf-8")))
SEED_DELIVERY = DATA / "seed_delivery.json"
DEV_TOKEN_WARNING = (
    "warning: dispensaries.partnersandbox3.webhook_token: the development token is in use"
)
VARIABLES = ("CONNECTOR_CONFIG", "TREEZ_WEBHOOK_TOKEN")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def run(*args: str | Path, input: str | bytes | None = None, **env: str) -> Result:
    """Run the command line in-process; stdout and stderr are kept apart (click 8.2+)."""
    runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], input=input, env=env or None)


def lines(text: str) -> list[str]:
    return text.splitlines()


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    """A deployment folder with mappings/http.yaml and a mapping that does not compile."""
    folder = tmp_path.resolve() / "deploy"
    (folder / "mappings").mkdir(parents=True)
    shutil.copy(HTTP_MAPPING, folder / "mappings" / "http.yaml")
    (folder / "mappings" / "broken.yaml").write_text(
        "email: email\nfirst_name: {from: first_name, transform: [strip, shout]}\n",
        encoding="utf-8",
    )
    return folder


def write_config(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


TWO_DESTINATIONS = """\
dispensaries:
  partnersandbox3:
    webhook_token: a-real-token
    destinations:
      - {name: first, type: jsonl, path: out/first.jsonl, mapping: mappings/http.yaml}
      - {name: second, type: jsonl, path: out/second.jsonl, mapping: mappings/http.yaml}
"""


def seed_with(**changes: Any) -> dict[str, Any]:
    """The seed body with some customer fields replaced; a value of ... removes the field."""
    body: dict[str, Any] = json.loads(SEED_BODY.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is ...:
            del body["data"][key]
        else:
            body["data"][key] = value
    return body


# --- check ---


def test_check_shipped_config() -> None:
    result = run("check", "--config", SHIPPED_CONFIG)

    assert result.exit_code == 0, result.output
    out = lines(result.stdout)
    assert out[0] == (
        f"{SHIPPED_CONFIG}: store sqlite:///{ROOT / 'connector.db'}, server 127.0.0.1:8080"
    )
    assert out[1] == (
        "dispensary partnersandbox3: 1 destination, webhook development token, "
        "reconcile off (no treez section), resubscribe never"
    )
    assert out[2] == (
        f"  destination sink (jsonl → {ROOT / 'out' / 'partnersandbox3.jsonl'}): "
        f"mapping http.yaml ({HTTP_FIELDS} fields), batch 1, rate limit off, resubscribe never"
    )
    assert out[3] == "console: off (no console section)"
    assert out[-1] == "OK"
    assert len(out) == 5
    assert DEV_TOKEN_WARNING in result.stderr
    assert "set TREEZ_WEBHOOK_TOKEN" in result.stderr
    assert DEV_TOKEN_WARNING not in result.stdout
    assert "dev-only-token-change-me" not in result.output


def test_check_strict_fails_on_the_development_token() -> None:
    result = run("check", "--strict", "--config", SHIPPED_CONFIG)

    assert result.exit_code == 1
    assert "OK" not in lines(result.stdout)
    assert DEV_TOKEN_WARNING in result.stderr
    assert "1 warning(s) and --strict given" in result.stderr


def test_check_strict_passes_with_a_real_token() -> None:
    result = run("check", "--strict", "--config", SHIPPED_CONFIG, TREEZ_WEBHOOK_TOKEN="tok-123")

    assert result.exit_code == 0, result.output
    assert "dispensary partnersandbox3: 1 destination, webhook 1 token," in result.stdout
    assert lines(result.stdout)[-1] == "OK"
    assert result.stderr == ""
    assert "tok-123" not in result.output


def test_check_broken_config_prints_every_error(deploy: Path) -> None:
    path = write_config(
        deploy,
        """\
        server: {port: 0}
        dispensaries:
          partnersandbox3:
            webhook_token: tok
            destinations:
              - name: crm
                type: http
                url: ${CRM_URL_UNSET_IN_TESTS}
                mapping: mappings/http.yaml
              - name: sink
                type: jsonl
                path: out/s.jsonl
                mapping: mappings/missing.yaml
        """,
    )

    result = run("check", "--config", path)

    assert result.exit_code == 1
    assert result.stdout == ""
    err = result.stderr
    assert f"{path}: 3 problems in the configuration" in err
    assert f"{path}:1: server.port: " in err
    assert (
        f"{path}:8: dispensaries.partnersandbox3.destinations[0].url: "
        "environment variable CRM_URL_UNSET_IN_TESTS is not set"
    ) in err
    assert (
        f"{path}:13: dispensaries.partnersandbox3.destinations[1].mapping: mapping file "
        f"{deploy / 'mappings' / 'missing.yaml'} does not exist"
    ) in err


def test_check_broken_mapping_names_file_and_field(deploy: Path) -> None:
    path = write_config(
        deploy,
        """\
        dispensaries:
          partnersandbox3:
            webhook_token: tok
            destinations:
              - {name: bad, type: jsonl, path: out/bad.jsonl, mapping: mappings/broken.yaml}
              - {name: good, type: jsonl, path: out/good.jsonl, mapping: mappings/http.yaml}
        """,
    )

    result = run("check", "--config", path)

    assert result.exit_code == 1
    broken = deploy / "mappings" / "broken.yaml"
    assert f"{broken}: 1 problem in the mapping" in result.stderr
    assert f"{broken}:2: field 'first_name': unknown transform 'shout'" in result.stderr
    out = lines(result.stdout)
    assert "  destination bad: mapping has errors" in out
    assert any(line.startswith("  destination good (jsonl → ") for line in out)
    assert "OK" not in out


def test_check_lists_disabled_sections(deploy: Path) -> None:
    path = write_config(
        deploy,
        """\
        dispensaries:
          partnersandbox3:
            webhook_token: tok
            destinations:
              - {name: old, enabled: false, type: http, url: "${OLD_URL}", mapping: gone.yaml}
              - {name: sink, type: jsonl, path: out/s.jsonl, mapping: mappings/http.yaml}
          closed:
            enabled: false
            webhook_token: ${CLOSED_TOKEN}
        """,
    )

    result = run("check", "--config", path)

    assert result.exit_code == 0, result.output
    out = lines(result.stdout)
    assert "disabled: dispensaries.partnersandbox3.destinations[0] (old)" in out
    assert "disabled: dispensaries.closed" in out
    assert out[-1] == "OK"


def test_check_shows_rate_limits_batches_and_policy(deploy: Path) -> None:
    path = write_config(
        deploy,
        """\
        dispensaries:
          partnersandbox3:
            webhook_token: [tok-a, tok-b]
            policy: {resubscribe: on_source_opt_in}
            destinations:
              - name: crm
                type: http
                url: https://crm.example.com/treez/ops
                mapping: mappings/http.yaml
                batch_size: 25
                rate_limit: ["75/s", "700/min"]
                policy: {resubscribe: never}
        """,
    )

    result = run("check", "--config", path)

    assert result.exit_code == 0, result.output
    out = lines(result.stdout)
    assert out[1] == (
        "dispensary partnersandbox3: 1 destination, webhook 2 tokens, "
        "reconcile off (no treez section), resubscribe on_source_opt_in"
    )
    assert out[2] == (
        "  destination crm (http → https://crm.example.com): "
        f"mapping http.yaml ({HTTP_FIELDS} fields), batch 25, "
        "rate limit 75/1s, 700/60s, resubscribe never"
    )


def test_check_never_prints_secrets(deploy: Path) -> None:
    path = write_config(
        deploy,
        """\
        store: postgresql://app:${PGPASSWORD}@db.internal/connector
        dispensaries:
          partnersandbox3:
            webhook_token: ${TREEZ_WEBHOOK_TOKEN}
            destinations:
              - name: zap
                type: http
                url: https://hooks.zapier.com/hooks/catch/123/${ZAP_HOOK}/
                headers: {Authorization: "Bearer ${CRM_TOKEN}"}
                mapping: mappings/http.yaml
        """,
    )
    secrets = {
        "PGPASSWORD": "pg-7Y6T-SECRET",
        "TREEZ_WEBHOOK_TOKEN": "whk-2B8N-SECRET",
        "ZAP_HOOK": "zap-4H1Q-SECRET",
        "CRM_TOKEN": "crm-9K3V-SECRET",
    }

    result = run("check", "--config", path, **secrets)

    assert result.exit_code == 0, result.output
    assert "store postgresql://app:***@db.internal/connector" in result.stdout
    assert "(http → https://hooks.zapier.com)" in result.stdout
    for secret in secrets.values():
        assert secret not in result.output


def test_check_never_prints_a_password_in_a_destination_url(deploy: Path) -> None:
    path = write_config(
        deploy,
        """\
        dispensaries:
          partnersandbox3:
            webhook_token: tok
            destinations:
              - name: n8n
                type: http
                url: https://bot:${N8N_PASSWORD}@n8n.example.com/webhook/treez
                mapping: mappings/http.yaml
        """,
    )

    result = run("check", "--config", path, N8N_PASSWORD="n8n-5L2C-SECRET")

    assert result.exit_code == 0, result.output
    assert "n8n.example.com" in result.stdout
    assert "n8n-5L2C-SECRET" not in result.output


def test_check_config_defaults_to_connector_config_variable(deploy: Path) -> None:
    path = write_config(deploy, TWO_DESTINATIONS)

    result = run("check", CONNECTOR_CONFIG=str(path))

    assert result.exit_code == 0, result.output
    assert lines(result.stdout)[0].startswith(f"{path}: store sqlite:///")
    assert "dispensary partnersandbox3: 2 destinations" in result.stdout


def test_check_explicit_config_beats_the_variable(deploy: Path) -> None:
    path = write_config(deploy, TWO_DESTINATIONS)

    result = run("check", "--config", SHIPPED_CONFIG, CONNECTOR_CONFIG=str(path))

    assert result.exit_code == 0, result.output
    assert lines(result.stdout)[0].startswith(f"{SHIPPED_CONFIG}: ")


def test_check_defaults_to_config_yaml_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    missing = run("check")
    monkeypatch.chdir(ROOT)
    found = run("check")

    assert missing.exit_code == 1
    assert "config.yaml: 1 problem in the configuration" in missing.stderr
    assert "file: does not exist" in missing.stderr
    assert found.exit_code == 0, found.output
    assert lines(found.stdout)[0].startswith("config.yaml: store ")


# --- map ---


@pytest.mark.parametrize("event_file", [SEED_DELIVERY, SEED_BODY], ids=["delivery", "body"])
def test_map_seed_event(event_file: Path) -> None:
    result = run("map", "--show-values", "--config", SHIPPED_CONFIG, event_file)

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "N/A" not in result.stdout
    contact = json.loads(result.stdout)
    assert contact["first_name"] == "Jules"
    assert contact["last_name"] == "Winnfield"
    assert contact["birthday"] == "1948-02-12"
    assert contact["city"] == "Inglewood"
    assert contact["state"] == "CA"
    assert contact["zip"] == "90301"
    assert contact["groups"] == ["SENIOR"]
    assert contact["rewards_balance"] == 0
    assert contact["treez_customer_id"] == "3904"
    assert contact["external_id"] == "treez-partnersandbox3-3904"
    assert contact["dispensary"] == "partnersandbox3"
    assert contact["opted_out"] is True
    assert "N/A" not in json.dumps(contact)
    assert all(value is not None for value in contact.values())


def test_map_reads_standard_input() -> None:
    result = run(
        "map", "--show-values", "--config", SHIPPED_CONFIG, "-", input=SEED_BODY.read_bytes()
    )

    assert result.exit_code == 0, result.output
    contact = json.loads(result.stdout)
    assert (contact["first_name"], contact["zip"]) == ("Jules", "90301")


def test_map_with_a_mapping_file_needs_no_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no config.yaml here
    assert not (tmp_path / "config.yaml").exists()

    result = run("map", "--show-values", "--mapping", HTTP_MAPPING, SEED_DELIVERY)

    assert result.exit_code == 0, result.output
    contact = json.loads(result.stdout)
    assert contact["external_id"] == "treez-partnersandbox3-3904"
    assert contact["birthday"] == "1948-02-12"


def test_map_with_a_mapping_file_and_another_dispensary_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = run(
        "map", "--show-values", "--mapping", HTTP_MAPPING, "--dispensary", "othershop", SEED_BODY
    )

    assert result.exit_code == 0, result.output
    contact = json.loads(result.stdout)
    assert contact["dispensary"] == "othershop"
    assert contact["external_id"] == "treez-othershop-3904"
    assert "'partnersandbox3'" in result.stderr
    assert "'othershop'" in result.stderr


def test_map_with_a_broken_mapping_file(deploy: Path) -> None:
    broken = deploy / "mappings" / "broken.yaml"

    result = run("map", "--show-values", "--mapping", broken, SEED_BODY)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"{broken}:2: field 'first_name': unknown transform 'shout'" in result.stderr


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"test": True}, "test ping"),
        ({"test": True, "dispensary_short_name": "partnersandbox3"}, "test ping"),
        (
            {"event_type": "TICKET", "dispensary_short_name": "partnersandbox3", "data": {}},
            "a TICKET event: recorded and ignored, nothing to map",
        ),
        (
            {"event_type": "product", "dispensary_short_name": "partnersandbox3", "data": {}},
            "a PRODUCT event: recorded and ignored, nothing to map",
        ),
    ],
)
def test_map_events_with_nothing_to_map(body: dict[str, Any], message: str) -> None:
    result = run("map", "--show-values", "--config", SHIPPED_CONFIG, "-", input=json.dumps(body))

    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert message in result.stderr


def test_map_invalid_event_names_every_field(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps(seed_with(opt_out="maybe", last_update=...)), encoding="utf-8")

    result = run("map", "--show-values", "--config", SHIPPED_CONFIG, event)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"{event}: 2 problems in the event" in result.stderr
    assert "data.opt_out: " in result.stderr
    assert "data.last_update: " in result.stderr
    assert "maybe" not in result.stderr  # customer values are never echoed


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"opt_out": "maybe"}, "data.opt_out"),
        ({"last_update": ...}, "data.last_update"),
        ({"last_update": "yesterday"}, "data.last_update"),
        ({"customer_id": ...}, "data.customer_id"),
    ],
)
def test_map_invalid_event_from_stdin(changes: dict[str, Any], field: str) -> None:
    result = run(
        "map",
        "--show-values",
        "--config",
        SHIPPED_CONFIG,
        "-",
        input=json.dumps(seed_with(**changes)),
    )

    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"  - {field}: " in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("this is not json {", "not JSON (line 1, column 1"),
        ('{"event_type": "CUSTOMER",', "not JSON"),
        ("[1, 2, 3]", "body: must be a JSON object"),
        ('{"event_type": "CUSTOMER", "data": "x"}', "data: "),
    ],
)
def test_map_bad_files(tmp_path: Path, text: str, message: str) -> None:
    event = tmp_path / "event.json"
    event.write_text(text, encoding="utf-8")

    result = run("map", "--show-values", "--config", SHIPPED_CONFIG, event)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert str(event) in result.stderr
    assert message in result.stderr


def test_map_missing_event_file(tmp_path: Path) -> None:
    event = tmp_path / "nowhere.json"

    result = run("map", "--show-values", "--config", SHIPPED_CONFIG, event)

    assert result.exit_code == 1
    assert f"{event}: cannot be read" in result.stderr


def test_map_unknown_dispensary_lists_the_choices() -> None:
    result = run(
        "map", "--show-values", "--config", SHIPPED_CONFIG, "--dispensary", "nope", SEED_BODY
    )

    assert result.exit_code == 1
    assert result.stdout == ""
    assert "no dispensary 'nope' in the configuration" in result.stderr
    assert "partnersandbox3" in result.stderr


def test_map_with_two_destinations_needs_one_chosen(deploy: Path) -> None:
    path = write_config(deploy, TWO_DESTINATIONS)

    result = run("map", "--show-values", "--config", path, SEED_BODY)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert "--destination" in result.stderr
    assert "first, second" in result.stderr


def test_map_with_two_destinations_and_one_chosen(deploy: Path) -> None:
    path = write_config(deploy, TWO_DESTINATIONS)

    chosen = run("map", "--show-values", "--config", path, "--destination", "second", SEED_BODY)
    unknown = run("map", "--show-values", "--config", path, "--destination", "third", SEED_BODY)

    assert chosen.exit_code == 0, chosen.output
    assert json.loads(chosen.stdout)["first_name"] == "Jules"
    assert unknown.exit_code == 1
    assert "no destination 'third'" in unknown.stderr
    assert "first, second" in unknown.stderr


def test_map_uses_connector_config_variable(deploy: Path) -> None:
    path = write_config(deploy, TWO_DESTINATIONS)

    result = run(
        "map", "--show-values", "--destination", "first", SEED_BODY, CONNECTOR_CONFIG=str(path)
    )

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["treez_customer_id"] == "3904"


def test_map_with_a_broken_config(deploy: Path) -> None:
    path = write_config(deploy, "dispensaries: {}\n")

    result = run("map", "--show-values", "--config", path, SEED_BODY)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"{path}: 1 problem in the configuration" in result.stderr


def test_help_lists_the_commands() -> None:
    result = run("--help")

    assert result.exit_code == 0
    assert "check" in result.stdout
    assert "map" in result.stdout


# --- the installed console script ---


def _console_script() -> list[str]:
    for candidate in (Path(sys.executable).with_name("connector"), ROOT / ".venv/bin/connector"):
        if candidate.is_file():
            return [str(candidate)]
    raise AssertionError("the console script 'connector' is not installed next to python")


def _subprocess_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in VARIABLES}


def test_console_script_check(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*_console_script(), "check", "--config", str(SHIPPED_CONFIG)],
        cwd=tmp_path,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "OK"
    assert "dispensary partnersandbox3: 1 destination" in proc.stdout
    assert DEV_TOKEN_WARNING in proc.stderr


def test_console_script_map_from_stdin(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*_console_script(), "map", "--show-values", "--config", str(SHIPPED_CONFIG), "-"],
        cwd=tmp_path,
        env=_subprocess_env(),
        input=SEED_DELIVERY.read_text(encoding="utf-8"),
        capture_output=True,
        text=True,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    contact = json.loads(proc.stdout)
    assert (contact["first_name"], contact["birthday"], contact["zip"]) == (
        "Jules",
        "1948-02-12",
        "90301",
    )


def test_console_script_fails_with_exit_code_1(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps(seed_with(opt_out="maybe")), encoding="utf-8")

    proc = subprocess.run(
        [*_console_script(), "map", "--show-values", "--config", str(SHIPPED_CONFIG), str(event)],
        cwd=tmp_path,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        check=False,
    )

    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "data.opt_out" in proc.stderr


def test_python_dash_m_connector(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "connector", "--version"],
        cwd=tmp_path,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "connector, version 0.1.0"


# --- status and serve with several replicas ---


def _replica_config(folder: Path) -> Path:
    """Two destinations on a store in ``folder``; a server address no replica can bind."""
    (folder / "mappings").mkdir(parents=True, exist_ok=True)
    shutil.copy(HTTP_MAPPING, folder / "mappings" / "http.yaml")
    text = f"store: sqlite:///{folder}/c.db\nserver: {{host: 192.0.2.1, port: 9}}\n"
    return write_config(folder, text + TWO_DESTINATIONS)


def test_status_names_who_delivers_each_destination_and_the_processes(tmp_path: Path) -> None:
    from connector.config import load_config
    from connector.store import open_store

    config = _replica_config(tmp_path)
    store = open_store(load_config(config).store)
    try:
        store.register_process()
        store.acquire("deliver:partnersandbox3/first", store.process_id, -1.0)  # lapsed
    finally:
        store.close()

    result = run("status", "--config", config)

    assert result.exit_code == 0, result.output
    out = lines(result.stdout)
    short = store.process_id[:8]
    first = out.index("  first: pending 0, in flight 0, dead letters 0")
    second = out.index("  second: pending 0, in flight 0, dead letters 0")
    assert out[first + 1].startswith(f"    delivered by: nobody (the lease of {short} (")
    assert "lapsed at" in out[first + 1]
    assert out[second + 1] == "    delivered by: nobody now (no running process holds its lease)"
    assert "processes: 1" in out
    process = out[out.index("processes: 1") + 1]
    assert process.startswith(f"  {short}  ")
    assert f"pid {os.getpid()}" in process


def test_replicas_share_one_config_with_serve_host_and_port(tmp_path: Path) -> None:
    """``serve --host/--port`` override server.host/port (here an address nobody can bind):
    two replicas on one config file and one store both answer, both ready, though only one
    of them delivers for each destination."""
    import signal
    import socket
    import time

    import httpx

    config = _replica_config(tmp_path)
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs = [tmp_path / f"serve-{port}.log" for port in ports]
    replicas = []
    for port, log in zip(ports, logs, strict=True):
        command = [sys.executable, "-m", "connector", "serve", "--config", str(config)]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        with log.open("wb") as output:
            replicas.append(
                subprocess.Popen(
                    command, cwd=tmp_path, env=environment, stdout=output, stderr=output
                )
            )
    try:
        deadline = time.monotonic() + 60.0
        ready: dict[int, int] = {}
        with httpx.Client(timeout=2.0) as client:
            while len(ready) < 2 and time.monotonic() < deadline:
                for port, replica, log in zip(ports, replicas, logs, strict=True):
                    assert replica.poll() is None, log.read_text(errors="replace")[-2000:]
                    try:
                        status = client.get(f"http://127.0.0.1:{port}/readyz").status_code
                    except httpx.TransportError:
                        continue
                    if status == 200:
                        ready[port] = status
                time.sleep(0.1)
        assert sorted(ready) == sorted(ports)
        status = run("status", "--config", config)
        assert status.exit_code == 0, status.output
        assert "processes: 2" in status.stdout  # the pipeline process of each replica
    finally:
        for replica in replicas:
            if replica.poll() is None:
                replica.send_signal(signal.SIGTERM)
        codes = [replica.wait(30) for replica in replicas]
    assert codes == [0, 0]


def test_map_prints_kinds_never_values_unless_asked() -> None:
    """Contract 5: a customer's values only with --show-values; the dry run says what each
    mapped field holds by kind (text and its length, number, list...)."""
    result = run("map", "--config", SHIPPED_CONFIG, SEED_BODY)
    assert result.exit_code == 0, result.stderr
    assert "first_name: text (5 characters)" in result.stdout
    assert "(kinds only: --show-values prints the values)" in result.stdout
    seed = json.loads(SEED_BODY.read_text())["data"]
    for value in (seed["first_name"], seed["last_name"], seed["birthday"], seed["email"]):
        if value:
            assert str(value) not in result.stdout
    shown = run("map", "--show-values", "--config", SHIPPED_CONFIG, SEED_BODY)
    assert json.loads(shown.stdout)["first_name"] == seed["first_name"]
