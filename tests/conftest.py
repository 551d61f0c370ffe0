"""Shared fixtures: the real Treez delivery from the seed document, and variations of it."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from connector.treez import Customer, parse_customer

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
SEED_BODY_BYTES = (DATA / "seed_body.json").read_bytes()


@pytest.fixture
def seed_bytes() -> bytes:
    """Exactly the bytes Treez sent (1,403 bytes)."""
    return SEED_BODY_BYTES


@pytest.fixture
def seed_body() -> dict[str, Any]:
    """The decoded webhook body: {event_type, dispensary_short_name, data}."""
    return json.loads(SEED_BODY_BYTES)


@pytest.fixture
def seed_data(seed_body: dict[str, Any]) -> dict[str, Any]:
    """The customer object of the seed delivery."""
    return seed_body["data"]


CustomerFactory = Callable[..., Customer]


@pytest.fixture
def make_customer(seed_data: dict[str, Any]) -> CustomerFactory:
    """A customer from the seed with some fields replaced: make_customer(email="a@b.co")."""

    def make(**overrides: Any) -> Customer:
        data = copy.deepcopy(seed_data)
        data.update(overrides)
        return parse_customer(data)

    return make
