"""The ``jsonl`` destination: each operation appended to a file as one JSON line."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from connector.config import JsonlDestination as JsonlConfig
from connector.config import Rate
from connector.delivery.base import Capabilities, Delivery, Result, Sent


class JsonlSink:
    """Contract 4's bodies, one per line: every operation kind, a merge included."""

    kind = "jsonl"

    def __init__(self, config: JsonlConfig) -> None:
        self.name = config.name
        self.capabilities = Capabilities(batch_size=config.batch_size, native_merge=True)
        self.rate_limit: tuple[Rate, ...] = config.rate_limit
        self.path = config.path
        self._lock = asyncio.Lock()

    def _append(self, lines: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())  # marked delivered only once it is on disk

    @property
    def batch_size(self) -> int:
        return self.capabilities.batch_size

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        lines = [
            json.dumps({**d.body, "idempotency_key": d.idempotency_key}, ensure_ascii=False) + "\n"
            for d in deliveries
        ]
        async with self._lock:
            await asyncio.to_thread(self._append, lines)
        return [Sent() for _ in deliveries]

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        return await self.send(deliveries)

    async def lookup(self, contact_id: str) -> dict[str, Any] | None:
        return None  # a file cannot be asked

    async def aclose(self) -> None:
        return None
