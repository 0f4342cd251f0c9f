"""The package's layers, checked on the source with ``ast``.

Lower layers never import higher ones (no import cycle between packages), no package imports
another package's private module, and ``jdoptim.distributed`` reads no private attribute of an
object it did not create.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jdoptim"

# Each package may import the packages of lower rank (and the root's private base modules).
RANKS = {
    "_base": 0,  # jdoptim/_stateful.py, jdoptim/_step_info.py
    "linalg": 1,
    "aggregation": 2,
    "scalarization": 3,
    "autojac": 3,
    "autogram": 3,
    "paths": 4,
    "distributed": 5,
    "optim": 6,
    "integrations": 7,
}


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "jdoptim" or len(parts) == 1:
        return None
    return "_base" if parts[1].startswith("_") else parts[1]


def _modules() -> list[tuple[str, Path]]:
    result = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        result.append((".".join(parts), path))
    return result


def _imports(path: Path, module: str) -> list[str]:
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return found


MODULES = _modules()


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_go_down_the_layers_and_never_into_a_neighbours_private_module(
    module: str, path: Path
) -> None:
    own = _package_of(module)
    if own is None:  # jdoptim/__init__.py gathers the public API of every layer
        return
    for imported in _imports(path, module):
        target = _package_of(imported)
        if target is None or target == own:
            continue
        assert RANKS[target] <= RANKS[own], f"{module} imports the higher layer {imported}"
        private = [part for part in imported.split(".")[2:] if part.startswith("_")]
        if target != "_base" and private and imported.split(".")[2] in private:
            # importing a name from the package's public __init__ is fine; a _module is not
            module_path = ROOT / imported.split(".")[1] / f"{imported.split('.')[2]}.py"
            assert not module_path.exists(), f"{module} imports the private module {imported}"


def test_no_import_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for module, path in MODULES:
        own = _package_of(module)
        if own is None:
            continue
        for imported in _imports(path, module):
            target = _package_of(imported)
            if target is not None and target != own:
                edges.setdefault(own, set()).add(target)

    def reachable(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reachable(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = [(a, b) for a, targets in edges.items() for b in targets if reachable(b, a, {b})]
    assert not cycles, f"import cycles between packages: {cycles}"


def test_distributed_reads_no_private_attribute_of_objects_it_did_not_create() -> None:
    offenders = []
    for module, path in MODULES:
        if _package_of(module) != "distributed":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
                continue
            if node.attr.startswith("__"):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders
