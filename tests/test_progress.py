"""Progress lines for long work: bar, rate and time left on a terminal; nothing elsewhere
(issue 17 item 4)."""

from __future__ import annotations

import io

from node.progress import Progress, render_line


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
