"""tests/test_nat_limits.py in a process of its own (why: that file's header).

The child is a pytest of that file alone, with this suite's conftest, so its fault
handler still reports a native crash on the child's stdout, which this test shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_relay_limit_tests_pass_in_a_fresh_process():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_nat_limits.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "SEALMESH_NAT_LIMITS_CHILD": "1", "PYTHONPATH": str(ROOT)})
    tail = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], tail
