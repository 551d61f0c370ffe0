"""Webhook ingestion: accepted events per second and latency of the durable route, against a
no-op route of the same server stack, in the same run.

The server runs `connector serve`'s app and uvicorn settings in its own process, with its
pipeline process (planner and delivery to a live local sink) beside it; wrk drives it from
core 1, where the sink also runs, with distinct customer events (every request a new customer
version, so each is a real insert). Rounds alternate no-op / durable so machine noise hits
both alike, and both routes count as webhooks: while either saturates the receiver, planning
and delivery step aside alike (connector/_pressure.py). Besides the rates it prints the
receiver's CPU per request (and the part of it its event loop's thread took: the rest is the
commit thread's, SQLite's work and its fsync included) and how busy the pipeline process was,
per route. Needs wrk (`apt-get install wrk`). Target (issue 17): the durable route at least
0.8 of the no-op's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import TOKEN, event_body, pinned, server_process, sink_process, write_config

TARGET = 0.8  # the durable route's throughput over the no-op's (issue 17)
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def own_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU of ``pid`` alone, not its children, or of its thread ``tid`` alone
    (Linux /proc; 0 elsewhere)."""
    stat = Path(f"/proc/{pid}/stat") if tid is None else Path(f"/proc/{pid}/task/{tid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def child_pid(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


LUA = """
-- every request is a new customer version: an 8-digit id and a fixed-width timestamp, so all
-- requests have the same length. The raw request is rendered once around two markers, and each
-- request only joins five strings: the client's own CPU (gsub over the body, then wrk.format)
-- took 35-45 us a request, about as much as the no-op route's server, on a 2-core machine.
local template = [==[%s]==]
local start = %d
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
local ID, TS = string.rep("#", 8), string.rep("@", 29)
local function timestamp(s)
  return string.format("2026-06-%%02dT%%02d:%%02d:%%02d.000-07:00",
    1 + math.floor(s / 86400) %% 28, math.floor(s / 3600) %% 24, math.floor(s / 60) %% 60, s %% 60)
end
local raw = wrk.format(nil, nil, nil, (template:gsub("__ID__", ID):gsub("__TS__", TS)))
local a = assert(string.find(raw, ID, 1, true))
local b = assert(string.find(raw, TS, 1, true))
assert(a < b and #timestamp(0) == #TS)
local r1, r2, r3 = raw:sub(1, a - 1), raw:sub(a + #ID, b - 1), raw:sub(b + #TS)
local counter = 0
request = function()
  counter = counter + 1
  local id = tostring(start + counter)
  assert(#id == #ID)
  return r1 .. id .. r2 .. timestamp(counter) .. r3
end
"""


def wrk(url: str, script: Path, seconds: int, connections: int) -> dict[str, float]:
    command = [
        *pinned(1),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)

    def latency(pct: str) -> float:
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        assert match is not None, out
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {
        "rate": rate,
        "p50": latency("50"),
        "p99": latency("99"),
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=6, help="per round")
    parser.add_argument("--rounds", type=int, default=5)
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
            scripts[name].write_text(LUA % (template, start, TOKEN))
        with sink_process(work) as (sink_url, _log):
            config = write_config(work, sink_url)
            pids: list[int] = []
            with server_process(config, cpu=None, pids=pids) as base:
                server, pipeline = pids[0], child_pid(pids[0])
                urls = {
                    "noop": f"{base}/noop/partnersandbox3",
                    "durable": f"{base}/webhooks/treez/partnersandbox3",
                }
                for name in ("noop", "durable"):  # warm up
                    wrk(urls[name], scripts[name], 2, args.connections)
                results: dict[str, list[dict[str, float]]] = {"noop": [], "durable": []}
                for _ in range(args.rounds):
                    for name in ("noop", "durable"):
                        before = (
                            own_cpu_seconds(server),
                            own_cpu_seconds(pipeline or 0),
                            own_cpu_seconds(server, server),
                        )
                        result = wrk(urls[name], scripts[name], args.seconds, args.connections)
                        requests = max(1.0, result["rate"] * args.seconds)
                        result["receiver_us"] = (
                            (own_cpu_seconds(server) - before[0]) / requests * 1e6
                        )
                        # the main thread runs the event loop (uvicorn's)
                        result["loop_us"] = (
                            (own_cpu_seconds(server, server) - before[2]) / requests * 1e6
                        )
                        result["pipeline_cores"] = (
                            own_cpu_seconds(pipeline or 0) - before[1]
                        ) / args.seconds
                        results[name].append(result)
                metrics = _queue(base)
    print(
        f"wrk: 1 thread, {args.connections} connections, {args.rounds} rounds x "
        f"{args.seconds} s per route; wrk and the sink on core 1, the server and its "
        "pipeline process unpinned"
    )
    print(
        f"{'route':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}"
        f" {'receiver CPU us/req':>20} {'of it loop':>11} {'pipeline cores':>15}"
    )
    medians = {}
    for name, rounds in results.items():
        medians[name] = statistics.median(r["rate"] for r in rounds)

        def median(key: str, rounds: list[dict[str, float]] = rounds) -> float:
            return statistics.median(r[key] for r in rounds)

        print(
            f"{name:10} {medians[name]:9,.0f} {median('p50'):8.2f} {median('p99'):8.2f} "
            f"{sum(r['errors'] for r in rounds):8.0f} {median('receiver_us'):20.0f} "
            f"{median('loop_us'):11.0f} {median('pipeline_cores'):15.2f}"
        )
    ratio = medians["durable"] / medians["noop"]
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(f"durable / no-op = {ratio:.2f}: {verdict} the {TARGET} target")
    # the spread from round to round (each durable round against the no-op round before it):
    # how far to trust the median on this machine
    paired = zip(results["noop"], results["durable"], strict=True)
    pairs = [durable["rate"] / noop["rate"] for noop, durable in paired]
    print(f"per round: {min(pairs):.2f} to {max(pairs):.2f}")
    print(f"operations still queued for the sink when the run ended: {metrics}")


def _queue(base: str) -> str:
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=5).text
    found = re.findall(r"^connector_queue_depth\{[^}]*\} ([\d.e+]+)$", text, re.MULTILINE)
    return json.dumps([float(v) for v in found])


if __name__ == "__main__":
    main()
