"""Webhook ingestion: accepted events per second and latency of the durable route, against a
no-op route of the same server stack, in the same run.

The server runs `connector serve`'s app and uvicorn settings in its own process (pinned to
one core), delivering to a live local sink meanwhile; wrk drives it from the other core with
distinct customer events (every request a new customer version, so each is a real insert).
Rounds alternate no-op / durable so machine noise hits both alike. Needs wrk
(`apt-get install wrk`). Target: the durable route at least half the no-op's throughput.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import TOKEN, event_body, pinned, server_process, sink_process, write_config

LUA = """
local counter = 0
local template = [==[%s]==]
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
request = function()
  counter = counter + 1
  local s = counter
  local ts = string.format("2026-06-%%02dT%%02d:%%02d:%%02d.000-07:00",
    1 + math.floor(s / 86400) %% 28, math.floor(s / 3600) %% 24, math.floor(s / 60) %% 60, s %% 60)
  local body = template:gsub("__ID__", tostring(%d + counter)):gsub("__TS__", ts)
  return wrk.format(nil, nil, nil, body)
end
"""


def wrk(url: str, script: Path, seconds: int, connections: int) -> dict[str, float]:
    command = [*pinned(1), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
               "-s", str(script), url]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)

    def latency(pct: str) -> float:
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        assert match is not None, out
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {"rate": rate, "p50": latency("50"), "p99": latency("99"),
            "errors": float(errors.group(1)) if errors else 0.0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=6, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/ingest.py needs wrk: apt-get install wrk")

    template = event_body(0, 0).decode()
    template = template.replace('"customer_id": "0"', '"customer_id": "__ID__"')
    template = re.sub(r'"last_update": "[^"]+"', '"last_update": "__TS__"', template)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        scripts = {}
        for name, start in (("noop", 10_000_000), ("durable", 20_000_000)):
            scripts[name] = work / f"{name}.lua"
            scripts[name].write_text(LUA % (template, TOKEN, start))
        with sink_process(work) as (sink_url, _log):
            config = write_config(work, sink_url)
            with server_process(config, cpu=None) as base:
                urls = {
                    "noop": f"{base}/noop/partnersandbox3",
                    "durable": f"{base}/webhooks/treez/partnersandbox3",
                }
                for name in ("noop", "durable"):  # warm up
                    wrk(urls[name], scripts[name], 2, args.connections)
                results: dict[str, list[dict[str, float]]] = {"noop": [], "durable": []}
                for _ in range(args.rounds):
                    for name in ("noop", "durable"):
                        results[name].append(wrk(urls[name], scripts[name], args.seconds,
                                                 args.connections))  # fmt: skip
                metrics = _queue(base)
    print(
        f"wrk: 1 thread, {args.connections} connections, {args.rounds} rounds x "
        f"{args.seconds} s per route; server on one core, delivering to a local sink"
    )
    print(f"{'route':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    medians = {}
    for name, rounds in results.items():
        medians[name] = statistics.median(r["rate"] for r in rounds)
        print(
            f"{name:10} {medians[name]:9,.0f} {statistics.median(r['p50'] for r in rounds):8.2f} "
            f"{statistics.median(r['p99'] for r in rounds):8.2f} "
            f"{sum(r['errors'] for r in rounds):8.0f}"
        )
    ratio = medians["durable"] / medians["noop"]
    verdict = "meets" if ratio >= 0.5 else "MISSES"
    print(f"durable / no-op = {ratio:.2f}: {verdict} the 0.5 target")
    print(f"operations still queued for the sink when the run ended: {metrics}")


def _queue(base: str) -> str:
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=5).text
    found = re.findall(r"^connector_queue_depth\{[^}]*\} ([\d.e+]+)$", text, re.MULTILINE)
    return json.dumps([float(v) for v in found])


if __name__ == "__main__":
    main()
