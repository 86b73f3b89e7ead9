import faulthandler
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A segfault in a native library (libp2p's crypto, Concrete, torch) kills the whole run
# with one line from make. Python's fault handler then prints every thread's stack, on a
# duplicate of stdout (kept open for the run: the handler writes to its fd at crash time),
# since stdout is what CI shows and pytest captures sys.stderr.
_FAULT_OUT = os.fdopen(os.dup(1), "w")
faulthandler.enable(file=_FAULT_OUT, all_threads=True)


def pytest_collection_modifyitems(config, items):
    # Heavy tests run with SEALMESH_SLOW=1 (make test-all); CI runs the rest.
    if os.environ.get("SEALMESH_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set SEALMESH_SLOW=1 (make test-all) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
