"""The pipeline process itself: the planner and the delivery workers of a ``connector serve``
whose receiver runs in its parent (:mod:`connector.pipeline_process` says how the two talk).

Started as ``python -m connector.pipeline_child FD PARENT_PID`` by
:class:`connector.pipeline_process.PipelineProcess`; a module of its own, so that the
receiver's side imports nothing of the pipeline's (and no import runs in a circle).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

from connector.logs import configure_logging, get_logger
from connector.pipeline_process import (
    BUSY,
    BUSY_LEASE_SECONDS,
    METRICS,
    STATUS,
    STOP,
    WAKE,
    frame,
    read_frame,
)
from connector.service import Service

if TYPE_CHECKING:
    from connector.config import Config

log = get_logger("connector.pipeline_process")


async def _child(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    config: Config = await read_frame(reader)
    configure_logging(level=config.server.log_level, json=config.server.log_format == "json")
    service = Service(config, role="pipeline")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C reaches the whole process group: the parent decides when the child stops. A
    # SIGHUP (a reload, or a hangup of the group) is the parent's too: the child holds no
    # webhook token, and a restarted child would otherwise die of the default action.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def commands() -> None:
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                log.warning("pipeline_parent_gone")
                break
            if WAKE in chunk:
                service.wake_processor()
            if BUSY in chunk:
                service.pressure.saturated_elsewhere(BUSY_LEASE_SECONDS)
            if METRICS in chunk:  # from memory: answered at once
                writer.write(frame({"families": list(service.metrics.registry.collect())}))
            if STATUS in chunk:
                # answered in a task of its own: the readiness check waits for the store,
                # and a wake-up read meanwhile must not wait for it
                answer = asyncio.create_task(report())
                answers.add(answer)
                answer.add_done_callback(answers.discard)
            if STOP in chunk:
                break
        stop.set()

    async def report(*, families: bool = False) -> None:
        """The problems the parent asked for (and the families, at start): sent when asked,
        never on a timer, so an idle child sends nothing."""
        message: dict[str, object] = {"problems": await service.readiness()}
        if families:
            message["families"] = list(service.metrics.registry.collect())
        if not writer.is_closing():
            writer.write(frame(message))

    answers: set[asyncio.Task[None]] = set()
    await service.start()
    # as the receiver does once it listens (connector/server.py): what start-up made is kept
    # out of the cyclic collector's walks, objects made from here on are collected as before
    gc.freeze()
    await report(families=True)  # the first status: the parent waits for it at start
    tasks = [asyncio.create_task(commands())]
    try:
        await stop.wait()
    finally:
        await service.stop()
        for task in [*tasks, *answers]:
            task.cancel()
        await asyncio.gather(*tasks, *answers, return_exceptions=True)
        writer.close()


def _die_with_parent(parent: int) -> None:
    """Be killed the moment the parent dies, as if both were one process: a ``kill -9`` of
    ``connector serve`` stops everything at once, and the next start releases the claims."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


PIPELINE_NICENESS = 10


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    _die_with_parent(int(args[1]))
    # Ingestion first: when both processes want the same core, the receiver (Treez waits for
    # its answers) gets about nine tenths of it; the events are durable in the inbox and the
    # pipeline catches up after the burst. On an idle core the niceness costs nothing.
    with contextlib.suppress(OSError):
        os.nice(PIPELINE_NICENESS)
    sock = socket.socket(fileno=int(args[0]))
    os.set_blocking(sock.fileno(), False)
    try:
        import uvloop

        uvloop.run(_child(sock))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_child(sock))


if __name__ == "__main__":
    main()
