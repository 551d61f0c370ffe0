"""Parse + map throughput of the seed event, against json.loads of the same bytes.

Run by hand (`make bench` or `.venv/bin/python bench/mapping.py`). Every figure is measured in
this run, interleaved round by round so machine noise hits all of them alike, and judged on
the best round of each (as timeit advises: slower rounds measure interference, not the code);
the median is printed beside it. The ratio to json.loads is what to compare between machines.
Target: parse+map >= 1/3 of json.loads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
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

    cases: dict[str, Callable[[], object]] = {
        "json.loads (baseline)": lambda: json.loads(BODY),
        "parse (bytes → model)": parse,
        "map only": lambda: mapping.apply(event.customer, "partnersandbox3"),
        "parse + map": parse_and_map,
    }
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
    verdict = "meets" if ratio >= 1 / 3 else "MISSES"
    print(f"parse + map runs at {ratio:.2f}x json.loads: {verdict} the 0.33x target")


if __name__ == "__main__":
    main()
