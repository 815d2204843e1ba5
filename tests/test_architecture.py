"""The package's shape, as ARCHITECTURE.md states it: no import cycle (not even inside a
function), no module importing another's private names, every module saying what it holds."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llama"
MODULES = {p.stem: ast.parse(p.read_text()) for p in PACKAGE.glob("*.py")}


def llama_imports(tree):
    """(importing node, module stem, imported names) for every import of a llama module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llama":
            parts = node.module.split(".")
            if len(parts) > 1:
                yield node, parts[1], [a.name for a in node.names]
            else:  # from llama import x: a module, or a name from __init__
                for a in node.names:
                    yield node, a.name if a.name in MODULES else "__init__", [a.name]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("llama."):
                    yield node, a.name.split(".")[1], []


def test_no_import_cycles():
    graph = {name: {m for _, m, _ in llama_imports(tree)} - {name} for name, tree in MODULES.items()}
    state = {}

    def visit(name, path):
        state[name] = "open"
        for m in graph.get(name, ()):
            assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
            if m not in state:
                visit(m, path + [m])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_llama_modules_are_imported_at_the_top_only():
    for name, tree in MODULES.items():
        top = set(map(id, tree.body))
        for node, module, _ in llama_imports(tree):
            assert id(node) in top, f"llama/{name}.py imports llama.{module} inside a function (line {node.lineno})"


def test_no_private_names_cross_modules():
    for name, tree in MODULES.items():
        for node, module, names in llama_imports(tree):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"llama/{name}.py imports private {private} from llama.{module}"


def test_every_module_says_what_it_holds():
    for name, tree in MODULES.items():
        doc = ast.get_docstring(tree)
        assert doc and len(doc.split()) >= 5, f"llama/{name}.py needs an opening docstring saying what it holds"
