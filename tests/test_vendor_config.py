"""Configuration of the vendor destinations (alpineiq, klaviyo) and what `connector check`
and `connector map` say about them."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from connector.cli import main
from connector.config import ConfigError, load_config
from connector.destinations import capabilities
from connector.destinations.klaviyo import KlaviyoDestination
from connector.pipeline import Deployment

ROOT = Path(__file__).resolve().parent.parent
SEED = Path(__file__).resolve().parent / "data" / "seed_body.json"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "mappings").mkdir()
    for name in ("alpineiq.yaml", "klaviyo.yaml"):
        shutil.copy(ROOT / "mappings" / name, tmp_path / "mappings" / name)
    return tmp_path


def write(folder: Path, destinations: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(
        "dispensaries:\n  shop1:\n    webhook_token: tok\n    destinations:\n"
        + textwrap.indent(textwrap.dedent(destinations), "      "),
        encoding="utf-8",
    )
    return path


KLAVIYO = """\
- name: kl
  type: klaviyo
  api_key: ${KLAVIYO_PRIVATE_KEY}
  mapping: mappings/klaviyo.yaml
"""
AIQ = """\
- name: aiq
  type: alpineiq
  api_key: ${AIQ_API_KEY}
  uid: ${AIQ_UID}
  mapping: mappings/alpineiq.yaml
"""
ENV = {"KLAVIYO_PRIVATE_KEY": "pk_secret_123", "AIQ_API_KEY": "aiq-secret-456", "AIQ_UID": "77"}


def problems(path: Path, environ: dict[str, str]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ)
    return {p.where: p.what for p in info.value.problems}


def test_both_vendors_load_with_their_defaults_and_capabilities(folder: Path) -> None:
    config = load_config(write(folder, KLAVIYO + AIQ), environ=ENV)
    kl, aiq = config.dispensaries["shop1"].destinations
    assert isinstance(kl, KlaviyoDestination)
    assert (kl.revision, str(kl.base_url), kl.bulk_size) == (
        "2026-07-15",
        "https://a.klaviyo.com/",
        10_000,
    )
    assert [(r.count, r.per_seconds) for r in aiq.rate_limit] == [(20, 1.0)]  # a guess
    assert "pk_secret_123" not in repr(config)
    assert "aiq-secret-456" not in repr(config)
    assert capabilities(kl).native_merge
    assert not capabilities(aiq).native_merge
    assert capabilities(aiq).external_id_key == "aiq_contact_id"
    specs = Deployment.from_config(config).dispensaries["shop1"].specs
    assert [(s.name, s.native_merge, s.consent_fields) for s in specs] == [
        ("kl", True, True),
        ("aiq", False, True),
    ]


def test_a_missing_key_names_the_variable_and_the_key(folder: Path) -> None:
    found = problems(write(folder, KLAVIYO), {})
    [(where, what)] = found.items()
    assert where == "dispensaries.shop1.destinations[0].api_key"
    assert "KLAVIYO_PRIVATE_KEY is not set" in what


@pytest.mark.parametrize(
    ("revision", "expected"),
    [
        ("2026-13-01", "is not a revision date"),
        ("yesterday", "is not a revision date"),
        ("2019-01-01", "is not a Klaviyo API revision"),
        ("2999-01-01", "is not a Klaviyo API revision"),
    ],
)
def test_a_bad_revision_is_refused_with_a_clear_message(
    folder: Path, revision: str, expected: str
) -> None:
    found = problems(write(folder, KLAVIYO + f'  revision: "{revision}"\n'), ENV)
    what = found["dispensaries.shop1.destinations[0].revision"]
    assert expected in what
    assert "2026-07-15" in what


def test_a_loyalty_contact_path_is_refused(folder: Path) -> None:
    found = problems(write(folder, AIQ + "  upsert_path: /api/v2/loyaltyContact/{uid}\n"), ENV)
    assert "texts the customer" in found["dispensaries.shop1.destinations[0].upsert_path"]


def test_check_and_map_through_the_cli(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    path = write(folder, KLAVIYO + AIQ)
    runner = CliRunner()
    checked = runner.invoke(main, ["check", "--config", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "klaviyo → https://a.klaviyo.com, revision 2026-07-15" in checked.output
    assert "alpineiq → https://lab.alpineiq.com, uid 77" in checked.output
    assert "pk_secret_123" not in checked.output
    for name, expected in (("kl", "external_id"), ("aiq", "favoriteStore")):
        mapped = runner.invoke(
            main, ["map", "--show-values", str(SEED), "--config", str(path), "--destination", name]
        )
        assert mapped.exit_code == 0, mapped.output
        contact = json.loads(mapped.stdout)
        assert expected in contact
        assert "emailOptIn" not in contact
        assert "subscriptions" not in contact

    monkeypatch.delenv("KLAVIYO_PRIVATE_KEY")
    failed = runner.invoke(main, ["check", "--config", str(path)])
    assert failed.exit_code != 0
    assert "KLAVIYO_PRIVATE_KEY" in failed.output
