"""Every import points down (data_manifests <- refbuild <- model <- pipelines), and no two
modules import each other, directly or in a ring, at module level or inside a function
(`if TYPE_CHECKING:` imports, for annotations only, aside; docs/DESIGN.md, "Layering"). Read from the source with `ast`: nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("data_manifests", "refbuild", "model", "pipelines")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in LAYERS:
        for f in (REPO / pkg).rglob("*.py"):
            parts = f.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _target(name: str, mods: dict[str, Path]) -> str | None:
    """The most specific project module an imported dotted name lands in."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(annotations: bool = False) -> dict[str, set[str]]:
    """Who imports whom; `annotations`: `if TYPE_CHECKING:` imports count too."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
                       for n in ast.walk(b)}  # annotations only: never imported at run time
        for node in ast.walk(tree):
            if id(node) in typing_only and not annotations:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for n in names:
                t = _target(n, mods)
                if t and t != mod:
                    graph[mod].add(t)
    for mod in graph:  # `from pkg import sub` names both: keep the submodule only
        graph[mod] -= {t for t in graph[mod] if any(o.startswith(t + ".") for o in graph[mod])}
    return graph


def _layer(mod: str) -> int:
    return LAYERS.index(mod.split(".")[0])


def test_every_import_points_down():
    up = sorted(f"{m} imports {t}" for m, ts in import_graph().items() for t in ts if _layer(t) > _layer(m))
    assert not up, "imports pointing up a layer:\n" + "\n".join(up)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "modules that import each other:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_two_modules_need_each_other_even_for_annotations():
    """A cycle closed only under `if TYPE_CHECKING:` still means the shared type lives too high
    (it was refbuild.detect <-> refbuild.labels over DetectConfig)."""
    cycles = _cycles(import_graph(annotations=True))
    assert not cycles, "modules that import each other (annotations included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_the_checks_can_fail():
    """The two checks see a planted cycle and a planted upward import."""
    g = {"refbuild.a": {"refbuild.b"}, "refbuild.b": {"refbuild.a", "model.x"}, "model.x": set()}
    assert _cycles(g) == [["refbuild.a", "refbuild.b"]]
    assert [t for t in g["refbuild.b"] if _layer(t) > _layer("refbuild.b")] == ["model.x"]
    real = import_graph()
    assert "refbuild.pair" in real and "data_manifests" in real["refbuild.pair"]
