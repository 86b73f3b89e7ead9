"""Progress of long work a person waits for (key ceremony, FHE compile, blob transfers,
testnet phases): one line redrawn in place, with a bar when the total is known, the rate
and the time left. Quiet when the stream is not a terminal, so logs and pipes get none
of it (issue 17 item 4).

    with Progress("fhe compile", total=len(layers), unit="layers") as progress:
        for layer in layers:
            compile(layer)
            progress.advance()

Work made of named steps whose inside cannot be measured (one Concrete compile call, a
phase of the key ceremony) uses PhaseProgress, which a thread redraws every second so the
elapsed time keeps moving during a long step. Log records written to the same terminal go
through ProgressLogHandler, which lifts the line, writes the record and puts the line back.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable, Sequence, TextIO

BAR_WIDTH = 24
REDRAW_S = 0.1  # at most ten redraws a second: a tight loop must not spend its time drawing

# One lock for every line and the log handler: a record and a redraw from two threads must
# not interleave their characters.
_LOCK = threading.RLock()
_ACTIVE: list["TerminalLine"] = []


class TerminalLine:
    """One line of text redrawn in place with \\r on a terminal; nothing anywhere else."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled
        self.text = ""
        self._width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        with _LOCK:
            if self not in _ACTIVE:
                _ACTIVE.append(self)
            self.text = text
            self._draw()

    def say(self, text: str) -> None:
        """A line that stays (an event), written above the redrawn one; printed as is
        when the stream is not a terminal."""
        with _LOCK:
            if self.enabled and self in _ACTIVE:
                self._lift()
                self.stream.write(text + "\n")
                self._draw()
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def end(self) -> None:
        """The last text stays; what follows starts on its own line."""
        with _LOCK:
            if self.enabled and self in _ACTIVE:
                self.stream.write("\n")
                self.stream.flush()
                _ACTIVE.remove(self)
            self.enabled = False

    def _draw(self) -> None:
        pad = " " * max(0, self._width - len(self.text))  # wipe what a longer line left
        self.stream.write("\r" + self.text + pad)
        self.stream.flush()
        self._width = len(self.text)

    def _lift(self) -> None:
        self.stream.write("\r" + " " * self._width + "\r")
        self._width = 0


class ProgressLogHandler(logging.StreamHandler):
    """A StreamHandler that keeps a progress line below the records instead of writing
    the record into the middle of it."""

    def emit(self, record: logging.LogRecord) -> None:
        with _LOCK:
            shown = [line for line in _ACTIVE if line.stream is self.stream]
            for line in shown:
                line._lift()
            super().emit(record)
            for line in shown:
                line._draw()


class Progress:
    def __init__(self, label: str, total: float | None = None, *, unit: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 initial: float = 0.0) -> None:
        """`initial`: done before we started (chunks resumed from disk): shown in the bar,
        left out of the rate."""
        self.label, self.total, self.unit = label, total, unit
        self.line = TerminalLine(stream, enabled)
        self.clock = clock
        self.started = clock()
        self.done = self.initial = initial
        self._drawn_at: float | None = None

    @property
    def enabled(self) -> bool:
        return self.line.enabled

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
        self.line.end()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def _draw(self, now: float) -> None:
        self.line.show(render_line(self.label, self.done, self.total, now - self.started, self.unit,
                                   since=self.initial))
        self._drawn_at = now


class PhaseProgress:
    """'fhe compile [######------------------] 2/4 compile, 1 min 05 s': which of a known
    list of steps runs, an optional detail ('candidate round 12'), and the time so far."""

    def __init__(self, label: str, phases: Sequence[str], *, stream: TextIO | None = None,
                 enabled: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 tick_s: float | None = 1.0) -> None:
        self.label, self.phases = label, list(phases)
        self.line = TerminalLine(stream, enabled)
        self.clock = clock
        self.started = clock()
        self.phase, self.detail = "", ""
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.line.enabled and tick_s:
            self._ticker = threading.Thread(target=self._tick, args=(tick_s,), daemon=True,
                                            name=f"progress-{label}")
            self._ticker.start()

    def enter(self, phase: str, detail: str = "") -> None:
        self.phase, self.detail = phase, detail
        self.redraw()

    def note(self, detail: str) -> None:
        self.detail = detail
        self.redraw()

    def redraw(self) -> None:
        if self.phase:
            self.line.show(render_phase_line(self.label, self.phases, self.phase, self.detail,
                                             self.clock() - self.started))

    def finish(self, outcome: str = "done") -> None:
        self._stop.set()
        if self.line.enabled:
            self.line.show(f"{self.label}: {outcome} ({_duration(self.clock() - self.started)})")
        self.line.end()

    def __enter__(self) -> "PhaseProgress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.finish("done" if exc_type is None else f"stopped in {self.phase or 'start-up'}")

    def _tick(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.redraw()


def render_line(label: str, done: float, total: float | None, elapsed_s: float, unit: str = "", *,
                since: float = 0.0) -> str:
    """'label [#####-----] 42/100 layers, 12.3 layers/s, 5 s left' (bytes: KiB, MiB...);
    the rate counts only what was done after `since`."""
    rate = (done - since) / elapsed_s if elapsed_s > 0 else 0.0
    amount = _amount(done, unit)
    if total:
        fraction = min(1.0, max(0.0, done / total))
        left = f", {_duration((total - done) / rate)} left" if rate > 0 and done < total else ""
        return (f"{label} {_bar(fraction)} {fraction:4.0%} "
                f"{amount}/{_amount(total, unit)}, {_amount(rate, unit)}/s{left}")
    return f"{label} {amount}, {_amount(rate, unit)}/s, {_duration(elapsed_s)}"


def render_phase_line(label: str, phases: Sequence[str], phase: str, detail: str, elapsed_s: float) -> str:
    """A phase not in the list (a member's 'starting') shows as step 0."""
    index = phases.index(phase) + 1 if phase in phases else 0
    # The bar counts finished steps: the running one is not done yet.
    bar = _bar((index - 1) / len(phases) if index else 0.0)
    extra = f" ({detail})" if detail else ""
    return f"{label} {bar} {index}/{len(phases)} {phase}{extra}, {_duration(elapsed_s)}"


def _bar(fraction: float) -> str:
    filled = round(fraction * BAR_WIDTH)
    return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}]"


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


__all__ = ["PhaseProgress", "Progress", "ProgressLogHandler", "TerminalLine", "render_line",
           "render_phase_line"]
