"""Progress of long work a person waits for (key ceremony, FHE compile, blob transfers,
testnet phases): one line redrawn in place, with a bar when the total is known, the rate
and the time left. Quiet when the stream is not a terminal, so logs and pipes get none
of it (issue 17 item 4).

    with Progress("fhe compile", total=len(layers), unit="layers") as progress:
        for layer in layers:
            compile(layer)
            progress.advance()
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

BAR_WIDTH = 24
REDRAW_S = 0.1  # at most ten redraws a second: a tight loop must not spend its time drawing


class Progress:
    def __init__(self, label: str, total: float | None = None, *, unit: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled
        self.clock = clock
        self.started = clock()
        self.done = 0.0
        self._drawn_at: float | None = None
        self._width = 0

    def advance(self, amount: float = 1) -> None:
        self.update(self.done + amount)

    def update(self, done: float) -> None:
        self.done = done
        now = self.clock()
        if self.enabled and (self._drawn_at is None or now - self._drawn_at >= REDRAW_S):
            self._draw(now)

    def finish(self) -> None:
        """The last state, then a newline, so what follows starts on its own line."""
        if self.enabled:
            self._draw(self.clock())
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def _draw(self, now: float) -> None:
        line = render_line(self.label, self.done, self.total, now - self.started, self.unit)
        pad = " " * max(0, self._width - len(line))  # wipe what a longer line left
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self._width, self._drawn_at = len(line), now


def render_line(label: str, done: float, total: float | None, elapsed_s: float, unit: str = "") -> str:
    """'label [#####-----] 42/100 layers, 12.3 layers/s, 5 s left' (bytes: KiB, MiB...)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    amount = _amount(done, unit)
    if total:
        fraction = min(1.0, max(0.0, done / total))
        filled = round(fraction * BAR_WIDTH)
        left = f", {_duration((total - done) / rate)} left" if rate > 0 and done < total else ""
        return (f"{label} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {fraction:4.0%} "
                f"{amount}/{_amount(total, unit)}, {_amount(rate, unit)}/s{left}")
    return f"{label} {amount}, {_amount(rate, unit)}/s, {_duration(elapsed_s)}"


def _amount(value: float, unit: str) -> str:
    if unit == "bytes":
        for name in ("B", "KiB", "MiB", "GiB"):
            if abs(value) < 1024 or name == "GiB":
                return f"{value:.0f} {name}" if name == "B" else f"{value:.1f} {name}"
            value /= 1024
    number = f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    return f"{number} {unit}".rstrip()


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a file
        return False


__all__ = ["Progress", "render_line"]
