"""Reconciliation: 1,000, 10,000 and 100,000 customers pulled from the fake Treez API (its rate
limit off) into the ``http`` sink, as ``connector reconcile --full`` runs them; customers per
second and peak memory of the command, each size next to the smallest. Then 10,000 customers
with the fake's 10 requests-per-second limit on: the share of the 500 customers per second the
limit allows, and the most requests the fake received in any one second (from its own log).

Targets (issue 17): limit off, at least 2,000 customers/s at every size; memory flat (peak
within 20 % of the smallest run's); limit on, at least 96 % of the 500/s allowed, and never
more than 10 requests in any one-second window. Each prints "meets" or "MISSES".

Every run is a fresh ``connector reconcile`` process (its peak RSS and CPU time read from
``wait4``; "CPU us/customer" is user + system time per customer, the interpreter's start
included: on a shared machine it is steadier than the wall clock) against a fresh store;
the fake and the sink run in their own processes. A run exits when its operations are
delivered, so the figures are pull + plan + delivery.

"Limit off" means the client's pace too: the Treez client never makes more than 10 requests a
second (``requests_per_second`` is at most 10), which alone caps a run near 500 customers/s
whatever the fake allows. So the runs with the limit off are this file started again as the
child (``--unpaced CONFIG``): what ``connector reconcile --full`` does (the same
``reconcile_now``, progress and report), its Treez client built with ``pace=False``; they
measure the connector's own pull, planning and delivery. The run with the limit on is the
command itself.

    .venv/bin/python bench/reconcile.py [--sizes 1000,10000,100000] [--limited 10000]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, fake_process
from tests.fakes.treez_api import most_in_window

DISPENSARY = "partnersandbox3"
TARGET_RATE = 2_000  # customers/s, limit off
ALLOWED_RATE = 500  # customers/s the limit allows: 10 requests/s, 50 customers a page
TARGET_SHARE = 0.96
MAX_IN_WINDOW = 10  # Treez's limit: requests in any one second


def write_config(work: Path, treez_port: int, sink_port: int) -> Path:
    shutil.copy(ROOT / "mappings" / "http.yaml", work / "mapping.yaml")
    path = work / "config.yaml"
    path.write_text(
        f"""
store: sqlite:///connector.db
dispensaries:
  {DISPENSARY}:
    webhook_token: bench-token
    treez:
      api_url: http://127.0.0.1:{treez_port}/v2.0/dispensary/{DISPENSARY}
      client_id: treez_test_client
      api_key: treez_test_apikey
    destinations:
      - name: sink
        type: http
        url: http://127.0.0.1:{sink_port}/ops
        mapping: mapping.yaml
        batch_size: 50
        concurrency: 8
"""
    )
    return path


def reconcile(config: Path, cwd: Path, *, paced: bool = True) -> tuple[float, float, str, float]:
    """Run ``connector reconcile --full`` (``paced``: the command, else this file's
    ``--unpaced`` child); (seconds, peak RSS in MiB, its output, its CPU seconds)."""
    started = time.perf_counter()
    if paced:
        command = [sys.executable, "-m", "connector", "reconcile", "--full", "--config"]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--unpaced"]
    proc = subprocess.Popen(
        [*command, str(config)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"reconcile failed ({proc.returncode}):\n{output}")
    # the command's own figure: the run and its delivery, without the interpreter's start
    found = re.search(r"succeeded in ([0-9.]+) s", output)
    cpu = usage.ru_utime + usage.ru_stime
    return float(found.group(1)) if found else seconds, usage.ru_maxrss / 1024, output, cpu


def one(
    customers: int, *, limited: bool
) -> tuple[float, float, str, list[tuple[float, str]], float]:
    """One run: (seconds, peak MiB, its output, the fake's requests as (arrival, status), the
    command's CPU seconds)."""
    flags = [] if limited else ["--no-rate-limit"]
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp:
        work = Path(tmp)
        calls_log = work / "treez-calls.log"
        with (
            fake_process(
                "tests.fakes.treez_api",
                "--customers",
                str(customers),
                "--seed",
                "1",
                "--calls-log",
                str(calls_log),
                *flags,
            ) as treez_port,
            fake_process("tests.fakes.http_sink") as sink_port,
        ):
            config = write_config(work, treez_port, sink_port)
            seconds, peak, output, cpu = reconcile(config, work, paced=limited)
        calls = [
            (float(at), status)
            for at, status in (line.split() for line in calls_log.read_text().splitlines())
        ]
    return seconds, peak, output, calls, cpu


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def unpaced(config_file: str) -> int:
    """The child of a run with the limit off: ``connector reconcile --full`` as the command
    runs it, the Treez client's pace off. ``connector`` is imported as the command imports
    it (``PYTHONPATH`` first), not from this checkout."""
    sys.path.remove(str(ROOT))
    import asyncio

    import click

    from connector.config import DispensaryConfig, load_config
    from connector.logs import configure_logging
    from connector.reconcile import RunOptions
    from connector.runner import CommandProgress, reconcile_now
    from connector.treez_api import TreezClient

    def client_for(_: str, disp: DispensaryConfig) -> TreezClient:
        assert disp.treez is not None
        return TreezClient(disp.treez, pace=False)

    config = load_config(Path(config_file))
    configure_logging(level="warning", json=False)
    asyncio.run(
        reconcile_now(
            config,
            DISPENSARY,
            RunOptions(full=True),
            wait=True,
            timeout=3600.0,
            echo=click.echo,
            progress=CommandProgress(),
            reconciler_options={"client_for": client_for},
        )
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--limited", type=int, default=10_000, help="0: skip the limited run")
    parser.add_argument("--unpaced", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.unpaced:
        sys.exit(unpaced(args.unpaced))
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        "connector reconcile --full into the http sink (batch_size 50); limit off (the "
        "fake's, and the client's pace)"
    )
    print(
        f"{'customers':>10} {'seconds':>8} {'customers/s':>12} {'vs first':>9} "
        f"{'peak MiB':>9} {'vs first':>9} {'CPU us/customer':>16}"
    )
    first: tuple[float, float] | None = None
    rates, peaks = [], []
    for size in sizes:
        seconds, peak, output, _, cpu = one(size, limited=False)
        if f"pulled {size:,}" not in output:
            raise RuntimeError(f"the run did not pull {size:,} customers:\n{output}")
        rate = size / seconds
        first = first or (rate, peak)
        rates.append(rate)
        peaks.append(peak / first[1])
        print(
            f"{size:>10,} {seconds:>8.1f} {rate:>12,.0f} {rate / first[0]:>9.2f} "
            f"{peak:>9.1f} {peak / first[1]:>9.2f} {cpu / size * 1e6:>16,.0f}"
        )
    print(
        f"target: limit off, at least {TARGET_RATE:,} customers/s at every size "
        f"(slowest {min(rates):,.0f}/s): {verdict(min(rates) >= TARGET_RATE)}"
    )
    print(
        f"target: memory flat, peak within 20 % of the smallest run's "
        f"(largest {max(peaks):.2f}x): {verdict(max(peaks) <= 1.2)}"
    )
    if args.limited:
        seconds, peak, output, calls, cpu = one(args.limited, limited=True)
        if f"pulled {args.limited:,}" not in output:
            raise RuntimeError(f"the run did not pull {args.limited:,} customers:\n{output}")
        rate = args.limited / seconds
        share = rate / ALLOWED_RATE
        most = most_in_window([at for at, _ in calls])
        refused = sum(1 for _, status in calls if status == "429")
        print(
            f"with the 10 requests/s limit on: {args.limited:,} customers in {seconds:.1f} s, "
            f"{rate:,.0f} customers/s = {share:.1%} of the {ALLOWED_RATE}/s the limit allows; "
            f"{len(calls)} requests, at most {most} in any 1 s, {refused} answered 429; "
            f"peak {peak:.1f} MiB"
        )
        print(
            f"target: limit on, at least {TARGET_SHARE:.0%} of {ALLOWED_RATE}/s "
            f"({share:.1%}): {verdict(share >= TARGET_SHARE)}"
        )
        print(
            f"target: limit on, at most {MAX_IN_WINDOW} requests in any 1 s window "
            f"({most}): {verdict(most <= MAX_IN_WINDOW)}"
        )


if __name__ == "__main__":
    main()
