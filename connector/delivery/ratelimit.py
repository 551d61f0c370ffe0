"""Client-side pacing: never more than N requests in any sliding window.

A token bucket lets a full burst through and then refills, so two bursts can meet in one
window; vendors that count per sliding window (Treez, Klaviyo's burst limits) answer 429 to
that. This limiter keeps the times of recent requests and waits until the oldest leaves the
window.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence

from connector.config import Rate


class SlidingWindowLimiter:
    def __init__(self, rates: Sequence[Rate], clock: Callable[[], float] = time.monotonic):
        self._rates = [(r.count, r.per_seconds) for r in rates]
        self._sent: deque[float] = deque()
        self._horizon = max((per for _, per in self._rates), default=0.0)
        self._lock = asyncio.Lock()
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return bool(self._rates)

    def _wait_needed(self, now: float) -> float:
        while self._sent and self._sent[0] <= now - self._horizon:
            self._sent.popleft()
        wait = 0.0
        for count, per in self._rates:
            in_window = [t for t in self._sent if t > now - per]
            if len(in_window) >= count:
                # the request that must leave the window before one more may go
                wait = max(wait, in_window[-count] + per - now)
        return wait

    def restamp(self) -> None:
        """Move the latest request's time to now: for sequential callers, once the answer is
        in, the request has surely arrived, whatever connection setup delayed it."""
        if self._sent:
            self._sent[-1] = max(self._sent[-1], self._clock())

    async def acquire(self) -> None:
        if not self._rates:
            return
        loop = asyncio.get_running_loop()
        if self._lock_loop is not loop:  # shared across clients: maybe another loop's lock
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            while True:
                now = self._clock()
                wait = self._wait_needed(now)
                if wait <= 0:
                    self._sent.append(now)
                    return
                await asyncio.sleep(wait)
