"""Progress lines for long work: bar, rate and time left on a terminal; nothing elsewhere
(issue 17 item 4)."""

from __future__ import annotations

import io
import logging
import time

import pytest

from node.progress import PhaseProgress, Progress, ProgressLogHandler, TerminalLine, render_line, render_phase_line


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_with_bar_rate_and_time_left():
    assert render_line("fhe compile", 25, 100, 5.0, "layers") == \
        "fhe compile [######------------------]  25% 25 layers/100 layers, 5 layers/s, 15 s left"
    assert render_line("blob", 3 * 1024 * 1024, 12 * 1024 * 1024, 2.0, "bytes").endswith(
        "3.0 MiB/12.0 MiB, 1.5 MiB/s, 6 s left")
    assert render_line("ceremony", 10, None, 125.0, "steps") == "ceremony 10 steps, 0.1 steps/s, 2 min 05 s"
    assert "left" not in render_line("done", 100, 100, 9.0)  # finished: nothing left to wait for


def test_on_a_terminal_it_redraws_one_line_and_ends_it():
    out, clock = Terminal(), Clock()
    with Progress("keygen", total=4, unit="steps", stream=out, clock=clock) as p:
        for _ in range(4):
            clock.now += 1.0
            p.advance()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, redrawn with \r
    frames = [f.rstrip() for f in text.rstrip("\n").split("\r") if f]
    assert frames[0].startswith("keygen [######") and "3 s left" in frames[0]
    assert frames[-1] == "keygen [########################] 100% 4 steps/4 steps, 1 steps/s"


def test_redraws_are_rate_limited():
    out, clock = Terminal(), Clock()
    p = Progress("blob", total=10_000, stream=out, clock=clock)
    for _ in range(10_000):  # no time passes: one frame, not ten thousand
        p.advance()
    assert out.getvalue().count("\r") == 1


def test_quiet_when_not_a_terminal():
    out = io.StringIO()  # a pipe or a log file
    with Progress("testnet", total=3, stream=out) as p:
        p.advance(3)
    assert out.getvalue() == ""


def test_a_phase_line_names_the_step_its_detail_and_the_time_so_far():
    out, clock = Terminal(), Clock()
    with PhaseProgress("keygen member 1", ["hello", "modulus", "writing"], stream=out, clock=clock,
                       tick_s=None) as line:
        line.enter("hello")
        clock.now += 75
        line.enter("modulus", "candidate round 3")
    frames = [f.rstrip() for f in out.getvalue().rstrip("\n").split("\r") if f]
    assert frames[0] == "keygen member 1 [------------------------] 1/3 hello, 0 s"
    assert frames[1] == "keygen member 1 [########----------------] 2/3 modulus (candidate round 3), 1 min 15 s"
    assert frames[-1] == "keygen member 1: done (1 min 15 s)"
    assert render_phase_line("x", ["a", "b"], "starting", "", 1.0).startswith("x [----")  # before the first


def test_a_phase_line_that_fails_says_where_and_a_ticker_keeps_the_time_moving():
    out = Terminal()
    with pytest.raises(RuntimeError):
        with PhaseProgress("fhe compile", ["build", "compile", "save"], stream=out, tick_s=0.02) as line:
            line.enter("compile")
            time.sleep(0.2)  # a long step that reports nothing: the ticker redraws it
            raise RuntimeError("compiler said no")
    text = out.getvalue()
    assert text.count("2/3 compile") >= 3, text
    assert _screen(text) == ["fhe compile: stopped in compile (0 s)"]
    assert PhaseProgress("quiet", ["a"], stream=io.StringIO())._ticker is None  # no thread off a terminal


def test_a_log_record_goes_above_the_line_and_the_line_comes_back():
    out = Terminal()
    handler = ProgressLogHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test_progress.lift")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        line = TerminalLine(out)
        line.show("blob abc [####] 40%")
        logger.warning("a holder failed")
        line.say("testnet: mesh complete")
        line.end()
    finally:
        logger.removeHandler(handler)
    screen = _screen(out.getvalue())
    assert screen == ["a holder failed", "testnet: mesh complete", "blob abc [####] 40%"], screen


def test_off_a_terminal_events_are_printed_and_the_redrawn_line_is_not():
    out = io.StringIO()
    line = TerminalLine(out)
    line.show("testnet: up 1/5")
    line.say("testnet: starting pings")
    line.end()
    assert out.getvalue() == "testnet: starting pings\n"


def test_the_rate_of_a_resumed_transfer_counts_only_what_came_now():
    out, clock = Terminal(), Clock()
    p = Progress("blob", total=100, unit="bytes", stream=out, clock=clock, initial=50)
    clock.now += 5
    p.update(60)
    assert "60 B/100 B, 2 B/s, 20 s left" in out.getvalue()


def _screen(text: str) -> list[str]:
    """What a terminal shows after `text`: \\r returns to the line's start and overwrites."""
    lines, current = [], ""
    for part in text.split("\n"):
        for piece in part.split("\r"):
            current = piece + current[len(piece):]
        lines.append(current.rstrip())
        current = ""
    return [line for line in lines if line]
