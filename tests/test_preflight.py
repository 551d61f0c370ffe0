"""``connector check --online`` (connector/preflight.py) against the vendor fakes over real HTTP:
each destination and Treez reachable, refusing the credentials, unreachable, or not checked;
only harmless reads sent, never a customer's data; and without ``--online`` no connection at
all.

In process (click's runner): the fakes serve from threads, the command runs its own event loop.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from fakes._serve import serve_in_thread
from fakes.alpineiq import AlpineIQFake
from fakes.braze import BrazeFake
from fakes.hubspot import HubSpotFake
from fakes.klaviyo import KlaviyoFake
from fakes.treez_api import TreezFake
from test_e2e import DISPENSARY, MAPPING, free_port

from connector import cli

SECRETS = {
    "TREEZ_KEY": "treez-right-key-55aa",
    "KLAVIYO_KEY": "pk_right_klaviyo_77bb",
    "HUBSPOT_TOKEN": "pat-right-hubspot-99cc",
    "AIQ_KEY": "aiq-right-key-11dd",
    "BRAZE_KEY": "braze-right-key-33ee",
    "HOOK_TOKEN": "hook-right-token-22ff",
}
WRONG = "wrong-credential-0000"
CLIENT_ID = "client-1"


@dataclass
class Fakes:
    treez: TreezFake
    klaviyo: KlaviyoFake
    hubspot: HubSpotFake
    alpineiq: AlpineIQFake
    braze: BrazeFake
    urls: dict[str, str]

    def all_calls(self) -> list[Any]:
        return [
            *self.treez.calls,
            *self.klaviyo.calls,
            *self.hubspot.calls,
            *self.alpineiq.calls,
            *self.braze.calls,
        ]


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    found = Fakes(
        treez=TreezFake(client_id=CLIENT_ID, api_key=SECRETS["TREEZ_KEY"], customers=3),
        klaviyo=KlaviyoFake(api_key=SECRETS["KLAVIYO_KEY"]),
        hubspot=HubSpotFake(token=SECRETS["HUBSPOT_TOKEN"]),
        alpineiq=AlpineIQFake(api_key=SECRETS["AIQ_KEY"], uid="1234"),
        braze=BrazeFake(api_key=SECRETS["BRAZE_KEY"]),
        urls={},
    )
    with (
        serve_in_thread(found.treez.app, host="127.0.0.1", port=0, name="treez") as treez,
        serve_in_thread(found.klaviyo.app, host="127.0.0.1", port=0, name="klaviyo") as klaviyo,
        serve_in_thread(found.hubspot.app, host="127.0.0.1", port=0, name="hubspot") as hubspot,
        serve_in_thread(found.alpineiq.app, host="127.0.0.1", port=0, name="aiq") as alpineiq,
        serve_in_thread(found.braze.app, host="127.0.0.1", port=0, name="braze") as braze,
    ):
        found.urls = {
            "treez": f"http://127.0.0.1:{treez}/v2.0/dispensary/{DISPENSARY}",
            "klaviyo": f"http://127.0.0.1:{klaviyo}",
            "hubspot": f"http://127.0.0.1:{hubspot}",
            "alpineiq": f"http://127.0.0.1:{alpineiq}",
            "braze": f"http://127.0.0.1:{braze}",
        }
        yield found


def write_config(folder: Path, urls: dict[str, str], *, jsonl: str = "out/sink.jsonl") -> Path:
    for vendor in ("klaviyo", "hubspot", "braze", "alpineiq", "http"):
        (folder / f"{vendor}.yaml").write_bytes((MAPPING.parent / f"{vendor}.yaml").read_bytes())
    config = {
        "store": "sqlite:///connector.db",
        "dispensaries": {
            DISPENSARY: {
                "webhook_token": "a-webhook-token-of-ours",
                "treez": {
                    "api_url": urls["treez"],
                    "client_id": CLIENT_ID,
                    "api_key": "${TREEZ_KEY}",
                },
                "destinations": [
                    {
                        "name": "kl",
                        "type": "klaviyo",
                        "api_key": "${KLAVIYO_KEY}",
                        "mapping": "klaviyo.yaml",
                        "base_url": urls["klaviyo"],
                    },
                    {
                        "name": "hs",
                        "type": "hubspot",
                        "token": "${HUBSPOT_TOKEN}",
                        "mapping": "hubspot.yaml",
                        "base_url": urls["hubspot"],
                    },
                    {
                        "name": "aiq",
                        "type": "alpineiq",
                        "api_key": "${AIQ_KEY}",
                        "uid": "1234",
                        "mapping": "alpineiq.yaml",
                        "base_url": urls["alpineiq"],
                    },
                    {
                        "name": "bz",
                        "type": "braze",
                        "api_key": "${BRAZE_KEY}",
                        "mapping": "braze.yaml",
                        "rest_endpoint": urls["braze"],
                    },
                    {
                        "name": "hook",
                        "type": "http",
                        "url": "http://127.0.0.1:9/ops",
                        "headers": {"Authorization": "Bearer ${HOOK_TOKEN}"},
                        "mapping": "http.yaml",
                    },
                    {"name": "file", "type": "jsonl", "path": jsonl, "mapping": "http.yaml"},
                ],
            }
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_check(config: Path, monkeypatch: pytest.MonkeyPatch, *flags: str, **env: str) -> Result:
    for name, value in {**SECRETS, **env}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CONNECTOR_CONFIG", raising=False)
    return CliRunner().invoke(cli.main, ["check", "--config", str(config), *flags])


def line_of(result: Result, label: str) -> str:
    found = [
        line for line in result.output.splitlines() if line.startswith("online: ") and label in line
    ]
    assert len(found) == 1, result.output
    return found[0]


def test_every_check_passes_with_the_right_credentials(
    tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    fakes.hubspot.add_property("treez_customer_key", unique=True)
    result = run_check(write_config(tmp_path, fakes.urls), monkeypatch, "--online")
    assert result.exit_code == 0, result.output
    assert line_of(result, "treez (").endswith(": reachable")
    assert line_of(result, "destination kl ").endswith(": reachable")
    assert line_of(result, "destination hs ").endswith(": reachable")
    assert line_of(result, "destination aiq ").endswith(": reachable")
    assert ": not checked (Braze has no read" in line_of(result, "destination bz ")
    assert ": not checked (contract 4 defines no harmless read" in line_of(
        result, "destination hook "
    )
    assert line_of(result, "destination file ").endswith(": reachable (local file, writable)")
    assert result.output.rstrip().endswith("OK")
    # one harmless read each: the documented ones, GET without a body (Treez: its token)
    assert [(c.method, c.path) for c in fakes.klaviyo.calls] == [("GET", "/api/accounts")]
    assert [(c.method, c.path) for c in fakes.hubspot.calls] == [
        ("GET", "/crm/v3/properties/contacts/treez_customer_key")
    ]
    assert [(c.method, c.path) for c in fakes.alpineiq.calls] == [("GET", "/api/v1.1/stores/1234")]
    assert [(c.method, c.path) for c in fakes.treez.calls] == [
        ("POST", f"/v2.0/dispensary/{DISPENSARY}/config/api/gettokens")
    ]
    assert fakes.braze.calls == []
    assert not (tmp_path / "out").exists(), "the jsonl check writes nothing"


def test_refused_credentials_fail_the_check_and_are_never_shown(
    tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, fakes.urls)
    wrong = {"TREEZ_KEY": WRONG, "KLAVIYO_KEY": WRONG, "HUBSPOT_TOKEN": WRONG, "AIQ_KEY": WRONG}
    result = run_check(config, monkeypatch, "--online", **wrong)
    assert result.exit_code == 1, result.output
    assert line_of(result, "treez (").endswith(": auth refused (HTTP 401 INVALID_CREDENTIALS)")
    assert line_of(result, "destination kl ").endswith(": auth refused (HTTP 401)")
    assert line_of(result, "destination hs ").endswith(": auth refused (HTTP 401)")
    assert line_of(result, "destination aiq ").endswith(": auth refused (HTTP 401)")
    assert "4 of 7 online check(s) failed" in result.output
    for secret in (WRONG, *SECRETS.values()):
        assert secret not in result.output


def test_a_key_without_access_to_the_uid_is_refused(
    tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, fakes.urls)
    data = yaml.safe_load(config.read_text())
    data["dispensaries"][DISPENSARY]["destinations"][2]["uid"] = "9999"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    result = run_check(config, monkeypatch, "--online")
    assert result.exit_code == 1, result.output
    assert line_of(result, "destination aiq ").endswith(": auth refused (HTTP 403)")


def test_a_missing_hubspot_property_is_reachable_with_a_note(
    tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_check(write_config(tmp_path, fakes.urls), monkeypatch, "--online")
    assert result.exit_code == 0, result.output
    assert line_of(result, "destination hs ").endswith(
        ": reachable (but the property treez_customer_key is missing: run connector hubspot setup)"
    )


def test_closed_ports_and_an_unwritable_folder_are_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = {
        vendor: f"http://127.0.0.1:{free_port()}"
        for vendor in ("klaviyo", "hubspot", "alpineiq", "braze")
    }
    closed["treez"] = f"http://127.0.0.1:{free_port()}/v2.0/dispensary/{DISPENSARY}"
    (tmp_path / "a-file").write_text("not a folder")
    result = run_check(
        write_config(tmp_path, closed, jsonl="a-file/sink.jsonl"), monkeypatch, "--online"
    )
    assert result.exit_code == 1, result.output
    assert line_of(result, "treez (").endswith(": unreachable (Connection refused)")
    for name in ("kl", "hs", "aiq"):
        assert line_of(result, f"destination {name} ").endswith(
            ": unreachable (Connection refused)"
        )
    assert line_of(result, "destination file ").endswith("sink.jsonl cannot be written)")
    assert "4 of 7" not in result.output
    assert "5 of 7 online check(s) failed" in result.output


def test_without_online_no_connection_is_even_tried(
    tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, fakes.urls)
    tried: list[Any] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        tried.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    result = run_check(config, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "online:" not in result.output
    assert tried == []
    assert fakes.all_calls() == []
    # the same check with --online does try: the patch above sees connections
    result = run_check(config, monkeypatch, "--online")
    assert tried, result.output
    monkeypatch.setattr(socket.socket, "connect", real_connect)


def test_no_customer_data_leaves_with_the_probes(
    tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever each vendor holds, a probe writes nothing there and sends no body but the
    Treez token form."""
    fakes.hubspot.add_property("treez_customer_key", unique=True)
    result = run_check(write_config(tmp_path, fakes.urls), monkeypatch, "--online")
    assert result.exit_code == 0, result.output
    calls = fakes.all_calls()
    assert calls
    assert all(c.method in ("GET", "POST") for c in calls)
    posts = [c for c in calls if c.method == "POST"]
    assert [c.path.rsplit("/", 1)[-1] for c in posts] == ["gettokens"]
    for call in calls:
        assert getattr(call, "body", None) in (None, b"", ""), call
    assert fakes.klaviyo.profiles == {}
    assert fakes.hubspot.contacts == {}


def test_a_silent_server_and_a_5xx_are_unreachable(
    tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener that never answers is given up within the probe's timeout (a short one
    here), and a vendor's 5xx is no proof of anything: both fail the preflight."""
    import asyncio

    from connector.config import load_config
    from connector.preflight import preflight

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nothing ever answers
        urls = {**fakes.urls, "klaviyo": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        fakes.hubspot.fail_next(503)
        config = load_config(write_config(tmp_path, urls))
        checked = asyncio.run(preflight(config, timeout=0.5))
    found = {c.what.split(" (")[0]: c.probe for c in checked}
    assert str(found["destination kl"]) == "unreachable (no answer within 0.5 s)"
    assert str(found["destination hs"]).startswith("unreachable (HTTP 503 from 127.0.0.1")
    assert found["destination kl"].failed
    assert found["destination hs"].failed
    assert not found["destination bz"].failed  # not checked is no failure
    assert str(found["treez"]) == "reachable"
