import faulthandler
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A segfault in a native library (libp2p's crypto, Concrete, torch) kills the whole run
# with one line from make. Python's fault handler then prints every thread's stack on the
# terminal's stdout, which is what CI shows. Not on fd 1 as this file finds it at import:
# pytest imports conftest files with its own capture on fd 1 (and fd 2), so a report
# written there went into the capture's temp file and died with the process. By
# pytest_configure that capture is suspended (the terminal reporter takes the real stdout
# then too), so the dup made here is the real stdout for the whole run.
_FAULT_OUT = None


def pytest_configure(config):
    global _FAULT_OUT
    _FAULT_OUT = os.fdopen(os.dup(1), "w")  # kept open: the handler writes to its fd at crash time
    faulthandler.enable(file=_FAULT_OUT, all_threads=True)


def pytest_runtest_setup(item):
    # Armed again before every test: compiling a Concrete circuit loads LLVM, which puts its
    # own SIGSEGV handler in place of Python's (its stack dump goes to stderr, which pytest
    # captures, so a crash after the first FHE test left nothing behind). enable() alone
    # is a no-op while Python thinks its handler is still there.
    if _FAULT_OUT is not None:
        faulthandler.disable()
        faulthandler.enable(file=_FAULT_OUT, all_threads=True)


def pytest_collection_modifyitems(config, items):
    # Heavy tests run with SEALMESH_SLOW=1 (make test-all); CI runs the rest.
    if os.environ.get("SEALMESH_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set SEALMESH_SLOW=1 (make test-all) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
