"""A small line-chart writer for the benches: an RGB canvas, straight lines, a 5x7 bitmap font
and a PNG encoder on ``zlib`` (no plotting library is in the lock).

    chart = Chart(2, 3)  # columns, rows of panels
    chart.panel(0, "RSS MIB", [("SERVER", xs, ys), ("PIPELINE", xs, ys2)], x_label="SECONDS")
    chart.save(Path("soak.png"))
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

Color = tuple[int, int, int]
Series = tuple[str, Sequence[float], Sequence[float]]  # name, xs, ys

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GRID: Color = (225, 225, 225)
PALETTE: tuple[Color, ...] = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))

# 5x7 glyphs, one string of five pixels per row ("#" lit); lower case is drawn as upper case
_FONT_ROWS = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    " ": (".....",) * 7,
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    ",": (".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."),
    ":": (".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    "+": (".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."),
    "/": (".....", "....#", "...#.", "..#..", ".#...", "#....", "....."),
    "%": ("##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"),
    "(": ("...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."),
    ")": (".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."),
    "_": (".....", ".....", ".....", ".....", ".....", ".....", "#####"),
    "=": (".....", ".....", "#####", ".....", "#####", ".....", "....."),
    "<": ("...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."),
    ">": (".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."),
}
FONT: dict[str, tuple[tuple[int, int], ...]] = {
    char: tuple((x, y) for y, row in enumerate(rows) for x, lit in enumerate(row) if lit == "#")
    for char, rows in _FONT_ROWS.items()
}
GLYPH_W, GLYPH_H, ADVANCE = 5, 7, 6


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (rows top to bottom, three bytes a pixel)."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"{len(rgb)} bytes for {width}x{height} RGB pixels")
    stride = width * 3
    # filter type 0 (none) before each row
    raw = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


class Canvas:
    """Pixels on a white background; drawing outside is clipped."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            at = (y * self.width + x) * 3
            self.pixels[at : at + 3] = bytes(color)

    def get(self, x: int, y: int) -> Color:
        at = (y * self.width + x) * 3
        r, g, b = self.pixels[at : at + 3]
        return r, g, b

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, thick: int = 1) -> None:
        """Bresenham's line; ``thick`` > 1 repeats it one pixel down and right."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for t in range(thick):
                self.set(x0 + t, y0, color)
                self.set(x0, y0 + t, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color: Color = BLACK) -> int:
        """``text`` with its top left corner at (x, y); returns the x after it. Characters
        the small font lacks are left blank."""
        for char in text.upper():
            for gx, gy in FONT.get(char, ()):
                self.set(x + gx, y + gy, color)
            x += ADVANCE
        return x

    def vtext(self, x: int, y: int, text: str, color: Color = BLACK) -> None:
        """``text`` turned a quarter left (read bottom to top), its bottom left at (x, y)."""
        for char in text.upper():
            for gx, gy in FONT.get(char, ()):
                self.set(x + gy, y - gx, color)
            y -= ADVANCE

    def png(self) -> bytes:
        return encode_png(self.width, self.height, bytes(self.pixels))


def text_width(text: str) -> int:
    return len(text) * ADVANCE - 1 if text else 0


def nice_ticks(largest: float, most: int = 5) -> list[float]:
    """Ticks from 0 at a round step (1, 2 or 5 times a power of ten), at most ``most``
    intervals, the last one at or above ``largest``."""
    if largest <= 0:
        return [0.0, 1.0]
    step = 10 ** math.floor(math.log10(largest / most))
    for factor in (1, 2, 2.5, 5, 10):
        if largest / (step * factor) <= most:
            step *= factor
            break
    count = math.ceil(largest / step - 1e-9)
    return [step * i for i in range(count + 1)]


def short(value: float) -> str:
    """A tick label: 3 significant figures, K/M for large values."""
    magnitude = abs(value)
    if magnitude >= 10_000_000:
        return f"{value / 1e6:.0f}M"
    if magnitude >= 10_000:
        return f"{value / 1e3:.0f}K"
    if magnitude >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.3g}"


class Chart:
    """A grid of panels, each with its own axes, one line per series and a legend."""

    PANEL_W, PANEL_H = 520, 240
    LEFT, RIGHT, TOP, BOTTOM = 62, 14, 34, 34

    def __init__(self, columns: int, rows: int) -> None:
        self.columns, self.rows = columns, rows
        self.canvas = Canvas(columns * self.PANEL_W, rows * self.PANEL_H)

    def panel(
        self,
        index: int,
        title: str,
        series: Sequence[Series],
        *,
        x_label: str = "SECONDS",
        y_label: str = "",
        marks: Sequence[float] = (),
    ) -> None:
        """Draw panel ``index`` (row by row): ``series`` as lines on common axes from 0 to a
        round value at or above the largest, ``marks`` as dotted vertical lines at those x."""
        c = self.canvas
        ox = (index % self.columns) * self.PANEL_W
        oy = (index // self.columns) * self.PANEL_H
        left, top = ox + self.LEFT, oy + self.TOP
        right, bottom = ox + self.PANEL_W - self.RIGHT, oy + self.PANEL_H - self.BOTTOM
        xs_all = [x for _, xs, _ in series for x in xs] or [0.0]
        ys_all = [y for _, _, ys in series for y in ys] or [0.0]
        x_ticks, y_ticks = nice_ticks(max(xs_all)), nice_ticks(max(ys_all))
        x_max, y_max = x_ticks[-1], y_ticks[-1]

        def px(x: float) -> int:
            return left + round((right - left) * x / x_max)

        def py(y: float) -> int:
            return bottom - round((bottom - top) * y / y_max)

        c.text(ox + self.LEFT, oy + 8, title)
        for value in y_ticks:  # horizontal grid lines and y labels
            y = py(value)
            c.line(left, y, right, y, GRID)
            label = short(value)
            c.text(left - 6 - text_width(label), y - 3, label)
        for value in x_ticks:
            label = short(value)
            x = px(value)
            c.line(x, bottom, x, bottom + 3, BLACK)
            c.text(x - text_width(label) // 2, bottom + 7, label)
        c.text(right - text_width(x_label), bottom + 19, x_label)
        if y_label:
            c.vtext(ox + 6, bottom, y_label)
        for mark in marks:
            x = px(mark)
            for y in range(top, bottom, 4):
                c.set(x, y, (150, 150, 150))
        c.line(left, top, left, bottom, BLACK)
        c.line(left, bottom, right, bottom, BLACK)
        legend_x = right
        for number, (name, xs, ys) in reversed(list(enumerate(series))):
            color = PALETTE[number % len(PALETTE)]
            points = [(px(x), py(y)) for x, y in zip(xs, ys, strict=True)]
            for (x0, y0), (x1, y1) in itertools.pairwise(points):
                c.line(x0, y0, x1, y1, color, thick=2)
            if len(points) == 1:
                c.line(*points[0], *points[0], color, thick=3)
            legend_x -= text_width(name) + 4
            c.text(legend_x, oy + 20, name, color)
            legend_x -= 12
            c.line(legend_x, oy + 23, legend_x + 8, oy + 23, color, thick=2)
            legend_x -= 8

    def save(self, path: Path) -> None:
        path.write_bytes(self.canvas.png())
