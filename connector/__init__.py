"""Treez → marketing and loyalty tools connector.

The public surface: load a deployment's configuration, parse Treez events, map customers.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connector.config import Config, load_config
    from connector.errors import (
        ConfigError,
        ConnectorError,
        EventValidationError,
        FieldMappingError,
        MappingError,
    )
    from connector.mapping import Mapping, compile_mapping_text, load_mapping
    from connector.treez import (
        Customer,
        CustomerEvent,
        OtherEvent,
        TestPing,
        TreezEvent,
        parse_customer,
        parse_event,
    )

# Imported when first asked for (PEP 562): `connector serve` is already ignoring SIGHUP
# (connector._entry) before pydantic and the rest load, and the command line starts faster.
_WHERE = {
    "Config": "connector.config",
    "load_config": "connector.config",
    "ConfigError": "connector.errors",
    "ConnectorError": "connector.errors",
    "EventValidationError": "connector.errors",
    "FieldMappingError": "connector.errors",
    "MappingError": "connector.errors",
    "Mapping": "connector.mapping",
    "compile_mapping_text": "connector.mapping",
    "load_mapping": "connector.mapping",
    "Customer": "connector.treez",
    "CustomerEvent": "connector.treez",
    "OtherEvent": "connector.treez",
    "TestPing": "connector.treez",
    "TreezEvent": "connector.treez",
    "parse_customer": "connector.treez",
    "parse_event": "connector.treez",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'connector' has no attribute {name!r}")
    return getattr(import_module(module), name)


__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "ConnectorError",
    "Customer",
    "CustomerEvent",
    "EventValidationError",
    "FieldMappingError",
    "Mapping",
    "MappingError",
    "OtherEvent",
    "TestPing",
    "TreezEvent",
    "__version__",
    "compile_mapping_text",
    "load_config",
    "load_mapping",
    "parse_customer",
    "parse_event",
]
