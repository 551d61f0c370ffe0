"""The ``jsonl`` destination: each operation appended to a file as one JSON line."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Literal

from connector.config_base import DestinationConfig, FilePath, Rate
from connector.delivery.base import Capabilities, Delivery, DestinationType, Result, Sent
from connector.destinations._probe import Probe


class JsonlDestination(DestinationConfig):
    """A local sink: one JSON line per operation appended to ``path``."""

    type: Literal["jsonl"]
    path: FilePath


def _capabilities(config: JsonlDestination) -> Capabilities:
    return Capabilities(batch_size=config.batch_size, native_merge=True)


class JsonlSink:
    """Contract 4's bodies, one per line: every operation kind, a merge included."""

    kind = "jsonl"

    def __init__(self, config: JsonlDestination) -> None:
        self.name = config.name
        self.capabilities = _capabilities(config)
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

    async def probe(self) -> Probe:
        """Local: whether the file can be appended to (or made), without writing to it."""
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent  # the first existing folder: the rest is made at once
        if self.path.exists():
            ok = self.path.is_file() and os.access(self.path, os.W_OK)
        else:
            ok = folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
        if ok:
            return Probe("reachable", "local file, writable")
        return Probe("unreachable", f"{self.path} cannot be written")

    async def aclose(self) -> None:
        return None


DESTINATION = DestinationType(
    tag="jsonl",
    config=JsonlDestination,
    build=JsonlSink,
    capabilities=_capabilities,
    where=lambda config: str(config.path),
    summary="a local file, one JSON line per operation (development, audits)",
)
