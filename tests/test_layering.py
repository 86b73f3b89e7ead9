"""The layout rules, checked on the source (ARCHITECTURE.md, STYLE.md after trio):

- an underscore-prefixed module is its package's own: only modules inside that package
  import it, everything else goes through the package's `__init__` (protocol/head/ is
  built that way: its public names are re-exported from protocol/head/__init__.py);
- protocol/, crypto/, fhe/ and training/ never import node/ (the node carries out what
  the protocol decides, never the other way round), not even inside a function;
- crypto/ never imports protocol/: crypto/ is the bottom layer the protocol builds on
  (the strict msgpack reader and the error kinds that both use live in crypto/);
- inside a package (protocol/, its head/ and aggregation/ split along their seams,
  crypto/, fhe/, training/, node/ and its sub-packages), no module imports one that
  imports it back, not even lazily.

Imports are read with `ast`, so a lazy import inside a function counts as much as one at
the top of a module.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREES = ("node", "protocol", "crypto", "fhe", "training", "bench", "tests")
BELOW_NODE = ("protocol", "crypto", "fhe", "training")
# Each tree and the trees it must never import (a lazy import inside a function counts).
NEVER_IMPORTS = {tree: ("node",) for tree in BELOW_NODE} | {"crypto": ("node", "protocol")}
# Packages whose modules' import graph must stay acyclic: every package of the code.
LAYERED_PACKAGES = ("protocol", "protocol.head", "protocol.aggregation", "crypto", "fhe", "training",
                    "node", "node.roles", "node.registry", "node.settlement", "node.storage")

# Imports of another package's underscore module that predate this check, each with what
# removes it. The list only shrinks: an entry whose import is gone fails
# test_the_known_exceptions_still_exist, so it is deleted with the import.
KNOWN_PRIVATE_IMPORTS = {
    ("tests.test_libp2p_tuning", "node._libp2p_tuning"),  # the private module's own test
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module `path` imports, absolute and dotted; `from a import b` counts `a.b`
    too when b is a module of the tree (that is how `from protocol import head` reads)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if _is_module(candidate, root):
                    found.add(candidate)
    return {m for m in found if m.split(".")[0] in TREES}


def _is_module(dotted: str, root: Path) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def private_owner(module: str) -> str | None:
    """The package that owns `module` when one of its parts is underscore-prefixed."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


@functools.lru_cache(maxsize=8)  # the tree is read once for all the checks
def import_graph(root: Path) -> dict[str, frozenset[str]]:
    """Every module of the trees under `root` and the modules it imports."""
    paths = [p for tree in TREES if (root / tree).is_dir() for p in sorted((root / tree).rglob("*.py"))]
    return {module_name(path, root): frozenset(imports_of(path, root)) for path in paths}


def private_imports(root: Path) -> set[tuple[str, str]]:
    """(importer, module) for each import of an underscore module from outside its package."""
    bad = set()
    for importer, modules in import_graph(root).items():
        for module in modules:
            owner = private_owner(module)
            if owner is not None and importer != owner and not importer.startswith(owner + "."):
                bad.add((importer, module))
    return bad


def upward_imports(root: Path) -> set[tuple[str, str]]:
    """(importer, module) for each import NEVER_IMPORTS forbids."""
    return {(importer, module) for importer, modules in import_graph(root).items()
            for module in modules if module.split(".")[0] in NEVER_IMPORTS.get(importer.split(".")[0], ())}


def node_imports_below_node(root: Path) -> set[tuple[str, str]]:
    return {(importer, module) for importer, module in upward_imports(root) if module.split(".")[0] == "node"}


def cycles_inside(package: str, root: Path) -> list[list[str]]:
    """Import cycles among the modules of `package` (its __init__ left out: it only
    re-exports, and every module of the package is imported through it)."""
    graph = {}
    for name, modules in import_graph(root).items():
        if name.rpartition(".")[0] == package:
            # m != name: a sub-package's __init__ that loads one of its own modules (`from
            # node.settlement import hydra`) imports its own name; that is no cycle
            graph[name] = {m for m in modules if m.rpartition(".")[0] == package and m != name}
    found, done = [], set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            found.append(trail[trail.index(module):] + [module])
            return
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, trail + [module])
        done.add(module)

    for module in graph:
        visit(module, [])
    return found


def test_no_module_imports_another_packages_underscore_module():
    found = private_imports(ROOT)
    assert found - KNOWN_PRIVATE_IMPORTS == set()


def test_the_known_exceptions_still_exist():
    assert KNOWN_PRIVATE_IMPORTS - private_imports(ROOT) == set()


def test_protocol_crypto_fhe_training_never_import_node():
    assert node_imports_below_node(ROOT) == set()


def test_crypto_never_imports_protocol():
    assert {(importer, module) for importer, module in upward_imports(ROOT)
            if module.split(".")[0] == "protocol"} == set()


def test_split_packages_have_no_import_cycles():
    for package in LAYERED_PACKAGES:
        assert _is_module(package, ROOT), package
        assert cycles_inside(package, ROOT) == [], package


def test_the_head_package_re_exports_what_the_tree_uses():
    import protocol.head as head

    assert sorted(set(head.__all__)) == sorted(head.__all__)  # no name twice
    missing = [name for name in head.__all__ if not hasattr(head, name)]
    assert missing == []
    assert all(not name.startswith("_") for name in head.__all__)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checks_catch_each_kind_of_breach(tmp_path):
    root = _tree(tmp_path, {
        "protocol/__init__.py": "",
        "protocol/head/__init__.py": "from protocol.head._ledger import Ledger\n",
        "protocol/head/_ledger.py": "from protocol.head._machine import Machine\nLedger = 1\n",
        "protocol/head/_machine.py": "from . import _ledger\nMachine = 2\n",
        "protocol/rules.py": "def rule():\n    from node.daemon import run\n",
        "crypto/__init__.py": "",
        "crypto/paillier.py": "def decode():\n    from protocol.errors import RemoteProtocolError\n",
        "node/__init__.py": "",
        "node/daemon.py": "from protocol.head import _machine\nfrom protocol.head._ledger import Ledger\n",
        "node/cli.py": "def main():\n    from node.membership_cli import run\n",
        "node/membership_cli.py": "def run():\n    from node.cli import UserError\n",
        "tests/test_x.py": "import protocol.head._machine\n",
    })
    assert private_imports(root) == {
        ("node.daemon", "protocol.head._machine"), ("node.daemon", "protocol.head._ledger"),
        ("tests.test_x", "protocol.head._machine")}
    assert node_imports_below_node(root) == {("protocol.rules", "node.daemon")}
    assert upward_imports(root) == {("protocol.rules", "node.daemon"), ("crypto.paillier", "protocol.errors")}
    assert cycles_inside("protocol.head", root) != []
    assert cycles_inside("node", root) == [["node.cli", "node.membership_cli", "node.cli"]]


def test_the_checks_pass_a_tree_that_keeps_the_rules(tmp_path):
    root = _tree(tmp_path, {
        "protocol/__init__.py": "",
        "protocol/head/__init__.py": "from protocol.head._machine import Machine\n",
        "protocol/head/_ledger.py": "Ledger = 1\n",
        "protocol/head/_machine.py": "from protocol.head._ledger import Ledger\nMachine = 2\n",
        "protocol/errors.py": "from crypto.errors import RemoteProtocolError\n",
        "crypto/__init__.py": "",
        "crypto/errors.py": "RemoteProtocolError = Exception\n",
        "node/__init__.py": "",
        "node/daemon.py": "from protocol.head import Machine\nfrom protocol import head\nfrom crypto import errors\n",
        "node/settlement/__init__.py": "def __getattr__(name):\n    from node.settlement import hydra\n",
        "node/settlement/hydra.py": "",
    })
    assert private_imports(root) == set()
    assert node_imports_below_node(root) == set()
    assert upward_imports(root) == set()
    assert cycles_inside("protocol.head", root) == []
    assert cycles_inside("node", root) == [] and cycles_inside("node.settlement", root) == []
