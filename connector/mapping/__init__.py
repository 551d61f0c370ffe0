"""The mapping language: Treez customer → one destination's contact. See ``_engine``."""

from connector.mapping._engine import (
    DEFAULT_PLACEHOLDERS,
    FieldSpec,
    Mapping,
    compile_mapping,
    compile_mapping_text,
    load_mapping,
)
from connector.mapping._transforms import BUILDERS as TRANSFORMS

__all__ = [
    "DEFAULT_PLACEHOLDERS",
    "TRANSFORMS",
    "FieldSpec",
    "Mapping",
    "compile_mapping",
    "compile_mapping_text",
    "load_mapping",
]
