"""Reconciliation: 1,000, 10,000 and 100,000 customers pulled from the fake Treez API (its rate
limit off) into the ``http`` sink, as ``connector reconcile --full`` runs them; customers per
second and peak memory of the command, each size next to the smallest (linear cost: throughput
within 20 %; flat memory: peak within 20 %). Then 10,000 customers with the fake's 10
requests-per-second limit on: the share of the 500 customers per second the limit allows.

Every run is a fresh ``connector reconcile`` process (its peak RSS read from ``wait4``) against
a fresh store; the fake and the sink run in their own processes. A run exits when its
operations are delivered, so the figures are pull + plan + delivery.

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

DISPENSARY = "partnersandbox3"


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


def reconcile(config: Path, cwd: Path) -> tuple[float, float, str]:
    """Run ``connector reconcile --full``; (seconds, peak RSS in MiB, its output)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector", "reconcile", "--full", "--config", str(config)],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"reconcile failed ({proc.returncode}):\n{output}")
    # the command's own figure: the run and its delivery, without the interpreter's start
    found = re.search(r"succeeded in ([0-9.]+) s", output)
    return float(found.group(1)) if found else seconds, usage.ru_maxrss / 1024, output


def one(customers: int, *, limited: bool) -> tuple[float, float, str]:
    flags = [] if limited else ["--no-rate-limit"]
    with (
        tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp,
        fake_process("tests.fakes.treez_api", "--customers", str(customers), "--seed", "1",
                *flags) as treez_port,
        fake_process("tests.fakes.http_sink") as sink_port,
    ):  # fmt: skip
        work = Path(tmp)
        return reconcile(write_config(work, treez_port, sink_port), work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--limited", type=int, default=10_000, help="0: skip the limited run")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print("connector reconcile --full into the http sink (batch_size 50); fake limit off")
    print(f"{'customers':>10} {'seconds':>8} {'customers/s':>12} {'vs first':>9} "
          f"{'peak MiB':>9} {'vs first':>9}")  # fmt: skip
    first: tuple[float, float] | None = None
    verdicts = []
    for size in sizes:
        seconds, peak, output = one(size, limited=False)
        if f"pulled {size:,}" not in output:
            raise RuntimeError(f"the run did not pull {size:,} customers:\n{output}")
        rate = size / seconds
        first = first or (rate, peak)
        rate_ratio, peak_ratio = rate / first[0], peak / first[1]
        verdicts.append(0.8 <= rate_ratio <= 1.2 and peak_ratio <= 1.2)
        print(f"{size:>10,} {seconds:>8.1f} {rate:>12,.0f} {rate_ratio:>9.2f} "
              f"{peak:>9.1f} {peak_ratio:>9.2f}")  # fmt: skip
    print("target (throughput and peak memory within 20 % of the smallest run): "
          + ("met" if all(verdicts) else "MISSED"))  # fmt: skip
    if args.limited:
        seconds, peak, _ = one(args.limited, limited=True)
        rate = args.limited / seconds
        share = rate / 500
        verdict = "met" if share >= 0.9 else "MISSED"
        print(f"with the 10 requests/s limit on: {args.limited:,} customers in {seconds:.1f} s, "
              f"{rate:,.0f} customers/s = {share:.0%} of the 500/s the limit allows "
              f"(target 90 %: {verdict}); peak {peak:.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
