"""The package's layers, read from every module's imports (AST), not by importing anything.

Imports go one way, in this order (the README says the same, and a test below checks it):

    config -> data -> model -> run -> training -> programs -> launch and bench

A module imports from its own layer or earlier ones; no modules import each other round a
circle, however long, inside functions included; and an import inside a function says why on
its line or just above it (`deferred:`), because the only reasons to defer one are startup time
and optional dependencies.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from tests.helpers import REPO

LAYER_ORDER = "config -> data -> model -> run -> training -> programs -> launch and bench"
# Each layer's modules, as dotted prefixes; a module belongs to the layer of its longest prefix.
LAYERS = {
    "config": ("deeprnn", "deeprnn.errors", "deeprnn.config"),
    "data": ("deeprnn.data",),
    "model": ("deeprnn.model",),
    "run": ("deeprnn.run",),
    "training": ("deeprnn.training",),
    "programs": ("deeprnn.train", "deeprnn.evaluate", "deeprnn.generate", "deeprnn.report",
                 "deeprnn.corpora"),
    "launch and bench": ("launch", "deeprnn.bench"),
}
PACKAGES = ("deeprnn", "launch")


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, index = -1, None
    for position, prefixes in enumerate(LAYERS.values()):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), position
    assert index is not None, f"{module} is in no layer: add it to LAYERS"
    return index


def read_modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    return {module_name(path, root): path for package in PACKAGES
            for path in sorted((root / package).rglob("*.py"))}


def project_imports(path: pathlib.Path, module: str, known: set[str]):
    """(line, imported project module, inside a function) for every import of the project's
    own modules; `from package import name` counts as the submodule when there is one."""
    tree = ast.parse(path.read_text())
    in_function = {id(node) for fn in ast.walk(tree)
                   if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                   for node in ast.walk(fn)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                yield node.lineno, target, id(node) in in_function


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    modules = read_modules(root)
    known = set(modules)
    return {module: {target for _, target, _ in project_imports(path, module, known)
                     if target != module and target in known}
            for module, path in modules.items()}


def layer_violations(root: pathlib.Path) -> list[str]:
    modules = read_modules(root)
    found = []
    for module, path in modules.items():
        for line, target, _ in project_imports(path, module, set(modules)):
            if layer_of(target) > layer_of(module):
                names = list(LAYERS)
                found.append(f"{path.relative_to(root)}:{line}: {module} ({names[layer_of(module)]}"
                             f") imports {target} ({names[layer_of(target)]})")
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other round a circle (Tarjan's strongly
    connected components with more than one member, or a module importing itself)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def undeclared_deferred_imports(root: pathlib.Path) -> list[str]:
    """Imports inside functions without a `deferred:` reason on their line or in the comment,
    `try:` or import lines just above them."""
    found = []
    for path in read_modules(root).values():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                number = node.lineno - 1
                said = "deferred:" in lines[number]
                while not said and number > 0:
                    number -= 1
                    above = lines[number].strip()
                    if not above.startswith(("#", "try:", "import ", "from ")):
                        break
                    said = "deferred:" in above
                if not said:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: "
                                 f"{lines[node.lineno - 1].strip()}")
    return found


def test_imports_go_down_the_layers_only():
    assert layer_violations(REPO) == []


def test_no_modules_import_each_other():
    assert import_cycles(import_graph(REPO)) == []


def test_every_import_inside_a_function_says_why():
    assert undeclared_deferred_imports(REPO) == []


def test_the_readme_states_the_same_layer_order():
    assert LAYER_ORDER in (REPO / "README.md").read_text()


def write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in {"deeprnn/__init__.py": "", "launch/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files,cycle", [
    ({"deeprnn/model/__init__.py": "", "deeprnn/model/a.py": "from deeprnn.model import b\n",
      "deeprnn/model/b.py": "def f():\n    from deeprnn.model.a import x  # deferred: test\n"},
     ["deeprnn.model.a", "deeprnn.model.b"]),
    ({"deeprnn/data/__init__.py": "", "deeprnn/data/a.py": "from . import b\n",
      "deeprnn/data/b.py": "import deeprnn.data.c\n", "deeprnn/data/c.py": "from .a import y\n"},
     ["deeprnn.data.a", "deeprnn.data.b", "deeprnn.data.c"]),
])
def test_the_checks_find_a_circle(tmp_path, files, cycle):
    """A circle hidden in a function, and a three-module circle through relative imports."""
    assert import_cycles(import_graph(write_package(tmp_path, files))) == [cycle]


def test_the_checks_find_an_upward_import_and_an_unexplained_deferred_one(tmp_path):
    root = write_package(tmp_path, {
        "deeprnn/model/__init__.py": "",
        "deeprnn/model/stack.py": "def build():\n    from deeprnn.training import loop\n",
        "deeprnn/training/__init__.py": "", "deeprnn/training/loop.py": "",
    })
    assert layer_violations(root) == [
        "deeprnn/model/stack.py:2: deeprnn.model.stack (model) imports "
        "deeprnn.training.loop (training)"]
    assert undeclared_deferred_imports(root) == [
        "deeprnn/model/stack.py:2: from deeprnn.training import loop"]
