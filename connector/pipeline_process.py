"""The planner and the delivery workers in a process of their own, beside the receiver.

One Python process is bound by its interpreter lock: receiving, planning and delivering in
one process share a single core, about 3 ms of Python per event. ``connector serve`` therefore
runs the receiver in its own process and starts :mod:`connector.pipeline_child` as a child
process for the rest (``server.pipeline_process``, on by default), so that each half gets a
core. Both open the same store: the receiver commits events to the inbox, the child plans and
delivers them, and the claims in the store keep each operation with one process.

The two talk over a socket pair (the child's end is passed as a file descriptor):

* parent to child: first one frame holding the configuration, then single bytes: ``w``
  (events were committed: plan now), ``b`` (the receiver is saturated: planning and delivery
  step aside for a moment, as they do in one process), ``q`` (send your readiness problems),
  ``m`` (send your metric families) and ``s`` (stop: finish or release the work in
  hand).
  On Linux the child is killed with its parent (``PR_SET_PDEATHSIG``), so ``kill -9`` of
  ``connector serve`` ends both at once, as for one process; elsewhere, end of file on the
  socket tells the child that its parent is gone, and it stops.
* child to parent: a frame at start with the child's readiness problems and its metric
  families, then one in answer to each ``q`` (the problems) or ``m`` (the families, which the
  receiver's ``/metrics`` serves with its own; answered at once, without the store). The
  parent asks when it needs them (a ``/readyz``, a ``/metrics``), so an idle pair of
  processes sends nothing; a child that has answered nothing for
  :data:`STATUS_STALE_SECONDS` since it was asked is "not reporting".

A frame is a 4-byte big-endian length and a pickle: both ends are this package, started by
each other, so nothing untrusted is ever unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from connector.logs import get_logger

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from connector.config import Config

log = get_logger("connector.pipeline_process")

STATUS_STALE_SECONDS = 5.0  # a child silent this long since it was asked is not reporting
METRICS_WAIT_SECONDS = 2.0  # /metrics waits this long for the child's families, then serves
# the last ones it has
START_WAIT_SECONDS = 30.0
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
WAKE, STOP, BUSY, STATUS, METRICS = b"w", b"s", b"b", b"q", b"m"
# the receiver says "saturated" at most this often; the child counts as busy for BUSY_LEASE
BUSY_EVERY_SECONDS, BUSY_LEASE_SECONDS = 0.05, 0.25
_LENGTH = struct.Struct(">I")


def frame(payload: object) -> bytes:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    header = await reader.readexactly(_LENGTH.size)
    (length,) = _LENGTH.unpack(header)
    return pickle.loads(await reader.readexactly(length))  # noqa: S301 (our own child)


@dataclass
class ChildStatus:
    problems: list[str] = field(default_factory=lambda: ["pipeline process starting"])
    families: list[Metric] = field(default_factory=list)
    at: float = 0.0  # monotonic time the problems came
    families_at: float = 0.0  # and the families


class PipelineProcess:
    """The parent's handle on the child: starts it, wakes it, restarts it if it dies, stops it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.status = ChildStatus()
        self.restarts = 0
        self.pid: int | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._first_status = asyncio.Event()
        self._stopping = False
        self._process: asyncio.subprocess.Process | None = None
        self._busy_sent = 0.0
        self._arrived = asyncio.Event()  # a status came (set by each, cleared by waiters)
        # when the child was first asked something it has not answered (None: it answered)
        self._unanswered_since: float | None = None

    # -- called by the receiver's service -------------------------------------------------

    def wake(self) -> None:
        """Tell the child that events were committed (never blocks: the byte is buffered)."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(WAKE)

    def saturated(self) -> None:
        """Tell the child that the receiver is saturated: planning and delivery step aside
        (:mod:`connector._pressure`) for the next :data:`BUSY_LEASE_SECONDS`. Called on every
        saturated request; sends a byte at most every :data:`BUSY_EVERY_SECONDS`."""
        now = time.monotonic()
        if now - self._busy_sent < BUSY_EVERY_SECONDS:
            return
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(BUSY)
            self._busy_sent = now

    async def wait_started(self, timeout: float = START_WAIT_SECONDS) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first_status.wait(), timeout)
        return self._first_status.is_set()

    async def refresh(
        self, *, families: bool = False, timeout: float = STATUS_STALE_SECONDS
    ) -> bool:
        """Ask the child for its problems (or its metric families, ``families``) and wait up
        to ``timeout`` for the answer; whether it came. Questions asked together share the
        answers: each waits for the first answer of its kind that came after it asked."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        asked = time.monotonic()
        writer.write(METRICS if families else STATUS)

        def answered() -> bool:
            return (self.status.families_at if families else self.status.at) >= asked

        deadline = asked + timeout
        while not answered():
            left = deadline - time.monotonic()
            if left <= 0 or self._writer is not writer:  # out of time, or the child went
                break
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        found = answered()
        if not found and self._writer is writer and self._unanswered_since is None:
            self._unanswered_since = asked
        return found

    def problems(self) -> list[str]:
        """The child's problems as its last answer said them (:meth:`refresh` asks)."""
        if self._process is None or self._process.returncode is not None:
            return ["pipeline process not running"]
        silent = self._unanswered_since
        if silent is not None and time.monotonic() - silent >= STATUS_STALE_SECONDS:
            return ["pipeline process not reporting"]
        return list(self.status.problems)

    async def run(self, stopping: asyncio.Event) -> None:
        """Keep a child running until ``stopping``; a child that dies is started again."""
        failures = 0
        while not stopping.is_set():
            started = time.monotonic()
            code = await self._run_once(stopping)
            if stopping.is_set() or self._stopping:
                return
            self.restarts += 1
            failures = 0 if time.monotonic() - started > 60 else failures + 1
            delay = RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS) - 1)]
            log.error("pipeline_process_exited", exit_code=code, retry_in_s=delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)

    async def stop(self, grace: float) -> None:
        """Ask the child to finish or release its work; kill it if it outlasts the grace."""
        self._stopping = True
        process = self._process
        if process is None or process.returncode is not None:
            return
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(STOP)
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()
        try:
            await asyncio.wait_for(process.wait(), grace + 5.0)
        except TimeoutError:
            log.error("pipeline_process_killed", reason="did not stop within the grace period")
            process.kill()
            await process.wait()

    # -- internals --------------------------------------------------------------------------

    async def _run_once(self, stopping: asyncio.Event) -> int | None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "connector.pipeline_child",
                str(theirs.fileno()),
                str(os.getpid()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=False,
            )
        finally:
            theirs.close()
        self._process = process
        self.pid = process.pid
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self._writer = writer
        writer.write(frame(self.config))
        statuses = asyncio.create_task(self._read_statuses(reader))
        try:
            return await process.wait()
        finally:
            statuses.cancel()
            await asyncio.gather(statuses, return_exceptions=True)
            self._writer = None
            writer.close()
            self.status = ChildStatus(problems=["pipeline process not running"])
            self._unanswered_since = None
            self._arrived.set()  # whoever waits for an answer of this child: none will come

    async def _read_statuses(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                message = await read_frame(reader)
                now, last = time.monotonic(), self.status
                problems, families = message.get("problems"), message.get("families")
                self.status = ChildStatus(
                    problems=last.problems if problems is None else list(problems),
                    families=last.families if families is None else list(families),
                    at=last.at if problems is None else now,
                    families_at=last.families_at if families is None else now,
                )
                self._unanswered_since = None
                self._arrived.set()
                self._first_status.set()
