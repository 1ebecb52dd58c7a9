"""The architecture the surgery promises, read from the source (``ast``, nothing imported):

- no import cycle among the ``rdn`` modules (imports inside functions count; ``if TYPE_CHECKING:``
  blocks do not), so nothing in the surgery points back up;
- the passes, the policy / inference code and the tests use the network through its public API:
  no ``x._name`` attribute access on anything but ``self`` / ``cls`` / ``super()`` (PyTorch's
  state-dict ``_metadata``, the documented way to version a state dict, excepted).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Code that uses a RussianDollNet from outside it.
CLIENTS = [
    "rdn/surgery/passes",
    "rdn/surgery/nest.py",
    "rdn/policy.py",
    "rdn/inference.py",
    "rdn/order.py",
    "tests/surgery",
    "tests/test_policy.py",
    "tests/test_inference.py",
    "tests/test_order.py",
]
ALLOWED_PRIVATE = {"_metadata"}


def _python_files(relative: str) -> list[Path]:
    path = ROOT / relative
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _module_names() -> dict[str, Path]:
    names = {}
    for path in (ROOT / "rdn").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside |= {id(child) for statement in node.body for child in ast.walk(statement)}
    return inside


def import_graph() -> dict[str, set[str]]:
    """rdn module → the rdn modules it imports (a package name stands for its ``__init__``)."""
    modules = _module_names()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skipped = _type_checking_blocks(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                # `from package import module` imports the module; `from module import name` the module
                names = [f"{base}.{alias.name}" for alias in node.names]
                targets = [target if target in modules else base for target in names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_rdn():
    graph = import_graph()
    assert "rdn.surgery.network" in graph["rdn.surgery.nest"]  # the scan sees the imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_surgery_layers_build_upward():
    """The plan is plain data below everything; the executor does not import the surgery or the passes."""
    graph = import_graph()
    surgery = {name for name in graph if name.startswith("rdn.surgery")}
    assert graph["rdn.surgery.plan"] & surgery <= {"rdn.surgery.record", "rdn.surgery.spaces", "rdn.surgery.config"}
    for module in ("rdn.surgery.network", "rdn.surgery.costs", "rdn.surgery.export", "rdn.surgery.build"):
        assert not graph[module] & {"rdn.surgery.nest", "rdn.surgery.passes", *_passes(graph)}, module


def _passes(graph: dict[str, set[str]]) -> set[str]:
    return {name for name in graph if name.startswith("rdn.surgery.passes.")}


def private_accesses(path: Path) -> list[str]:
    """``file:line: expression`` for every ``x._name`` with x not self / cls / super()."""
    found, label = [], path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        if node.attr not in ALLOWED_PRIVATE:
            found.append(f"{label}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_clients_of_the_network_use_its_public_api():
    offending = [line for client in CLIENTS for path in _python_files(client) for line in private_accesses(path)]
    assert not offending, "private members used from outside:\n" + "\n".join(offending)


def test_the_private_access_scan_finds_them(tmp_path):
    source = tmp_path / "client.py"
    source.write_text("net._plan.steps\nself._ok\nsuper()._load()\nstate._metadata\nnet.layers[0]._parameters\n")
    found = sorted(line.split(": ", 1)[1] for line in private_accesses(source))
    assert found == ["net._plan", "net.layers[0]._parameters"]
