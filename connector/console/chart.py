"""The overview's throughput chart: operations delivered per hour over the last day, as an
SVG drawn on the server (no script, no chart library, readable without JavaScript)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from markupsafe import Markup, escape

WIDTH, HEIGHT = 960, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 40


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... at least ``value``: a y-axis top that reads."""
    if value <= 1:
        return 1
    magnitude: int = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude  # pragma: no cover - the loop always returns


def buckets(
    points: Sequence[tuple[float, int]], now: float, count: int, size: int
) -> list[tuple[float, int]]:
    """``count`` buckets of ``size`` seconds ending with the one holding ``now``, each with
    its delivered count (0 where the store had none)."""
    last = math.floor(now / size) * size
    starts = [last - size * (count - 1 - i) for i in range(count)]
    found = {int(start): n for start, n in points}
    return [(start, found.get(int(start), 0)) for start in starts]


def throughput_svg(
    points: Sequence[tuple[float, int]], now: float, *, count: int = 24, size: int = 3600
) -> Markup:
    """A bar per bucket, the y axis in operations, the x axis in UTC hours."""
    bars = buckets(points, now, count, size)
    top = nice_ceiling(max((n for _, n in bars), default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / count
    total = sum(n for _, n in bars)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="chart-title" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="chart-title">Operations delivered per hour, last {count} hours: '
        f"{total} in all</title>",
    ]
    for tick in (0, top // 2, top) if top >= 2 else (0, top):
        y = TOP + plot_h - plot_h * tick / top
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>'
        )
    for i, (start, n) in enumerate(bars):
        x = LEFT + i * slot
        h = plot_h * n / top
        hour = datetime.fromtimestamp(start, UTC)
        label = hour.strftime("%Y-%m-%d %H:%M UTC")
        parts.append(
            f'<rect class="bar" x="{x + 2:.1f}" y="{TOP + plot_h - h:.1f}" '
            f'width="{slot - 4:.1f}" height="{h:.1f}"><title>{escape(label)}: {n} delivered'
            "</title></rect>"
        )
        if i % 3 == 0 or i == count - 1:
            parts.append(
                f'<text class="tick" x="{x + slot / 2:.1f}" y="{HEIGHT - BOTTOM + 16}" '
                f'text-anchor="middle">{hour:%H:%M}</text>'
            )
    parts.append(
        f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" '
        f'y2="{TOP + plot_h}"/><line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" '
        f'y2="{TOP + plot_h}"/>'
        f'<text class="label" x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" '
        'text-anchor="middle">hour (UTC)</text>'
        f'<text class="label" x="14" y="{TOP + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {TOP + plot_h / 2:.1f})">delivered</text></svg>'
    )
    return Markup("".join(parts))  # noqa: S704 - built from numbers and escaped text only
