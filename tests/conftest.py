import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    # Heavy tests run with SEALMESH_SLOW=1 (make test-all); CI runs the rest.
    if os.environ.get("SEALMESH_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set SEALMESH_SLOW=1 (make test-all) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
