"""The destination registry (connector/destinations/__init__.py): each type declares itself
once, in its own module, and the config union, the builders, the capabilities and the CLI's
text all come from there."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any, get_args

import pytest
from click.testing import CliRunner
from test_architecture import MODULES, imports

from connector.cli import main
from connector.config import DispensaryConfig, load_config
from connector.destinations import DESTINATION_TYPES, build_destination, capabilities, discover
from connector.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent.parent / "connector" / "destinations"
ROOT = Path(__file__).resolve().parent.parent


def test_every_public_module_of_the_package_is_a_registered_type() -> None:
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))
    found = {kind.build.__module__.rsplit(".", 1)[-1] for kind in DESTINATION_TYPES.values()}
    assert sorted(found) == modules
    assert list(DESTINATION_TYPES)[:2] == ["http", "jsonl"]  # generic ones first


def test_the_config_union_is_the_registry() -> None:
    field = DispensaryConfig.model_fields["destinations"].annotation
    (item,) = get_args(field)
    union, *_ = get_args(item)
    assert set(get_args(union)) == {kind.config for kind in DESTINATION_TYPES.values()}


def test_an_unknown_type_names_every_registered_one(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text((ROOT / "mappings" / "http.yaml").read_text())
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent("""\
            dispensaries:
              s1:
                webhook_token: t
                destinations:
                  - {name: x, type: mailchimp, mapping: m.yaml}
            """)
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "destinations[0].type" in text
    assert "'mailchimp' is not a destination type" in text
    for tag in DESTINATION_TYPES:
        assert tag in text


def test_check_help_lists_each_type_with_its_summary() -> None:
    result = CliRunner().invoke(main, ["check", "--help"])
    assert result.exit_code == 0
    for tag, kind in DESTINATION_TYPES.items():
        line = next(line for line in result.output.splitlines() if line.strip().startswith(tag))
        assert kind.summary in " ".join(line.split())


def test_builders_and_capabilities_come_from_the_declaration(tmp_path: Path) -> None:
    """The adapter's own capabilities and the planner's (built without a client) are the
    same value, from the one function each type declares."""
    (tmp_path / "m.yaml").write_text((ROOT / "mappings" / "http.yaml").read_text())
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent("""\
            dispensaries:
              s1:
                webhook_token: t
                destinations:
                  - {name: h, type: http, url: "https://example.com/hook", mapping: m.yaml,
                     batch_size: 7}
                  - {name: j, type: jsonl, path: out.jsonl, mapping: m.yaml}
                  - {name: a, type: alpineiq, api_key: k, uid: "1", mapping: m.yaml}
                  - {name: k, type: klaviyo, api_key: pk_x, mapping: m.yaml}
            """)
    )
    config = load_config(path)
    for dest in config.dispensaries["s1"].destinations:
        sink = build_destination(dest)
        assert sink.kind == dest.type
        assert sink.capabilities == capabilities(dest)
    assert capabilities(config.dispensaries["s1"].destination("h")).batch_size == 7
    # vendors keep a profile's state: a newer upsert replaces one still waiting; http and
    # jsonl are feeds of every change
    coalescing = {
        d.type for d in config.dispensaries["s1"].destinations if capabilities(d).coalesce_upserts
    }
    assert coalescing == {"alpineiq", "klaviyo"}


def test_a_public_module_without_a_declaration_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "fake_destinations"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_shared.py").write_text("X = 1\n")  # private: skipped
    (package / "stray.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(TypeError, match="stray declares no DESTINATION"):
            discover("fake_destinations", [str(package)])
    finally:
        for name in [m for m in sys.modules if m.startswith("fake_destinations")]:
            del sys.modules[name]


def test_a_declaration_whose_tag_disagrees_with_its_model_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "fake_destinations2"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "twin.py").write_text(
        "from dataclasses import replace\n"
        "from connector.destinations.jsonl import DESTINATION as JSONL\n"
        "DESTINATION = replace(JSONL, tag='other')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(TypeError, match="must be Literal\\['other'\\]"):
            discover("fake_destinations2", [str(package)])
    finally:
        for name in [m for m in sys.modules if m.startswith("fake_destinations2")]:
            del sys.modules[name]


def test_no_module_outside_the_package_names_a_vendor_module() -> None:
    """Adding a vendor touches its own module only: the rest of the connector reaches the
    types through the registry (the demo writes through the jsonl file sink by name)."""
    vendors = {f"connector.destinations.{t}" for t in DESTINATION_TYPES} - {
        "connector.destinations.jsonl"
    }
    for module in MODULES:
        if module == "connector.destinations" or module.startswith("connector.destinations."):
            continue
        assert not imports(module) & vendors, module


def test_adapters_do_not_import_the_config_module() -> None:
    """connector.config imports the registry: an adapter importing it would be a circle."""
    for module in MODULES:
        if module.startswith("connector.destinations"):
            assert "connector.config" not in imports(module), module


@pytest.mark.parametrize("status", [400, 404, 408, 409, 422, 425, 429, 500, 501, 503, 505, 599])
def test_treez_and_the_destinations_judge_a_status_alike(status: int) -> None:
    """One set of retriable statuses (connector/delivery/_http.py) for both sides."""
    import httpx

    from connector.config import TreezApiConfig
    from connector.delivery._http import classify_status
    from connector.errors import DeliveryError, RetriableDelivery
    from connector.treez_api import TreezApiError, TreezClient, TreezRetriable

    config = TreezApiConfig(
        api_url="https://api.example.com/v2.0/dispensary/s1", client_id="c", api_key="k"
    )
    client = TreezClient(config)
    response = httpx.Response(status, json={"resultCode": "FAIL"})
    with pytest.raises(TreezApiError) as treez:
        client._envelope(response, "a call")
    with pytest.raises(DeliveryError) as destination:
        classify_status(status, None, "", "example.com")
    retriable = isinstance(destination.value, RetriableDelivery)
    if status not in (401, 403):
        assert isinstance(treez.value, TreezRetriable) == retriable


def test_a_type_with_a_setup_hook_gets_its_own_setup_command(tmp_path: Path) -> None:
    """``connector TAG setup``: mounted for every type that declares ``setup``, it picks the
    dispensary and the destination of that type and prints what the hook did."""
    from dataclasses import replace

    from connector.cli import _setup_command
    from connector.destinations.jsonl import DESTINATION as JSONL

    seen: list[tuple[str, int]] = []

    async def setup(config: Any, mapping: Any) -> list[str]:
        seen.append((config.name, len(mapping.fields)))
        return [f"{config.name}: nothing to do"]

    command = _setup_command("jsonl", replace(JSONL, setup=setup, setup_help="Prepare it."))
    (tmp_path / "m.yaml").write_text((ROOT / "mappings" / "http.yaml").read_text())
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent("""\
            dispensaries:
              s1:
                webhook_token: t
                destinations:
                  - {name: file1, type: jsonl, path: a.jsonl, mapping: m.yaml}
                  - {name: file2, type: jsonl, path: b.jsonl, mapping: m.yaml}
                  - {name: hook, type: http, url: "https://example.com/h", mapping: m.yaml}
            """)
    )
    runner = CliRunner()
    result = runner.invoke(command, ["setup", "--config", str(config), "-t", "file2"])
    assert result.exit_code == 0, result.output
    assert result.output == "file2: nothing to do\n"
    assert seen[0][0] == "file2"
    assert seen[0][1] > 0
    result = runner.invoke(command, ["setup", "--config", str(config)])
    assert result.exit_code != 0
    assert "several jsonl destinations are configured" in result.output
    result = runner.invoke(command, ["setup", "--config", str(config), "-t", "hook"])
    assert result.exit_code != 0
    assert "no jsonl destination 'hook'" in result.output
    assert "Prepare it." in runner.invoke(command, ["setup", "--help"]).output


def braze_config(folder: Path) -> Path:
    """A config with one Braze destination whose mapping is ``folder/b.yaml``."""
    config = folder / "config.yaml"
    config.write_text(
        textwrap.dedent("""\
            dispensaries:
              s1:
                webhook_token: t
                destinations:
                  - {name: br, type: braze, api_key: k, mapping: b.yaml,
                     rest_endpoint: "https://rest.iad-01.braze.com"}
            """)
    )
    return config


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (None, "maps no 'treez_opt_out'"),
        ("treez_opt_out: {value: false}", "must map opt_out as a boolean"),
        ("treez_opt_out: {from: first_name}", "must map opt_out as a boolean"),
    ],
)
def test_a_braze_mapping_without_the_consent_view_is_refused_by_check_and_serve(
    tmp_path: Path, line: str | None, message: str
) -> None:
    """Braze creates a user subscribed: the upsert of a customer opted out when first sent
    must carry the opt-out, read from the mapped consent view. A mapping that drops it (or
    maps something else there) is refused, by `check` and at start, not found out later."""
    from connector.errors import MappingError
    from connector.pipeline import Deployment

    shipped = (ROOT / "mappings" / "braze.yaml").read_text().splitlines()
    kept = [row for row in shipped if not row.startswith("treez_opt_out:")]
    assert len(kept) == len(shipped) - 1
    (tmp_path / "b.yaml").write_text("\n".join([*kept, *([line] if line else [])]) + "\n")
    config = braze_config(tmp_path)
    result = CliRunner().invoke(main, ["check", "--config", str(config)])
    assert result.exit_code != 0
    assert message in result.output
    with pytest.raises(MappingError, match=message):
        Deployment.from_config(load_config(config))


def test_the_shipped_braze_mapping_carries_the_consent_view(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text((ROOT / "mappings" / "braze.yaml").read_text())
    config = braze_config(tmp_path)
    result = CliRunner().invoke(main, ["check", "--config", str(config)])
    assert result.exit_code == 0, result.output
