"""Names that do not exist fail here, not in a user's run: a challenger that named an
exception class it never imported crashed the first time a miner sent a malformed result
(found by `make demo`, after the mesh stopped hiding role crashes)."""

from __future__ import annotations

from pathlib import Path

import pyflakes.api
import pyflakes.messages
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "protocol", "crypto", "fhe", "training", "bench", "tests")
# Only what is a certain bug at run time; unused imports and the like are style.
BUGS = (pyflakes.messages.UndefinedName, pyflakes.messages.UndefinedLocal, pyflakes.messages.UndefinedExport,
        pyflakes.messages.DuplicateArgument, pyflakes.messages.ReturnOutsideFunction)


class _Collect(Reporter):
    def __init__(self) -> None:
        super().__init__(None, None)
        self.found: list[str] = []

    def flake(self, message) -> None:
        if isinstance(message, BUGS):
            self.found.append(str(message))

    def syntaxError(self, filename, msg, lineno, offset, text) -> None:
        self.found.append(f"{filename}:{lineno}: syntax error: {msg}")

    def unexpectedError(self, filename, msg) -> None:
        self.found.append(f"{filename}: {msg}")


def _check(paths) -> list[str]:
    reporter = _Collect()
    for path in paths:
        pyflakes.api.checkPath(str(path), reporter)
    return reporter.found


def test_no_undefined_names_in_the_tree():
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 100
    assert _check(files) == []


def test_the_check_finds_an_undefined_exception_class(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def judge():\n    try:\n        pass\n    except MalformedResult:\n        pass\n")
    assert any("undefined name 'MalformedResult'" in line for line in _check([sample]))
