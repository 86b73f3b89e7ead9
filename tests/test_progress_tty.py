"""A person at a terminal runs `sealmesh fhe compile` and sees one line that names each step
as it comes; the same command into a pipe prints no such line (issue 17 item 4)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_on_a_terminal(argv: list[str]) -> tuple[int, str]:
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return process.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_fhe_compile_on_a_terminal_shows_its_steps_and_in_a_pipe_does_not(tmp_path):
    command = [sys.executable, "-m", "node.cli", "fhe", "compile", "--model", "digits-cnn"]
    code, screen = _run_on_a_terminal(command + ["--out", str(tmp_path / "tty")])
    assert code == 0, screen
    frames = [f.strip() for f in screen.replace("\n", "\r").split("\r") if f.strip()]
    steps = [f for f in frames if f.startswith("fhe compile digits-cnn [")]
    assert any("2/3 compile" in f for f in steps), frames
    assert any(f.startswith("fhe compile digits-cnn: done (") for f in frames), frames
    assert any(f.startswith("compiled digits-cnn in ") for f in frames)  # the result still follows

    piped = subprocess.run(command + ["--out", str(tmp_path / "pipe")], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert "fhe compile digits-cnn [" not in piped.stderr + piped.stdout
    assert "\r" not in piped.stderr
