"""An idle connector wakes only when something is due (issue 17, "cost at a trickle"): the
receiver's load is measured as webhooks arrive, uvicorn's loop waits for its stop instead of
polling for it, the pipeline process answers status questions instead of sending its status
every second, and the planner and the workers look at the store rarely while wake-ups reach
them."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import CounterMetricFamily
from test_receiver import write_config

from connector import _pressure
from connector._pressure import Pressure
from connector.config import load_config
from connector.pipeline_process import (
    METRICS,
    STATUS,
    STATUS_STALE_SECONDS,
    PipelineProcess,
    frame,
)
from connector.server import ConnectorServer, QuietServer
from connector.service import POLL_SECONDS, QUIET_POLL_SECONDS, Service

# --- the receiver's load, measured as webhooks arrive ------------------------------------------


class _Clock:
    """time.monotonic and time.thread_time, moved by hand."""

    def __init__(self) -> None:
        self.wall = 1000.0
        self.cpu = 5.0

    def monotonic(self) -> float:
        return self.wall

    def thread_time(self) -> float:
        return self.cpu


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=0.3),  # wall seconds before the arrival
            st.floats(min_value=0.0, max_value=1.0),  # the share of them on the CPU
        ),
        min_size=1,
        max_size=60,
    )
)
def test_arrivals_measure_the_same_windows_as_a_watch_would(
    steps: list[tuple[float, float]],
) -> None:
    """A model of the lazy windows: a window ends at the first arrival at least ``window``
    after it began (the first one only starts the measurement), and its figures are the
    arrivals and the CPU within it; a measurement older than two windows is not saturated."""
    clock = _Clock()
    original = _pressure.time
    _pressure.time = clock  # type: ignore[assignment]
    try:
        pressure = Pressure(saturated_rate=20.0, saturated_load=0.5, window=0.1)
        start, start_cpu, start_count, started = clock.wall, clock.cpu, 0, False
        measured: tuple[float, float, float] | None = None  # rate, load, when
        count = 0
        for wait, share in steps:
            clock.wall += wait
            clock.cpu += wait * share
            pressure.enter()
            pressure.leave()
            count += 1
            if clock.wall - start >= 0.1:
                if started:
                    elapsed = clock.wall - start
                    measured = (
                        (count - start_count) / elapsed,
                        min(1.0, (clock.cpu - start_cpu) / elapsed),
                        clock.wall,
                    )
                start, start_cpu, start_count, started = clock.wall, clock.cpu, count, True
            if measured is None:
                assert not pressure.saturated
                continue
            rate, load, at = measured
            assert pressure.rate == pytest.approx(rate)
            assert pressure.load == pytest.approx(load)
            fresh = clock.wall - at < 0.2
            assert pressure.saturated == (fresh and rate >= 20.0 and load >= 0.5)
        assert pressure.inflight == 0
        clock.wall += 0.25  # no webhook since: the last measurement is stale
        assert not pressure.saturated
    finally:
        _pressure.time = original


def test_arrivals_alone_measure_the_event_loop() -> None:
    """No watch task runs: the webhooks' own arrivals measure the rate and the load."""
    pressure = Pressure(window=0.02)
    started = time.monotonic()
    while time.monotonic() - started < 0.2:
        pressure.enter()
        pressure.leave()
        busy_until = time.monotonic() + 0.002
        while time.monotonic() < busy_until:  # the thread on the CPU
            pass
    # loose bounds, as for the watch (a loaded machine starves this thread of its core)
    assert pressure.rate > 10
    assert pressure.load > 0.05


def test_a_measured_saturation_ends_when_the_webhooks_stop() -> None:
    pressure = Pressure(saturated_rate=1000, saturated_load=0.5)
    pressure.measure(arrivals=150, elapsed=0.1, cpu=0.09)
    assert pressure.saturated
    assert pressure.busy
    pressure._measured_at -= 2 * pressure.window  # two windows without a webhook
    assert not pressure.saturated
    assert not pressure.busy


# --- uvicorn's loop: woken by its stop, or once a second for the Date header ----------------


async def _app(scope: Any, receive: Any, send: Any) -> None:  # never called
    raise AssertionError


@pytest.mark.parametrize("kind", [ConnectorServer, QuietServer])
def test_the_server_loop_ends_when_told_to_and_keeps_the_date_header(
    kind: type[QuietServer],
) -> None:
    async def scenario() -> list[tuple[bytes, bytes]]:
        server = kind(uvicorn.Config(_app, lifespan="off", log_config=None))
        server.config.load()
        loop = asyncio.create_task(server.main_loop())
        await asyncio.sleep(0.01)
        assert not loop.done()
        server.should_exit = True  # as a signal's handler or the companion's stop does
        await asyncio.wait_for(loop, 30)  # a guard against a hang, not a timing
        return list(server.server_state.default_headers)

    headers = asyncio.run(scenario())
    assert any(name == b"date" for name, _ in headers)


def test_a_stop_asked_before_the_loop_runs_ends_it_at_once() -> None:
    async def scenario() -> None:
        server = ConnectorServer(uvicorn.Config(_app, lifespan="off", log_config=None))
        server.config.load()
        server.should_exit = True
        await asyncio.wait_for(server.main_loop(), 30)

    asyncio.run(scenario())


# --- the pipeline process's status: asked for, not sent every second -------------------------


class _Running:
    returncode = None


async def _pair(answer: Any) -> tuple[PipelineProcess, asyncio.Task[None], list[bytes]]:
    """A parent's handle wired to a fake child that answers each question with
    ``answer(question)`` (a message, or None for no answer); returns the questions heard."""
    ours, theirs = socket.socketpair()
    child = PipelineProcess(None)  # type: ignore[arg-type]
    child._process = _Running()  # type: ignore[assignment]
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    child._writer = writer
    statuses = asyncio.create_task(child._read_statuses(reader))
    their_reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
    heard: list[bytes] = []

    async def fake_child() -> None:
        while chunk := await their_reader.read(1):
            heard.append(chunk)
            message = answer(chunk)
            if message is not None:
                their_writer.write(frame(message))

    task = asyncio.create_task(fake_child())
    task.add_done_callback(lambda _: their_writer.close())
    statuses.add_done_callback(lambda _: writer.close())
    return child, asyncio.gather(task, statuses), heard  # type: ignore[return-value]


def _families() -> list[Any]:
    family = CounterMetricFamily("connector_events_planned", "x", labels=["dispensary"])
    family.add_metric(["d"], 3.0)
    return [family]


def test_the_parent_asks_for_the_status_and_for_the_families_apart() -> None:
    def answer(question: bytes) -> dict[str, Any]:
        if question == METRICS:
            return {"families": _families()}
        return {"problems": ["store unreachable"]}

    async def scenario() -> None:
        child, tasks, heard = await _pair(answer)
        assert await child.refresh(families=True, timeout=30)
        assert child.problems() == ["pipeline process starting"]  # no problems asked yet
        assert [f.name for f in child.status.families] == ["connector_events_planned"]
        assert await child.refresh(timeout=30)
        assert child.problems() == ["store unreachable"]
        # a status alone keeps the families the child sent last
        assert [f.name for f in child.status.families] == ["connector_events_planned"]
        assert heard == [METRICS, STATUS]
        tasks.cancel()
        await asyncio.gather(tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_a_child_silent_since_it_was_asked_is_not_reporting_until_it_answers() -> None:
    silent = [True]

    def answer(question: bytes) -> dict[str, Any] | None:
        return None if silent[0] else {"problems": []}

    async def scenario() -> None:
        child, tasks, _ = await _pair(answer)
        assert not await child.refresh(timeout=0.05)
        # one slow answer: its last one stands (a readiness check waits for the store)
        assert child.problems() == ["pipeline process starting"]
        assert not await child.refresh(timeout=0.05)
        assert child._unanswered_since is not None
        child._unanswered_since -= STATUS_STALE_SECONDS  # silent that long since asked
        assert child.problems() == ["pipeline process not reporting"]
        silent[0] = False
        assert await child.refresh(timeout=30)
        assert child.problems() == []
        tasks.cancel()
        await asyncio.gather(tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_questions_asked_together_are_all_answered() -> None:
    async def scenario() -> None:
        child, tasks, heard = await _pair(
            lambda q: {"families": _families()} if q == METRICS else {"problems": []}
        )
        answered = await asyncio.gather(
            child.refresh(timeout=30), child.refresh(families=True, timeout=30)
        )
        assert answered == [True, True]
        assert sorted(heard) == sorted([STATUS, METRICS])
        tasks.cancel()
        await asyncio.gather(tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_a_child_with_no_connection_is_asked_nothing() -> None:
    async def scenario() -> None:
        child = PipelineProcess(None)  # type: ignore[arg-type]
        assert not await child.refresh(timeout=30)
        assert child.problems() == ["pipeline process not running"]

    asyncio.run(scenario())


# --- the planner's and the workers' look at the store -----------------------------------------


def test_the_look_at_the_store_is_rare_where_wake_ups_reach_the_loops(
    tmp_path: Path, store_url: str
) -> None:
    config = load_config(write_config(tmp_path, store=store_url))
    fixed = Service(config, idle_poll=0.05)
    try:
        assert fixed._idle_poll() == 0.05
    finally:
        fixed.astore.close()

    async def scenario() -> None:
        service = Service(config)
        try:
            assert service.processor is not None
            assert service.workers
            store = service.astore.store
            if store_url.startswith("sqlite"):
                # one host, one serve: its commits wake its planner and workers
                assert service._idle_poll() == QUIET_POLL_SECONDS
                return
            # PostgreSQL: as often as before until the listener hears the other replicas
            assert service._idle_poll() == POLL_SECONDS
            service._listen(asyncio.get_running_loop())
            for _ in range(3000):  # the listener connects, and wakes everything once
                if service.processor.idle_poll == QUIET_POLL_SECONDS:
                    break
                await asyncio.sleep(0.01)
            assert store.listening
            assert service.processor.idle_poll == QUIET_POLL_SECONDS
            assert all(w.idle_poll == QUIET_POLL_SECONDS for w in service.workers.values())
        finally:
            service.astore.close()

    asyncio.run(scenario())
