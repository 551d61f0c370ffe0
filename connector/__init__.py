"""Treez → marketing and loyalty tools connector.

The public surface: load a deployment's configuration, parse Treez events, map customers.
"""

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
