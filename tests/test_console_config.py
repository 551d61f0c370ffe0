"""The ``console`` section of config.yaml and ``connector check``'s line about it."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from connector.cli import main
from connector.config import load_config
from connector.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
HTTP_MAPPING = ROOT / "mappings" / "http.yaml"
TOKEN = "console-token-0123456789"

BASE = """\
server: {host: 127.0.0.1, port: 8080}
dispensaries:
  shop1:
    webhook_token: tok
    destinations:
      - {name: sink, type: jsonl, path: out/sink.jsonl, mapping: mappings/http.yaml}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "mappings").mkdir()
    shutil.copy(HTTP_MAPPING, tmp_path / "mappings" / "http.yaml")
    return tmp_path.resolve()


def write(folder: Path, console: str = "") -> Path:
    path = folder / "config.yaml"
    path.write_text(BASE + textwrap.dedent(console), encoding="utf-8")
    return path


def test_absent_section_means_no_console(folder: Path) -> None:
    config = load_config(write(folder), environ={})

    assert config.console is None
    assert not config.console_on


def test_defaults_bind_loopback_on_8081(folder: Path) -> None:
    path = write(folder, "console: {token: '${CONSOLE_TOKEN}'}\n")

    config = load_config(path, environ={"CONSOLE_TOKEN": TOKEN})

    assert config.console is not None
    assert (config.console.host, config.console.port) == ("127.0.0.1", 8081)
    assert config.console.token.get_secret_value() == TOKEN
    assert config.console.loopback
    assert config.console_on
    assert TOKEN not in repr(config)
    assert TOKEN not in config.model_dump_json()


def test_an_empty_token_turns_it_off(folder: Path) -> None:
    path = write(folder, "console: {token: '${CONSOLE_TOKEN:-}'}\n")

    config = load_config(path, environ={})

    assert config.console is not None
    assert not config.console_on


def test_a_short_token_is_refused_without_showing_it(folder: Path) -> None:
    path = write(folder, "console: {token: '${CONSOLE_TOKEN}'}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"CONSOLE_TOKEN": "short-secret"})

    problems = {p.where: p.what for p in info.value.problems}
    assert "at least 16 characters" in problems["console.token"]
    assert "short-secret" not in str(info.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_the_port_must_differ_from_the_webhook_port_on_one_host(folder: Path, host: str) -> None:
    path = write(folder, f"console: {{host: {host}, port: 8080, token: {TOKEN}}}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})

    (problem,) = info.value.problems
    assert problem.where == "console.port"
    assert "must differ from server.port (8080)" in problem.what
    assert problem.line == 7
    assert TOKEN not in str(info.value)


def test_the_same_port_on_another_address_is_allowed(folder: Path) -> None:
    path = write(folder, f"console: {{host: 127.0.0.2, port: 8080, token: {TOKEN}}}\n")

    config = load_config(path, environ={})

    assert config.console is not None
    assert config.console.port == 8080


def test_an_unknown_key_is_named(folder: Path) -> None:
    path = write(folder, f"console: {{token: {TOKEN}, password: x}}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})

    assert "console.password" in {p.where for p in info.value.problems}


def run_check(path: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    return result.exit_code, result.stdout, result.stderr


def test_check_says_where_the_console_listens_never_the_token(folder: Path) -> None:
    code, out, err = run_check(write(folder, f"console: {{port: 9001, token: {TOKEN}}}\n"))

    assert code == 0, out + err
    assert "console: on at http://127.0.0.1:9001" in out.splitlines()
    assert TOKEN not in out + err
    assert "console.host" not in err


def test_check_says_off(folder: Path) -> None:
    code, out, _ = run_check(write(folder))

    assert code == 0
    assert "console: off (no console section)" in out.splitlines()


def test_check_warns_when_the_console_is_not_on_loopback(folder: Path) -> None:
    code, out, err = run_check(write(folder, f"console: {{host: 0.0.0.0, token: {TOKEN}}}\n"))

    assert code == 0
    assert "console: on at http://0.0.0.0:8081" in out
    assert "warning: console.host: 0.0.0.0 is not a loopback address" in err
    assert TOKEN not in out + err
