"""The import contract of docs/architecture.md, checked on the code as it is.

Every import of every module under fedctl/ (module level, inside functions, under
TYPE_CHECKING, and ``importlib.import_module("fedctl...")`` with a literal) must follow the
documented direction between packages; the packages' graph must have no cycle; the base modules
(fedctl/*.py) import no package. A new edge is either allowed here *and* drawn in
docs/architecture.md, or it is a design mistake.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "fedctl"
DOC = ROOT.parent / "docs" / "architecture.md"

#: modules directly under fedctl/: helpers every layer may use; they import only each other
BASE = {"errors", "constants", "jobs", "sampling", "_fs", "_imports", "_yaml", "__main__"}

#: package → the packages it may import (besides the base modules). Keep in step with the
#: picture in docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    "codec": set(),
    # provision makes the project's CKKS context with privacy.he (kits carry it)
    "provision": {"privacy"},
    "datasets": set(),
    # aggregators.he sums ciphertexts with privacy.he's crypto
    "aggregators": {"codec", "privacy"},
    "privacy": {"codec"},
    "tracking": {"codec"},
    "transport": {"codec", "provision"},
    "workflows": {"aggregators", "privacy", "codec"},
    "client": {"codec"},
    "recipe": {"workflows", "aggregators", "privacy", "tracking", "codec"},
    "sim": {"recipe", "workflows", "privacy", "tracking", "client", "codec"},
    "runtime": {"recipe", "workflows", "privacy", "tracking", "transport", "provision", "codec"},
    "cli": {
        "sim",
        "runtime",
        "recipe",
        "provision",
        "tracking",
        "transport",
        "codec",
        "workflows",
        "aggregators",
        "privacy",
    },
}

#: the documented exceptions: (importing module, imported package) → why
EXCEPTIONS = {
    # plain `python client.py` runs one local round against the recipe next to the script
    ("fedctl.client.standalone", "recipe"): "standalone mode reads the recipe next to a script",
}
#: fedctl.recipe re-exports SimEnv/PocEnv/ProdEnv for users, by name, on first use (module
#: __getattr__ and importlib): not a dependency of recipes on their executors, so it may run
#: against the direction and is left out of the cycle check
LAZY_REEXPORTS = {("fedctl.recipe", "sim"), ("fedctl.recipe", "runtime")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _imports(path: Path, me: str | None = None) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file (module ``me``), wherever it is."""
    text = path.read_text()
    tree = ast.parse(text, str(path))
    # a module named in a string counts where the file imports modules by name (importlib);
    # elsewhere such a string is something else (a command line, a log line)
    by_name = "import_module" in text
    me = me or _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.append((name, node.lineno))
            out += [(f"{name}.{a.name}", node.lineno) for a in node.names]
        elif (
            by_name
            and isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith("fedctl.")
            and node.value.replace(".", "").isidentifier()
        ):  # a module named in a string, for importlib (lazy re-exports)
            out.append((node.value, node.lineno))
    return [(n, line) for n, line in out if n == "fedctl" or n.startswith("fedctl.")]


def _part(module: str) -> str | None:
    """The package (or base module) a fedctl module belongs to."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    name = parts[1]
    if (ROOT / name).is_dir() or name in BASE:
        return name
    return None


def _edges() -> list[tuple[str, str, str, int]]:
    """(importing module, its package, imported package, line) across packages."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        me = _module_name(path)
        mine = _part(me)
        for name, line in _imports(path):
            other = _part(name)
            if other is None or other == mine:
                continue
            edges.append((me, mine or "fedctl", other, line))
    return edges


def test_every_package_is_in_the_contract() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), "add the new package to ALLOWED and the docs' picture"
    loose = {p.name for p in ROOT.iterdir() if p.is_dir() and not (p / "__init__.py").exists()}
    assert not loose - {"__pycache__"}, f"packages without __init__.py: {loose}"
    base = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    assert base <= BASE, f"new base module(s) {base - BASE}: add them to BASE and the docs"


def test_imports_follow_the_documented_direction() -> None:
    wrong = []
    for module, mine, other, line in _edges():
        if other in BASE:
            continue
        if mine in BASE:
            wrong.append(f"{module}:{line} (a base module) imports the {other} package")
        elif other not in ALLOWED[mine] and (module, other) not in {*EXCEPTIONS, *LAZY_REEXPORTS}:
            wrong.append(f"{module}:{line} imports {other} ({mine} → {other} is not allowed)")
    assert not wrong, "\n".join(wrong)


def test_base_modules_import_only_base_modules() -> None:
    for path in ROOT.glob("*.py"):
        for name, line in _imports(path):
            part = _part(name)
            assert part is None or part in BASE, f"{path.name}:{line} imports {name}"


def test_no_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for module, mine, other, _ in _edges():
        if mine not in BASE and other not in BASE and (module, other) not in LAZY_REEXPORTS:
            graph.setdefault(mine, set()).add(other)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(p for p in graph if p in reach(p))
    assert not cycles, f"packages in an import cycle: {cycles}"


def test_the_contract_itself_has_no_cycle_and_matches_the_docs() -> None:
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in ALLOWED.get(todo.pop(), set()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert not [p for p in ALLOWED if p in reach(p)]
    text = DOC.read_text()
    for package, deps in ALLOWED.items():
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| `{package}` |")), None)
        assert line is not None, f"docs/architecture.md has no row for {package}"
        for dep in deps:
            assert f"`{dep}`" in line.split("|")[3], f"{package} → {dep} is not in the docs' table"


@pytest.mark.parametrize(
    "source",
    [
        "from fedctl.sim.env import SimEnv",
        "import fedctl.runtime.server",
        "from ..runtime import server",
        "x = importlib.import_module('fedctl.sim.pool')",
    ],
)
def test_the_checker_sees_every_kind_of_import(tmp_path, source) -> None:
    """The contract is only as good as its parser: each form of import is found."""
    path = tmp_path / "probe.py"
    path.write_text(f"def f():\n    {source}\n")
    found = {_part(name) for name, _ in _imports(path, "fedctl.workflows.probe")}
    assert found & {"sim", "runtime"}, found


#: the only modules that may import pickle: the process simulator's private socket pairs between a
#: driver and the workers its zygote forked (see the comment at each import)
PICKLERS = {"fedctl.sim.procs", "fedctl.sim.zygote"}
UNPICKLERS = {"pickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def test_only_the_simulators_private_channel_imports_pickle() -> None:
    found = set()
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] in UNPICKLERS for n in names):
                found.add(_module_name(path))
    assert found == PICKLERS
    # and what talks to the network (servers, sites, the wire) cannot reach them
    for package in ("runtime", "transport", "codec", "provision"):
        assert "sim" not in ALLOWED[package]
