"""ToDo graphs: the model, validation at construction, and scheduling views.

A :class:`Graph` is a DAG of :class:`ToDo` keyed by ``key``. Construction checks that keys are
unique, dependencies exist, nobody depends on itself, there is no cycle (the error names the
path, e.g. ``a -> b -> c -> a``, read "a depends on b ..."), and every
``{"$ref": "key.result..."}`` param points at an ancestor. The size limit is the catalogue's:
:meth:`cpa_scheduler.catalogue.Catalogue.build` checks it before validating any ToDo.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, Literal, TypeGuard

from pydantic import BaseModel, ConfigDict, Field

from cpa_scheduler import errors

REF_KEY = "$ref"

Target = Literal["cloud", "desktop"]
# The states of a job and of a ToDo, as the database's check constraints allow them.
JobStatus = Literal["pending", "running", "done", "failed", "cancelled"]
TodoStatus = Literal["waiting", "confirming", "ready", "running", "done", "failed", "cancelled"]
Status = Literal[JobStatus, TodoStatus]


class ToDo(BaseModel):
    """One unit of work in a job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(min_length=1, max_length=64)
    action: str
    target: Target = "cloud"
    params: dict[str, Any] = Field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    max_attempts: int = Field(default=3, ge=1, le=25)
    requires_confirmation: bool = False
    run_at: datetime | None = None
    agent_timeout: int | None = None


def is_ref(value: object) -> TypeGuard[dict[str, Any]]:
    """Whether a param value is a ``{"$ref": "..."}`` reference."""
    return isinstance(value, dict) and len(value) == 1 and REF_KEY in value


def iter_refs(value: object) -> Iterator[str]:
    """Every reference string inside a params value, depth first."""
    if is_ref(value):
        yield str(value[REF_KEY])
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from iter_refs(item)


def ref_source(ref: str) -> str:
    """The ToDo key a reference like ``search.result.text`` reads from."""
    return ref.split(".", 1)[0]


class Graph:
    """An immutable, validated DAG of ToDos."""

    def __init__(self, todos: Iterable[ToDo]) -> None:
        items = list(todos)
        if not items:
            raise errors.GraphError("The graph has no ToDos; add at least one.")
        self._todos: dict[str, ToDo] = {}
        for todo in items:
            if todo.key in self._todos:
                raise errors.GraphError(
                    f"The ToDo key {todo.key!r} is used twice; every key must be unique.",
                    errors=[{"loc": ["todos", todo.key, "key"], "msg": "duplicate key"}],
                )
            self._todos[todo.key] = todo
        for todo in items:
            for dep in todo.depends_on:
                if dep == todo.key:
                    raise errors.GraphError(
                        f"The ToDo {todo.key!r} depends on itself; remove it from its depends_on.",
                        errors=[{"loc": ["todos", todo.key, "depends_on"], "msg": "self"}],
                    )
                if dep not in self._todos:
                    raise errors.GraphError(
                        f"The ToDo {todo.key!r} depends on {dep!r}, which is not in the graph; "
                        "add that ToDo or remove the dependency.",
                        errors=[
                            {"loc": ["todos", todo.key, "depends_on"], "msg": f"unknown {dep}"}
                        ],
                    )
        self._order = self._toposort()
        self._dependents: dict[str, list[str]] = {key: [] for key in self._todos}
        for todo in items:
            for dep in todo.depends_on:
                self._dependents[dep].append(todo.key)
        self._ancestors = self._compute_ancestors()
        self._check_refs()

    # --- construction helpers -------------------------------------------------------------

    def _toposort(self) -> list[str]:
        # Iterative DFS so deep chains do not hit the recursion limit.
        white, grey, black = 0, 1, 2
        colour = dict.fromkeys(self._todos, white)
        order: list[str] = []
        for root in self._todos:
            if colour[root] != white:
                continue
            stack: list[tuple[str, Iterator[str]]] = [(root, iter(self._todos[root].depends_on))]
            colour[root] = grey
            while stack:
                key, deps = stack[-1]
                dep = next(deps, None)
                if dep is None:
                    colour[key] = black
                    order.append(key)
                    stack.pop()
                elif colour[dep] == grey:
                    path = [k for k, _ in stack]
                    cycle = [*path[path.index(dep) :], dep]
                    raise errors.CycleError(cycle)
                elif colour[dep] == white:
                    colour[dep] = grey
                    stack.append((dep, iter(self._todos[dep].depends_on)))
        return order

    def _compute_ancestors(self) -> dict[str, frozenset[str]]:
        ancestors: dict[str, frozenset[str]] = {}
        for key in self._order:
            acc: set[str] = set()
            for dep in self._todos[key].depends_on:
                acc.add(dep)
                acc |= ancestors[dep]
            ancestors[key] = frozenset(acc)
        return ancestors

    def _check_refs(self) -> None:
        for todo in self._todos.values():
            for ref in iter_refs(todo.params):
                source = ref_source(ref)
                if source not in self._ancestors[todo.key]:
                    raise errors.GraphError(
                        f"The ToDo {todo.key!r} references {ref!r}, but {source!r} is not one of "
                        "its dependencies; add it to depends_on or fix the reference.",
                        errors=[{"loc": ["todos", todo.key, "params"], "msg": f"bad $ref {ref}"}],
                    )

    # --- views ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._todos)

    def __iter__(self) -> Iterator[ToDo]:
        return iter(self._todos.values())

    def __getitem__(self, key: str) -> ToDo:
        return self._todos[key]

    @property
    def keys(self) -> list[str]:
        return list(self._todos)

    def topological_order(self) -> list[str]:
        """Keys such that each comes after all its dependencies."""
        return list(self._order)

    def batches(self) -> list[list[str]]:
        """Levels: each batch depends only on earlier batches (level-by-level baseline)."""
        level: dict[str, int] = {}
        for key in self._order:
            deps = self._todos[key].depends_on
            level[key] = 1 + max((level[d] for d in deps), default=-1)
        out: list[list[str]] = [[] for _ in range(1 + max(level.values()))]
        for key in self._order:
            out[level[key]].append(key)
        return out

    def ready(self) -> list[str]:
        """ToDos with no dependencies: ready as soon as the job starts."""
        return [key for key, todo in self._todos.items() if not todo.depends_on]

    def dependents(self, key: str) -> list[str]:
        """ToDos that depend directly on ``key``."""
        return list(self._dependents[key])

    def ancestors(self, key: str) -> frozenset[str]:
        """Every ToDo ``key`` depends on, directly or transitively."""
        return self._ancestors[key]

    def critical_path(self, durations: Mapping[str, float]) -> float:
        """The length of the longest dependency chain, weighting each ToDo by its duration."""
        finish: dict[str, float] = {}
        for key in self._order:
            start = max((finish[d] for d in self._todos[key].depends_on), default=0.0)
            finish[key] = start + float(durations.get(key, 0.0))
        return max(finish.values())


def todo_rows(g: Graph) -> list[dict[str, Any]]:
    """The ToDos of a validated graph as rows, in the shape job creation takes."""
    return [
        {
            "key": t.key,
            "action": t.action,
            "target": t.target,
            "params": t.params,
            "depends_on": list(dict.fromkeys(t.depends_on)),
            "max_attempts": t.max_attempts,
            "requires_confirmation": t.requires_confirmation,
        }
        | ({"run_at": t.run_at.isoformat()} if t.run_at is not None else {})
        | ({"agent_timeout": t.agent_timeout} if t.agent_timeout is not None else {})
        for t in g
    ]


def resolve_refs(params: Any, results: Mapping[str, Any], key: str) -> Any:
    """Replace every ``{"$ref": "dep.result.path"}`` with the value it names."""
    if is_ref(params):
        ref = str(params[REF_KEY])
        source, _, rest = ref.partition(".")
        if source not in results:
            raise errors.PermanentError(
                f"The ToDo {key!r} references {ref!r}, but {source!r} has no result; "
                "it must be a finished dependency."
            )
        value: Any = results[source]
        parts = rest.split(".") if rest else []
        if parts and parts[0] == "result":
            parts = parts[1:]
        for part in parts:
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise errors.PermanentError(
                    f"The ToDo {key!r} references {ref!r}, but the result of {source!r} "
                    f"has no {part!r}."
                )
        return value
    if isinstance(params, dict):
        return {k: resolve_refs(v, results, key) for k, v in params.items()}
    if isinstance(params, list):
        return [resolve_refs(v, results, key) for v in params]
    return params
