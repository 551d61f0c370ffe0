"""Client-side pacing: never more than N requests in any sliding window.

A token bucket lets a full burst through and then refills, so two bursts can meet in one
window; vendors that count per sliding window (Treez, Klaviyo's burst limits) answer 429 to
that. This limiter keeps the times of recent requests and waits until the oldest leaves the
window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

from connector.config_base import Rate

_IN_FLIGHT_POLL = 0.005  # seconds between looks while the window waits on an answer


class _Sent:
    """One request let go: when, and whether its answer is still awaited."""

    __slots__ = ("at", "flying")

    def __init__(self, at: float, flying: bool) -> None:
        self.at, self.flying = at, flying


class SlidingWindowLimiter:
    def __init__(self, rates: Sequence[Rate], clock: Callable[[], float] = time.monotonic):
        self._rates = [(r.count, r.per_seconds) for r in rates]
        # a slot's request counts as now until its answer restamps it
        self._sent: deque[_Sent] = deque()
        self._horizon = max((per for _, per in self._rates), default=0.0)
        self._lock = asyncio.Lock()
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return bool(self._rates)

    def _wait_needed(self, now: float) -> float:
        while self._sent and not self._sent[0].flying and self._sent[0].at <= now - self._horizon:
            self._sent.popleft()
        # (time, in flight), oldest first; one in flight counts as now
        stamps = sorted((now, True) if s.flying else (s.at, False) for s in self._sent)
        wait = 0.0
        for count, per in self._rates:
            in_window = [stamp for stamp in stamps if stamp[0] > now - per]
            if len(in_window) >= count:
                # the request that must leave the window before one more may go; one still
                # in flight: look again shortly, its answer will place it
                at, flying = in_window[-count]
                wait = max(wait, _IN_FLIGHT_POLL if flying else at + per - now)
        return wait

    def restamp(self) -> None:
        """Move the latest request's time to now: for sequential callers, once the answer is
        in, the request has surely arrived, whatever connection setup delayed it."""
        if self._sent:
            self._sent[-1].at = max(self._sent[-1].at, self._clock())

    async def acquire(self) -> None:
        await self._take(in_flight=False)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """A request from its start to its answer, for concurrent callers: the window counts
        it from its answer (see the module docstring)."""
        entry = await self._take(in_flight=True)
        try:
            yield
        finally:
            if entry is not None:
                entry.at, entry.flying = max(entry.at, self._clock()), False

    async def _take(self, *, in_flight: bool) -> _Sent | None:
        if not self._rates:
            return None
        loop = asyncio.get_running_loop()
        if self._lock_loop is not loop:  # shared across clients: maybe another loop's lock
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            while True:
                now = self._clock()
                wait = self._wait_needed(now)
                if wait <= 0:
                    entry = _Sent(now, in_flight)
                    self._sent.append(entry)
                    return entry
                await asyncio.sleep(wait)
