"""The house rules of docs/architecture.md, checked on the source: imports only go down the
wings, the ground floor imports nothing of llamactl, no module imports another that imports it
back, rich is imported by cli/ alone, and no module outgrows 800 lines unless the
architecture page says why it must be one piece."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "llamactl"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"

#: Each wing's floor: a module may import its own wing and wings on lower floors only.
FLOORS = {
    "ground": 0,  # errors, paths, proc, locks, net
    "build": 1,
    "models": 1,
    "serve": 2,
    "chat": 3,
    "bench": 3,
    "cli": 4,
    "entry": 5,
}
GROUND = {"errors", "paths", "proc", "locks", "net", "__init__"}
MAX_LINES = 800
#: Modules allowed to be longer, each named with its reason in docs/architecture.md.
LONG_MODULES = {"serve/proxy.py"}


@functools.cache
def tree(path: Path) -> ast.Module:
    """Each source file parsed once for all the rules."""
    return ast.parse(path.read_text())


@functools.cache
def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        found[name.removesuffix(".__init__")] = path
    return found


def wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "ground"
    if parts[1] in ("entry", "__main__"):
        return "entry"
    if parts[1] in GROUND:
        return "ground"
    return parts[1]


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The llamactl modules that `module` imports, anywhere in its body (lazy imports too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != module}


@functools.cache
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_imports_only_go_down_the_wings() -> None:
    wrong = []
    for module, deps in graph().items():
        here = wing(module)
        for dep in deps:
            there = wing(dep)
            if dep == "llamactl" or there == here:
                continue
            if FLOORS[there] >= FLOORS[here]:
                wrong.append(f"{module} ({here}) imports {dep} ({there})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_ground_floor_imports_nothing_of_llamactl() -> None:
    g = graph()
    wrong = {
        m: sorted(d - {"llamactl"})
        for m, d in g.items()
        if wing(m) == "ground" and d - {"llamactl"}
    }
    assert not wrong


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if dep not in g or dep == "llamactl":
                continue
            if state.get(dep) == 1:
                cycles.append([*trail[trail.index(dep) :], dep] if dep in trail else [node, dep])
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_rich_is_imported_by_cli_alone() -> None:
    wrong = []
    for module, path in modules().items():
        if wing(module) in ("cli", "entry"):
            continue
        for node in ast.walk(tree(path)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "rich" or n.startswith("rich.") for n in names):
                wrong.append(f"{module}:{node.lineno}")
    assert not wrong, wrong


def test_no_module_over_800_lines_unless_the_architecture_says_why() -> None:
    doc = ARCHITECTURE.read_text()
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    unexplained = {p: n for p, n in long.items() if p not in LONG_MODULES or p not in doc}
    assert not unexplained, unexplained


def test_the_checker_sees_a_cycle_and_a_wrong_way_import() -> None:
    assert wing("llamactl.serve.proxy") == "serve" and wing("llamactl.net") == "ground"
    assert wing("llamactl.cli.build") == "cli" and wing("llamactl.entry") == "entry"
    assert FLOORS[wing("llamactl.build.cache")] < FLOORS[wing("llamactl.serve.main")]
