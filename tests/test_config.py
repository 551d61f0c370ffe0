"""config.yaml: loading, ${VAR} interpolation, validation and how errors are reported."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from pydantic import SecretStr

from connector.config import (
    CONFIG_ENV_VAR,
    DEFAULT_SCHEDULE,
    DEV_WEBHOOK_TOKEN,
    config_path,
    load_config,
)
from connector.config_base import Rate
from connector.destinations.http import HttpDestination
from connector.destinations.jsonl import JsonlDestination
from connector.errors import ConfigError, Problem

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "config.yaml"
HTTP_MAPPING = ROOT / "mappings" / "http.yaml"

# The shape issue 2 says must work as written.
ISSUE_EXAMPLE = """\
store: sqlite:///./connector.db
server: {host: 127.0.0.1, port: 8080}
dispensaries:
  partnersandbox3:
    webhook_token: ${TREEZ_WEBHOOK_TOKEN}
    treez:
      api_url: https://api.treez.io/v2.0/dispensary/partnersandbox3
      client_id: ${TREEZ_CLIENT_ID}
      api_key: ${TREEZ_API_KEY}
    reconcile: {schedule: "15 3 * * *"}
    destinations:
      - name: crm
        type: http
        url: http://127.0.0.1:9000/ops
        mapping: mappings/http.yaml
"""
ISSUE_ENV = {
    "TREEZ_WEBHOOK_TOKEN": "whk-token-0001",
    "TREEZ_CLIENT_ID": "client-42",
    "TREEZ_API_KEY": "treez-api-key-0002",
}


# --- helpers ---


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A deployment folder holding mappings/http.yaml (the shipped mapping)."""
    (tmp_path / "mappings").mkdir()
    shutil.copy(HTTP_MAPPING, tmp_path / "mappings" / "http.yaml")
    return tmp_path.resolve()


def write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    """The 1-based number of the first line of ``path`` that contains ``needle``."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} is not in {path}")


def config_error(path: Path, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    return info.value


def by_where(error: ConfigError) -> dict[str, Problem]:
    return {p.where: p for p in error.problems}


def one_dispensary(destinations: str, extra: str = "") -> str:
    """A minimal config: dispensary shop1 with the given destination list (YAML, indented 6)."""
    return (
        "dispensaries:\n"
        "  shop1:\n"
        "    webhook_token: tok\n"
        + textwrap.indent(textwrap.dedent(extra), "    ")
        + "    destinations:\n"
        + textwrap.indent(textwrap.dedent(destinations), "      ")
    )


SINK = "- {name: sink, type: jsonl, path: out/sink.jsonl, mapping: mappings/http.yaml}\n"
SINK_S = "name: s, type: jsonl, path: s.jsonl, mapping: mappings/http.yaml"  # for {...} items


# --- the issue's example ---


def test_issue_example_loads_as_written(folder: Path) -> None:
    path = write(folder, ISSUE_EXAMPLE)

    config = load_config(path, environ=ISSUE_ENV)

    assert config.path == path
    assert config.store == f"sqlite:///{folder / 'connector.db'}"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert list(config.dispensaries) == ["partnersandbox3"]
    disp = config.dispensaries["partnersandbox3"]
    assert [t.get_secret_value() for t in disp.webhook_token] == ["whk-token-0001"]
    assert not disp.uses_dev_token
    assert disp.treez is not None
    assert str(disp.treez.api_url) == "https://api.treez.io/v2.0/dispensary/partnersandbox3"
    assert disp.treez.client_id == "client-42"
    assert isinstance(disp.treez.api_key, SecretStr)
    assert disp.treez.api_key.get_secret_value() == "treez-api-key-0002"
    assert disp.reconcile.schedule == "15 3 * * *"
    assert disp.reconcile.timezone == "UTC"
    assert disp.reconciles is True
    assert disp.policy.resubscribe == "never"
    [dest] = disp.destinations
    assert isinstance(dest, HttpDestination)
    assert dest.name == "crm"
    assert dest.type == "http"
    assert str(dest.url) == "http://127.0.0.1:9000/ops"
    assert dest.mapping == folder / "mappings" / "http.yaml"
    assert dest.rate_limit == ()
    assert dest.batch_size == 1
    assert disp.destination("crm") is dest
    assert config.disabled == ()


def test_issue_example_without_its_variables_names_each_one(folder: Path) -> None:
    path = write(folder, ISSUE_EXAMPLE)

    error = config_error(path, {})

    problems = by_where(error)
    assert set(problems) == {
        "dispensaries.partnersandbox3.webhook_token",
        "dispensaries.partnersandbox3.treez.client_id",
        "dispensaries.partnersandbox3.treez.api_key",
    }
    assert "TREEZ_WEBHOOK_TOKEN" in problems["dispensaries.partnersandbox3.webhook_token"].what
    assert "TREEZ_CLIENT_ID" in problems["dispensaries.partnersandbox3.treez.client_id"].what
    assert "TREEZ_API_KEY" in problems["dispensaries.partnersandbox3.treez.api_key"].what


# --- ${VAR} interpolation ---


@pytest.mark.parametrize(
    ("written", "environ", "expected"),
    [
        ("${HOST}", {"HOST": "10.0.0.5"}, "10.0.0.5"),
        ("${HOST:-0.0.0.0}", {}, "0.0.0.0"),
        ("${HOST:-0.0.0.0}", {"HOST": ""}, "0.0.0.0"),  # empty uses the default
        ("${HOST:-0.0.0.0}", {"HOST": "10.0.0.5"}, "10.0.0.5"),
        ("${A}-${B:-b}.example", {"A": "a"}, "a-b.example"),
        ("$${HOST}", {"HOST": "ignored"}, "${HOST}"),  # $$ escapes
        ("cost$$5", {}, "cost$5"),
        ("lone$sign", {}, "lone$sign"),
    ],
)
def test_interpolation(folder: Path, written: str, environ: dict[str, str], expected: str) -> None:
    path = write(folder, f'server: {{host: "{written}"}}\n' + one_dispensary(SINK))

    config = load_config(path, environ=environ)

    assert config.server.host == expected


def test_empty_variable_without_default_is_used_as_is(folder: Path) -> None:
    path = write(folder, 'server: {host: "x${EMPTY}y"}\n' + one_dispensary(SINK))

    assert load_config(path, environ={"EMPTY": ""}).server.host == "xy"


def test_missing_variable_names_variable_key_path_and_line(folder: Path) -> None:
    path = write(
        folder,
        one_dispensary(
            """\
            - name: crm
              type: http
              url: ${CRM_URL}
              mapping: mappings/http.yaml
            """
        ),
    )

    error = config_error(path, {"OTHER": "x"})

    [problem] = error.problems
    assert problem.where == "dispensaries.shop1.destinations[0].url"
    assert problem.what.startswith("environment variable CRM_URL is not set")
    assert problem.line == line_of(path, "url: ${CRM_URL}")
    assert (
        f"{path}:{problem.line}: dispensaries.shop1.destinations[0].url: "
        "environment variable CRM_URL is not set"
    ) in str(error)


def test_missing_variable_in_a_token_list_is_reported_once(folder: Path) -> None:
    path = write(
        folder,
        """\
        dispensaries:
          shop1:
            webhook_token: [current-token, "${NEXT_TOKEN}"]
            destinations:
              - {name: sink, type: jsonl, path: out/s.jsonl, mapping: mappings/http.yaml}
        """,
    )

    error = config_error(path)

    # the unset variable is the one problem; its empty value is not a second one
    assert [(p.where, p.line) for p in error.problems] == [
        ("dispensaries.shop1.webhook_token[1]", 3)
    ]
    assert "NEXT_TOKEN" in error.problems[0].what


# --- sections switched off ---

WITH_DISABLED_SECTIONS = """\
dispensaries:
  shop1:
    webhook_token: tok
    treez:
      api_url: https://api.treez.io/v2.0/dispensary/shop1
      client_id: ${TREEZ_CLIENT_ID}
      api_key: ${TREEZ_API_KEY}
    reconcile: {enabled: false}
    destinations:
      - name: old
        enabled: false
        type: http
        url: ${OLD_URL}
        headers: {Authorization: "Bearer ${OLD_TOKEN}"}
        mapping: mappings/http.yaml
      - {name: sink, type: jsonl, path: out/s.jsonl, mapping: mappings/http.yaml}
  shop2:
    enabled: false
    webhook_token: ${SHOP2_TOKEN}
    destinations: []
"""


def test_missing_variables_in_disabled_sections_are_not_errors(folder: Path) -> None:
    path = write(folder, WITH_DISABLED_SECTIONS)

    config = load_config(path, environ={})

    assert list(config.dispensaries) == ["shop1"]
    shop1 = config.dispensaries["shop1"]
    assert shop1.treez is None
    assert shop1.reconciles is False
    assert [d.name for d in shop1.destinations] == ["sink"]
    assert sorted(config.disabled) == [
        "dispensaries.shop1.destinations[0] (old)",
        "dispensaries.shop1.treez",
        "dispensaries.shop2",
    ]


def test_the_same_sections_switched_on_need_their_variables(folder: Path) -> None:
    path = write(
        folder,
        WITH_DISABLED_SECTIONS.replace("reconcile: {enabled: false}", "reconcile: {}")
        .replace("enabled: false\n        type", "type")
        .replace("    enabled: false\n", ""),
    )

    error = config_error(path)

    assert {p.where for p in error.problems} == {
        "dispensaries.shop1.treez.client_id",
        "dispensaries.shop1.treez.api_key",
        "dispensaries.shop1.destinations[0].url",
        "dispensaries.shop1.destinations[0].headers.Authorization",
        "dispensaries.shop2.webhook_token",
        "dispensaries.shop2.destinations",  # an empty list is refused once enabled
    }


@pytest.mark.parametrize("off", ["false", "False", "no", "off", "0"])
def test_enabled_from_a_variable_can_switch_off(folder: Path, off: str) -> None:
    path = write(
        folder,
        one_dispensary(
            """\
            - {name: a, enabled: "${A_ON}", type: http, url: "${A_URL}",
               mapping: mappings/http.yaml}
            """
            + SINK
        ),
    )

    config = load_config(path, environ={"A_ON": off})

    assert [d.name for d in config.dispensaries["shop1"].destinations] == ["sink"]
    assert config.disabled == ("dispensaries.shop1.destinations[0] (a)",)


def test_enabled_from_a_variable_can_switch_on(folder: Path) -> None:
    # ${X:-false} switches a section off, so ${X:-true} must leave it on
    path = write(
        folder,
        """\
        dispensaries:
          shop1:
            enabled: ${SHOP1_ON:-true}
            webhook_token: tok
            destinations:
              - {name: sink, enabled: "${SINK_ON:-true}", type: jsonl, path: s.jsonl,
                 mapping: mappings/http.yaml}
        """,
    )

    config = load_config(path, environ={})

    assert [d.name for d in config.dispensaries["shop1"].destinations] == ["sink"]
    assert config.disabled == ()


# --- secrets ---

SECRETS = {
    "WEBHOOK_SECRET": "whsec-7Q2Z-SECRET",
    "TREEZ_API_KEY": "tzkey-9X4K-SECRET",
    "CRM_TOKEN": "crmtok-3M8P-SECRET",
    "NEXT_TOKEN": "whsec-next-5R1D-SECRET",
}

WITH_SECRETS = """\
dispensaries:
  shop1:
    webhook_token: ["${WEBHOOK_SECRET}", "${NEXT_TOKEN}"]
    treez:
      api_url: https://api.treez.io/v2.0/dispensary/shop1
      client_id: client-1
      api_key: ${TREEZ_API_KEY}
    destinations:
      - name: crm
        type: http
        url: https://crm.example.com/ops
        headers: {Authorization: "Bearer ${CRM_TOKEN}"}
        mapping: mappings/http.yaml
"""


def test_secrets_are_secretstr_and_never_shown(folder: Path) -> None:
    path = write(folder, WITH_SECRETS)

    config = load_config(path, environ=SECRETS)

    disp = config.dispensaries["shop1"]
    assert all(isinstance(t, SecretStr) for t in disp.webhook_token)
    assert [t.get_secret_value() for t in disp.webhook_token] == [
        SECRETS["WEBHOOK_SECRET"],
        SECRETS["NEXT_TOKEN"],
    ]
    assert disp.treez is not None
    assert isinstance(disp.treez.api_key, SecretStr)
    dest = disp.destination("crm")
    assert isinstance(dest, HttpDestination)
    assert isinstance(dest.headers["Authorization"], SecretStr)
    assert dest.headers["Authorization"].get_secret_value() == f"Bearer {SECRETS['CRM_TOKEN']}"
    shown = [repr(config), str(config), repr(disp), str(disp), config.model_dump_json()]
    for secret in SECRETS.values():
        for text in shown:
            assert secret not in text


def test_store_password_is_not_shown_by_repr(folder: Path) -> None:
    path = write(
        folder,
        "store: postgresql://app:${PGPASSWORD}@db.internal:5432/connector\n" + one_dispensary(SINK),
    )

    config = load_config(path, environ={"PGPASSWORD": "pg-pass-6T3W-SECRET"})

    assert "pg-pass-6T3W-SECRET" not in config.store_display
    assert "pg-pass-6T3W-SECRET" not in repr(config)
    assert "pg-pass-6T3W-SECRET" not in str(config)


def test_secrets_never_appear_in_config_errors(folder: Path) -> None:
    text = (
        WITH_SECRETS.replace("client_id: client-1", "client_id: client-1\n      region: west")
        .replace("https://crm.example.com/ops", "crm.example.com/ops")
        .replace(
            "mapping: mappings/http.yaml", "mapping: mappings/http.yaml\n        batch_size: 0"
        )
    )
    path = write(
        folder,
        "store: postgresql://app:${PGPASSWORD}@db.internal:badport/connector\n"
        "server: {port: 0}\n" + text,
    )
    environ = {**SECRETS, "PGPASSWORD": "pg-pass-6T3W-SECRET"}

    error = config_error(path, environ)

    assert len(error.problems) >= 4
    rendered = [str(error), repr(error), *(repr(p) for p in error.problems)]
    for secret in environ.values():
        for text in rendered:
            assert secret not in text


# --- how errors are reported ---


def test_several_errors_each_name_file_key_path_line_and_problem(folder: Path) -> None:
    path = write(
        folder,
        """\
        server:
          host: 127.0.0.1
          port: 70000
        dispensaries:
          partnersandbox3:
            webhook_token: tok
            destinations:
              - name: crm
                type: http
                url: not a url
                mapping: mappings/http.yaml
              - name: sink
                type: jsonl
                path: out/sink.jsonl
                batchsize: 5
                batch_size: 0
                mapping: mappings/http.yaml
        """,
    )

    error = config_error(path)

    expected = {
        "server.port": ("port: 70000", "less than or equal to 65535"),
        "dispensaries.partnersandbox3.destinations[0].url": ("url: not a url", "valid URL"),
        "dispensaries.partnersandbox3.destinations[1].batchsize": (
            "batchsize: 5",
            "is not a known key",
        ),
        "dispensaries.partnersandbox3.destinations[1].batch_size": (
            "batch_size: 0",
            "greater than or equal to 1",
        ),
    }
    assert len(error.problems) == len(expected)
    assert error.source == str(path)
    text = str(error)
    assert text.splitlines()[0] == f"{path}: 4 problems in the configuration"
    for problem in error.problems:
        needle, what = expected[problem.where]
        assert problem.line == line_of(path, needle)
        assert what in problem.what
        assert f"{path}:{problem.line}: {problem.where}: {problem.what}" in text


@pytest.mark.parametrize(("kind", "missing"), [("http", "url"), ("jsonl", "path")])
def test_destination_errors_have_clean_paths_after_a_disabled_one(
    folder: Path, kind: str, missing: str
) -> None:
    path = write(
        folder,
        one_dispensary(
            f"""\
            - {{name: off1, enabled: false, type: http, url: "${{NOPE}}", mapping: nope.yaml}}
            - {{name: ok, type: jsonl, path: ok.jsonl, mapping: mappings/http.yaml}}
            - name: broken
              type: {kind}
              mapping: mappings/http.yaml
              batch_size: 0
            """
        ),
    )

    error = config_error(path)

    wheres = {p.where for p in error.problems}
    assert wheres == {
        f"dispensaries.shop1.destinations[2].{missing}",
        "dispensaries.shop1.destinations[2].batch_size",
    }
    assert all(".http" not in w and ".jsonl" not in w for w in wheres)
    problems = by_where(error)
    assert problems[f"dispensaries.shop1.destinations[2].{missing}"].what == "is required"
    assert problems["dispensaries.shop1.destinations[2].batch_size"].line == line_of(
        path, "batch_size: 0"
    )


@pytest.mark.parametrize("type_line", ["type: braze", "type: ''", "# no type"])
def test_unknown_or_missing_destination_type(folder: Path, type_line: str) -> None:
    path = write(
        folder,
        one_dispensary(
            f"""\
            - name: vendor
              {type_line}
              mapping: mappings/http.yaml
            """
        ),
    )

    error = config_error(path)

    [problem] = error.problems
    assert problem.where in (
        "dispensaries.shop1.destinations[0]",
        "dispensaries.shop1.destinations[0].type",
    )
    assert "http" in problem.what
    assert "jsonl" in problem.what
    assert problem.line in (line_of(path, "- name: vendor"), line_of(path, type_line))


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("stor: sqlite:///x.db\n" + one_dispensary(SINK), "stor"),
        ("server: {hots: 0.0.0.0}\n" + one_dispensary(SINK), "server.hots"),
        (one_dispensary(SINK, "webhook_tokn: other\n"), "dispensaries.shop1.webhook_tokn"),
        (one_dispensary(SINK, "polcy: {resubscribe: never}\n"), "dispensaries.shop1.polcy"),
        (
            one_dispensary(SINK, "reconcile: {timezone: UTC, shedule: '* * * * *'}\n"),
            "dispensaries.shop1.reconcile.shedule",
        ),
        (
            one_dispensary(SINK.replace("path:", "pathh: x, path:")),
            "dispensaries.shop1.destinations[0].pathh",
        ),
        (
            one_dispensary(
                SINK,
                "treez: {api_url: 'https://t.example', client_id: c, api_key: k, apikey: k}\n",
            ),
            "dispensaries.shop1.treez.apikey",
        ),
    ],
)
def test_unknown_keys_are_rejected(folder: Path, text: str, where: str) -> None:
    path = write(folder, text)

    error = config_error(path)

    [problem] = error.problems
    assert problem.where == where
    assert problem.what == "is not a known key (check its spelling)"
    assert problem.line == line_of(path, where.rsplit(".", 1)[-1].split("]")[-1] + ":")


# --- paths ---


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deploy = tmp_path.resolve() / "deploy"
    (deploy / "maps").mkdir(parents=True)
    shutil.copy(HTTP_MAPPING, deploy / "maps" / "contact.yaml")
    path = write(
        deploy,
        "store: sqlite:///data/connector.db\n"
        + one_dispensary(
            """\
            - {name: sink, type: jsonl, path: out/sink.jsonl, mapping: maps/contact.yaml}
            - {name: crm, type: http, url: "http://h/x", mapping: ./maps/../maps/contact.yaml}
            """
        ),
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(path, environ={})

    assert config.store == f"sqlite:///{deploy / 'data' / 'connector.db'}"
    sink, crm = config.dispensaries["shop1"].destinations
    assert isinstance(sink, JsonlDestination)
    assert sink.path == deploy / "out" / "sink.jsonl"
    assert sink.mapping == deploy / "maps" / "contact.yaml"
    assert crm.mapping.resolve() == deploy / "maps" / "contact.yaml"
    assert crm.mapping.is_absolute()


def test_a_relative_config_path_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deploy = tmp_path.resolve() / "deploy"
    (deploy / "mappings").mkdir(parents=True)
    shutil.copy(HTTP_MAPPING, deploy / "mappings" / "http.yaml")
    write(deploy, "store: sqlite:///c.db\n" + one_dispensary(SINK))
    monkeypatch.chdir(tmp_path)

    config = load_config("deploy/config.yaml", environ={})
    monkeypatch.chdir(deploy / "mappings")  # later changes of directory change nothing

    assert config.store == f"sqlite:///{deploy / 'c.db'}"
    [sink] = config.dispensaries["shop1"].destinations
    assert isinstance(sink, JsonlDestination)
    assert sink.path == deploy / "out" / "sink.jsonl"
    assert sink.mapping == deploy / "mappings" / "http.yaml"


def test_the_default_store_resolves_against_the_config_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = write(folder, one_dispensary(SINK))  # no store key
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))

    config = load_config(path, environ={})

    assert config.store == f"sqlite:///{folder / 'connector.db'}"


def test_absolute_paths_are_untouched(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("other").resolve()
    shutil.copy(HTTP_MAPPING, other / "abs.yaml")
    path = write(
        folder,
        f"store: sqlite:///{other / 'store.db'}\n"
        + one_dispensary(
            f"- {{name: s, type: jsonl, path: {other / 's.jsonl'}, "
            f"mapping: {other / 'abs.yaml'}}}\n"
        ),
    )

    config = load_config(path, environ={})

    assert config.store == f"sqlite:///{other / 'store.db'}"
    [sink] = config.dispensaries["shop1"].destinations
    assert isinstance(sink, JsonlDestination)
    assert sink.path == other / "s.jsonl"
    assert sink.mapping == other / "abs.yaml"


def test_missing_mapping_file_is_an_error_at_its_key(folder: Path) -> None:
    path = write(
        folder,
        one_dispensary(
            """\
            - name: sink
              type: jsonl
              path: out/s.jsonl
              mapping: mappings/nope.yaml
            """
        ),
    )

    error = config_error(path)

    [problem] = error.problems
    assert problem.where == "dispensaries.shop1.destinations[0].mapping"
    assert problem.what == f"mapping file {folder / 'mappings' / 'nope.yaml'} does not exist"
    assert problem.line == line_of(path, "mapping: mappings/nope.yaml")


# --- store ---


def test_postgresql_store_is_accepted_and_displayed_without_password(folder: Path) -> None:
    path = write(
        folder,
        "store: postgresql://app:${PGPASSWORD}@db.internal:5432/connector\n" + one_dispensary(SINK),
    )

    config = load_config(path, environ={"PGPASSWORD": "pg-pass-6T3W"})

    assert config.store == "postgresql://app:pg-pass-6T3W@db.internal:5432/connector"
    assert config.store_display == "postgresql://app:***@db.internal:5432/connector"


@pytest.mark.parametrize(
    ("store", "what"),
    [
        ("'sqlite:///:memory:'", "needs a file"),
        ("sqlite://", "needs a file"),
        ("'sqlite:///file:memdb?mode=memory&uri=true'", "needs a file"),
        ("mysql://u@h/db", "database 'mysql' is not supported"),
        ("just some text", "is not a database URL"),
    ],
)
def test_unusable_stores_are_refused(folder: Path, store: str, what: str) -> None:
    path = write(folder, f"store: {store}\n" + one_dispensary(SINK))

    error = config_error(path)

    [problem] = error.problems
    assert (problem.where, problem.line) == ("store", 1)
    assert what in problem.what


# --- reconcile ---

TREEZ = "treez: {api_url: 'https://api.treez.io/v2.0/dispensary/shop1', client_id: c, api_key: k}\n"


def test_reconcile_defaults(folder: Path) -> None:
    path = write(folder, one_dispensary(SINK, TREEZ))

    disp = load_config(path, environ={}).dispensaries["shop1"]

    assert disp.reconcile.timezone == "UTC"
    assert disp.reconcile.schedule == DEFAULT_SCHEDULE
    assert disp.reconciles is True
    assert disp.treez is not None
    assert disp.treez.requests_per_second == 10


def test_reconcile_timezone_and_schedule(folder: Path) -> None:
    path = write(
        folder,
        one_dispensary(
            SINK, TREEZ + "reconcile: {schedule: '15 3 * * *', timezone: America/Los_Angeles}\n"
        ),
    )

    disp = load_config(path, environ={}).dispensaries["shop1"]

    assert (disp.reconcile.schedule, disp.reconcile.timezone) == (
        "15 3 * * *",
        "America/Los_Angeles",
    )


def test_bad_timezone(folder: Path) -> None:
    path = write(folder, one_dispensary(SINK, "reconcile: {timezone: Mars/Olympus_Mons}\n"))

    [problem] = config_error(path).problems

    assert problem.where == "dispensaries.shop1.reconcile.timezone"
    assert "Mars/Olympus_Mons" in problem.what
    assert "time zone" in problem.what
    assert problem.line == line_of(path, "reconcile:")


@pytest.mark.parametrize("schedule", ["61 * * * *", "every night", "* * *", "0 0 32 * *"])
def test_bad_cron_schedule(folder: Path, schedule: str) -> None:
    path = write(folder, one_dispensary(SINK, f"reconcile:\n  schedule: '{schedule}'\n"))

    [problem] = config_error(path).problems

    assert problem.where in (
        "dispensaries.shop1.reconcile",
        "dispensaries.shop1.reconcile.schedule",
    )
    assert "cron" in problem.what
    assert repr(schedule) in problem.what
    assert problem.line in (line_of(path, "reconcile:"), line_of(path, "schedule:"))


def test_treez_api_limits(folder: Path) -> None:
    path = write(
        folder,
        one_dispensary(
            SINK,
            "treez: {api_url: 'not a url', client_id: '', api_key: '${KEY}', "
            "requests_per_second: 11}\n",
        ),
    )

    error = config_error(path, {"KEY": ""})

    assert {p.where for p in error.problems} == {
        "dispensaries.shop1.treez.api_url",
        "dispensaries.shop1.treez.client_id",
        "dispensaries.shop1.treez.api_key",
        "dispensaries.shop1.treez.requests_per_second",
    }
    assert by_where(error)["dispensaries.shop1.treez.api_key"].what == "must not be empty"


# --- policy ---


def test_policy_per_dispensary_with_destination_override(folder: Path) -> None:
    path = write(
        folder,
        one_dispensary(
            """\
            - {name: strict, type: jsonl, path: a.jsonl, mapping: mappings/http.yaml,
               policy: {resubscribe: never}}
            - {name: follows, type: jsonl, path: b.jsonl, mapping: mappings/http.yaml}
            """,
            "policy: {resubscribe: on_source_opt_in}\n",
        ),
    )

    disp = load_config(path, environ={}).dispensaries["shop1"]

    assert disp.policy.resubscribe == "on_source_opt_in"
    assert disp.policy_for("strict").resubscribe == "never"
    assert disp.policy_for("follows").resubscribe == "on_source_opt_in"
    with pytest.raises(KeyError):
        disp.policy_for("nobody")


def test_policy_defaults_to_never_and_override_can_loosen(folder: Path) -> None:
    path = write(
        folder,
        one_dispensary(
            """\
            - {name: loose, type: jsonl, path: a.jsonl, mapping: mappings/http.yaml,
               policy: {resubscribe: on_source_opt_in}}
            - {name: plain, type: jsonl, path: b.jsonl, mapping: mappings/http.yaml}
            """
        ),
    )

    disp = load_config(path, environ={}).dispensaries["shop1"]

    assert disp.policy.resubscribe == "never"
    assert disp.policy_for("loose").resubscribe == "on_source_opt_in"
    assert disp.policy_for("plain").resubscribe == "never"


@pytest.mark.parametrize(
    ("extra", "destination_policy", "where"),
    [
        ("policy: {resubscribe: always}\n", "", "dispensaries.shop1.policy.resubscribe"),
        (
            "",
            ", policy: {resubscribe: sometimes}",
            "dispensaries.shop1.destinations[0].policy.resubscribe",
        ),
    ],
)
def test_bad_policy_values(folder: Path, extra: str, destination_policy: str, where: str) -> None:
    dest = f"- {{{SINK_S}{destination_policy}}}\n"
    path = write(folder, one_dispensary(dest, extra))

    [problem] = config_error(path).problems

    assert problem.where == where
    assert "never" in problem.what
    assert "on_source_opt_in" in problem.what


# --- rate limits and batches ---


@pytest.mark.parametrize(
    ("written", "rates", "shown"),
    [
        ("'10/s'", (Rate(10, 1.0),), ["10/1s"]),
        ("['75/s', '700/min']", (Rate(75, 1.0), Rate(700, 60.0)), ["75/1s", "700/60s"]),
        ("'3000/3s'", (Rate(3000, 3.0),), ["3000/3s"]),
        ("'100 / hour'", (Rate(100, 3600.0),), ["100/3600s"]),
    ],
)
def test_rate_limits(folder: Path, written: str, rates: tuple[Rate, ...], shown: list[str]) -> None:
    dest = f"- {{{SINK_S}, rate_limit: {written}}}\n"
    path = write(folder, one_dispensary(dest))

    [sink] = load_config(path, environ={}).dispensaries["shop1"].destinations

    assert sink.rate_limit == rates
    assert [str(r) for r in sink.rate_limit] == shown


def test_rate_limit_is_off_by_default(folder: Path) -> None:
    path = write(folder, one_dispensary(SINK))

    [sink] = load_config(path, environ={}).dispensaries["shop1"].destinations

    assert sink.rate_limit == ()


@pytest.mark.parametrize(
    "written", ["'10 per s'", "'0/s'", "'10/0s'", "10", "['75/s', 'fast']", "'10/fortnight'"]
)
def test_bad_rate_limits(folder: Path, written: str) -> None:
    dest = f"- {{{SINK_S}, rate_limit: {written}}}\n"
    path = write(folder, one_dispensary(dest))

    [problem] = config_error(path).problems

    assert problem.where == "dispensaries.shop1.destinations[0].rate_limit"
    assert "rate" in problem.what


@pytest.mark.parametrize("size", [0, -1, 10_001, "lots"])
def test_bad_batch_size(folder: Path, size: object) -> None:
    dest = f"- {{{SINK_S}, batch_size: {size}}}\n"
    path = write(folder, one_dispensary(dest))

    [problem] = config_error(path).problems

    assert problem.where == "dispensaries.shop1.destinations[0].batch_size"


def test_batch_size_is_kept(folder: Path) -> None:
    dest = "- {name: s, type: jsonl, path: s.jsonl, mapping: mappings/http.yaml, batch_size: 50}\n"
    path = write(folder, one_dispensary(dest))

    [sink] = load_config(path, environ={}).dispensaries["shop1"].destinations

    assert sink.batch_size == 50


# --- names and tokens ---


def test_duplicate_destination_names(folder: Path) -> None:
    path = write(
        folder,
        one_dispensary(
            """\
            - {name: crm, type: jsonl, path: a.jsonl, mapping: mappings/http.yaml}
            - {name: sink, type: jsonl, path: b.jsonl, mapping: mappings/http.yaml}
            - {name: crm, type: http, url: "http://h/", mapping: mappings/http.yaml}
            """
        ),
    )

    [problem] = config_error(path).problems

    assert problem.where == "dispensaries.shop1"
    assert "unique" in problem.what
    assert "crm" in problem.what
    assert "sink" not in problem.what
    assert problem.line == line_of(path, "shop1:")


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        (
            one_dispensary(SINK).replace("shop1:", "'shop one!':"),
            "dispensaries",
            "shop one!",
        ),
        (
            one_dispensary(SINK.replace("name: sink", "name: -sink")),
            "dispensaries.shop1.destinations[0].name",
            "letter or digit",
        ),
        ("dispensaries: {}\n", "dispensaries", "at least 1"),
        (
            one_dispensary("[]\n").replace(":\n      []", ": []"),
            "dispensaries.shop1.destinations",
            "at least 1",
        ),
    ],
)
def test_bad_names_and_empty_sections(folder: Path, text: str, where: str, what: str) -> None:
    path = write(folder, text)

    [problem] = config_error(path).problems

    assert problem.where == where
    assert what in problem.what


def test_webhook_token_list(folder: Path) -> None:
    path = write(
        folder,
        one_dispensary(SINK).replace(
            "webhook_token: tok", f"webhook_token: [new-token, {DEV_WEBHOOK_TOKEN}]"
        ),
    )

    disp = load_config(path, environ={}).dispensaries["shop1"]

    assert [t.get_secret_value() for t in disp.webhook_token] == ["new-token", DEV_WEBHOOK_TOKEN]
    assert disp.uses_dev_token is True


@pytest.mark.parametrize("token", ['""', "'   '", "[]", "[good-token, '']", "${EMPTY_TOKEN}"])
def test_empty_webhook_token_is_refused(folder: Path, token: str) -> None:
    path = write(
        folder, one_dispensary(SINK).replace("webhook_token: tok", f"webhook_token: {token}")
    )

    [problem] = config_error(path, {"EMPTY_TOKEN": ""}).problems

    assert problem.where == "dispensaries.shop1.webhook_token"
    assert problem.line == line_of(path, "webhook_token:")


# --- the file itself ---


def test_yaml_syntax_error_names_its_line(folder: Path) -> None:
    path = write(
        folder,
        """\
        server: {host: 127.0.0.1}
        dispensaries:
          shop1:
            webhook_token: [a, b
            destinations: []
        """,
    )

    error = config_error(path)

    [problem] = error.problems
    assert problem.where == "YAML syntax"
    assert problem.line == 5
    assert f"{path}:5: YAML syntax: " in str(error)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"

    error = config_error(path)

    assert error.source == str(path)
    [problem] = error.problems
    assert (problem.where, problem.what) == ("file", "does not exist")
    assert str(error).startswith(f"{path}: 1 problem in the configuration")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n"])
def test_document_must_be_a_table(folder: Path, text: str) -> None:
    path = write(folder, text)

    [problem] = config_error(path).problems

    assert problem.where == "config"
    assert "dispensaries" in problem.what


def test_server_defaults(folder: Path) -> None:
    path = write(folder, one_dispensary(SINK))

    config = load_config(path, environ={})

    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)


# --- config_path ---


def test_config_path_explicit_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV_VAR, "/from/env.yaml")

    assert config_path("given.yaml") == Path("given.yaml")


def test_config_path_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV_VAR, "/from/env.yaml")

    assert config_path() == Path("/from/env.yaml")
    assert config_path(None) == Path("/from/env.yaml")


def test_config_path_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)

    assert config_path() == Path("config.yaml")


# --- the shipped config.yaml ---


def test_shipped_config_loads_with_nothing_set() -> None:
    config = load_config(SHIPPED_CONFIG, environ={})

    assert config.store == f"sqlite:///{ROOT / 'connector.db'}"
    assert list(config.dispensaries) == ["partnersandbox3"]
    disp = config.dispensaries["partnersandbox3"]
    assert disp.uses_dev_token is True
    assert [t.get_secret_value() for t in disp.webhook_token] == [DEV_WEBHOOK_TOKEN]
    assert disp.treez is None
    assert disp.reconciles is False
    assert disp.policy.resubscribe == "never"
    [sink] = disp.destinations
    assert isinstance(sink, JsonlDestination)
    assert sink.path == ROOT / "out" / "partnersandbox3.jsonl"
    assert sink.mapping == ROOT / "mappings" / "http.yaml"
    assert config.disabled == ()


def test_shipped_config_uses_a_real_token_when_set() -> None:
    config = load_config(SHIPPED_CONFIG, environ={"TREEZ_WEBHOOK_TOKEN": "prod-token-123"})

    disp = config.dispensaries["partnersandbox3"]
    assert disp.uses_dev_token is False
    assert [t.get_secret_value() for t in disp.webhook_token] == ["prod-token-123"]
