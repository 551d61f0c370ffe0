"""Shared pieces of the benchmarks: a sink process, a server process, a config, free ports."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SEED = json.loads((ROOT / "tests" / "data" / "seed_body.json").read_text())
TOKEN = "bench-token"  # a local benchmark's token


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpu: int | None) -> list[str]:
    """Prefix a command with taskset when the machine has that core."""
    if cpu is None or shutil.which("taskset") is None or cpu >= (os.cpu_count() or 1):
        return []
    return ["taskset", "-c", str(cpu)]


@contextmanager
def fake_process(module: str, *args: str, cpu: int | None = None) -> Iterator[int]:
    """One of the fakes (``tests.fakes.<name>``) in its own process, optionally pinned to a
    core; yields the port it printed (``LISTENING <port>``) and stops it with SIGTERM."""
    command = [*pinned(cpu), sys.executable, "-m", module, "--port", "0", *args]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LISTENING"):
            raise RuntimeError(f"{module} did not start: {line!r}")
        yield int(line.split()[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


@contextmanager
def sink_process(workdir: Path, *args: str, cpu: int | None = 1) -> Iterator[tuple[str, Path]]:
    """The local HTTP sink (tests/fakes/http_sink.py) in its own process: (url, attempts log)."""
    log = workdir / "sink-attempts.jsonl"
    with fake_process("tests.fakes.http_sink", "--attempts-log", str(log), *args, cpu=cpu) as port:
        yield f"http://127.0.0.1:{port}/ops", log


def write_config(
    workdir: Path,
    sink_url: str,
    *,
    concurrency: int = 16,
    batch_size: int = 1,
    pipeline_process: bool = True,
) -> Path:
    shutil.copy(ROOT / "mappings" / "http.yaml", workdir / "http.yaml")
    path = workdir / "config.yaml"
    path.write_text(
        f"""
store: sqlite:///connector.db
server: {{host: 127.0.0.1, port: 8080, log_level: info,
         pipeline_process: {str(pipeline_process).lower()}}}
dispensaries:
  partnersandbox3:
    webhook_token: {TOKEN}
    destinations:
      - name: sink
        type: http
        url: {sink_url}
        mapping: http.yaml
        concurrency: {concurrency}
        batch_size: {batch_size}
        retry: {{initial_seconds: 0.2, max_seconds: 2}}
"""
    )
    return path


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and of its live children (Linux /proc; 0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, IndexError, ValueError):
        return total
    return total + sum(process_cpu_seconds(int(child)) for child in children)


@contextmanager
def server_process(
    config: Path, *, cpu: int | None = 0, bench_server: bool = True, pids: list[int] | None = None
) -> Iterator[str]:
    """The connector in its own process (its JSON logs go to a file); yields the base URL.
    ``pids``, when given, receives the server's pid (for :func:`process_cpu_seconds`)."""
    port = free_port()
    if bench_server:
        command = [
            sys.executable,
            str(ROOT / "bench" / "_server.py"),
            "--config",
            str(config),
            "--port",
            str(port),
        ]
    else:
        command = [
            str(Path(sys.executable).parent / "connector"),
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
        ]
        if os.environ.get("BENCH_SERVE_WRAPPER"):  # profiling by hand: a script taking serve's args
            command = [sys.executable, os.environ["BENCH_SERVE_WRAPPER"], *command[2:]]
    log = (config.parent / "server.log").open("ab")
    proc = subprocess.Popen([*pinned(cpu), *command], cwd=config.parent, stdout=log, stderr=log)
    if pids is not None:
        pids.append(proc.pid)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # a loaded machine starts slowly
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the server did not start; see {config.parent / 'server.log'}")
            time.sleep(0.05)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        keep = os.environ.get("BENCH_KEEP_LOG")
        if keep:
            shutil.copy(config.parent / "server.log", keep)


def event_body(customer_id: int, version: int, **changes: object) -> bytes:
    """The seed delivery as another customer and version (a later version is newer)."""
    body = json.loads(json.dumps(SEED))
    data = body["data"]
    data["customer_id"] = str(customer_id)
    seconds = version
    data["last_update"] = (
        f"2026-05-{1 + seconds // 86400:02d}T{seconds // 3600 % 24:02d}:"
        f"{seconds // 60 % 60:02d}:{seconds % 60:02d}.000-07:00"
    )
    data["opt_out"] = "false"
    data["rewards_balance"] = version
    data.update(changes)
    return json.dumps(body).encode()


class RawPoster:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams.

    The benchmarks measure the server; httpx costs ~1 ms of CPU per request here, which would
    make the load generator the bottleneck. This writes a prepared request and reads the
    status line, headers and Content-Length body: nothing else.
    """

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str]) -> None:
        self.host, self.port, self.path = host, port, path
        lines = [f"{k}: {v}" for k, v in {"host": f"{host}:{port}", **headers}.items()]
        self._head = f"POST {path} HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n"

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def post(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], body: bytes
    ) -> int:
        reader, writer = conn
        writer.write(f"{self._head}content-length: {len(body)}\r\n\r\n".encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await reader.readexactly(length)
        return status


def webhook_poster(base: str, dispensary: str = "partnersandbox3") -> RawPoster:
    """A :class:`RawPoster` of CUSTOMER webhooks to the server at ``base`` (``http://host:port``)
    for ``dispensary``, with the benchmarks' token."""
    host, port = base.removeprefix("http://").split(":")
    return RawPoster(
        host,
        int(port),
        f"/webhooks/treez/{dispensary}",
        {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
    )
