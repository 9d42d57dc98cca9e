"""The loss curve of `dslc train`: matplotlib when it is installed (the `bench` extra), else a plain PNG drawn
here with zlib alone (axes, the train loss in blue, eval loss points in red; no text)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

BLUE, RED, GREY, WHITE = (31, 119, 180), (214, 39, 40), (160, 160, 160), (255, 255, 255)


def loss_curve(path: Path, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> str:
    """Write the PNG; returns how it was drawn (for the log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_png(path, *_raster(train, evals))
        return "drawn without matplotlib: no labels; `pip install matplotlib` for a labelled chart"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def _raster(train, evals, width: int = 640, height: int = 360, margin: int = 30):
    pixels = [[WHITE] * width for _ in range(height)]
    points = train + evals
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    else:
        x0, x1, y0, y1 = 0, 1, 0, 1
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def at(step, loss):
        x = margin + (step - x0) / (x1 - x0) * (width - 2 * margin)
        y = height - margin - (loss - y0) / (y1 - y0) * (height - 2 * margin)
        return int(round(x)), int(round(y))

    def put(x, y, color, r=0):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if 0 <= x + dx < width and 0 <= y + dy < height:
                    pixels[y + dy][x + dx] = color

    def line(a, b, color):
        (xa, ya), (xb, yb) = a, b
        n = max(abs(xb - xa), abs(yb - ya), 1)
        for i in range(n + 1):
            put(round(xa + (xb - xa) * i / n), round(ya + (yb - ya) * i / n), color)

    line((margin, height - margin), (width - margin, height - margin), GREY)
    line((margin, margin), (margin, height - margin), GREY)
    for a, b in zip(train, train[1:]):
        line(at(*a), at(*b), BLUE)
    if len(train) == 1:
        put(*at(*train[0]), BLUE, 2)
    for p in evals:
        put(*at(*p), RED, 3)
    return width, height, pixels


def write_png(path: Path, width: int, height: int, pixels) -> None:
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    )
