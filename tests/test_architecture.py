"""The layers run one way and no two modules import each other (docs/ARCHITECTURE.md, ../shared/DESIGN.md
"Code layers"): `prep` <- `train` <- `pipelines`; only the CLI front doors (`*/cli.py`, `*/commands/`) may
reach any layer. Every import counts, function-level ones and `TYPE_CHECKING` ones too: an import moved into
a function to dodge a cycle is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("prep", "train", "pipelines")  # each may import only itself and the ones before it

# Cycles being removed on other branches; delete each entry once its branch is merged (the test below
# fails on an entry that no longer matches a cycle, so a stale exemption cannot linger).
KNOWN_CYCLES = {
    frozenset({"train.augment", "train.data"}),  # branch `softlabels`
    frozenset({"train.evaluate", "train.report"}),  # branch `evaluation`
}


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `packages` under `root` (a package is its __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its body)."""
    modules = module_files(root, packages)

    def owner(name: str) -> str | None:  # the module a dotted name lives in (`pkg.mod.func` -> `pkg.mod`)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {owner(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the submodule; `from mod import name` imports mod
                targets |= {owner(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else owner(base)
                            for alias in node.names}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def is_front_door(module: str) -> bool:
    parts = module.split(".")
    return parts[-1] == "cli" or "commands" in parts[1:]


def layer_violations(graph: dict[str, set[str]], layers: tuple[str, ...] = LAYERS) -> list[str]:
    rank = {layer: i for i, layer in enumerate(layers)}
    return sorted(f"{module} imports {target}" for module, targets in graph.items() if not is_front_door(module)
                  for target in targets if rank[target.split(".")[0]] > rank[module.split(".")[0]])


def import_cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(frozenset(component))
    return cycles


def test_no_module_imports_a_layer_above_it():
    graph = import_graph(REPO, LAYERS)
    assert "pipelines.plan" in graph["pipelines.build"] and "prep.codec" in graph["train.data"]  # it sees imports
    assert layer_violations(graph) == []


def test_no_import_cycle_between_modules():
    cycles = set(import_cycles(import_graph(REPO, LAYERS)))
    assert cycles - KNOWN_CYCLES == set(), "new import cycle(s)"
    assert KNOWN_CYCLES - cycles == set(), "these cycles are gone: delete them from KNOWN_CYCLES"


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    files = {
        "low/__init__.py": "from low import a  # a package importing its submodule is fine\n",
        "low/a.py": "def f():\n    from high.b import g  # upward, hidden in a function\n",
        "low/c.py": "from . import d\n",
        "low/d.py": "import low.c\n",
        "high/__init__.py": "",
        "high/b.py": "import low.a\n",
        "high/cli.py": "from low.a import f\n",
        "low/cli.py": "import high.b  # a front door may reach any layer\n",
        "low/commands/x.py": "from high import b\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ("low", "high"))
    assert layer_violations(graph, ("low", "high")) == ["low.a imports high.b"]
    assert sorted(map(sorted, import_cycles(graph))) == [["high.b", "low.a"], ["low.c", "low.d"]]


def test_no_test_module_imports_another():
    """Shared test code lives in conftest.py fixtures or helper modules (build_helpers, shard_fixture)."""
    tests = REPO / "tests"
    names = {path.stem for path in tests.glob("test_*.py")}
    offenders = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            imported = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                        [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.name} imports {name}" for name in imported if name.split(".")[0] in names]
    assert offenders == []
