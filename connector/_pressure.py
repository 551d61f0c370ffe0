"""Ingestion first: background work steps aside while the receiver is saturated.

Receiving, planning and delivering share a machine (one process, or the receiver and the
pipeline process beside it). When webhooks arrive faster than the receiver can answer them,
requests queue up: then planning and delivery rest for ``ratio`` times as long as their last
step took (at ratio 20 they keep about a twentieth of the CPU), because Treez waits for its
answers while the events are already durable in the inbox and the background can catch up
after the burst. A steady stream the receiver keeps up with never counts as saturation, so it
is planned and delivered at full speed.

Saturated means both, over the last window (``window`` seconds or more): webhooks arriving
at ``saturated_rate`` a second or more, and the event loop's own thread busy at least
``saturated_load`` of the time. The window is measured when a webhook arrives (:meth:`enter`)
once it has lasted ``window`` seconds, so an idle receiver has no timer waking it; a
measurement older than two windows (no webhook since) counts as not saturated.

Requests in flight are no measure: a few clients that each wait for their commit keep eight
requests open at a few hundred events a second (resting then halved what the pipeline
delivered, bench/pipeline.py: 454 events/s against 719), while a flood of requests answered
without waiting never has more than one open.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class Pressure:
    def __init__(
        self,
        *,
        saturated_rate: float = 1000.0,
        saturated_load: float = 0.5,
        ratio: float = 20.0,
        max_rest: float = 0.25,
        window: float = 0.1,
    ) -> None:
        self.saturated_rate = saturated_rate
        self.saturated_load = saturated_load
        self.ratio = ratio
        self.max_rest = max_rest
        self.window = window
        self.inflight = 0  # webhook requests being answered right now
        self.rate = 0.0  # webhooks a second over the last window
        self.load = 0.0  # the share of the last window the event loop's thread was on a CPU
        self._arrivals = 0
        self._elsewhere_until = 0.0  # the receiver in another process said it is saturated
        self._measured_at = -float("inf")  # monotonic time of the last measure()
        # the window being measured: its start (monotonic), the loop thread's CPU time and
        # the arrivals then (taken on the event loop's thread, as enter() is called)
        self._window_start = time.monotonic()
        self._window_cpu: float | None = None
        self._window_arrivals = 0

    def enter(self) -> None:
        """A webhook arrives (on the event loop's thread): counted, and the window measured
        if it has lasted long enough."""
        self.inflight += 1
        self._arrivals += 1
        now = time.monotonic()
        if now - self._window_start >= self.window:
            self._roll(now)

    def _roll(self, now: float) -> None:
        cpu = time.thread_time()
        if self._window_cpu is not None:
            self.measure(
                self._arrivals - self._window_arrivals,
                now - self._window_start,
                cpu - self._window_cpu,
            )
        # a first window (its CPU time unknown: the thread's was never read) is not measured
        self._window_start, self._window_cpu, self._window_arrivals = now, cpu, self._arrivals

    def leave(self) -> None:
        self.inflight -= 1

    def saturated_elsewhere(self, seconds: float) -> None:
        """The receiver runs in another process (``connector.pipeline_process``) and is
        saturated: count as busy for the next ``seconds`` (it says so again while it is)."""
        self._elsewhere_until = time.monotonic() + seconds

    @property
    def saturated(self) -> bool:
        """This process's receiver is saturated (see the module's text)."""
        return (
            self.rate >= self.saturated_rate
            and self.load >= self.saturated_load
            and time.monotonic() - self._measured_at < 2 * self.window
        )

    @property
    def busy(self) -> bool:
        """Background work should step aside: the receiver here or in the other process is
        saturated."""
        return self.saturated or (
            self._elsewhere_until > 0.0 and time.monotonic() < self._elsewhere_until
        )

    def measure(self, arrivals: int, elapsed: float, cpu: float) -> None:
        """Take one window's figures: ``arrivals`` webhooks and ``cpu`` seconds of the event
        loop's thread in ``elapsed`` seconds."""
        if elapsed > 0:
            self.rate = arrivals / elapsed
            self.load = min(1.0, cpu / elapsed)
            self._measured_at = time.monotonic()

    async def watch(self, stopping: asyncio.Event, window: float = 0.1) -> None:
        """Measure :attr:`rate` and :attr:`load` over each ``window`` seconds until
        ``stopping``, whether webhooks arrive or not. Runs on the event loop whose load it
        is: it reads the CPU time of the thread it runs on. The service does not run it:
        :meth:`enter` measures as webhooks arrive, and nothing wakes an idle receiver."""
        while not stopping.is_set():
            wall, cpu, arrivals = time.monotonic(), time.thread_time(), self._arrivals
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), window)
            self.measure(
                self._arrivals - arrivals, time.monotonic() - wall, time.thread_time() - cpu
            )

    async def yield_after(self, spent: float) -> None:
        """Rest after a background step that took ``spent`` seconds, if ingestion is saturated."""
        if self.busy and spent > 0:
            await asyncio.sleep(min(self.max_rest, spent * self.ratio))
