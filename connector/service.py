"""One running connector: the store, the receiver's committer, the planner loop and a
delivery worker per destination, started and stopped together (the ASGI lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from connector._pressure import Pressure
from connector.config import Config
from connector.delivery._wait import Signal
from connector.delivery.base import Destination
from connector.delivery.worker import DeliveryWorker
from connector.errors import StoreUnavailable
from connector.intake import GroupCommitter
from connector.logs import get_logger
from connector.metrics import Metrics, replica_id
from connector.pipeline import Deployment, Processor, build_worker
from connector.pipeline_process import METRICS_WAIT_SECONDS, PipelineProcess
from connector.reconcile import ReconcileBusy, Reconciler, RunOptions
from connector.store import AsyncStore, Store, open_store
from connector.store.abc import PurgeCursor

log = get_logger("connector.service")
HEARTBEAT_SECONDS = 5.0
# How often the planner and the workers look at the store with nothing to wake them. Every
# commit that gives them work wakes them (this process's receiver, the receiver's wake-up
# byte to the pipeline process, PostgreSQL's NOTIFY from the other replicas): the look is a
# fallback, for a notification lost while the listener reconnects, events a replica left
# behind when it died, or a command of the CLI writing to a SQLite store. Once a second where
# no notification can come (PostgreSQL with store_listen false, or its listener away),
# otherwise every QUIET_POLL_SECONDS: an idle connector then costs next to nothing.
POLL_SECONDS = 1.0
QUIET_POLL_SECONDS = 5.0
RETENTION_SECONDS = 3600.0
MISFIRE_GRACE = timedelta(seconds=600)
# past the store's own timeout, how long a commit or a readiness check waits before calling
# the store unavailable (a database that stopped answering raises nothing)
STORE_MARGIN_SECONDS = 1.0


Role = Literal["all", "receiver", "pipeline"]
RECEIVER_SWITCH_SECONDS = 0.0002


def _lease_held(worker: DeliveryWorker) -> Callable[[], float]:
    return lambda: float(worker.leased)


def _beat(store: Store) -> None:
    """The heartbeat, then the store's upkeep: one trip to the store's thread for both."""
    store.heartbeat()
    store.maintain()


class Service:
    """``role`` says which half runs here: ``all`` (one process: receiver, planner and
    workers), ``receiver`` (the committer, with the planner and workers in a child process,
    :mod:`connector.pipeline_child`) or ``pipeline`` (that child: planner and workers)."""

    def __init__(
        self, config: Config, *, idle_poll: float | None = None, role: Role = "all"
    ) -> None:
        """``idle_poll``: the planner's and the workers' look at the store with nothing to
        wake them, fixed; None (the default) adapts it to the wake-ups (QUIET_POLL_SECONDS)."""
        self.config = config
        self._fixed_poll = idle_poll
        if idle_poll is None:
            idle_poll = POLL_SECONDS
        self.role = role
        self.metrics = Metrics()
        self.pressure = Pressure()
        self.deployment = Deployment.from_config(config)
        self.astore = AsyncStore(
            open_store(
                config.store, timeout=config.store_timeout_seconds, listen=config.store_listen
            )
        )
        self.destination_keys = [
            (name, dest.name)
            for name, disp in config.dispensaries.items()
            for dest in disp.destinations
        ]
        self.replica = replica_id(self.astore.store.process_id)
        host, pid = socket.gethostname(), str(os.getpid())
        self.metrics.replica.info({"replica": self.replica, "host": host, "pid": pid, "role": role})
        self.committer = GroupCommitter(
            self.astore.store, timeout=config.store_timeout_seconds + STORE_MARGIN_SECONDS
        )
        self.child = PipelineProcess(config) if role == "receiver" else None
        # the planner, the workers and reconciliation run where the pipeline runs: in the
        # receiver role, in the child process, and nothing of theirs is built here
        self.planner_lane: AsyncStore | None = None
        self.processor: Processor | None = None
        self.reconciler: Reconciler | None = None
        self.destinations: list[Destination] = []
        self.workers: dict[tuple[str, str], DeliveryWorker] = {}
        if self.child is not None:
            self.committer.on_commit.append(self.child.wake)
        else:
            self.planner_lane = self.astore.lane("planner")
            self.processor = Processor(
                self.planner_lane,
                self.deployment,
                on_enqueued=self._wake_workers,
                metrics=self.metrics,
                idle_poll=idle_poll,
                pressure=self.pressure,
            )
            self.committer.on_commit.append(self.processor.wake.set)
            for name, disp in config.dispensaries.items():
                for dest_config in disp.destinations:
                    worker = build_worker(
                        self.astore,
                        name,
                        dest_config,
                        metrics=self.metrics,
                        idle_poll=idle_poll,
                        pressure=self.pressure,
                    )
                    self.destinations.append(worker.destination)
                    self.workers[(name, dest_config.name)] = worker
                    self.metrics.delivery_lease.labels(name, dest_config.name).set_function(
                        _lease_held(worker)
                    )
            self.reconciler = Reconciler(
                config,
                self.astore,
                self.deployment,
                plan=self._plan_soon,
                destinations={key: w.destination for key, w in self.workers.items()},
            )
        self.scheduler: AsyncIOScheduler | None = None
        self._stopping = Signal()  # an asyncio.Event the loops wait for cheaply
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._switch_interval = sys.getswitchinterval()
        self._registered = False  # in the store's processes (register_process)
        self._readiness: asyncio.Future[list[str]] | None = None  # the check running now

    def webhook_started(self) -> None:
        """A webhook request is being answered: counted, so that planning and delivery step
        aside while the receiver is saturated (:mod:`connector._pressure`), in this process
        or, through :meth:`PipelineProcess.saturated`, in the pipeline's."""
        pressure = self.pressure
        pressure.enter()
        if self.child is not None and pressure.saturated:
            self.child.saturated()

    def webhook_finished(self) -> None:
        self.pressure.leave()

    def wake_processor(self) -> None:
        if self.processor is not None:
            self.processor.wake.set()

    async def _plan_soon(self) -> None:
        self.wake_processor()

    def _start_scheduler(self) -> None:
        """One cron job per dispensary that reconciles; misfires coalesced, one at a time
        (and the store lock keeps other processes' runs apart)."""
        scheduler = AsyncIOScheduler(timezone="UTC")
        for name, disp in self.config.dispensaries.items():
            if not disp.reconciles:
                continue
            trigger = CronTrigger.from_crontab(
                disp.reconcile.schedule, timezone=disp.reconcile.timezone
            )
            scheduler.add_job(
                self.scheduled_reconcile,
                trigger,
                args=[name],
                id=f"reconcile:{name}",
                coalesce=True,
                max_instances=1,
                misfire_grace_time=int(MISFIRE_GRACE.total_seconds()),
            )
        if scheduler.get_jobs():
            scheduler.start()
            self.scheduler = scheduler
            log.info("scheduler_started", count=len(scheduler.get_jobs()))

    async def scheduled_reconcile(self, dispensary: str) -> None:
        """One scheduled tick: run by the first process of the cluster to claim it in the
        store; every other replica sends Treez nothing, not even a token request."""
        if self.reconciler is None:  # the receiver role: no scheduler runs here
            return
        job = f"reconcile:{dispensary}"
        tick = self._tick_of(dispensary)
        if tick is not None:
            store = self.astore.store
            try:
                mine = await self.astore.call(store.claim_tick, job, tick, store.process_id)
            except Exception as exc:
                log.warning("reconcile_error", dispensary=dispensary, error=exc)
                return
            if not mine:
                log.info("reconcile_skipped", dispensary=dispensary, reason="tick ran elsewhere")
                return
        try:
            await self.reconciler.run(dispensary, RunOptions(trigger="schedule"))
        except ReconcileBusy:
            log.info("reconcile_skipped", dispensary=dispensary, reason="already running")
        except Exception as exc:  # recorded in the run; the schedule goes on
            log.warning("reconcile_error", dispensary=dispensary, error=exc)

    def _tick_of(self, dispensary: str) -> float | None:
        """The scheduled time (epoch seconds) of the tick firing now: the latest fire time of
        the dispensary's schedule not after now, within the misfire grace."""
        if self.scheduler is None:
            return None
        job = self.scheduler.get_job(f"reconcile:{dispensary}")
        if job is None:
            return None
        now = datetime.now(UTC)
        found, fire = None, job.trigger.get_next_fire_time(None, now - MISFIRE_GRACE)
        while fire is not None and fire <= now:
            found = fire
            fire = job.trigger.get_next_fire_time(fire, fire + timedelta(microseconds=1))
        return None if found is None else float(found.timestamp())

    def _idle_poll(self) -> float:
        """The look at the store now (see QUIET_POLL_SECONDS)."""
        if self._fixed_poll is not None:
            return self._fixed_poll
        store = self.astore.store
        if getattr(type(store), "listening", None) is None:  # no listener: SQLite, one host
            return QUIET_POLL_SECONDS
        return QUIET_POLL_SECONDS if getattr(store, "listening", False) else POLL_SECONDS

    def _apply_idle_poll(self) -> None:
        poll = self._idle_poll()
        if self.processor is not None:
            self.processor.idle_poll = poll
        for worker in self.workers.values():
            worker.idle_poll = poll

    def _wake_workers(self, touched: Iterable[tuple[str, str]]) -> None:
        for key in touched:
            worker = self.workers.get(key)
            if worker is not None:
                worker.wake.set()

    async def start(self) -> None:
        # Threads hand the interpreter lock to each other after every system call. With the
        # default 5 ms switch interval the event loop would wait up to 5 ms for it behind the
        # CPU-bound planning thread (a convoy); 0.5 ms keeps the receiver responsive. The
        # receiver alone goes further: its commit thread takes the lock back from a busy
        # event loop once a commit (InboxWriter), and waits up to an interval for it: a
        # longer interval raised the webhooks' p99, a shorter one cost the loop CPU in forced
        # switches (bench/ingest.py measures both).
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(RECEIVER_SWITCH_SECONDS if self.role == "receiver" else 0.0005)
        store = self.astore.store
        self._stopping.clear()
        released = 0
        if self.role != "pipeline":
            # a store that takes no write (read-only files, a held lock) is said by /readyz
            # from the start, not only once a webhook fails on it; readiness probes it again
            try:
                await self.astore.call(store.probe_write)
            except StoreUnavailable as exc:
                self.committer.note_fault(exc)
            self._tasks["committer"] = asyncio.create_task(self.committer.run(self._stopping))
            # the receiver's load is measured as webhooks arrive (Pressure.enter): no timer
        if self.child is not None:
            self._tasks["pipeline_process"] = asyncio.create_task(self.child.run(self._stopping))
            if not await self.child.wait_started():
                log.error("pipeline_process_slow", reason="no status within its start time")
        elif self.processor is not None:
            try:
                released = await self.astore.call(store.register_process)
                self._registered = True
            except StoreUnavailable as exc:  # read-only, full, locked: the heartbeat retries
                log.warning("register_deferred", reason=exc.reason)
            self._listen(asyncio.get_running_loop())
            self._apply_idle_poll()
            self._tasks["processor"] = asyncio.create_task(self.processor.run(self._stopping))
            for (dispensary, name), worker in self.workers.items():
                self._tasks[f"worker:{dispensary}/{name}"] = asyncio.create_task(
                    worker.run(self._stopping)
                )
            self._tasks["heartbeat"] = asyncio.create_task(self._heartbeat())
            self._tasks["retention"] = asyncio.create_task(self._retention())
            self._start_scheduler()
        if self.role != "pipeline":
            for name, disp in self.config.dispensaries.items():
                if disp.uses_dev_token:
                    log.warning(
                        "development_webhook_token",
                        dispensary=name,
                        reason="set TREEZ_WEBHOOK_TOKEN before Treez can reach this server",
                    )
        log.info(
            "started",
            role=self.role,
            store=self.config.store_display,
            released=released,
            count=len(self.workers),
        )

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake the planner and the workers when another process of the cluster commits
        (PostgreSQL's LISTEN/NOTIFY; every loop polls as well)."""

        def wake(handler: Callable[[str], None]) -> Callable[[str], None]:
            def called(payload: str) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(handler, payload)

            return called

        store = self.astore.store

        def inbox(_payload: str) -> None:
            # the listener (re)connected, or a replica committed: its wake-ups are heard
            self._apply_idle_poll()
            self.wake_processor()

        store.on_commit("inbox", wake(inbox))
        store.on_commit("outbox", wake(self._wake_named))

    def _wake_named(self, payload: str) -> None:
        """``payload``: ``dispensary/destination`` keys, space-separated; empty: all."""
        keys = [tuple(k.split("/", 1)) for k in payload.split()]
        if not keys:
            for worker in self.workers.values():
                worker.wake.set()
            return
        self._wake_workers((k[0], k[1]) for k in keys if len(k) == 2)

    async def _heartbeat(self) -> None:
        store = self.astore.store
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), HEARTBEAT_SECONDS)
            if not self._stopping.is_set():
                self._apply_idle_poll()  # the listener may have gone: poll as often as before
                try:
                    if not self._registered:  # the store refused it at start
                        released = await self.astore.call(store.register_process)
                        self._registered = True
                        log.info("registered", released=released)
                    await self.astore.call(_beat, store)
                except Exception as exc:  # the store is away: one line, not a traceback
                    log.warning("heartbeat_failed", error=exc)

    async def _retention(self) -> None:
        """Purge old raw payloads and delivered operations at start and then hourly."""
        store = self.astore.store
        days = self.config.retention
        while not self._stopping.is_set():
            now = time.time()
            cursor = PurgeCursor()
            try:
                # a step at a time, each its own transaction and its own turn of the store's
                # thread: a large purge never stalls the receiver's commits nor this
                # process's claims and settles
                while not cursor.finished and not self._stopping.is_set():
                    await self.astore.call(
                        store.purge_step,
                        raw_before=now - days.raw_payload_days * 86_400,
                        delivered_before=now - days.delivered_days * 86_400,
                        cursor=cursor,
                    )
                if any(cursor.counts.values()):
                    log.info("purged", counts=cursor.counts)
            except Exception as exc:  # what the steps before it purged stays purged
                log.warning("purge_failed", error=exc, counts=cursor.counts)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), RETENTION_SECONDS)

    async def stop(self) -> None:
        """Finish the work in hand within the grace period; release what is left."""
        self._stopping.set()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        grace = self.config.server.shutdown_grace_seconds
        if self.child is not None:
            await self.child.stop(grace)
        tasks = list(self._tasks.items())
        if tasks:
            done, pending = await asyncio.wait([t for _, t in tasks], timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for name, task in tasks:  # a loop that had ended on an error (readiness said so)
                if task in done and not task.cancelled() and task.exception() is not None:
                    log.error("loop_failed", reason=name, error=task.exception())
        released = 0
        if self.child is None:
            try:
                released = await self.astore.call(self.astore.store.release_claims)
            except StoreUnavailable as exc:  # the claims lapse instead: one line
                log.warning("release_failed", reason=exc.reason, error=exc)
            except Exception:
                log.exception("release_failed")
        if self.reconciler is not None:
            await self.reconciler.aclose()
        for destination in self.destinations:
            await destination.aclose()
        if self.planner_lane is not None:
            self.planner_lane.close()
        self.astore.close()
        self._tasks.clear()
        sys.setswitchinterval(self._switch_interval)
        log.info("stopped", role=self.role, released=released)

    async def readiness(self) -> list[str]:
        """What keeps this replica from taking webhooks. Checks asked for while one runs
        share its answer: on a locked store each takes up to the store timeout, and queued
        one behind another on the store's thread they would take many times that."""
        running = self._readiness
        if running is None or running.done():
            running = self._readiness = asyncio.ensure_future(self._check_readiness())
        return list(await asyncio.shield(running))

    async def _check_readiness(self) -> list[str]:
        problems = []
        timeout = self.config.store_timeout_seconds + STORE_MARGIN_SECONDS
        # the pipeline process answers when asked (it sends nothing unasked): asked first,
        # its answer awaited after this process's own checks, as long as they may take (a
        # slow answer leaves its last one standing, until its silence makes it "not
        # reporting")
        asking = (
            None
            if self.child is None
            else asyncio.ensure_future(self.child.refresh(timeout=timeout))
        )
        try:
            await asyncio.wait_for(self.astore.call(self.astore.store.ping), timeout)
        except TimeoutError:
            problems.append(f"store unreachable: no answer within {timeout:g} s")
        except StoreUnavailable as exc:  # a few words; the reason (hosts, ports) is logged
            problems.append(
                exc.reason if exc.reason != "store unavailable" else "store unreachable"
            )
        except Exception:
            problems.append("store unreachable")
        fault = self.committer.fault  # the receiver's last commit failed: read-only, full...
        if fault is not None and fault.reason != "store corrupt":
            # gone once the store takes a write again, webhooks or not (a balancer that
            # stops sending them while /readyz is 503 would otherwise keep it 503 for ever);
            # a full store is probed with a write that needs room (rolled back). A corrupt
            # one stays until a commit succeeds: a probe's write may not touch the damage.
            probe = functools.partial(
                self.astore.store.probe_write, allocate=fault.reason == "store full"
            )
            try:
                await asyncio.wait_for(self.astore.call(probe), timeout)
                self.committer.clear_fault()
                fault = None
            except StoreUnavailable as exc:
                fault = exc
            except Exception as exc:  # no answer in time: the commit's fault stands
                log.debug("write_probe_failed", error=exc)
        if fault is not None:
            problems.append(f"{fault.reason}: the last webhook could not be stored ({fault})")
        for name, task in self._tasks.items():
            if task.done():
                problems.append(f"{name} stopped")
        if self.child is not None:
            assert asking is not None
            await asking
            problems.extend(self.child.problems())
        if not self._tasks:
            problems.append("not started")
        return problems

    async def metrics_text(self) -> bytes:
        """This process's series (and its pipeline process's), with the queue gauges read
        from the store just now: every replica shows the cluster's queues. The last webhook
        times start from the store's at the first scrape that reaches it."""
        store = self.astore.store
        reconciled: dict[str, dict[str, Any]] | None
        # the pipeline process's families, asked for now and awaited after the store's reads
        # (the last ones it sent, if it is slow)
        asking = (
            None
            if self.child is None
            else asyncio.ensure_future(
                self.child.refresh(families=True, timeout=METRICS_WAIT_SECONDS)
            )
        )
        try:
            if not self.metrics.webhook_times_loaded:
                self.metrics.remember_webhooks(await self.astore.call(store.last_webhook_times))
            stats = await self.astore.call(store.queue_stats)
            paused = await self.astore.call(store.pauses)
            reconciled = await self.astore.call(store.reconcile_times)
        except StoreUnavailable:
            stats, paused, reconciled = [], [], None
        if asking is not None:
            await asking
        return self.metrics.render(
            stats,
            self.destination_keys,
            self.child.status.families if self.child is not None else (),
            paused={(p.dispensary, p.destination): p.until for p in paused},
            reconciled=reconciled,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()
