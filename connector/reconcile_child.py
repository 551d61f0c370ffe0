"""The planner of ``connector reconcile`` in a process of its own.

In one process, pulling, planning and delivering share one interpreter lock, and planning
takes more of it than the other two together: the pull waited for it. So the command, unless
``--no-wait`` or ``--dry-run``, plans in a child (as ``connector serve`` runs its pipeline
beside its receiver, :mod:`connector.pipeline_process`), and pulls, commits pages and
delivers in the parent, which keeps the claims (its workers, its heartbeat). Both open the same
store: the inbox and the outbox are the hand-over, durable, so a child that dies loses
nothing (``serve`` or the next run plans what it left).

The child is forked, not started afresh: it has everything imported already (no second
interpreter start while the run pulls) and shares nothing the parent opened, because the fork
comes first, before the parent opens its store or starts a thread.

The two talk over a socket pair (frames as :mod:`connector.pipeline_process` makes them):

* parent to child: single bytes, ``w`` (the parent's store is open, the first time; then a
  page was committed: plan), ``f`` (the pages are all in: plan what is pending at once, and
  from now on without waiting for more) and ``s`` (stop); end of file (the parent is gone) stops it
  too, and on Linux the child is killed with its parent (``PR_SET_PDEATHSIG``), as one
  process would be;
* child to parent: frames, ``{"touched": [(dispensary, destination), ...]}`` after a batch
  enqueued operations (the parent wakes those workers), ``{"planned": True}`` when all that
  was pending is planned (the run's end waits for it), ``{"error": exception}`` when
  planning failed (the run fails at its next page, as it does in one process) or the child
  could not start.

Ctrl-C reaches both processes: the child ignores it, and the parent stops it as it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Protocol

from connector.errors import ConnectorError
from connector.logs import get_logger
from connector.pipeline import Deployment
from connector.pipeline_process import STOP, WAKE, frame, read_frame
from connector.store import AsyncStore, open_store

if TYPE_CHECKING:
    from connector.config import Config

log = get_logger("connector.reconcile_child")

STOP_MARGIN_SECONDS = 5.0  # beyond the shutdown grace, then the child is killed
# as serve's pipeline process (connector/service.py): the event loop answering the parent
# gets the interpreter lock back from the planning thread within half a millisecond
SWITCH_INTERVAL_SECONDS = 0.0005

Touched = Callable[[Iterable[tuple[str, str]]], None]
FLUSH = b"f"


class PlanningProcessError(ConnectorError):
    """The planning process failed or ended before the run's events were planned."""


class Planner(Protocol):
    """What the child runs (``runner._Planner``): woken, it plans what is pending and says
    which destinations it fed; it stops at its first failure, kept in ``error``."""

    lane: AsyncStore
    wake: asyncio.Event
    error: Exception | None

    def hurry_up(self) -> None: ...

    async def run(self, stopping: asyncio.Event) -> None: ...


PlannerFactory = Callable[[AsyncStore, Deployment, Touched, Callable[[], None]], Planner]


class PlanningProcess:
    """The parent's handle: :meth:`start` (forks: call it first), :meth:`connect` (in the
    event loop), :meth:`plan` (the reconciler's ``plan``), :meth:`check`, :meth:`stop`.
    ``touched`` is called with the destinations each batch fed."""

    def __init__(self, config: Config, planner: PlannerFactory, touched: Touched) -> None:
        self.config = config
        self._planner = planner
        self._touched = touched
        self._process: BaseProcess | None = None
        self._socket: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._stopping = False
        self._planned = asyncio.Event()
        self.error: Exception | None = None

    def start(self) -> None:
        """Fork the child. Before this process opens its store or starts a thread: a fork
        copies only the thread that makes it, and nothing opened here may be used twice."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        context = multiprocessing.get_context("fork")
        process = context.Process(
            target=_main,
            args=(theirs, ours, os.getpid(), self.config, self._planner),
            name="connector-reconcile-planner",
            daemon=True,  # an interpreter that exits early ends it too
        )
        try:
            process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._process, self._socket = process, ours

    async def connect(self) -> None:
        """Once this process has opened the store (and brought its schema up to date: two
        processes migrating one fresh SQLite file at once find it locked), let the child open
        it too, and start reading the child's frames."""
        assert self._socket is not None
        reader, self._writer = await asyncio.open_unix_connection(sock=self._socket)
        self._reading = asyncio.create_task(self._read(reader))
        self._writer.write(WAKE)

    async def plan(self) -> None:
        """Wake the child's planner; raise what stopped the child, if anything did."""
        self.check()
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(WAKE)

    async def settle(self, seconds: float) -> None:
        """The reconciler's ``settle``: the child plans what is pending at once, from now on
        without lingering for pages; wait up to ``seconds`` for it to say it has."""
        self.check()
        writer = self._writer
        if writer is not None and not writer.is_closing():
            self._planned.clear()
            writer.write(FLUSH)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._planned.wait(), seconds)
        self.check()

    def check(self) -> None:
        """Raise the child's failure, or its end, if either came."""
        if self.error is not None:
            raise self.error

    async def stop(self, grace: float) -> None:
        """Ask the child to finish the batch in hand; kill it if it outlasts ``grace`` (and
        a margin): a batch commits whole or not at all."""
        self._stopping = True
        process, writer = self._process, self._writer
        if writer is not None and not writer.is_closing():
            writer.write(STOP)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        elif self._socket is not None:
            # never connected (the run failed before its store was open): the end of file
            # is what stops a child still waiting for its first word
            self._socket.close()
            self._socket = None
        if process is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, process.join, grace + STOP_MARGIN_SECONDS)
            if process.exitcode is None:
                log.error("planning_process_killed", reason="did not stop within its grace")
                process.kill()
                await loop.run_in_executor(None, process.join)
            process.close()
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        if writer is not None:
            writer.close()
        elif self._socket is not None:
            self._socket.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """The child's frames until its end of file: its failure, sent before it, comes
        first; an end of file without one is the child gone (killed, crashed)."""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                message = await read_frame(reader)
                touched = message.get("touched")
                if touched:
                    self._touched(touched)
                if message.get("planned"):
                    self._planned.set()
                error = message.get("error")
                if isinstance(error, Exception) and self.error is None:
                    self.error = error
                    self._planned.set()
        if self.error is None and not self._stopping:
            self.error = PlanningProcessError(
                "the planning process ended before the run's events were planned; what the "
                "run stored is kept: serve or the next reconcile plans and delivers it"
            )
        self._planned.set()


def _sendable(exc: BaseException) -> object:
    """``exc`` for the parent to raise as it was; when it cannot cross (it does not pickle
    back), a :class:`PlanningProcessError` saying what it was, as a failed run says it (the
    message only for the connector's own errors, which never carry a value)."""
    where = _where(exc)
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 (our own object)
    except Exception:
        what = str(exc) if isinstance(exc, ConnectorError) and str(exc) else type(exc).__name__
        exc = PlanningProcessError(f"planning failed in the planning process: {what}")
    if where:
        exc.add_note(where)  # a note crosses with the exception (its traceback does not)
    return exc


def _where(exc: BaseException) -> str:
    """Where ``exc`` was raised in this process, as a traceback's frames: file, line and
    function (no values, no message), for the parent's traceback to show."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    lines = [f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in frames]
    return "\n".join(["raised in the planning process at:", *lines])


def _main(
    sock: socket.socket,
    parents: socket.socket,
    parent: int,
    config: Config,
    planner: PlannerFactory,
) -> None:
    """The child, just forked."""
    parents.close()  # the parent's end: its end of file must reach us when the parent goes
    # what the parent's event loop set up is not ours: Ctrl-C is the parent's to handle
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    _die_with_parent(parent)
    # what the fork copied (the parent's objects, a test process's garbage included) is kept
    # out of the collector's walks: never finalized here, as nothing of it is ours to close
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    os.set_blocking(sock.fileno(), False)
    if not asyncio.run(_child(sock, config, planner)):
        sys.exit(1)


def _die_with_parent(parent: int) -> None:
    """Be killed the moment the parent dies, as if both were one process."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


async def _child(sock: socket.socket, config: Config, make_planner: PlannerFactory) -> bool:
    """Plan when woken until told to stop; whether it ended without a failure."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    stopping = asyncio.Event()
    astore: AsyncStore | None = None
    planner: Planner | None = None
    planning: asyncio.Task[None] | None = None

    def tell(message: dict[str, Any]) -> None:
        if not writer.is_closing():
            writer.write(frame(message))

    def touched(keys: Iterable[tuple[str, str]]) -> None:
        tell({"touched": list(keys)})

    def planned() -> None:
        tell({"planned": True})

    async def plan() -> None:
        assert planner is not None
        await planner.run(stopping)
        if planner.error is not None:
            tell({"error": _sendable(planner.error)})

    ok = True
    try:
        # the parent's first byte: its store is open (connect)
        first = await reader.read(4096)
        if not first or STOP in first:
            return ok
        store = open_store(config.store, timeout=config.store_timeout_seconds, listen=False)
        astore = AsyncStore(store)
        planner = make_planner(astore, Deployment.from_config(config), touched, planned)
        planning = asyncio.create_task(plan())
        while True:
            chunk = await reader.read(4096)
            if not chunk or STOP in chunk:
                break
            if FLUSH in chunk:
                planner.hurry_up()
            elif WAKE in chunk:
                planner.wake.set()
    except Exception as exc:
        tell({"error": _sendable(exc)})
        log.warning("planning_process_failed", error=exc)
        ok = False
    finally:
        stopping.set()
        if planning is not None:
            await asyncio.gather(planning, return_exceptions=True)
        if planner is not None:
            planner.lane.close()
        if astore is not None:
            astore.close()
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
    return ok
