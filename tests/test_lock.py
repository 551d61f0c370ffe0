"""The lock files (requirements/) against pyproject.toml's ranges, and this environment
against the lock: `make test` and `make run` install from the lock, so what the suite runs on
is what the lock names."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)(?:\s*;\s*([^\\]+?))?\s*\\?$")


def pins(path: Path) -> dict[str, tuple[str, str | None]]:
    """name -> (version, marker) of every pinned requirement of a lock file, each of which
    must carry at least one hash."""
    found: dict[str, tuple[str, str | None]] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        match = PIN.match(line)
        if match is None:
            continue
        name, version, marker = match.groups()
        following = lines[number + 1] if number + 1 < len(lines) else ""
        assert "--hash=sha256:" in following, f"{path.name}:{number + 1}: {name} has no hash"
        found[canonicalize_name(name)] = (version, marker)
    return found


def project() -> dict[str, list[Requirement]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        "app": [Requirement(r) for r in data["dependencies"]],
        "dev": [Requirement(r) for r in data["optional-dependencies"]["dev"]],
    }


def test_pin_lines_are_read() -> None:
    line = "httpx==0.28.1 \\"
    assert PIN.match(line) is not None
    assert PIN.match("colorama==0.4.6 ; sys_platform == 'win32' \\") is not None
    assert PIN.match("    # via httpx") is None


@pytest.mark.parametrize(("lock", "groups"), [("app.txt", ("app",)), ("dev.txt", ("app", "dev"))])
def test_every_range_of_pyproject_is_pinned_within_it(lock: str, groups: tuple[str, ...]) -> None:
    locked = pins(LOCKS / lock)
    wanted = project()
    for group in groups:
        for requirement in wanted[group]:
            name = canonicalize_name(requirement.name)
            assert name in locked, f"{lock} does not pin {requirement.name}: run `make lock`"
            version = locked[name][0]
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{lock} pins {name}=={version}, outside pyproject.toml's {requirement}: "
                "run `make lock`"
            )


def test_the_build_backend_is_pinned() -> None:
    for lock in ("app.txt", "dev.txt"):
        locked = pins(LOCKS / lock)
        assert {"setuptools", "wheel"} <= locked.keys(), lock


def test_run_and_test_locks_agree() -> None:
    app = pins(LOCKS / "app.txt")
    dev = pins(LOCKS / "dev.txt")
    assert app.keys() <= dev.keys()
    assert {name: app[name] for name in app} == {name: dev[name] for name in app}


def test_this_environment_is_the_lock() -> None:
    """Every package the dev lock names for this platform is installed at its pinned version
    (the suite runs on what `make test` installed from the lock)."""
    environment = default_environment()
    wrong = []
    for name, (version, marker) in pins(LOCKS / "dev.txt").items():
        if marker is not None and not Requirement(f"x; {marker}").marker.evaluate(environment):  # type: ignore[union-attr]
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{name} (missing)")
            continue
        if installed != version:
            wrong.append(f"{name} {installed} (locked {version})")
    assert not wrong, f"installed apart from requirements/dev.txt: {wrong}"


def test_make_installs_from_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r requirements/app.txt" in makefile
    assert "--require-hashes -r requirements/dev.txt" in makefile
    assert "-e '.[dev]'" not in makefile
    for target in ("run", "demo"):
        assert re.search(rf"^{target}: \$\(APP_STAMP\)", makefile, re.M), target
    assert re.search(r"^unit: \$\(STAMP\)", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
