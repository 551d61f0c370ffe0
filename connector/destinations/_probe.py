"""What a preflight (``connector check --online``) learns of one destination or source: the
answer of a harmless authenticated read, told in four words.

A probe sends credentials and nothing a customer owns; it is made once, unpaced and never
retried, within :data:`PROBE_TIMEOUT_SECONDS`. Its text never holds a secret: statuses,
exception class names and the operating system's reason for a failed connection only.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Literal

import httpx

PROBE_TIMEOUT_SECONDS = 5.0

Outcome = Literal["reachable", "refused", "unreachable", "not_checked"]


@dataclass(frozen=True, slots=True)
class Probe:
    outcome: Outcome
    detail: str = ""

    @property
    def failed(self) -> bool:
        """Whether the preflight fails for it (``not checked`` is no failure)."""
        return self.outcome in ("refused", "unreachable")

    def __str__(self) -> str:
        words = {
            "reachable": "reachable",
            "refused": "auth refused",
            "unreachable": "unreachable",
            "not_checked": "not checked",
        }[self.outcome]
        return f"{words} ({self.detail})" if self.detail else words


def not_checked(why: str) -> Probe:
    return Probe("not_checked", why)


def answered(response: httpx.Response, notes: dict[int, str] | None = None) -> Probe:
    """A 2xx is reachable; 401 and 403 are refused credentials; a status in ``notes`` is
    reachable with that note (a 404 that says something about the account, not the key);
    any other status is a failure named by its number."""
    status = response.status_code
    if 200 <= status < 300:
        return Probe("reachable")
    if status in (401, 403):
        return Probe("refused", f"HTTP {status}")
    if notes and status in notes:
        return Probe("reachable", notes[status])
    return Probe("unreachable", f"HTTP {status} from {response.url.host}")


def failed_to_connect(exc: Exception, timeout: float = PROBE_TIMEOUT_SECONDS) -> Probe:
    """A request that got no answer: a timeout, or why the connection failed."""
    if isinstance(exc, httpx.TimeoutException):
        return Probe("unreachable", f"no answer within {timeout:g} s")
    reason = _os_reason(exc)
    return Probe("unreachable", reason or exc.__class__.__name__)


def _os_reason(exc: BaseException) -> str | None:
    """The operating system's word for a failed connection ("Connection refused", a name
    that does not resolve), found under the client library's own wrapping."""
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None:
            return None
        if isinstance(cause, socket.gaierror):
            return f"host not found: {cause.strerror}"
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    return None
