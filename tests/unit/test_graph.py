"""Task graph validation and scheduling views, with property tests on random DAGs."""

from __future__ import annotations

import itertools
import random

import pytest
from cpa_scheduler import errors, graph
from hypothesis import given, settings
from hypothesis import strategies as st


def todo(key: str, *deps: str, **params: object) -> graph.ToDo:
    return graph.ToDo(key=key, action="noop", depends_on=deps, params=params)


def diamond() -> graph.Graph:
    return graph.Graph([todo("a"), todo("b", "a"), todo("c", "a"), todo("d", "b", "c")])


def test_views_of_a_diamond() -> None:
    g = diamond()
    order = g.topological_order()
    assert order.index("a") < order.index("b") < order.index("d")
    assert order.index("c") < order.index("d")
    assert g.batches() == [["a"], ["b", "c"], ["d"]]
    assert g.ready() == ["a"]
    assert sorted(g.dependents("a")) == ["b", "c"]
    assert g.ancestors("d") == {"a", "b", "c"}
    assert g.critical_path({"a": 1, "b": 5, "c": 2, "d": 1}) == 7


def test_duplicate_keys_are_rejected() -> None:
    with pytest.raises(errors.GraphError, match="'a' is used twice"):
        graph.Graph([todo("a"), todo("a")])


def test_unknown_dependency_is_named() -> None:
    with pytest.raises(errors.GraphError, match="'b' depends on 'zz'"):
        graph.Graph([todo("a"), todo("b", "zz")])


def test_self_dependency_is_rejected() -> None:
    with pytest.raises(errors.GraphError, match="depends on itself"):
        graph.Graph([todo("a", "a")])


def test_cycle_error_names_the_path() -> None:
    with pytest.raises(errors.CycleError) as info:
        graph.Graph([todo("a", "b"), todo("b", "c"), todo("c", "a"), todo("x")])
    assert info.value.message.startswith("The graph has a cycle: a -> b -> c -> a.")
    assert info.value.cycle == ["a", "b", "c", "a"]


def test_empty_graph_is_rejected() -> None:
    with pytest.raises(errors.GraphError, match="no ToDos"):
        graph.Graph([])


def test_refs_must_point_at_ancestors() -> None:
    ok = graph.Graph([todo("a"), todo("b", "a"), todo("c", "b", text={"$ref": "a.result.text"})])
    assert len(ok) == 3
    with pytest.raises(errors.GraphError, match="references 'b.result'"):
        graph.Graph([todo("a"), todo("b"), todo("c", "a", x={"$ref": "b.result"})])
    nested = [todo("a"), todo("c", x=[{"deep": {"$ref": "a.result"}}])]
    with pytest.raises(errors.GraphError, match="'a' is not one of its dependencies"):
        graph.Graph(nested)


def test_long_chain_does_not_recurse() -> None:
    keys = [f"k{i}" for i in range(3000)]
    chain = [todo(keys[0])] + [todo(k, p) for p, k in itertools.pairwise(keys)]
    g = graph.Graph(chain)
    assert g.topological_order() == keys
    assert len(g.batches()) == 3000


@st.composite
def dags(draw: st.DrawFn) -> list[graph.ToDo]:
    n = draw(st.integers(min_value=1, max_value=40))
    todos = []
    for i in range(n):
        deps = draw(st.sets(st.integers(min_value=0, max_value=i - 1), max_size=4)) if i else set()
        todos.append(todo(f"t{i}", *(f"t{d}" for d in sorted(deps))))
    order = draw(st.permutations(todos))
    return list(order)


@settings(max_examples=150, deadline=None)
@given(dags())
def test_batches_respect_dependencies_and_cover_all(todos: list[graph.ToDo]) -> None:
    g = graph.Graph(todos)
    level = {k: i for i, batch in enumerate(g.batches()) for k in batch}
    assert sorted(level) == sorted(t.key for t in todos)
    assert sum(len(b) for b in g.batches()) == len(todos)
    for t in todos:
        for dep in t.depends_on:
            assert level[dep] < level[t.key]
    position = {k: i for i, k in enumerate(g.topological_order())}
    for t in todos:
        assert all(position[d] < position[t.key] for d in t.depends_on)
    assert set(g.ready()) == {t.key for t in todos if not t.depends_on}


@settings(max_examples=150, deadline=None)
@given(dags(), st.randoms(use_true_random=False))
def test_random_cycles_are_always_found(todos: list[graph.ToDo], rnd: random.Random) -> None:
    # Add a back edge along an existing path (or a 2-cycle) so a cycle is guaranteed.
    g = graph.Graph(todos)
    order = g.topological_order()
    if len(order) < 2:
        return
    lo, hi = sorted(rnd.sample(range(len(order)), 2))
    early, late = order[lo], order[hi]
    by_key = {t.key: t for t in todos}
    by_key[early] = todo(early, *by_key[early].depends_on, late)
    by_key[late] = todo(late, *set(by_key[late].depends_on) | {early})
    with pytest.raises(errors.CycleError) as info:
        graph.Graph(by_key.values())
    cycle = info.value.cycle
    assert cycle[0] == cycle[-1]
    for a, b in itertools.pairwise(cycle):
        assert b in by_key[a].depends_on


@settings(max_examples=100, deadline=None)
@given(dags(), st.dictionaries(st.integers(0, 39), st.floats(0, 10), max_size=40))
def test_critical_path_bounds(todos: list[graph.ToDo], raw: dict[int, float]) -> None:
    durations = {f"t{k}": v for k, v in raw.items()}
    g = graph.Graph(todos)
    cp = g.critical_path(durations)
    total = sum(durations.get(t.key, 0.0) for t in todos)
    longest = max((durations.get(t.key, 0.0) for t in todos), default=0.0)
    assert longest - 1e-9 <= cp <= total + 1e-9
