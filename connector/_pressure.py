"""Ingestion first: background work yields while webhooks are arriving.

Receiving, planning and delivering share one process (and one interpreter lock). Under a
burst of webhooks, planning and delivery would take CPU from the receiver, whose answers
Treez waits for; the events are durable in the inbox, so the background can catch up after.
While requests keep arriving, each background loop therefore rests for ``ratio`` times as
long as its last step took (at ratio 3 it gets at most a quarter of the CPU); when the
receiver is idle it runs flat out.
"""

from __future__ import annotations

import asyncio
import time


class Pressure:
    def __init__(self, *, window: float = 0.05, ratio: float = 1.0, max_rest: float = 0.25):
        self.window = window
        self.ratio = ratio
        self.max_rest = max_rest
        self._last = 0.0

    def touch(self) -> None:
        """A request arrived."""
        self._last = time.monotonic()

    @property
    def busy(self) -> bool:
        return time.monotonic() - self._last < self.window

    async def yield_after(self, spent: float) -> None:
        """Rest after a background step that took ``spent`` seconds, if ingestion is busy."""
        if self.busy and spent > 0:
            await asyncio.sleep(min(self.max_rest, spent * self.ratio))
