"""Who may use the console: one shared token exchanged for a server-side session, a CSRF
token per session, a same-origin check, and a brake on guessing the token.

With one shared token there are no user names: the audit log calls a person by a short hash
of their session id and the address they came from (:func:`who`), which tells sessions apart
without writing the session id (a bearer credential) into the database.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pydantic import SecretStr

SESSION_COOKIE = "console_session"
CSRF_FIELD = "csrf"
# failed sign-ins an address may make before it has to wait; the wait doubles with each
# further failure, up to the cap, and is forgotten after a successful sign-in
FREE_FAILURES = 3
MAX_WAIT_SECONDS = 300.0


@dataclass
class Session:
    id: str
    csrf: str
    client: str
    seen: float
    flash: list[str] = field(default_factory=list)

    @property
    def who(self) -> str:
        return who(self.id, self.client)


def who(session_id: str | None, client: str) -> str:
    """The audit log's name for a person: ``session 1a2b3c4d from 10.0.0.5``."""
    if session_id is None:
        return f"no session from {client}"
    digest = hashlib.sha256(session_id.encode()).hexdigest()[:8]
    return f"session {digest} from {client}"


def token_matches(given: str, expected: SecretStr | str) -> bool:
    """Constant-time: how long the comparison takes tells nothing of the token."""
    secret = expected.get_secret_value() if isinstance(expected, SecretStr) else expected
    return hmac.compare_digest(given.encode(), secret.encode())


class Sessions:
    """Signed-in sessions, kept in this process's memory: a restart signs everyone out, and
    nothing about a session leaves the server but its random id in a cookie."""

    def __init__(self, idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, client: str) -> Session:
        session = Session(
            secrets.token_urlsafe(32), secrets.token_urlsafe(32), client, self._clock()
        )
        with self._lock:
            self._forget_idle()
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of that id, its idle clock restarted; None if unknown or idle."""
        if not session_id:
            return None
        now = self._clock()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if now - session.seen > self.idle_seconds:
                del self._sessions[session_id]
                return None
            session.seen = now
            return session

    def end(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def _forget_idle(self) -> None:
        now = self._clock()
        idle = [k for k, s in self._sessions.items() if now - s.seen > self.idle_seconds]
        for key in idle:
            del self._sessions[key]


class SignInBrake:
    """Failed sign-ins per client address: after :data:`FREE_FAILURES`, the address waits
    before it may try again (1 s, 2 s, 4 s ... up to :data:`MAX_WAIT_SECONDS`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # address: (count, blocked until)
        self._lock = threading.Lock()

    def wait_for(self, client: str) -> float:
        """Seconds ``client`` must wait before its next attempt (0: it may try now)."""
        with self._lock:
            _, until = self._failures.get(client, (0, 0.0))
        return max(0.0, until - self._clock())

    def failed(self, client: str) -> None:
        with self._lock:
            count, _ = self._failures.get(client, (0, 0.0))
            count += 1
            wait = 0.0
            if count > FREE_FAILURES:
                wait = min(MAX_WAIT_SECONDS, 2.0 ** (count - FREE_FAILURES - 1))
            self._failures[client] = (count, self._clock() + wait)
            if len(self._failures) > 10_000:  # a flood from many addresses: keep the newest
                for key in list(self._failures)[:5_000]:
                    del self._failures[key]

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


def same_origin(origin: str | None, referer: str | None, scheme: str, host: str) -> bool:
    """Whether a state-changing request came from one of the console's own pages. Browsers
    send ``Origin`` with a cross-site POST; a request with neither header (a script) is left
    to the CSRF token, which only a page of the console holds."""
    source = origin if origin not in (None, "", "null") else referer
    if origin == "null":
        return False
    if not source:
        return True
    parts = urlsplit(source)
    return parts.scheme == scheme and parts.netloc.lower() == host.lower()
