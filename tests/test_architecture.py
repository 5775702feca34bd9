"""The rooms' import directions, checked on the source: ipcv_core <- ipcv_compile <- ipcv_adapters
<- ipcv_adapters.app (the application layer).  The compiler reaches the adapters only through its
extension point (the ``ipcv.rewriters`` entry point in pyproject.toml), never by an import or an
importlib call; and no module imports itself back through others (no cycles, lazy imports and
importlib targets included: an importlib target the test cannot resolve from the source fails it)."""

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


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


_IMPORTLIB_CALLS = ("import_module", "__import__")


class _Targets:
    """The strings an expression of one module may evaluate to, found on its source: string
    literals, ``__name__`` / ``__package__``, f-strings and ``+`` of those, literal tuples / lists /
    sets / dicts (every string in them), ``.get`` / subscripts of those, and names bound in the
    module (anywhere: assignments, ``for`` / comprehension targets) only to such expressions.
    ``None``: not resolvable (a parameter, an attribute, a call result, ...)."""

    def __init__(self, tree: ast.AST, mod: str, pkg: str):
        self.consts = {"__name__": {mod}, "__package__": {pkg}}
        self.bindings: dict = {}
        for n in ast.walk(tree):
            if isinstance(n, ast.Assign):
                for t in n.targets:
                    self._bind(t, n.value)
            elif isinstance(n, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and n.value is not None:
                self._bind(n.target, n.value)
            elif isinstance(n, (ast.For, ast.AsyncFor, ast.comprehension)):
                self._bind(n.target, n.iter)
            elif isinstance(n, ast.arg):
                self.bindings.setdefault(n.arg, []).append(None)  # a parameter: any value
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                for a in n.names:
                    self.bindings.setdefault((a.asname or a.name).split(".")[0], []).append(None)
            elif isinstance(n, (ast.withitem, ast.ExceptHandler)):
                t = n.optional_vars if isinstance(n, ast.withitem) else None
                if isinstance(t, ast.Name):
                    self.bindings.setdefault(t.id, []).append(None)
        self._busy: set = set()

    def _bind(self, target, value) -> None:
        for t in ast.walk(target):  # tuple unpacking: every name may be any string of the value
            if isinstance(t, ast.Name):
                self.bindings.setdefault(t.id, []).append(value)

    def of(self, e):
        if isinstance(e, ast.Constant):
            return {e.value} if isinstance(e.value, str) else set()
        if isinstance(e, ast.Name):
            if e.id in self.consts and e.id not in self.bindings:
                return self.consts[e.id]
            values = self.bindings.get(e.id)
            if not values or e.id in self._busy:
                return None
            self._busy.add(e.id)
            try:
                parts = [None if v is None else self.of(v) for v in values]
            finally:
                self._busy.discard(e.id)
            return None if any(p is None for p in parts) else set().union(*parts)
        if isinstance(e, ast.JoinedStr):
            out = {""}
            for v in e.values:
                part = self.of(v.value if isinstance(v, ast.FormattedValue) else v)
                if part is None:
                    return None
                out = {a + b for a in out for b in part}
            return out
        if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add):
            a, b = self.of(e.left), self.of(e.right)
            return None if a is None or b is None else {x + y for x in a for y in b}
        if isinstance(e, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            items = [x for x in ast.iter_child_nodes(e) if not isinstance(x, ast.expr_context)]
            parts = [self.of(x) for x in items]
            return None if any(p is None for p in parts) else set().union(set(), *parts)
        if isinstance(e, ast.Subscript):
            return self.of(e.value)
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and e.func.attr == "get":
            parts = [self.of(e.func.value), *(self.of(a) for a in e.args[1:])]
            return None if any(p is None for p in parts) else set().union(*parts)
        return None


def _imports(path: pathlib.Path, root: pathlib.Path = ROOT, unresolved=None):
    """Every module ``path`` imports (module level and inside functions), as absolute names, with
    the line; the targets of ``importlib.import_module(...)`` / ``__import__(...)`` calls too, as
    far as :class:`_Targets` resolves them (a relative name against the call's ``package``).  A call
    whose target cannot be resolved is appended to ``unresolved`` as ``(module, line)``."""
    mod = _module_name(path, root)
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    tree = ast.parse(path.read_text())
    targets = _Targets(tree, mod, ".".join(base))
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
        elif isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", "")) in _IMPORTLIB_CALLS:
            names = targets.of(n.args[0]) if n.args else None
            if names is None:
                if unresolved is not None:
                    unresolved.append((mod, n.lineno))
                continue
            package = next((k.value for k in n.keywords if k.arg == "package"), None)
            if package is None and len(n.args) > 1 and getattr(n.func, "attr", "") == "import_module":
                package = n.args[1]
            for name in sorted(names):
                if name.startswith("."):  # importlib.import_module(".x", package)
                    pkgs = targets.of(package) if isinstance(package, ast.expr) else None
                    if not pkgs:
                        if unresolved is not None:
                            unresolved.append((mod, n.lineno))
                        continue
                    level = len(name) - len(name.lstrip("."))
                    for p in sorted(pkgs):
                        parts = p.split(".")
                        yield ".".join(parts[: len(parts) - (level - 1)] + [name.lstrip(".")]), n.lineno
                else:
                    yield name, n.lineno


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


def import_cycles(root: pathlib.Path, packages, unresolved=None):
    """The import cycles among the modules of ``packages`` under ``root`` (lazy imports and
    resolved importlib targets included), each as ``[m1, m2, ..., m1]``."""
    modules = {_module_name(f, root): f for pkg in packages for f in sorted((root / pkg).rglob("*.py"))}
    graph = {m: set() for m in modules}
    for m, f in modules.items():
        for target, _ in _imports(f, root, unresolved):
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
    return cycles


def test_no_import_cycles():
    cycles = import_cycles(ROOT, PACKAGES)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# importlib calls whose target is not in the source (it comes from data), each with why it can only
# name modules outside the project and a check of that data: the rest must be resolvable
def _adapter_tower_modules():
    from ipcv_adapters.registry import adapters

    return [path.rpartition(".")[0] for a in adapters() for path in a.tower_classes]


DATA_DRIVEN_IMPORTS = {
    # the transformers modules of the registered adapters' tower classes
    "ipcv_adapters.loading": _adapter_tower_modules,
}


def test_every_importlib_target_is_known():
    """Every ``importlib.import_module`` / ``__import__`` target is resolved from the source (so the
    checks above see it), or its module is listed in DATA_DRIVEN_IMPORTS, whose data names no
    project module."""
    unresolved = []
    import_cycles(ROOT, PACKAGES, unresolved)
    unknown = sorted({f"{m}:{line}" for m, line in unresolved if m not in DATA_DRIVEN_IMPORTS})
    assert not unknown, ("importlib calls whose target the architecture test cannot resolve (use a string "
                         f"literal or a literal table, or a plain import): {unknown}")
    for m, names in DATA_DRIVEN_IMPORTS.items():
        named = names()
        assert named, m
        assert not [n for n in named if any(_within(n, p) for p in (*PACKAGES, "benchmarks"))], (m, named)


def _write(root: pathlib.Path, files) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_sees_a_cycle_hidden_behind_importlib(tmp_path):
    """A synthetic package whose cycle goes through ``importlib.import_module(f"{__name__}.{name}")``
    over a literal table (the pattern the backends used): the checker reports the cycle; with
    the plain import removed it reports none; an importlib target from a parameter is reported as
    unresolved."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/front.py": "def run(name):\n    from . import plugins\n    return plugins.get(name)\n",
        "pkg/plugins/__init__.py": (
            "import importlib\n\nNAMES = ('alpha', 'beta')\n\n\n"
            "def get(name):\n    for n in NAMES:\n        if n == name:\n"
            "            return importlib.import_module(f'{__name__}.{n}')\n"),
        "pkg/plugins/alpha.py": "from ..front import run\n",
        "pkg/plugins/beta.py": "X = 1\n",
    })
    unresolved = []
    cycles = import_cycles(tmp_path, ("pkg",), unresolved)
    assert ["pkg.front", "pkg.plugins", "pkg.plugins.alpha", "pkg.front"] in cycles, cycles
    assert not unresolved
    _write(tmp_path, {"pkg/plugins/alpha.py": "X = 2\n"})
    assert import_cycles(tmp_path, ("pkg",)) == []
    # relative names against a literal package, and a __import__ of a joined literal
    _write(tmp_path, {"pkg/plugins/beta.py": "import importlib\nimportlib.import_module('.front', package='pkg')\n",
                      "pkg/front.py": "M = 'pkg.plugins' + '.beta'\n__import__(M)\n"})
    assert ["pkg.front", "pkg.plugins.beta", "pkg.front"] in import_cycles(tmp_path, ("pkg",))
    _write(tmp_path, {"pkg/front.py": "import importlib\n\ndef load(name):\n    return importlib.import_module(name)\n"})
    unresolved = []
    import_cycles(tmp_path, ("pkg",), unresolved)
    assert unresolved == [("pkg.front", 4)]
