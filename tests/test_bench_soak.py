"""The soak bench's pieces that can be checked in a blink: the PNG writer (bench/_plot.py) and
the sampler and verdicts of bench/soak.py (the soak itself takes minutes: run by hand)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from fakes.http_sink import Attempt

# the benches are scripts run from the checkout, not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._plot import PALETTE, Canvas, Chart, encode_png, nice_ticks
from bench.pipeline import AttemptsTail
from bench.soak import (
    FIRST_WEBHOOK_ID,
    Sample,
    SinkView,
    churn_expected,
    fds_flat,
    lost,
    open_files,
    pipeline_child,
    rss_growth,
    rss_mib,
    warm_up_end,
)


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of an 8-bit RGB PNG without filters, every CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        at += 12 + length
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, color, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(chunks[1][1])
    stride = width * 3 + 1
    assert len(raw) == stride * height
    assert all(raw[y * stride] == 0 for y in range(height))
    return width, height, b"".join(raw[y * stride + 1 : (y + 1) * stride] for y in range(height))


def test_png_round_trip() -> None:
    pixels = bytes(range(256)) * 3 * 2  # 1536 bytes: 32 x 16 pixels
    assert decode_png(encode_png(32, 16, pixels)) == (32, 16, pixels)
    with pytest.raises(ValueError, match="bytes for 32x16"):
        encode_png(32, 16, pixels[:-1])


def test_canvas_lines_and_text() -> None:
    canvas = Canvas(40, 20)
    red = (255, 0, 0)
    canvas.line(2, 3, 30, 17, red)
    assert canvas.get(2, 3) == red
    assert canvas.get(30, 17) == red
    assert canvas.get(16, 10) == red
    assert canvas.get(30, 3) == (255, 255, 255)
    canvas.line(-5, 0, 100, 0, red)  # clipped, not an error
    assert canvas.get(39, 0) == red
    blank = Canvas(40, 10)
    blank.text(1, 1, "~")  # no glyph: nothing drawn
    assert blank.pixels == Canvas(40, 10).pixels
    blank.text(1, 1, "l")  # lower case drawn as upper case: L's column and foot
    assert blank.get(1, 1) == (0, 0, 0)
    assert blank.get(5, 7) == (0, 0, 0)
    assert blank.get(5, 1) == (255, 255, 255)
    _, _, rgb = decode_png(canvas.png())
    assert rgb == bytes(canvas.pixels)


@pytest.mark.parametrize("largest", [0.3, 1, 7.6, 9.46, 41, 114, 313, 4091, 5944, 1e6])
def test_nice_ticks(largest: float) -> None:
    ticks = nice_ticks(largest)
    step = ticks[1]
    assert ticks[0] == 0
    assert ticks[-1] >= largest > ticks[-2]
    assert len(ticks) - 1 <= 5
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in (1, 2, 2.5, 5)
    assert nice_ticks(0) == [0.0, 1.0]


def test_chart_draws_each_series_in_its_color(tmp_path: Path) -> None:
    chart = Chart(2, 1)
    chart.panel(0, "RSS (MIB)", [("A", [0, 10, 20], [1, 5, 3]), ("B", [0, 20], [2, 2])])
    chart.panel(1, "EMPTY", [("C", [], [])])
    path = tmp_path / "chart.png"
    chart.save(path)
    width, height, rgb = decode_png(path.read_bytes())
    assert (width, height) == (2 * Chart.PANEL_W, Chart.PANEL_H)
    colours = {rgb[i : i + 3] for i in range(0, len(rgb), 3)}
    assert bytes(PALETTE[0]) in colours
    assert bytes(PALETTE[1]) in colours


def sample(t: float, phase: str = "load", **values: float) -> Sample:
    base = {
        "rss_server": 100.0,
        "rss_pipeline": 100.0,
        "fds_server": 20,
        "fds_pipeline": 30,
        "store": 1.0,
        "wal": 1.0,
        "posted": 0,
        "delivered": 0,
        "treez_ops": 0,
        "failed": 0,
        "dead": 0,
        "queue": 0,
        "runs": 0,
        "pipeline_pid": 1,
    }
    return Sample(t=t, phase=phase, **{**base, **values})


def test_rss_growth_from_the_first_sample_after_warm_up() -> None:
    samples = [sample(t, rss_server=200.0 if t < 60 else 100.0 + t / 10) for t in range(0, 190, 10)]
    samples.append(sample(190, "drain", rss_server=500.0))  # the drain is not judged
    first, last, growth = rss_growth(samples, "rss_server")
    assert (first, last) == (106.0, 118.0)
    assert growth == pytest.approx(118 / 106 - 1)
    with pytest.raises(ValueError, match="warm-up"):
        rss_growth(samples[:5], "rss_server")


def test_the_warm_up_lasts_until_the_first_reconciliation_has_finished() -> None:
    # the first run ends between t=70 and t=80 and steps the pipeline's RSS up once: judged
    # from t=80, and a later growth still counts
    samples = [
        sample(t, rss_pipeline=90.0 if t < 80 else 99.0, runs=0 if t < 80 else 1)
        for t in range(0, 300, 10)
    ]
    assert warm_up_end(samples) == 80
    assert rss_growth(samples, "rss_pipeline") == (99.0, 99.0, 0.0)
    samples[-1] = sample(290, rss_pipeline=110.0, runs=2)
    assert rss_growth(samples, "rss_pipeline")[2] == pytest.approx(110 / 99 - 1)
    # a first run within the first minute: the minute stands
    early = [sample(t, runs=0 if t < 30 else 1) for t in range(0, 200, 10)]
    assert warm_up_end(early) == 60
    # no run finished: the minute stands too
    assert warm_up_end([sample(t) for t in range(0, 200, 10)]) == 60


def test_open_files_must_not_pass_the_plateau() -> None:
    flat = [sample(t, fds_server=25 if t in (70, 80) else 22) for t in range(0, 200, 10)]
    assert fds_flat(flat, "fds_server") == (25, 22, True)
    leak = [sample(t, fds_server=20 + t // 10) for t in range(0, 200, 10)]
    plateau, last, ok = fds_flat(leak, "fds_server")
    assert (plateau, last, ok) == (32, 39, False)  # the plateau: up to t=120


def test_one_step_in_the_first_half_is_not_growth() -> None:
    # a pool's connection opened at the first reconciliation (t=130), then flat to the end
    step = [sample(t, fds_pipeline=38 if t < 130 else 39) for t in range(0, 250, 10)]
    assert fds_flat(step, "fds_pipeline") == (39, 39, True)
    late = [sample(t, fds_pipeline=38 if t < 200 else 39) for t in range(0, 250, 10)]
    assert fds_flat(late, "fds_pipeline") == (38, 39, False)


def test_lost_counts_the_latest_value_in_sink_or_dead_letters() -> None:
    expected = {"1": 3, "2": 2, "3": 5}
    assert lost(expected, {"1": 3, "2": 4}, {"3": 5}) == []
    assert lost(expected, {"1": 2, "2": 2}, {"3": 4}) == ["1", "3"]
    assert lost(expected) == ["1", "2", "3"]


def attempt(status: int, *ops: dict[str, object]) -> str:
    record = Attempt(
        received=0.0,
        wall=0.0,
        answered=0.0,
        method="POST",
        path="/ops",
        idempotency_key="k",
        status=status,
        retry_after=None,
        batch=False,
        ops=list(ops),
        response=None,
    )
    return json.dumps(dataclasses.asdict(record)) + "\n"


def test_sink_view_reads_new_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "attempts.jsonl"
    webhook = str(FIRST_WEBHOOK_ID + 1)

    def op(cid: str, key: str, balance: object) -> dict[str, object]:
        return {"customer_id": cid, "idempotency_key": key, "fields": {"rewards_balance": balance}}

    log.write_text(attempt(200, op(webhook, "a", 2)) + attempt(500, op(webhook, "b", 3)))
    view = SinkView(AttemptsTail(log))
    view.update()
    with log.open("a") as fh:  # a retry of the same key, a Treez customer, half a line
        fh.write(attempt(200, op(webhook, "a", 2)) + attempt(200, op("1001", "c", "x")))
        fh.write(attempt(200, op(webhook, "d", 4))[:20])
    view.update()
    assert (len(view.webhook_keys), len(view.treez_keys), view.failed) == (1, 1, 1)
    assert view.best == {webhook: 2}


def test_churn_expected_keeps_the_last_value_before(tmp_path: Path) -> None:
    log = tmp_path / "changes.log"
    log.write_text("10.0 1001 1000001\n11.0 1002 1000002\n12.0 1001 1000003\n20.0 1002 9\n")
    assert churn_expected(log, 15.0) == {"1001": 1000003, "1002": 1000002}
    assert churn_expected(tmp_path / "none.log", 15.0) == {}


def test_proc_readings_and_the_pipeline_child() -> None:
    assert rss_mib(os.getpid()) > 1
    assert open_files(os.getpid()) > 2
    assert pipeline_child(os.getpid()) == 0
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", "connector.pipeline_child"],
        stdin=subprocess.PIPE,
    )
    try:
        assert pipeline_child(os.getpid()) == child.pid
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
    assert rss_mib(child.pid) == 0
    assert open_files(child.pid) == 0
