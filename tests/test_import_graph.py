"""The pack's modules import each other in one direction: no circles, and the engine in layers.

A cycle hidden by a function-local import still ties two files together (neither can be read,
tested or moved alone), so every `import` at any depth counts. The layers say which way the
engine's imports run; an import from a lower layer up to a higher one is allowed only where it is
listed below with its reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nextstep_core", "nodes")

# Lowest first. A module imports modules of its own layer or below.
LAYERS = {
    "ground": ("nextstep_core", "nextstep_core.errors", "nextstep_core.limits", "nextstep_core.variants", "nextstep_core.config", "nextstep_core.devices",
               "nextstep_core.atomic_write", "nextstep_core.progress_line",
               "nextstep_core.noise", "nextstep_core.kv_cache", "nextstep_core.images", "nextstep_core.outputs"),
    "weight formats": ("nextstep_core.weights", "nextstep_core.weights.reading", "nextstep_core.weights.int4",
                       "nextstep_core.weights.int8_gpu", "nextstep_core.weights.quant",
                       "nextstep_core.weights.convention", "nextstep_core.weights.quant_file", "nextstep_core.fused"),
    "model parts": ("nextstep_core.tokenizer", "nextstep_core.prompts", "nextstep_core.backbone",
                    "nextstep_core.flow_head", "nextstep_core.vae"),
    "loading and memory": ("nextstep_core.checkpoint", "nextstep_core.memory", "nextstep_core.tiny",
                           "nextstep_core.weights.quant_write"),
    "token loop": ("nextstep_core.samplers", "nextstep_core.graphs", "nextstep_core.engine",
                   "nextstep_core.weights.streaming"),
    "requests": ("nextstep_core.presets", "nextstep_core.reasoning", "nextstep_core.pipeline", "nextstep_core.story",
                 "nextstep_core.preview"),
    "commands": ("nextstep_core.cli", "nextstep_core.__main__", "nextstep_core.remote",
                 "nextstep_core.remote.servers", "nextstep_core.remote.trust", "nextstep_core.remote.payload",
                 "nextstep_core.remote.fanout", "nextstep_core.remote.command"),
    "face": ("nextstep_core.api",),
    "nodes": ("nodes", "nodes.bridge", "nodes.sockets", "nodes.model_folders", "nodes.int4_layout",
              "nodes.core_memory", "nodes.progress", "nodes.settings", "nodes.remote", "nodes.runner",
              "nodes.loaders", "nodes.edit", "nodes.generate", "nodes.storyboard"),
}
MOST_UPWARD = 2  # imports from a lower layer up to a higher one
UPWARD = {
    ("nextstep_core.backbone", "nextstep_core.graphs"):
        "a kept CUDA graph reads the backbone's weights where they were; the backbone's _apply drops it when "
        "the weights move (a host offloading the model frees that memory at once)",
    ("nextstep_core.flow_head", "nextstep_core.graphs"):
        "the same for the flow head's weights, which the captured step reads too",
}


def modules() -> dict[str, Path]:
    """{dotted name from the checkout's root: file} for every module of the two packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known) -> set[str]:
    """The pack's modules that `name` imports anywhere in its file (functions included). `from X
    import y` counts X.y where y is a module, else X; a name outside the pack is left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:max(0, len(base) - (node.level - 1))]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of modules that reach each other through imports (strongly connected, Tarjan),
    sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def describe(graph, group: list[str]) -> str:
    """`group` and, for each of its modules, what it imports inside the group."""
    return "{" + "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(group)))}" for m in group) + "}"


def layer_of() -> dict[str, int]:
    """Every module's layer: listed, or that of the listed subpackage it lies in (a new sampler in
    nextstep_core/samplers/ is one file, with no line here)."""
    listed = {m: i for i, members in enumerate(LAYERS.values()) for m in members}
    out = dict(listed)
    for m in modules():
        parent = m.rpartition(".")[0]
        while m not in out and parent and parent not in PACKAGES:
            if parent in listed:
                out[m] = listed[parent]
            parent = parent.rpartition(".")[0]
    return out


def upward(graph) -> list[tuple[str, str]]:
    rank = layer_of()
    return sorted((a, b) for a, targets in graph.items() for b in targets if rank[a] < rank[b])


def test_no_module_imports_itself_back():
    graph = import_graph()
    found = [describe(graph, group) for group in cycles(graph)]
    for text in found:
        print("cycle:", text)
    assert not found, "modules that import each other: " + " ".join(found)


def test_every_module_has_a_layer():
    known, placed = set(modules()), set(layer_of())
    listed = {m for members in LAYERS.values() for m in members}
    assert known - placed == set(), f"give these modules a layer in LAYERS: {sorted(known - placed)}"
    assert listed - known == set(), f"LAYERS names modules that no longer exist: {sorted(listed - known)}"


def test_imports_run_down_the_layers_except_the_listed_ones():
    up = upward(import_graph())
    names = list(LAYERS)
    for a, b in up:
        print(f"upward: {a} ({names[layer_of()[a]]}) -> {b} ({names[layer_of()[b]]})")
    assert set(up) == set(UPWARD), (f"unlisted upward imports: {sorted(set(up) - set(UPWARD))}; listed but gone "
                                    f"(remove them from UPWARD): {sorted(set(UPWARD) - set(up))}")
    assert len(UPWARD) <= MOST_UPWARD


def test_the_nodes_see_the_engine_only_through_its_face():
    """nodes/ is a thin adapter: every engine name it uses comes from nextstep_core.api, so the
    engine's modules behind it can move without touching the nodes."""
    graph = import_graph()
    reached = {m: sorted(t for t in targets if t.startswith("nextstep_core")) for m, targets in graph.items()
               if m == "nodes" or m.startswith("nodes.")}
    beside = {m: [t for t in ts if t != "nextstep_core.api"] for m, ts in reached.items()}
    assert not any(beside.values()), f"import these through nextstep_core.api: { {m: t for m, t in beside.items() if t} }"
    assert any("nextstep_core.api" in ts for ts in reached.values())


def test_the_checker_sees_a_function_local_cycle_and_an_upward_import(tmp_path):
    """The checker itself: a cycle closed only inside a function, and a relative `from . import`."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .high import g\n    return g\n")
    (pkg / "high.py").write_text("from . import low\n")
    known = {"pkg": pkg / "__init__.py", "pkg.low": pkg / "low.py", "pkg.high": pkg / "high.py"}
    graph = {n: imports_of(n, p, known) for n, p in known.items()}
    assert graph == {"pkg": set(), "pkg.low": {"pkg.high"}, "pkg.high": {"pkg.low"}}
    assert cycles(graph) == [["pkg.high", "pkg.low"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
