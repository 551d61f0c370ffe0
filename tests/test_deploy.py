"""What deploy/ ships: the alert rules pass promtool's checks and their own unit tests; every
metric the rules and the dashboard name is one the connector exports; the systemd unit runs
``connector serve`` with paths that agree and stops within its timeout.

promtool comes from Debian's ``prometheus`` package (.ci/run installs it): without it the
promtool tests are skipped, unless ``CI`` is set, when they fail."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_receiver import SEED_BYTES, Running, run

from connector.config import ServerConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "connector-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "connector-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "connector-dashboard.json"
UNIT = DEPLOY / "systemd" / "connector.service"

# the sample names a family of each type exposes (prometheus_client's exposition)
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}


# --- promtool ---


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set and promtool is missing (apt-get install prometheus)")
        pytest.skip("promtool is missing (apt-get install prometheus)")
    return found


def _promtool_run(*args: str) -> None:
    done = subprocess.run(
        [_promtool(), *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def test_promtool_accepts_the_alert_rules() -> None:
    _promtool_run("check", "rules", RULES.name)


def test_the_alert_rules_pass_their_unit_tests() -> None:
    _promtool_run("test", "rules", RULE_TESTS.name)


def test_every_alert_has_a_unit_test_severity_and_annotations() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    for rule in rules:
        assert rule["alert"] in tested, f"{rule['alert']}: no promtool unit test"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


# --- metric names ---

_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
_WORDS |= {"offset", "bool", "inf", "nan"}
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: label matchers, strings, ranges and label
    lists left out, and the names of the functions it calls."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = _LABEL_LISTS.sub("", expr)
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        word = match.group()
        if word.lower() in _WORDS or expr[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def unknown_metrics(expressions: dict[str, str], exported: set[str]) -> dict[str, set[str]]:
    """Per place (an alert, a panel), the metric names it reads that are not exported."""
    unknown = {where: metric_names(expr) - exported for where, expr in expressions.items()}
    return {where: names for where, names in unknown.items() if names}


def _rule_expressions() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {f"alert {r['alert']}": r["expr"] for g in groups for r in g["rules"]}


def _dashboard_expressions() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            # label_values(metric, label): the metric is the first argument
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            found[f"variable {variable['name']}"] = inner.group(1) if inner else query
    return found


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name the connector's /metrics can show, from a scrape of the real app
    after some traffic: each family's samples named by its type (a counter's ``_total``, a
    histogram's ``_bucket``...), whether or not it has samples yet."""
    texts: list[str] = []

    async def scenario(rx: Running) -> None:
        assert (await rx.post(SEED_BYTES)).status_code == 202
        texts.append((await rx.client.get("/metrics")).text)

    run(tmp_path_factory.mktemp("scrape"), scenario)
    names = set()
    for family in text_string_to_metric_families(texts[0]):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def test_the_scrape_shows_the_families_the_alerts_rely_on(exported: set[str]) -> None:
    for name in (
        "connector_events_received_total",
        "connector_delivery_seconds_bucket",
        "connector_dead_operations",
        "connector_last_webhook_timestamp_seconds",
        "connector_last_reconcile_success_timestamp_seconds",
    ):
        assert name in exported


def test_every_metric_of_the_alert_rules_is_exported(exported: set[str]) -> None:
    expressions = _rule_expressions()
    assert len(expressions) >= 7
    assert unknown_metrics(expressions, exported) == {}


def test_every_metric_of_the_dashboard_is_exported(exported: set[str]) -> None:
    expressions = _dashboard_expressions()
    assert len(expressions) >= 12
    assert unknown_metrics(expressions, exported) == {}


def test_the_checker_finds_a_bogus_name_and_only_metric_names() -> None:
    exported = {"connector_operations_total", "connector_dead_operations"}
    expressions = {
        "good": 'sum by (destination, result) (rate(connector_operations_total{result=~"a|b",'
        'dispensary=~"$dispensary"}[$__rate_interval])) > 0 unless on (destination) '
        "connector_dead_operations offset 15m and time() - 6 * 3600 > 1e3",
        "bogus": "max by (dispensary) (connector_bogus_seconds) > 0",
        "suffix": "rate(connector_operations[5m])",  # a counter read without _total
    }
    assert metric_names(expressions["good"]) == {
        "connector_operations_total",
        "connector_dead_operations",
    }
    assert unknown_metrics(expressions, exported) == {
        "bogus": {"connector_bogus_seconds"},
        "suffix": {"connector_operations"},
    }


def test_the_dashboard_has_its_variables_and_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["dispensary"]["datasource"]["uid"] == "${datasource}"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'dispensary=~"$dispensary"' in target["expr"], panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# --- the systemd unit ---


@pytest.fixture(scope="module")
def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(UNIT.read_text())
    return parser


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min|)", value.strip())
    assert match, f"TimeoutStopSec={value}: expected seconds or minutes"
    return float(match[1]) * (60 if match[2] == "min" else 1)


def test_the_unit_serves_with_an_absolute_config(unit: configparser.RawConfigParser) -> None:
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert PurePosixPath(argv[0]).is_absolute()
    assert PurePosixPath(argv[0]).name == "connector"
    assert argv[1:3] == ["serve", "--config"]
    assert PurePosixPath(argv[3]).is_absolute()
    check = shlex.split(service["ExecStartPre"])
    assert check == [argv[0], "check", "--config", argv[3]]
    # the secrets sit beside the configuration that names them
    environment = PurePosixPath(service["EnvironmentFile"].lstrip("-"))
    assert environment.parent == PurePosixPath(argv[3]).parent
    assert service["User"] == "connector"
    assert service["Restart"] == "on-failure"


def test_the_unit_writes_only_its_working_directory(unit: configparser.RawConfigParser) -> None:
    service = unit["Service"]
    working = PurePosixPath(service["WorkingDirectory"])
    assert str(working) in service["ReadWritePaths"].split()
    assert working == PurePosixPath("/var/lib") / service["StateDirectory"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"


def test_the_unit_waits_for_a_graceful_stop(unit: configparser.RawConfigParser) -> None:
    """serve drains requests for the grace, gives its pipeline child the grace plus 5 s, then
    its own loops the grace (connector/service.py, stop): systemd must wait for all three."""
    service = unit["Service"]
    grace = ServerConfig().shutdown_grace_seconds
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # the parent stops its child
    assert _seconds(service["TimeoutStopSec"]) > 3 * grace + 5


def test_systemd_analyze_verifies_the_unit(
    unit: configparser.RawConfigParser, tmp_path: Path
) -> None:
    """systemd's own reading: no unknown key, no value it ignores. The unit runs the
    connector of this test's virtualenv instead (the host's /opt/connector is not here)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (no systemd on this machine)")
    installed = shlex.split(unit["Service"]["ExecStart"])[0]
    here = Path(sys.executable).parent / "connector"
    assert here.exists(), f"{here}: the connector entry point of this virtualenv is missing"
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(installed, str(here)))
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    # systemd-analyze answers 0 even for a key it ignores: what it says is the verdict
    assert (done.returncode, done.stderr.strip()) == (0, ""), done.stderr


def test_deploy_files_hold_no_customer_field_in_annotations() -> None:
    """Annotations name the dispensary and the destination from labels, nothing else."""
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        text = " ".join(rule["annotations"].values())
        labels = set(re.findall(r"\$labels\.(\w+)", text))
        assert labels <= {"dispensary", "destination"}, (rule["alert"], labels)
