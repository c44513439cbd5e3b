"""dist_infer's import graph has no cycles, counting imports inside functions (lazy imports) as edges too.

A cycle means two modules each need the other: neither can be understood, tested or moved alone. Imports under
``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import grimp


def _import_graph() -> dict[str, set[str]]:
    graph = grimp.build_graph("dist_infer", exclude_type_checking_imports=True, cache_dir=None)
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (or a module importing
    itself), found by Tarjan's algorithm; each cycle lists its modules, the first repeated at the end."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges.get(node, ()):
                        components.append(set(component))
    return [_cycle_in(component, edges) for component in components]


def _cycle_in(component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in {component}")


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    cycles = _cycles(edges)
    assert sorted(map(tuple, cycles)) == [("a", "b", "c", "a"), ("e", "e")]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_dist_infer_has_no_import_cycles():
    edges = _import_graph()
    assert "dist_infer.executor.base" in edges  # the graph holds the package's modules
    cycles = _cycles(edges)
    assert not cycles, "import cycles in dist_infer (lazy imports count):\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles)


def test_executor_base_needs_neither_workers_nor_its_subclasses():
    """The executor interface (and so the engine's driver) reaches neither the worker nor any executor."""
    graph = grimp.build_graph("dist_infer", exclude_type_checking_imports=True, cache_dir=None)
    reached = graph.find_upstream_modules("dist_infer.executor.base")
    wrong = {m for m in reached if m.startswith(("dist_infer.worker", "dist_infer.executor."))}
    assert not wrong, f"dist_infer.executor.base imports {sorted(wrong)}"
