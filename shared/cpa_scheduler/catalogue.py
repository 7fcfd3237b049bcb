"""The action catalogue: which actions exist, where they run, and what params they take.

Loaded from ``actions.yaml`` (or a dict). Params are validated against each action's JSON
schema when a graph is built; a ``{"$ref": ...}`` value stands in for any value, since it is
resolved from a dependency's result only when the ToDo starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cpa_scheduler import errors, graph, protocol

# The most ToDos one submitted or planned graph may have (the database refuses over 1000).
MAX_TODOS = 500


class Action(BaseModel):
    """One catalogue entry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    target: graph.Target
    description: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    requires_confirmation: bool = False


class Catalogue:
    """A set of actions with params validators, and a version hash for caches."""

    def __init__(self, actions: Iterable[Action], *, version: str) -> None:
        self.actions: dict[str, Action] = {a.name: a for a in actions}
        self.version = version
        import jsonschema  # deferred: only validation needs it, not the cold import

        self._validators = {
            name: jsonschema.Draft202012Validator(action.params)
            for name, action in self.actions.items()
        }

    def __contains__(self, name: object) -> bool:
        return name in self.actions

    def get(self, key: str, name: str) -> Action:
        """The action ``name`` used by ToDo ``key``; an :class:`ActionError` if unknown."""
        try:
            return self.actions[name]
        except KeyError:
            known = ", ".join(sorted(self.actions))
            raise errors.ActionError(
                f"The ToDo {key!r} uses the unknown action {name!r}; use one of: {known}.",
                errors=[{"loc": ["todos", key, "action"], "msg": f"unknown action {name}"}],
            ) from None

    def names(self, target: graph.Target | None = None) -> list[str]:
        return sorted(n for n, a in self.actions.items() if target in (None, a.target))

    def check_params(self, key: str, name: str, params: Mapping[str, Any]) -> None:
        """Raise an :class:`ActionError` naming the ToDo and field if params do not fit."""
        validator = self._validators[self.get(key, name).name]
        found = []
        for err in validator.iter_errors(dict(params)):
            if _inside_ref(params, list(err.absolute_path)):
                continue
            found.append(err)
        if not found:
            return
        details = []
        for err in sorted(found, key=lambda e: list(map(str, e.absolute_path))):
            details.append(
                {"loc": ["todos", key, "params", *err.absolute_path], "msg": err.message}
            )
        first = details[0]
        field = ".".join(str(p) for p in first["loc"][3:]) or "params"
        raise errors.ActionError(
            f"The ToDo {key!r} has invalid params for {name!r}: {field}: {first['msg']}.",
            errors=details,
        )

    def build(self, spec: protocol.GraphSpec, *, max_todos: int = MAX_TODOS) -> graph.Graph:
        """Turn a submitted graph into a validated :class:`graph.Graph`."""
        # The size first, so an oversized graph costs no per-ToDo validation.
        if len(spec.todos) > max_todos:
            raise errors.GraphTooLargeError(
                f"The graph has {len(spec.todos)} ToDos but at most {max_todos} are allowed; "
                "split the request into smaller jobs."
            )
        todos = []
        for item in spec.todos:
            action = self.get(item.key, item.action)
            if item.target is not None and item.target != action.target:
                raise errors.ActionError(
                    f"The ToDo {item.key!r} asks for target {item.target!r}, but {action.name!r} "
                    f"runs on {action.target!r}; drop the target or use {action.target!r}.",
                    errors=[{"loc": ["todos", item.key, "target"], "msg": "wrong target"}],
                )
            self.check_params(item.key, action.name, item.params)
            extra = {} if item.max_attempts is None else {"max_attempts": item.max_attempts}
            if item.agent_timeout is not None and action.target != "desktop":
                raise errors.ActionError(
                    f"The ToDo {item.key!r} sets agent_timeout, but {action.name!r} runs in the "
                    "cloud, not on an agent; drop agent_timeout.",
                    errors=[{"loc": ["todos", item.key, "agent_timeout"], "msg": "cloud action"}],
                )
            todos.append(
                graph.ToDo(
                    key=item.key,
                    action=action.name,
                    target=action.target,
                    params=item.params,
                    depends_on=tuple(item.depends_on),
                    requires_confirmation=action.requires_confirmation
                    or bool(item.requires_confirmation),
                    run_at=item.run_at,
                    agent_timeout=item.agent_timeout,
                    **extra,
                )
            )
        return graph.Graph(todos)


def _inside_ref(params: Mapping[str, Any], path: list[Any]) -> bool:
    node: Any = params
    for part in path:
        if graph.is_ref(node):
            return True
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    return graph.is_ref(node)


def load_from_dict(data: Mapping[str, Any]) -> Catalogue:
    """Build a catalogue from the parsed YAML shape ``{"actions": {name: {...}}}``."""
    raw = data.get("actions")
    if not isinstance(raw, Mapping) or not raw:
        raise errors.ConfigError("The action catalogue needs a non-empty 'actions' mapping.")
    import jsonschema

    actions = []
    for name, body in raw.items():
        if not isinstance(body, Mapping):
            raise errors.ConfigError(f"The action {name!r} must be a mapping of its fields.")
        try:
            action = Action(name=name, **body)
            jsonschema.Draft202012Validator.check_schema(action.params)
        except ValidationError as exc:
            raise errors.ConfigError(f"The action {name!r} is malformed: {exc}") from None
        except jsonschema.SchemaError as exc:
            raise errors.ConfigError(
                f"The action {name!r} has an invalid params schema: {exc.message}."
            ) from None
        actions.append(action)
    version = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    return Catalogue(actions, version=version[:16])


def load_yaml(text: str, what: str) -> Mapping[str, Any]:
    """The top-level mapping of a YAML file of the package (actions, intents); ``what`` names the
    file in the error, e.g. "The action catalogue"."""
    import yaml  # deferred: the files are read on first use, not at cold import

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise errors.ConfigError(f"{what} is not valid YAML: {exc}.") from None
    if not isinstance(data, Mapping):
        raise errors.ConfigError(f"{what} must be a YAML mapping.")
    return data


@functools.cache
def default() -> Catalogue:
    """The built-in catalogue shipped as ``cpa_scheduler/actions.yaml``."""
    text = resources.files("cpa_scheduler").joinpath("actions.yaml").read_text("utf-8")
    return load_from_dict(load_yaml(text, "The action catalogue"))
