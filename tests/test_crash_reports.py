"""A native crash during `make test` must leave a traceback where CI shows it (stdout).

CI once ended with only make's "Segmentation fault" line. tests/conftest.py enables
Python's fault handler on the real stdout; this runs a child pytest whose conftest is
that one, loaded the way pytest loads ours (as a conftest, under pytest's own capture,
which is where a first version of this handler wrote its report and lost it), with a
test that really segfaults, and reads the child's stdout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_segfault_in_a_test_prints_its_traceback_on_stdout(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F401,F403\n")
    # The first test takes SIGSEGV over, as LLVM does when Concrete compiles a circuit.
    (tmp_path / "test_crashes.py").write_text(
        "import faulthandler\nimport signal\n\n"
        "def test_a_library_takes_the_signal_over():\n"
        "    signal.signal(signal.SIGSEGV, signal.SIG_DFL)\n\n"
        "def test_reaches_native_code():\n"
        "    faulthandler._sigsegv()\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_crashes.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    assert "Fatal Python error: Segmentation fault" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "test_reaches_native_code" in done.stdout
