"""The rooms' import directions, checked on the source: ipcv_core <- ipcv_compile <- ipcv_adapters
<- ipcv_adapters.app (the application layer).  The compiler reaches the adapters only through its
extension point (the ``ipcv.rewriters`` entry point in pyproject.toml), never by an import or an
importlib call; and no module imports itself back through others (no cycles, lazy imports included)."""

import ast
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ipcv_core", "ipcv_compile", "ipcv_adapters", "ipcv")
# package -> packages (or subpackages) it must never import
FORBIDDEN = {
    "ipcv_core": ("ipcv_compile", "ipcv_adapters", "benchmarks", "ipcv"),
    "ipcv_compile": ("ipcv_adapters", "benchmarks", "ipcv"),
    "ipcv_adapters": ("ipcv_adapters.app", "benchmarks", "ipcv"),  # outside the app itself
    # `import ipcv`: the public API re-exported from the rooms below it, never the application layer
    "ipcv": ("ipcv_adapters.app", "benchmarks"),
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path):
    """Every module ``path`` imports (module level and inside functions), as absolute names, with
    the line; ``importlib.import_module("x")`` / ``__import__("x")`` with a literal count too."""
    mod = _module_name(path)
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    tree = ast.parse(path.read_text())
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                yield a.name, n.lineno
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                pkg = base[: len(base) - (n.level - 1)]
                target = ".".join(pkg + ([n.module] if n.module else []))
            else:
                target = n.module
            yield target, n.lineno
            for a in n.names:  # `from . import x` / `from pkg import submodule`
                yield f"{target}.{a.name}", n.lineno
        elif isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant) \
                and isinstance(n.args[0].value, str) \
                and getattr(n.func, "attr", getattr(n.func, "id", "")) in ("import_module", "__import__"):
            yield n.args[0].value, n.lineno


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_reverse_imports_between_rooms():
    bad = []
    for f in _sources():
        mod = _module_name(f)
        for pkg, forbidden in FORBIDDEN.items():
            if not _within(mod, pkg):
                continue
            for target, line in _imports(f):
                for fb in forbidden:
                    if _within(target, fb) and not _within(mod, fb):
                        bad.append(f"{f.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "imports against the rooms (core <- compile <- adapters <- app):\n" + "\n".join(bad)


def test_compiler_names_no_adapter_anywhere_in_code():
    """Not even in an importlib string: the compiler finds the adapters through the entry point."""
    hits = []
    for f in sorted((ROOT / "ipcv_compile").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and "ipcv_adapters" in n.value \
                    and not _is_docstring(tree, n):
                hits.append(f"{f.relative_to(ROOT)}:{n.lineno}")
    assert not hits, f"ipcv_compile names ipcv_adapters in code: {hits}"


def _is_docstring(tree, const) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and first.value is const:
                return True
    return False


def test_the_entry_point_is_the_one_link():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["ipcv.rewriters"]
    assert eps == {"towers": "ipcv_adapters.registry:rewrite_with_adapter"}
    from ipcv_compile.extension import ENTRY_POINT_GROUP, rewriters

    assert ENTRY_POINT_GROUP == "ipcv.rewriters"
    import ipcv_adapters.registry

    assert rewriters()["towers"] is ipcv_adapters.registry.rewrite_with_adapter


def test_no_import_cycles():
    modules = {_module_name(f): f for f in _sources()}
    graph = {m: set() for m in modules}
    for m, f in modules.items():
        for target, _ in _imports(f):
            # the deepest project module the import names (`from pkg import name` names pkg.name or pkg)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != m and not _within(m, target):  # a package's own __init__ is its parent
                graph[m].add(target)
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
