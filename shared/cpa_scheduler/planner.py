"""The LLM planner: free-text requests to validated ToDo graphs, and ``llm.generate``.

The provider (:mod:`cpa_scheduler.llm`) speaks the OpenAI chat-completions API; plans are
cached per tenant (:mod:`cpa_scheduler.cache`). Output is constrained
by a strict JSON schema generated from the action catalogue (``response_format`` on chat
completions, which Ollama supports; its ``/v1/responses`` does not take a format). Every plan
is then validated by the task-graph rules; one repair round sends the errors back, and a plan
that is still invalid fails with the errors listed. Nothing is dropped from a plan silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cpa_scheduler import cache as cache_mod
from cpa_scheduler import catalogue as catalogue_mod
from cpa_scheduler import errors, executor, graph, intents, llm, protocol, settings, store

log = logging.getLogger("cpa.planner")
REF = {
    "type": "object",
    "properties": {"$ref": {"type": "string", "description": "<dependency key>.result[.path]"}},
    "required": ["$ref"],
    "additionalProperties": False,
}
_SCALAR = {"type": ["string", "number", "boolean"]}
SYSTEM = """You are the planner of CPA Desktop AI. Turn the user's request into the smallest graph
of ToDos that does it, with maximal safe parallelism: a ToDo depends only on the ToDos whose
results it needs or that must happen first. Use only the actions listed. Keys are short,
unique, lower-case words. To use an earlier ToDo's result in params, write
{"$ref": "<key>.result.<field>"} and list that key in depends_on. Never invent facts the user
did not give; ask nothing. Answer with JSON matching the schema.

Actions:
{actions}

User context: locale {locale}, time zone {timezone}, current time {now}."""


# --- schema ----------------------------------------------------------------------------------


def _strict(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A catalogue params schema in OpenAI's strict subset; any value may also be a $ref."""
    kind = schema.get("type")
    if "enum" in schema:
        return {"type": "string", "enum": list(schema["enum"])}
    if kind == "object":
        props = {
            name: {"anyOf": [_strict(sub), REF]}
            if name in schema.get("required", [])
            else {"anyOf": [_strict(sub), REF, {"type": "null"}]}
            for name, sub in schema.get("properties", {}).items()
            if not (sub.get("type") == "object" and "properties" not in sub)
        }
        return {"type": "object", "properties": props, "required": list(props),
                "additionalProperties": False}  # fmt: skip
    if kind == "array":
        return {"type": "array", "items": {"anyOf": [_strict(schema.get("items", {})), REF]}}
    if kind in ("string", "number", "integer", "boolean"):
        return {"type": kind}
    return {"anyOf": [_SCALAR, {"type": "array", "items": {"anyOf": [_SCALAR, REF]}}, REF]}


def plan_schema(cat: catalogue_mod.Catalogue) -> dict[str, Any]:
    """The strict output schema: ``{"todos": [...]}``, one variant per known action."""
    variants = []
    for name in cat.names():
        if name == "plan":
            continue
        action = cat.actions[name]
        variants.append({
            "type": "object",
            "properties": {
                "key": {"type": "string"},
                "action": {"type": "string", "enum": [name]},
                "target": {"type": "string", "enum": [action.target]},
                "params": _strict(action.params),
                "depends_on": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["key", "action", "target", "params", "depends_on"],
            "additionalProperties": False,
        })  # fmt: skip
    return {
        "type": "object",
        "properties": {"todos": {"type": "array", "items": {"anyOf": variants}}},
        "required": ["todos"],
        "additionalProperties": False,
    }


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _actions_text(cat: catalogue_mod.Catalogue) -> str:
    lines = []
    for name in cat.names():
        if name == "plan":
            continue
        a = cat.actions[name]
        props = ", ".join(a.params.get("properties", {})) or "-"
        lines.append(f"- {name} ({a.target}): {a.description} Params: {props}.")
    return "\n".join(lines)


# --- planner ---------------------------------------------------------------------------------


@dataclass
class Planner:
    """Plans requests with a provider, validates, repairs once, and caches per tenant."""

    provider: llm.Provider
    catalogue: catalogue_mod.Catalogue = field(default_factory=catalogue_mod.default)
    cache: cache_mod.PlanCache | None = None
    temperature: float = 0.1
    max_todos: int = 50

    def cache_key(self, request: str) -> str:
        text = intents.normalise(request).lower()
        return hashlib.sha256(f"{self.catalogue.version}:{text}".encode()).hexdigest()

    async def plan(
        self,
        request: str,
        *,
        tenant_id: str | None = None,
        context: protocol.UserContext | None = None,
        reserved_keys: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """``{"todos": [...], "usage": [...], "cached": bool}`` for a valid plan, else PlannerError."""
        key = self.cache_key(request)
        if self.cache is not None and tenant_id is not None:
            cached = await self.cache.get(tenant_id, key)
            if cached is not None:
                return {"todos": cached, "usage": [], "cached": True}
        ctx = context or protocol.UserContext()
        system = (
            SYSTEM.replace("{actions}", _actions_text(self.catalogue))
            .replace("{locale}", ctx.locale)
            .replace("{timezone}", ctx.timezone)
            .replace("{now}", datetime.now(UTC).isoformat(timespec="minutes"))
        )
        messages = [{"role": "system", "content": system}, {"role": "user", "content": request}]
        schema = plan_schema(self.catalogue)
        usage: list[dict[str, Any]] = []
        problems: list[str] = []
        for round_ in range(2):
            text, info = await self.provider.chat(
                messages, schema=schema, temperature=self.temperature
            )
            usage.append(info.as_dict())
            todos, problems = self._validate(text, reserved_keys)
            if not problems:
                if self.cache is not None and tenant_id is not None:
                    await self.cache.put(tenant_id, key, todos, cache_mod.TTL)
                return {"todos": todos, "usage": usage, "cached": False}
            if round_ == 0:
                messages += [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": "The plan is invalid:\n- " + "\n- ".join(problems)
                     + "\nAnswer with a corrected plan that keeps every step of the request."},
                ]  # fmt: skip
        raise errors.PlannerError(
            "The planner could not produce a valid plan after one repair: " + "; ".join(problems),
            errors=[{"loc": ["plan"], "msg": p} for p in problems],
        )

    def _validate(
        self, text: str, reserved: frozenset[str]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return [], [f"the answer is not JSON ({exc.msg} at {exc.pos})"]
        if not isinstance(data, dict) or not isinstance(data.get("todos"), list):
            return [], ["the answer must be an object with a 'todos' list"]
        todos = [_drop_nulls(t) for t in data["todos"]]
        clash = sorted({str(t.get("key")) for t in todos if isinstance(t, dict)} & reserved)
        if clash:
            return [], [f"the keys {', '.join(map(str, clash))} are already used in this job"]
        try:
            spec = protocol.GraphSpec.model_validate({"todos": todos})
            if any(t.action == "plan" for t in spec.todos):
                return [], ["a plan may not contain another 'plan' step"]
            built = self.catalogue.build(spec, max_todos=self.max_todos)
        except errors.InvalidError as exc:
            return [], [exc.message, *(str(e.get("msg")) for e in exc.errors[1:])]
        except ValueError as exc:
            return [], [f"the plan does not fit the ToDo shape: {exc}"]

        return graph.todo_rows(built), []


# --- executors -------------------------------------------------------------------------------


class PlanExecutor:
    """The ``plan`` action: attaches the planned sub-graph to the job as it completes."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner

    async def __call__(self, params: dict[str, Any], ctx: executor.Context) -> executor.Outcome:
        context = (
            protocol.UserContext.model_validate(params["context"])
            if params.get("context")
            else None
        )
        try:
            result = await self.planner.plan(
                str(params["request"]), tenant_id=ctx.tenant_id, context=context,
                reserved_keys=frozenset({ctx.key}),
            )  # fmt: skip
        except errors.PlannerError as exc:
            raise errors.PermanentError(exc.message) from None
        todos = result["todos"]
        # The stored result keeps the plan too, so the job shows what was attached.
        return executor.Attach(
            todos, {"attach": todos, "usage": result["usage"], "cached": result["cached"]}
        )


class GenerateExecutor:
    """``llm.generate``: a prompt plus optional inputs (often resolved ``$ref`` results) to text."""

    def __init__(self, provider: llm.Provider, *, temperature: float = 0.2) -> None:
        self.provider = provider
        self.temperature = temperature

    async def __call__(self, params: dict[str, Any], ctx: executor.Context) -> executor.Outcome:
        prompt = str(params["prompt"])
        if params.get("inputs") is not None:
            inputs = params["inputs"]
            prompt += "\n\nInputs:\n" + (
                inputs if isinstance(inputs, str) else json.dumps(inputs, ensure_ascii=False)
            )
        messages = [{"role": "system", "content": params.get("system") or "You are CPA Desktop AI's writer."},
                    {"role": "user", "content": prompt}]  # fmt: skip
        text, usage = await self.provider.chat(messages, schema=None, temperature=self.temperature)
        return executor.Done({"text": text, "usage": usage.as_dict()})


def register(
    registry: executor.Registry, provider: llm.Provider, cache: cache_mod.PlanCache | None
) -> Planner:
    """Add ``plan`` and ``llm.generate`` to a registry; returns the planner."""
    planner = Planner(provider, cache=cache)
    registry.register("plan", PlanExecutor(planner))
    registry.register("llm.generate", GenerateExecutor(provider))
    return planner


def registry_for(config: settings.Settings, db: store.Store | None) -> executor.Registry:
    """The built-in executors, plus ``plan`` and ``llm.generate`` when a provider is configured."""
    registry = executor.builtin(http_allow=config.http_allow)
    provider = llm.provider_from(config)
    if provider is not None:
        register(registry, provider, cache_mod.cache_for(config, db))
    return registry
