"""How ``connector serve`` runs uvicorn, in one place (the benchmarks use the same settings)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from connector.config import Config


class ConnectorServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM or Ctrl-C ends in exit status 0.

    uvicorn (0.30 and later) shuts down gracefully and then raises the signal again, which
    kills the process with status -15: a supervisor would count every clean stop as a crash.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()  # handled: the shutdown was graceful


def uvicorn_config(
    app: Any, config: Config, *, host: str | None, port: int | None
) -> uvicorn.Config:
    server = config.server
    return uvicorn.Config(
        app,
        host=host or server.host,
        port=server.port if port is None else port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,  # connector.logs owns logging
        access_log=False,  # the receiver logs one line per request itself
        timeout_graceful_shutdown=max(1, int(server.shutdown_grace_seconds)),
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for uvicorn. IPPROTO_TCP matters: asyncio turns Nagle off only for
    sockets whose proto is TCP, and without that every response waits ~40 ms for an ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
