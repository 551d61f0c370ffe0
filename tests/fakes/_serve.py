"""What every fake needs to be served by uvicorn: a listening socket, a lifespan answer, the
server itself, and the process mode that prints ``LISTENING <port>`` and stops on a signal."""

from __future__ import annotations

import asyncio
import importlib.util
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

DEFAULT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def bind_socket(host: str = "127.0.0.1", port: int = 0, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket created with ``IPPROTO_TCP`` and ``TCP_NODELAY`` set, so that
    asyncio disables Nagle on accepted connections (otherwise each answer waits ~40 ms)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge an ASGI lifespan's startup and shutdown; a fake has nothing to set up."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def make_server(app: Any, loop: str = DEFAULT_LOOP, *, quiet: bool) -> uvicorn.Server:
    """A uvicorn server for ``app``; ``quiet`` (in-process use) leaves the host's logging
    configuration alone."""
    config = uvicorn.Config(
        app,
        loop=loop,
        http="httptools",
        ws="none",
        lifespan="off",
        log_level="warning",
        access_log=False,
        log_config=None if quiet else LOGGING_CONFIG,
        timeout_graceful_shutdown=2,
    )
    return uvicorn.Server(config)


@contextmanager
def serve_in_thread(
    app: Any, *, host: str, port: int, name: str, start_timeout: float = 10.0
) -> Iterator[int]:
    """Serve ``app`` from a background thread (in-process use); yields the port it listens
    on, and stops the server (forcing it after 5 s) when the block ends."""
    sock = bind_socket(host, port)
    server = make_server(app, DEFAULT_LOOP, quiet=True)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.002)
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(5.0)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5.0)
        sock.close()


def listening_port(process: subprocess.Popen[str], timeout: float = 20.0) -> int:
    """The other side of process mode: wait for the fake's ``LISTENING <port>`` line."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "no LISTENING line"
    line = process.stdout.readline()
    assert line.startswith("LISTENING "), line
    return int(line.split()[1])


def serve_until_signalled(server: uvicorn.Server, sock: socket.socket) -> int:
    """Process mode: serve on ``sock``, print ``LISTENING <port>`` once accepting, stop on
    SIGTERM or SIGINT and return 0."""
    port = sock.getsockname()[1]

    def stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    # uvicorn installs its own handlers while serving and, once stopped, re-raises the signal
    # it caught: with these in place that re-raise is harmless and the exit code stays 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)

    async def serve() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.005)
        if server.started:
            print(f"LISTENING {port}", flush=True)
        await task

    try:
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(serve())
    finally:
        sock.close()
    return 0


async def http_body(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> bytes | None:
    """The prelude every fake shares: answer a lifespan, ignore what is not HTTP, read the
    whole body. None when there is no request to answer (a lifespan, a disconnect)."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return None
    if scope["type"] != "http":
        return None
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
