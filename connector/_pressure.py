"""Ingestion first: background work steps aside while the receiver is saturated.

Receiving, planning and delivering share one process (and one interpreter lock). When
webhooks arrive faster than the process can answer them, requests queue up: then planning
and delivery rest for ``ratio`` times as long as their last step took (at ratio 20 they keep
about a twentieth of the CPU), because Treez waits for its answers while the events are already
durable in the inbox and the background can catch up after the burst. A steady stream the
process keeps up with never counts as saturation, so it is planned and delivered at full
speed.
"""

from __future__ import annotations

import asyncio


class Pressure:
    def __init__(self, *, saturated_at: int = 8, ratio: float = 20.0, max_rest: float = 0.25):
        self.saturated_at = saturated_at
        self.ratio = ratio
        self.max_rest = max_rest
        self.inflight = 0  # webhook requests being answered right now

    def enter(self) -> None:
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1

    @property
    def busy(self) -> bool:
        return self.inflight >= self.saturated_at

    async def yield_after(self, spent: float) -> None:
        """Rest after a background step that took ``spent`` seconds, if ingestion is saturated."""
        if self.busy and spent > 0:
            await asyncio.sleep(min(self.max_rest, spent * self.ratio))
