"""Parse + map throughput of the seed event, against json.loads of the same bytes.

Run by hand (`make bench` or `.venv/bin/python bench/mapping.py`). Every figure is measured in
this run, interleaved round by round so machine noise hits all of them alike, and judged on
the best round of each (as timeit advises: slower rounds measure interference, not the code);
the median is printed beside it. The ratio to json.loads is what to compare between machines.
Target (issue 17): parse+map >= 0.5x json.loads, wall clock, best round.

`--instructions` counts CPU instructions per event instead, with valgrind's callgrind (each
case run as `N` events minus a run of 0 events, so start-up cancels out): repeatable to the
last digit whatever else the machine does, which wall-clock figures here are not.
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
import time
from collections.abc import Callable
from pathlib import Path

from connector.mapping import load_mapping
from connector.treez import CustomerEvent, parse_event_json

ROOT = Path(__file__).resolve().parent.parent
BODY = (ROOT / "tests" / "data" / "seed_body.json").read_bytes()


def per_second(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return number / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mapping", default=str(ROOT / "mappings" / "http.yaml"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=3000, help="events per round")
    parser.add_argument("--instructions", action="store_true", help="count with callgrind")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # one case, once (for callgrind)
    args = parser.parse_args()
    if args.instructions:
        count_instructions(args.mapping)
        return
    if hasattr(os, "sched_setaffinity") and args.only is None:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    mapping = load_mapping(Path(args.mapping))

    def parse() -> CustomerEvent:
        event = parse_event_json(BODY)
        assert isinstance(event, CustomerEvent)
        return event

    event = parse()

    def parse_and_map() -> object:
        e = parse_event_json(BODY)
        assert isinstance(e, CustomerEvent)
        return mapping.apply(e.customer, "partnersandbox3")

    cases: dict[str, Callable[[], object]] = dict(
        zip(
            CASES,
            (
                lambda: json.loads(BODY),
                parse,
                lambda: mapping.apply(event.customer, "partnersandbox3"),
                parse_and_map,
            ),
            strict=True,
        )
    )
    if args.only is not None:
        fn = cases[args.only]
        for _ in range(args.number):
            fn()
        return
    for fn in cases.values():  # warm up
        per_second(fn, 200)
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            rates[name].append(per_second(fn, args.number))

    base = max(rates["json.loads (baseline)"])
    base_median = statistics.median(rates["json.loads (baseline)"])
    print(
        f"seed event: {len(BODY)} bytes; mapping {Path(args.mapping).name} "
        f"({len(mapping.fields)} fields); {args.rounds} rounds x {args.number} events, one core"
    )
    print(f"{'case':30} {'best ev/s':>11} {'µs/event':>9} {'vs loads':>9} {'median':>8}")
    for name, values in rates.items():
        best, median = max(values), statistics.median(values)
        print(
            f"{name:30} {best:11,.0f} {1e6 / best:9.1f} {best / base:8.2f}x "
            f"{median / base_median:7.2f}x"
        )
    ratio = max(rates["parse + map"]) / base
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(f"parse + map runs at {ratio:.2f}x json.loads: {verdict} the {TARGET}x target")


TARGET = 0.5  # parse + map against json.loads (issue 17, target 3)
CASES = ("json.loads (baseline)", "parse (bytes → model)", "map only", "parse + map")


def count_instructions(mapping: str, number: int = 2000) -> None:
    if shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (apt-get install valgrind)")

    def collected(case: str, n: int) -> int:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--mapping",
            mapping,
            "--only",
            case,
            "--number",
            str(n),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        match = re.search(r"Collected : (\d+)", done.stderr)
        assert match is not None, done.stderr[-500:]
        return int(match.group(1))

    per_event = {c: (collected(c, number) - collected(c, 0)) / number for c in CASES}
    base = per_event[CASES[0]]
    print(f"instructions per event (callgrind, {number} events less a run of none)")
    for case, count in per_event.items():
        print(f"{case:30} {count:11,.0f} {base / count:8.2f}x as fast as json.loads")
    ratio = base / per_event["parse + map"]
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(f"parse + map: {ratio:.2f}x json.loads in instructions: {verdict} the {TARGET}x target")


if __name__ == "__main__":
    main()
