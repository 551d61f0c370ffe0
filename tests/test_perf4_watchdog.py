"""The store watchdog (store/_engine.py) sleeps while no call is armed, and still severs a
call that outlives its deadline after a long sleep, and a second one after that."""

from __future__ import annotations

import socket
import time

from connector.store._engine import _Watchdog


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()


def _severed(peer: socket.socket, within: float) -> bool:
    peer.settimeout(within)
    try:
        return peer.recv(1) == b""  # the other end shut down: end of file
    except TimeoutError:
        return False


def test_an_idle_watchdog_waits_and_still_severs_late_calls() -> None:
    watchdog = _Watchdog()
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    kept, kept_peer = socket.socketpair()
    try:
        watchdog.arm(_Conn(kept), 60)  # starts the thread
        watchdog._armed.clear()
        time.sleep(0.3)  # nothing armed: the thread is waiting, not looking
        assert watchdog._thread is not None
        assert watchdog._thread.is_alive()
        assert not watchdog._busy.is_set()
        watchdog.arm(_Conn(first), 0.05)
        assert _severed(first_peer, 5)
        time.sleep(0.3)
        assert not watchdog._busy.is_set()
        conn = _Conn(second)
        watchdog.arm(conn, 0.05)
        assert _severed(second_peer, 5)
        watchdog.arm(_Conn(kept), 0.05)
        watchdog._armed.clear()  # disarmed in time: never severed
        assert not _severed(kept_peer, 0.5)
    finally:
        for sock in (first, first_peer, second, second_peer, kept, kept_peer):
            sock.close()


def test_a_forked_watchdog_starts_a_thread_of_its_own() -> None:
    watchdog = _Watchdog()
    sock, peer = socket.socketpair()
    try:
        watchdog.arm(_Conn(sock), 60)
        watchdog.forked()
        assert watchdog._thread is None
        assert watchdog._armed == {}
        watchdog.arm(_Conn(sock), 0.05)
        assert watchdog._thread is not None
        assert _severed(peer, 5)
    finally:
        sock.close()
        peer.close()
