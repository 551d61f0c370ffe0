"""A clock the tests move by hand, for the fakes' rate limits, token expiry and jobs."""

from __future__ import annotations


class HandClock:
    """Seconds, as ``time.monotonic`` gives them, moved only by the test. The default start
    is on a minute boundary, so fixed one-minute windows align with it."""

    def __init__(self, now: float = 1200.0) -> None:
        self.start = now
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, seconds: float) -> None:
        """``seconds`` after the start: exact comparisons at window and expiry edges."""
        self.now = self.start + seconds
