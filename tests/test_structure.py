"""The package's shape: every import points down the layers below, and no module imports itself back.

Read with `ast` (nothing is imported), so a cycle or an upward import anywhere in src/lopro, even one
inside a function, fails here with the modules named.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; a module may import its own layer and the ones before it (longest prefix decides)
LAYERS = [
    ("lopro._version", "lopro.device", "lopro.io.atomic"),
    ("lopro.linalg", "lopro.quant", "lopro.data"),
    ("lopro.formats",),
    ("lopro.methods",),
    ("lopro.config",),
    ("lopro.nn",),
    ("lopro.model",),
    ("lopro.pipeline",),
    ("lopro.io",),
    ("lopro.eval",),
    ("lopro.export",),
    ("lopro.jobs",),
    ("lopro.compare",),
    ("lopro.cli", "lopro.__main__", "lopro"),
]


def modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "lopro").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
                targets = subs | ({base} if len(subs) < len(node.names) else set())
            elif isinstance(node, ast.Import):
                targets = {a.name for a in node.names}
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def layer(name: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{name} is in no layer of tests/test_structure.py: add it"
    return rank


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
    assert cycles(imports(modules())) == []


def test_imports_point_down():
    graph = imports(modules())
    upward = sorted(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
                    for a, targets in graph.items() for b in targets
                    if a != "lopro" and layer(b) > layer(a))
    assert upward == []


def test_the_checks_catch_what_they_should():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("lopro.io.atomic") < layer("lopro.quant.gptq") < layer("lopro.io.checkpoint")
