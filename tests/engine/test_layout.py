"""The engine's module layout (issue 24), checked from the source with `ast`: no import cycle among engine modules
(imports inside functions count, and so does a package `__init__` an import runs first), no module importing
another module's private (`_name`) name, no function longer than 80 lines."""
import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"
ROOT = "qforge.engine"
MAX_FUNCTION_LINES = 80

# Violations in files helper "core" is rewriting (engine/train/{loop,objective,sft,dpo,distill,loader,build,optim,
# metrics,config}.py, engine/data/*, engine/lora.py, engine/thinking.py, engine/model.py). Listed one by one so that
# nothing else can slip in; the lead empties this list once core's work is merged, and the test then holds for all.
ALLOWED: set[str] = set()  # exceptions, each with its reason; none today


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(ENGINE.rglob("*.py")):
        parts = path.relative_to(ENGINE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((ROOT, *parts))] = path
    return modules


MODULES = _modules()


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, source: str | None = None) -> list[tuple[str, list[str], int]]:
    """(target module, imported names, line) for every import statement, at any depth (functions too)."""
    found = []
    source = MODULES[module].read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _package(module).split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def _edges(module: str) -> set[str]:
    """Engine modules whose import `module` triggers: each imported module, a `from package import submodule`'s
    submodule, and every package __init__ on the way that is not already an ancestor of `module`."""
    targets = set()
    for base, names, _ in _imports(module):
        if base != ROOT and not base.startswith(ROOT + "."):
            continue
        targets |= {f"{base}.{name}" for name in names if f"{base}.{name}" in MODULES} | {base}
    edges = set()
    ancestors = {module.rsplit(".", i)[0] for i in range(module.count("."))}
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            step = ".".join(parts[:i])
            if step in MODULES and step not in ancestors and step != module:
                edges.add(step)
    return edges


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {module: _edges(module) for module in MODULES}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def _name(module: str) -> str:
    return str(MODULES[module].relative_to(ENGINE.parent))


def test_no_import_cycle_among_engine_modules():
    cycles = [" <-> ".join(map(_name, cycle)) for cycle in _cycles()]
    assert [cycle for cycle in cycles if cycle not in ALLOWED] == []


def test_no_module_imports_a_private_name_of_another():
    private = {f"{_name(module)} imports {name} from {base}": line for module in MODULES
               for base, names, line in _imports(module) if base.startswith(ROOT) and base != module
               for name in names if name.startswith("_") and not name.startswith("__")}
    assert {found: line for found, line in private.items() if found not in ALLOWED} == {}


def test_no_function_longer_than_80_lines():
    long = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{_name(module)}: {node.name}"] = lines
    assert {found: lines for found, lines in long.items() if found not in ALLOWED} == {}


def test_the_parser_sees_imports_inside_functions_and_the_packages_an_import_runs():
    """An empty result above means no violation, not a blind check: a function-level relative import (the kind that
    hid the checkpoint cycle) is found and resolved, and importing a submodule counts its package's __init__."""
    source = "import torch\n\ndef f():\n    from ..checkpoint.save import _x\n"
    assert _imports(f"{ROOT}.train.loop", source)[1] == (f"{ROOT}.checkpoint.save", ["_x"], 4)
    assert {f"{ROOT}.serve", f"{ROOT}.serve.client"} <= _edges(f"{ROOT}.train.teacher_endpoint")
