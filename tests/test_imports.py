"""No import cycle in the package: the graph of module-level imports between parlai_poly's
modules has no loop (a function's local import, made when it runs, cannot close one)."""
import ast
import os

import parlai_poly

ROOT = os.path.dirname(parlai_poly.__file__)


def module_name(path):
    rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def top_level_imports(path, name):
    """The parlai_poly modules ``path`` imports at module level (not inside functions)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("parlai_poly")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("parlai_poly"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def import_graph():
    modules = {}
    for folder, _, files in os.walk(ROOT):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                modules[module_name(path)] = path
    return {name: top_level_imports(path, name) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "parlai_poly.agents.base" in graph and "parlai_poly.modules" in graph["parlai_poly.agents.base"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_from_import_of_ours_names_something_that_exists():
    """Each ``from parlai_poly... import X`` and ``from benchmarks... import X``, at any depth
    (a function's local import runs only when called), names a module or a name that exists."""
    import importlib
    import importlib.util

    repo = os.path.dirname(ROOT)
    missing = []
    for top in ("parlai_poly", "benchmarks"):
        for folder, _, files in os.walk(os.path.join(repo, top)):
            for file in (f for f in files if f.endswith(".py")):
                path = os.path.join(folder, file)
                name = os.path.relpath(path, repo)[: -len(".py")].replace(os.sep, ".")
                package = name.rsplit(".", 1)[0] if not file == "__init__.py" else name[: -len(".__init__")]
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                    if not isinstance(node, ast.ImportFrom):
                        continue
                    base = node.module or ""
                    if node.level:
                        parts = package.split(".")
                        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                    if not base.startswith(("parlai_poly", "benchmarks")):
                        continue
                    module = importlib.import_module(base)
                    for alias in node.names:
                        submodule = hasattr(module, "__path__") and importlib.util.find_spec(f"{base}.{alias.name}")
                        if not hasattr(module, alias.name) and not submodule:
                            missing.append(f"{path}:{node.lineno}: {base} has no {alias.name}")
    assert not missing, "\n".join(missing)
