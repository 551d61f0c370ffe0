"""How ``connector serve`` runs uvicorn, in one place (the benchmarks use the same settings):
the webhook listener and, when the console is on, the console's own listener beside it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
from collections.abc import Generator
from email.utils import formatdate
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from connector.config import Config, ConsoleConfig
from connector.http_protocol import ClientLimits, protocol_class
from connector.logs import get_logger
from connector.receiver import serving_app

log = get_logger("connector.server")


# how often a server wakes while it waits to stop, when uvicorn has something due each second
# (a request limit to check, a notify callback); otherwise it sleeps until told to stop
TICK_SECONDS = 1.0


class DatedState(ServerState):
    """uvicorn's state shared by a server's connections, its default headers (the Date
    header and the configured ones) made when read in a new second rather than by a timer
    each second: the Date header is read as each request's head completes, so an idle
    server has nothing to refresh. Within a second the same list is handed out (the answer
    heads of connector.http_protocol are kept per list)."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._config = config
        self._second = -1
        self._headers: list[tuple[bytes, bytes]] = []
        super().__init__()
        self._second = -1  # the first read makes them (ServerState's own [] is no Date)

    @property
    def default_headers(self) -> list[tuple[bytes, bytes]]:
        now = time.time()
        if int(now) != self._second:
            self._second = int(now)
            config = self._config
            # as uvicorn's Server.on_tick makes them
            date = [(b"date", formatdate(now, usegmt=True).encode())] if config.date_header else []
            self._headers = date + config.encoded_headers
        return self._headers

    @default_headers.setter
    def default_headers(self, value: list[tuple[bytes, bytes]]) -> None:
        # uvicorn's on_tick sets them (the first tick, the last one): kept for this second
        self._second = int(time.time())
        self._headers = value


class QuietServer(uvicorn.Server):
    """uvicorn's server, asleep while it waits to stop instead of waking ten times a second.

    uvicorn's main loop sleeps 0.1 s at a time to look at ``should_exit``, refreshing its
    Date header every tenth look: an idle receiver woke ten times a second for nothing. Here
    it waits for ``should_exit`` itself (set by a signal or another task: the setter wakes
    the loop), and the Date header is made when a request reads it in a new second
    (:class:`DatedState`). Only a server with a request limit or a notify callback still
    wakes each second, for uvicorn's ``on_tick`` to check them.
    """

    _exit_now: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.server_state = DatedState(config)

    @property
    def should_exit(self) -> bool:
        return bool(self.__dict__.get("_should_exit", False))

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self.__dict__["_should_exit"] = value
        loop, event = self._loop, self._exit_now
        if value and loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(event.set)

    async def main_loop(self) -> None:
        self._loop, self._exit_now = asyncio.get_running_loop(), asyncio.Event()
        config = self.config
        ticking = config.limit_max_requests is not None or config.callback_notify is not None
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            if self.should_exit:  # set before the event existed
                self._exit_now.set()
            if ticking:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._exit_now.wait(), TICK_SECONDS)
            else:
                await self._exit_now.wait()
            self._exit_now.clear()  # set again by the next should_exit = True
            # a multiple of ten: uvicorn refreshes the Date header at each of them
            counter = (counter + 10) % 864000
            should_exit = await self.on_tick(counter)


class ConnectorServer(QuietServer):
    """uvicorn's server, except that a SIGTERM or Ctrl-C ends in exit status 0.

    uvicorn (0.30 and later) shuts down gracefully and then raises the signal again, which
    kills the process with status -15: a supervisor would count every clean stop as a crash.
    """

    companions: tuple[uvicorn.Server, ...] = ()  # listeners stopped with this one

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What the process holds once started (modules, the app, the configuration, the
        # store's engine: over a hundred thousand objects) is kept out of the cyclic garbage
        # collector's reach: each full collection walked all of it while requests waited.
        # Objects made from here on are collected as before.
        gc.freeze()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()  # handled: the shutdown was graceful

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        for companion in self.companions:
            companion.should_exit = True
        super().handle_exit(sig, frame)


class CompanionServer(QuietServer):
    """A second listener of the process (the console). It takes no signals: the webhook
    server's handler stops it (one process-wide handler per signal; a second server's would
    replace the first's)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def console_config(app: Any, console: ConsoleConfig, config: Config) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=console.host,
        port=console.port,
        loop="uvloop",
        # the webhook listener's limits on clients (README, "Limits on clients"): a console
        # on a non-loopback address meets the same slow and hostile clients
        http=protocol_class(ClientLimits.of(config.server)),
        ws="none",
        timeout_keep_alive=config.server.keep_alive_seconds,
        limit_concurrency=config.server.max_connections,
        limit_max_requests=None,
        lifespan="off",  # the webhook server's lifespan starts and stops the store it reads
        log_config=None,
        access_log=False,
        # the client's address is the socket's: never X-Forwarded-For (uvicorn trusts it
        # from 127.0.0.1 by default, and the console listens there: any local client could
        # name itself anew for each guess past the sign-in brake, or forge the audit's
        # address)
        proxy_headers=False,
        timeout_graceful_shutdown=max(1, int(config.server.shutdown_grace_seconds)),
    )


def run_with_companion(
    main: ConnectorServer, companion: CompanionServer, companion_socket: socket.socket
) -> None:
    """Serve both in one event loop until a signal stops the webhook server; the companion
    stops first, so the store it reads is still open while its last requests finish."""
    main.companions = (companion,)

    async def both() -> None:
        beside = asyncio.create_task(companion.serve(sockets=[companion_socket]))
        try:
            await main.serve()
        finally:
            companion.should_exit = True
            try:
                await beside
            except Exception as exc:  # the console failing never hides the webhook's end
                log.error("console_failed", error=exc)

    with asyncio.Runner(loop_factory=main.config.get_loop_factory()) as runner:
        runner.run(both())


def uvicorn_config(
    app: Any, config: Config, *, host: str | None, port: int | None
) -> uvicorn.Config:
    server = config.server
    return uvicorn.Config(
        serving_app(app),  # the webhook's fast path in front of the app's own call
        host=host or server.host,
        port=server.port if port is None else port,
        loop="uvloop",
        # httptools, with limits on what one client may hold and JSON answers for what it
        # refuses (connector/http_protocol.py; README, "Limits on clients")
        http=protocol_class(ClientLimits.of(server)),
        ws="none",  # no WebSocket route: an upgrade is never taken
        lifespan="on",
        log_config=None,  # connector.logs owns logging
        access_log=False,  # the receiver logs one line per request itself
        timeout_keep_alive=server.keep_alive_seconds,
        # past it (connections, idle ones included, or requests in hand): a JSON 503
        limit_concurrency=server.max_connections,
        # never recycled by request count: memory per connection is bounded by the limits
        limit_max_requests=None,
        # the client's address is the socket's, as on the console's listener: nothing here
        # reads it (no log line, no route), and uvicorn's X-Forwarded-For middleware cost
        # every request a layer of its own (its call, and its frame resumed with each await)
        proxy_headers=False,
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
