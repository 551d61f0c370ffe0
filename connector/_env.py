"""``${VAR}`` and ``${VAR:-default}`` in configuration values, read from the environment."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from connector._yaml import Location

_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class MissingVariable:
    """Where a variable was used and which one; the value is left as an empty string."""

    __slots__ = ("loc", "name")

    def __init__(self, loc: Location, name: str) -> None:
        self.loc = loc
        self.name = name


def interpolate(
    data: Any, environ: Mapping[str, str], loc: Location = ()
) -> tuple[Any, list[MissingVariable]]:
    """Replace references in every string of ``data``; ``$$`` writes a literal ``$``.

    Returns the new data and the variables that are neither set nor given a default.
    """
    missing: list[MissingVariable] = []

    def walk(value: Any, here: Location) -> Any:
        if isinstance(value, str):
            return _substitute(value, here)
        if isinstance(value, dict):
            return {k: walk(v, (*here, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*here, i)) for i, v in enumerate(value)]
        return value

    def _substitute(text: str, here: Location) -> str:
        if "$" not in text:
            return text

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            found = environ.get(name)
            if found is not None and (found != "" or default is None):
                return found
            if default is not None:
                return default
            missing.append(MissingVariable(here, name))
            return ""

        return _REFERENCE.sub(replace, text)

    return walk(data, loc), missing
