"""The package's layers import only downward, and no module imports itself back through a cycle.

utilities (settings, _native, _native_status, gguf) < reference < kernels < ops < rubric < judges < scoring < trainer
< integrations < the commands (cli, selfcheck, bench, compile-check). Read from the source with ``ast`` (every import, also the ones inside
functions), so a lazy import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"_C": 0, "settings": 0, "_native": 0, "_native_status": 0, "gguf": 0, "reference": 1, "kernels": 2, "ops": 3, "rubric": 4, "judges": 5,
          "scoring": 6, "trainer": 7, "integrations": 8}
TOP = 9  # cli, selfcheck, bench_command, compile_check, ...: may import anything


EXTENSIONS = ("rubric_fast._C",)  # compiled, no .py file


def _modules():
    for base, prefix in ((ROOT / "rubric_fast", "rubric_fast"), (ROOT / "kernels", "rubric_fast.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join((prefix, *parts))
            is_pkg = path.name == "__init__.py"
            yield name.removesuffix(".__init__"), path, is_pkg


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "rubric_fast":
        return None
    if len(parts) == 1:
        return TOP
    return LAYERS.get(parts[1], TOP)


def _import_nodes(tree, top_level_only: bool):
    if not top_level_only:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    todo = list(tree.body)  # module body, and the bodies of top-level if / try / with blocks
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)


def _imports(module: str, path: Path, is_pkg: bool, known: set[str], top_level_only: bool = False):
    """(line, imported rubric_fast module) for the imports of this file (every one, or the module-level ones)."""
    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
    tree = ast.parse(path.read_text(), str(path))
    for node in _import_nodes(tree, top_level_only):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("rubric_fast"):
                yield node.lineno, _owner(name, known)


def _owner(target: str, known: set[str]) -> str:
    """The module a dotted import target lives in (``a.b.c`` may be a name in module ``a.b``)."""
    while target not in known and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def test_no_upward_import():
    upward = []
    known = {m for m, _, _ in _modules()} | set(EXTENSIONS)
    for module, path, is_pkg in _modules():
        here = _layer(module)
        for line, target in _imports(module, path, is_pkg, known):
            there = _layer(target)
            if there is not None and here is not None and there > here:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {module} (layer {here}) imports {target} "
                              f"(layer {there})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(set(upward)))


def test_no_import_cycle():
    """Module-level imports only: a cycle there breaks or depends on import order; an import inside a
    function runs after every module is loaded."""
    mods = {m: (p, pkg) for m, p, pkg in _modules()}
    known = set(mods)
    graph = {m: sorted({t for _, t in _imports(m, p, pkg, known, top_level_only=True)} & known - {m})
             for m, (p, pkg) in mods.items()}
    # a package's __init__ importing its own submodules is how packages are built, not a cycle
    for m in graph:
        graph[m] = [t for t in graph[m] if not t.startswith(m + ".")]
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
