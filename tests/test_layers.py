"""The package's import graph: no cycle (eager or lazy: an import inside a function counts), and no arrow
from a lower layer up to a higher one. The layers, lowest first:
  core   the files and their names: naming, networks/, files, formats, safetensors_io, atomic, pickles,
         weights, blocks, cache, regions, library, registry
  hosts  the adapters over a loaded model (hosts/)
  work   what is done on a host: train/, apply, merge, tools/, concepts, tiny + sample_data (the shipped tiny models and demo data)
  front  the panel and the tab (panel/, ui/)
  doors  the ways in: cli, glue/, demo, __main__
A new module is placed by its path; one no layer names fails the test until it is placed."""
import ast
import os

from conftest import ROOT

LAYERS = [("core", ["lora_ext", "lora_ext.naming", "lora_ext.networks", "lora_ext.files", "lora_ext.formats",
                    "lora_ext.safetensors_io", "lora_ext.atomic", "lora_ext.pickles", "lora_ext.weights",
                    "lora_ext.blocks", "lora_ext.cache", "lora_ext.toml_text", "lora_ext.regions", "lora_ext.library", "lora_ext.registry"]),
          ("hosts", ["lora_ext.hosts"]),
          ("work", ["lora_ext.train", "lora_ext.apply", "lora_ext.merge", "lora_ext.tools", "lora_ext.concepts",
                    "lora_ext.tiny", "lora_ext.sample_data"]),
          ("front", ["lora_ext.panel", "lora_ext.ui"]),
          ("doors", ["lora_ext.cli", "lora_ext.glue", "lora_ext.demo", "lora_ext.__main__"])]


def _modules() -> dict:
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "lora_ext")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                out[os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")] = path
    return out


def import_graph() -> dict:
    """{module: the lora_ext modules it imports anywhere in it}."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected groups of more than one module (Tarjan's algorithm, without recursion)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def layer(module: str) -> int | None:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_points_up_a_layer_and_every_module_has_one():
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer(m) is None)
    assert unplaced == [], "place these modules in a layer (tests/test_layers.py)"
    upward = sorted(f"{m} ({LAYERS[layer(m)][0]}) -> {d} ({LAYERS[layer(d)][0]})"
                    for m, deps in graph.items() for d in deps if layer(d) > layer(m))
    assert upward == []
