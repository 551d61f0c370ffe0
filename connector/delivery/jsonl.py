"""The ``jsonl`` destination: each operation appended to a file as one JSON line."""

from __future__ import annotations

import asyncio
import json
import os

from connector.config import JsonlDestination as JsonlConfig
from connector.config import Rate
from connector.delivery.base import Delivery


class JsonlSink:
    kind = "jsonl"

    def __init__(self, config: JsonlConfig) -> None:
        self.name = config.name
        self.batch_size = config.batch_size
        self.rate_limit: tuple[Rate, ...] = config.rate_limit
        self.path = config.path
        self._lock = asyncio.Lock()

    def _append(self, lines: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())  # marked delivered only once it is on disk

    async def send(self, deliveries: list[Delivery]) -> list[str | None]:
        lines = [
            json.dumps({**d.body, "idempotency_key": d.idempotency_key}, ensure_ascii=False) + "\n"
            for d in deliveries
        ]
        async with self._lock:
            await asyncio.to_thread(self._append, lines)
        return [None] * len(deliveries)

    async def aclose(self) -> None:
        return None
