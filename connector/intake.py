"""Intake: received events into the inbox, in group commits.

Requests hand their event to a :class:`GroupCommitter`, which commits whatever has arrived
meanwhile in one transaction and then answers all of them: ``synchronous=FULL`` durability at
the cost of one fsync per batch rather than per request. It uses the store's
:class:`~connector.store.abc.Inbox` port and nothing else; the receiver sees it only through
:class:`Intake` (its ``submit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from connector.errors import StoreUnavailable
from connector.logs import get_logger
from connector.store.abc import Inbox, InboxWriterPort, NewEvent, Rejected

log = get_logger("connector.intake")


class Intake(Protocol):
    """What the receiver hands a received body to."""

    async def submit(self, item: NewEvent | Rejected) -> None:
        """Return once ``item`` is durably stored; :class:`StoreUnavailable` if it was not."""
        ...


class GroupCommitter:
    """Commits received events in batches; each caller waits for its own batch's commit.

    A writer thread of its own takes whatever has arrived, commits it in one transaction,
    hands the outcome to the event loop and at once takes what arrived meanwhile: the next
    batch never waits for the event loop to come round (with the loop busy answering the
    previous batch, that wait cost two thirds of each commit cycle: bench/ingest.py). An
    idle writer is woken by the loop once it has run what was ready with the first new
    submission: the requests of one read of the sockets share a commit, where a writer woken
    by the first took it alone (and its fsync) while the others were still being read.
    """

    def __init__(self, store: Inbox, *, max_batch: int = 512, timeout: float | None = None) -> None:
        self.store = store
        self.max_batch = max_batch
        # how long a commit may take before its callers, and every caller after them until
        # it ends, are answered 503: a database that stopped answering (a hung connection,
        # no error) must not hold requests for minutes (_watch)
        self.timeout = timeout
        self._stuck = False
        # the fault of the last commit, None once one succeeds: /readyz says it, and the log
        # has one line when it starts (or changes) and one when it ends, not one per request
        self.fault: StoreUnavailable | None = None
        self._batch_started: float | None = None  # monotonic, while the writer commits
        self.on_commit: list[Callable[[], None]] = []  # run after each commit of events
        self._queue: deque[tuple[NewEvent | Rejected, asyncio.Future[None]]] = deque()
        # released to wake the writer waiting to acquire it (a bare lock: threading.Event's
        # condition costs the loop a dozen Python calls at each wake-up); only the loop's
        # thread releases it, the writer only acquires it
        self._wake = threading.Lock()
        self._wake.acquire()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._idle = False  # the writer waits for the signal (read by submit)
        self._kicked = False  # the loop will wake the idle writer when it has run what is ready
        self._inflight: list[tuple[NewEvent | Rejected, asyncio.Future[None]]] = []
        # callers waiting for a commit; while there are none, _watch sleeps until one comes
        # (a commit can only hang with a caller waiting) instead of looking 4 times a second
        self._waiting = 0
        self._watch_wake: asyncio.Event | None = None

    async def submit(self, item: NewEvent | Rejected) -> None:
        """Return once ``item`` is committed; :class:`StoreUnavailable` if it was not."""
        loop = self._loop
        if loop is None or self._closing:
            raise StoreUnavailable("the receiver is not running")
        if self._stuck:
            raise StoreUnavailable(
                f"the store has not answered for {self.timeout} s", reason="store not answering"
            )
        future: asyncio.Future[None] = loop.create_future()
        self._queue.append((item, future))
        if self._idle and not self._kicked:  # else it takes it with what it finds after its commit
            # the idle writer is woken once the loop has run what is ready now: the other
            # requests of the same read reach this point first and share the commit, where
            # a writer woken at once would take the first alone
            self._kicked = True
            loop.call_soon(self._kick)
        self._waiting += 1
        wake = self._watch_wake
        if wake is not None:
            self._watch_wake = None
            wake.set()
        try:
            await future
        finally:
            self._waiting -= 1

    def _kick(self) -> None:
        self._kicked = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._wake.locked():  # else a wake-up is pending, not taken yet
            self._wake.release()

    async def run(self, stopping: asyncio.Event) -> None:
        """Commit until ``stopping`` is set, then commit what is queued and return. Ends
        early, raising, if the writer thread dies (readiness then reports it)."""
        previous = self._thread
        if previous is not None:  # a run that was cancelled while its writer drained
            await asyncio.to_thread(previous.join)
        self._loop = asyncio.get_running_loop()
        self._closing = False
        ended = asyncio.Event()
        thread = threading.Thread(
            target=self._write, args=(ended,), name="receiver-commit", daemon=True
        )
        self._thread = thread
        thread.start()
        try:
            waits = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(ended.wait())]
            watch = (
                None if self.timeout is None else asyncio.ensure_future(self._watch(self.timeout))
            )
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
                if watch is not None:
                    watch.cancel()
            if not stopping.is_set():
                raise RuntimeError("the receiver's commit thread stopped")
        finally:
            self._closing = True
            self._wake_writer()
            await asyncio.to_thread(thread.join)
            if self._thread is thread:
                self._thread = None
            # a submission that passed its check just as the writer made its last one: it
            # is on the queue with nobody to take it (later ones see _closing and refuse)
            left = [self._queue.popleft() for _ in range(len(self._queue))]
            if left:
                self._settle(left, StoreUnavailable("the receiver is not running"), False)

    async def _watch(self, timeout: float) -> None:
        """While a commit takes longer than ``timeout``, answer its callers and everyone
        queued behind it 503, and new callers at once; the writer skips what was answered
        (a 503 for an event the commit stores after all is harmless: Treez sends it again)."""
        error = StoreUnavailable(
            f"the store has not answered for {timeout} s", reason="store not answering"
        )
        while True:
            if not self._waiting and not self._stuck:
                # nobody waits, and no commit hangs: none can until somebody submits (while
                # one hangs, new callers are refused before they wait: keep looking)
                wake = self._watch_wake = asyncio.Event()
                await wake.wait()
            await asyncio.sleep(min(0.25, timeout / 4))
            started = self._batch_started
            self._stuck = started is not None and time.monotonic() - started > timeout
            if self._stuck:
                waiting = [*self._inflight, *list(self._queue)]
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(error)

    def _write(self, ended: asyncio.Event) -> None:
        loop = self._loop
        assert loop is not None
        try:
            writer = self.store.inbox_writer()
            try:
                self._write_batches(writer)
            finally:
                writer.close()
        except Exception:  # a bug: run() reports it, and readiness with it
            log.exception("commit_thread_failed")
        finally:
            # whatever ended the thread: nobody is left waiting, and nobody else is let in
            self._closing = True
            left, self._inflight = self._inflight, []
            while self._queue:
                left.append(self._queue.popleft())
            error = StoreUnavailable("the receiver's commit thread stopped")
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                if left:
                    loop.call_soon_threadsafe(self._settle, left, error, False)
                loop.call_soon_threadsafe(ended.set)

    def _write_batches(self, writer: InboxWriterPort) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            # idle, then look once more: an item queued before this flag was set is seen
            # below, one queued after it wakes the writer (the interpreter lock orders both).
            # A wake-up not waited for is taken at the next wait: one more look, no harm.
            self._idle = True
            if not self._queue:
                self._wake.acquire()
            self._idle = False
            while self._queue:
                size = min(len(self._queue), self.max_batch)
                # not what _watch answered 503 meanwhile
                batch = [e for e in (self._queue.popleft() for _ in range(size)) if not e[1].done()]
                if not batch:
                    continue
                events = [item for item, _ in batch if isinstance(item, NewEvent)]
                rejected = [item for item, _ in batch if isinstance(item, Rejected)]
                error: StoreUnavailable | None = None
                self._inflight = batch  # failed by _write if the thread dies with it
                self._batch_started = time.monotonic()
                try:
                    writer.add(events, rejected)
                except StoreUnavailable as exc:
                    error = exc
                except Exception as exc:  # every waiter learns of it; none is told "stored"
                    error = StoreUnavailable(f"the store failed ({exc.__class__.__name__})")
                finally:
                    self._batch_started = None
                self._note(error)
                try:
                    loop.call_soon_threadsafe(self._settle, batch, error, bool(events))
                except RuntimeError:  # the loop is closed: nobody waits any more
                    return
                self._inflight = []
            if self._closing and not self._queue:
                return

    def _note(self, error: StoreUnavailable | None) -> None:
        """Remember the outcome of a commit; log when a fault starts, changes or ends."""
        before = self.fault
        self.fault = error
        if error is not None and (before is None or before.reason != error.reason):
            # the driver's first line and the fault: never a statement or a value
            log.error("store_fault", reason=error.reason, error=str(error))
        elif error is None and before is not None:
            log.info("store_recovered", reason=before.reason)

    def note_fault(self, error: StoreUnavailable) -> None:
        """A write refused outside a commit (the start's probe): said like a commit's."""
        self._note(error)

    def clear_fault(self) -> None:
        """The store takes writes again (readiness probed it): forget the last fault."""
        before, self.fault = self.fault, None
        if before is not None:
            log.info("store_recovered", reason=before.reason)

    def _settle(
        self,
        batch: list[tuple[NewEvent | Rejected, asyncio.Future[None]]],
        error: StoreUnavailable | None,
        committed_events: bool,
    ) -> None:
        for _, future in batch:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        if error is None and committed_events:
            for callback in self.on_commit:
                callback()
