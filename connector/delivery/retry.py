"""When to try a failed operation again: a frozen policy, applied through tenacity.

The wait is tenacity's exponential backoff with jitter; the stop is "at least N attempts and at
least T seconds since the first" (both must hold before an operation is dead-lettered). A
``Retry-After`` from the destination wins when it asks for longer, up to ``max_seconds``: a
year-long one (or a date in 9999) would otherwise park that customer's queue, the opt-out
behind it included, and never reach the dead-letter horizon. The delay is not slept in
process: it becomes the operation's next attempt time in the outbox, so a retry's wait holds up
only that customer and survives a restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

import tenacity


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_seconds: float = 1.0
    max_seconds: float = 600.0
    jitter_seconds: float = 1.0
    min_attempts: int = 8
    min_elapsed_seconds: float = 1800.0

    def _state(self, attempts: int, elapsed: float) -> tenacity.RetryCallState:
        state = tenacity.RetryCallState(
            retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={}
        )
        state.attempt_number = attempts
        state.start_time = 0.0
        state.outcome_timestamp = elapsed
        return state

    def next_delay(self, attempts: int, elapsed: float, retry_after: float | None) -> float | None:
        """Seconds until the next attempt after ``attempts`` failures, or None to give up.

        ``elapsed``: seconds since the first attempt. ``retry_after``: what the destination
        asked for, if anything (never retried earlier than that, nor later than
        ``max_seconds``: the wait then counts toward ``min_elapsed_seconds`` like any other).
        """
        state = self._state(attempts, elapsed)
        stop = tenacity.stop_after_attempt(self.min_attempts) & tenacity.stop_after_delay(
            self.min_elapsed_seconds
        )
        if stop(state):
            return None
        wait = tenacity.wait_exponential_jitter(
            multiplier=self.initial_seconds, max=self.max_seconds, jitter=self.jitter_seconds
        )
        delay = float(wait(state))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_seconds))
        return delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now``: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment is None:
            return None
        if moment.tzinfo is None:  # the asctime form: an HTTP date is always GMT
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp() - now
    if not math.isfinite(seconds):  # "inf", "nan", 1e400
        return None
    return max(0.0, seconds)
