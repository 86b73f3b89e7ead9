"""Every TLA+ spec parses, and its .cfg names only operators the spec defines.

TLC itself runs on Java with tla2tools.jar (specs/*.md say how); here the `tla` parser
checks syntax, and the names tie each .cfg to its module. The invariant names are also
the names of the Python checks that the exploration tests run on the machines.
"""

import re
from pathlib import Path

import pytest

SPECS = Path(__file__).resolve().parent.parent / "specs"
MODULES = sorted(SPECS.glob("*.tla"))


def _cfg_names(cfg: str) -> set[str]:
    """Operator names after INVARIANT(S) / PROPERTY(IES) / INIT / NEXT / SPECIFICATION."""
    names: set[str] = set()
    section = None
    for raw in cfg.splitlines():
        line = raw.split("\\*")[0].strip()
        if not line:
            continue
        keyword = line.split()[0]
        if keyword in {"INVARIANT", "INVARIANTS", "PROPERTY", "PROPERTIES", "INIT", "NEXT", "SPECIFICATION"}:
            section = keyword
            names.update(line.split()[1:])
        elif keyword in {"CONSTANT", "CONSTANTS", "SYMMETRY", "VIEW", "CHECK_DEADLOCK", "CONSTRAINT",
                         "CONSTRAINTS", "ACTION_CONSTRAINT", "ACTION_CONSTRAINTS", "ALIAS", "POSTCONDITION"}:
            section = None
        elif section is not None:
            names.update(line.split())
    return names


def test_there_are_specs():
    assert MODULES, "specs/ holds no .tla files"


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_spec_parses_and_cfg_names_exist(path):
    tla = pytest.importorskip("tla")
    source = path.read_text()
    module = tla.parse(source)
    assert module is not None, f"{path.name} did not parse"
    cfg = path.with_suffix(".cfg")
    assert cfg.exists(), f"{path.name} has no {cfg.name}"
    defined = set(re.findall(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\([^)]*\))?\s*==", source, re.M))
    missing = _cfg_names(cfg.read_text()) - defined
    assert not missing, f"{cfg.name} names {sorted(missing)}, not defined in {path.name}"
