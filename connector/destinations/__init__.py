"""The destination types: one module each in this package, found here by looking.

Every public module of the package declares its type once, as ``DESTINATION``, a
:class:`~connector.delivery.base.DestinationType` (the ``type:`` tag, the settings model, the
adapter's builder, its capabilities, what ``connector check`` says about it). The config
file's union of destination blocks, :func:`build_destination`, :func:`capabilities` and the
CLI's text all derive from :data:`DESTINATION_TYPES`, so adding a vendor is adding a module
(with its mapping, its fake and its tests): nothing else names the types.

Private modules (``_vendor.py``) hold what several adapters share. The adapters import
:mod:`connector.config_base`, never :mod:`connector.config` (which imports this package).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any

from connector.config_base import DestinationConfig
from connector.delivery.base import Capabilities, Destination, DestinationType

# the order `check` lists them in: the generic ones first, then the vendors by name
_FIRST = ("http", "jsonl")


def discover(package: str, path: Iterable[str]) -> dict[str, DestinationType[Any]]:
    """The types the public modules of ``package`` (found at ``path``) declare, generic
    ones first; a public module without a ``DESTINATION``, or two modules with one tag, is
    an error (a module dropped in here must not go unnoticed)."""
    found: dict[str, DestinationType[Any]] = {}
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda info: info.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        declared = getattr(module, "DESTINATION", None)
        if not isinstance(declared, DestinationType):
            raise TypeError(
                f"{module.__name__} declares no DESTINATION (a DestinationType): every public "
                "module of connector.destinations is a destination type"
            )
        tag = declared.config.model_fields["type"].annotation
        if declared.tag in found or getattr(tag, "__args__", None) != (declared.tag,):
            raise TypeError(
                f"{module.__name__}: its config's type must be Literal[{declared.tag!r}], "
                "and no other module may declare that tag"
            )
        found[declared.tag] = declared
    order = sorted(
        found, key=lambda tag: (tag not in _FIRST, _FIRST.index(tag) if tag in _FIRST else 0, tag)
    )
    return {tag: found[tag] for tag in order}


DESTINATION_TYPES: dict[str, DestinationType[Any]] = discover(__name__, __path__)
"""Every destination type, by its ``type:`` tag."""


def destination_type(config: DestinationConfig) -> DestinationType[Any]:
    return DESTINATION_TYPES[config.type]


def build_destination(config: DestinationConfig) -> Destination:
    """The adapter of a configured destination (its HTTP client opens on first use)."""
    return destination_type(config).build(config)


def capabilities(config: DestinationConfig) -> Capabilities:
    """What a configured destination can do, without building its client."""
    return destination_type(config).capabilities(config)


def where(config: DestinationConfig) -> str:
    """Where a configured destination sends, for people: no secret, no URL path."""
    return destination_type(config).where(config)
