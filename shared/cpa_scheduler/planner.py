"""The LLM planner: free-text requests to validated ToDo graphs, and ``llm.generate``.

Providers speak the OpenAI chat-completions API: OpenAI itself (``OPENAI_API_KEY``), or any
compatible server through ``OPENAI_BASE_URL`` (Ollama, vLLM, llama.cpp). Output is constrained
by a strict JSON schema generated from the action catalogue (``response_format`` on chat
completions, which Ollama supports; its ``/v1/responses`` does not take a format). Every plan
is then validated by the task-graph rules; one repair round sends the errors back, and a plan
that is still invalid fails with the errors listed. Nothing is dropped from a plan silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from cpa_scheduler import catalogue as catalogue_mod
from cpa_scheduler import errors, executor, intents, protocol, settings, store

log = logging.getLogger("cpa.planner")
CACHE_TTL = 24 * 3600
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


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    model: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "latency_ms": round(self.latency_ms, 1), "model": self.model}  # fmt: skip


class Provider(Protocol):
    async def chat(
        self, messages: list[dict[str, str]], *, schema: dict[str, Any] | None, temperature: float
    ) -> tuple[str, Usage]:
        """The assistant's text (JSON when a schema is given) and the call's usage."""


def _map_error(exc: Exception) -> errors.CpaError:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return errors.RetryableError(f"The language model timed out: {exc}.")
    if isinstance(exc, openai.APIConnectionError):
        return errors.RetryableError(f"The language model is unreachable: {exc}.")
    if isinstance(exc, openai.RateLimitError):
        return errors.RetryableError("The language model is rate limited (429); retrying later.")
    if isinstance(exc, openai.InternalServerError):
        return errors.RetryableError(
            f"The language model failed ({exc.status_code}); retrying later."
        )
    if isinstance(exc, openai.APIStatusError):
        return errors.PermanentError(
            f"The language model rejected the request ({exc.status_code}): {exc.message}"
        )
    return errors.PermanentError(f"The language model call failed: {exc}")


class OpenAIProvider:
    """Chat completions through the ``openai`` SDK (OpenAI or any compatible server)."""

    def __init__(
        self,
        *,
        model: str,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 1,
        http_client: Any = None,
    ) -> None:
        import openai  # imported here: the SDK is slow to import and most paths never call it

        self.model = model
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "not-needed",  # Ollama and friends ignore it; the SDK needs one
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
        )

    async def chat(
        self, messages: list[dict[str, str]], *, schema: dict[str, Any] | None, temperature: float
    ) -> tuple[str, Usage]:
        import openai

        kwargs: dict[str, Any] = {}
        if schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "plan", "strict": True, "schema": schema},
            }
        started = time.perf_counter()
        try:
            completion = await self._client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                temperature=temperature,
                **kwargs,
            )
        except openai.OpenAIError as exc:
            raise _map_error(exc) from None
        latency = (time.perf_counter() - started) * 1000
        choice = completion.choices[0]
        refusal = getattr(choice.message, "refusal", None)
        if refusal:
            raise errors.PermanentError(f"The language model refused: {refusal}")
        usage = completion.usage
        info = Usage(
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_ms=latency,
            model=completion.model,
        )
        log.info("llm call model=%s tokens=%s+%s latency_ms=%.0f", info.model,
                 info.prompt_tokens, info.completion_tokens, latency)  # fmt: skip
        return choice.message.content or "", info


def provider_from(config: settings.Settings, *, http_client: Any = None) -> Provider | None:
    """OpenAI when OPENAI_API_KEY is set, a compatible server with OPENAI_BASE_URL, else None."""
    if not (config.openai_api_key or config.openai_base_url):
        return None
    return OpenAIProvider(
        model=config.llm_model,
        api_key=config.openai_api_key,
        base_url=config.openai_base_url,
        http_client=http_client,
    )


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


# --- cache -----------------------------------------------------------------------------------


class PlanCache(Protocol):
    async def get(self, tenant_id: str, key: str) -> Any: ...

    async def put(self, tenant_id: str, key: str, plan: Any, ttl: int) -> None: ...


@dataclass
class PostgresPlanCache:
    """``private.plan_cache`` through the service role."""

    db: store.Store

    async def get(self, tenant_id: str, key: str) -> Any:
        async with self.db.service() as session:
            return await session.plan_cache_get(tenant_id, key)

    async def put(self, tenant_id: str, key: str, plan: Any, ttl: int) -> None:
        async with self.db.service() as session:
            await session.plan_cache_put(tenant_id, key, plan, ttl)


class UpstashPlanCache:
    """Upstash Redis (REST) with a TTL per entry."""

    def __init__(self, url: str, token: str) -> None:
        from upstash_redis.asyncio import Redis

        self._redis = Redis(url=url, token=token, allow_telemetry=False)

    async def get(self, tenant_id: str, key: str) -> Any:
        raw = await self._redis.get(f"cpa:plan:{tenant_id}:{key}")
        return None if raw is None else json.loads(raw)

    async def put(self, tenant_id: str, key: str, plan: Any, ttl: int) -> None:
        await self._redis.set(f"cpa:plan:{tenant_id}:{key}", json.dumps(plan), ex=ttl)


def cache_for(config: settings.Settings, db: store.Store | None) -> PlanCache | None:
    """Upstash when configured, else Postgres (when there is a store)."""
    if config.upstash_redis_rest_url and config.upstash_redis_rest_token:
        return UpstashPlanCache(config.upstash_redis_rest_url, config.upstash_redis_rest_token)
    return PostgresPlanCache(db) if db is not None else None


# --- planner ---------------------------------------------------------------------------------


@dataclass
class Planner:
    """Plans requests with a provider, validates, repairs once, and caches per tenant."""

    provider: Provider
    catalogue: catalogue_mod.Catalogue = field(default_factory=catalogue_mod.default)
    cache: PlanCache | None = None
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
                    await self.cache.put(tenant_id, key, todos, CACHE_TTL)
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
            graph = self.catalogue.build(spec, max_todos=self.max_todos)
        except errors.InvalidError as exc:
            return [], [exc.message, *(str(e.get("msg")) for e in exc.errors[1:])]
        except ValueError as exc:
            return [], [f"the plan does not fit the ToDo shape: {exc}"]
        from cpa_scheduler import intake

        return intake.todo_rows(graph), []


# --- executors -------------------------------------------------------------------------------


class PlanExecutor:
    """The ``plan`` action: the planned sub-graph is attached by the dispatcher on completion."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner

    async def __call__(self, params: dict[str, Any], ctx: executor.Context) -> Any:
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
        return {"attach": result["todos"], "usage": result["usage"], "cached": result["cached"]}


class GenerateExecutor:
    """``llm.generate``: a prompt plus optional inputs (often resolved ``$ref`` results) to text."""

    def __init__(self, provider: Provider, *, temperature: float = 0.2) -> None:
        self.provider = provider
        self.temperature = temperature

    async def __call__(self, params: dict[str, Any], ctx: executor.Context) -> Any:
        prompt = str(params["prompt"])
        if params.get("inputs") is not None:
            inputs = params["inputs"]
            prompt += "\n\nInputs:\n" + (
                inputs if isinstance(inputs, str) else json.dumps(inputs, ensure_ascii=False)
            )
        messages = [{"role": "system", "content": params.get("system") or "You are CPA Desktop AI's writer."},
                    {"role": "user", "content": prompt}]  # fmt: skip
        text, usage = await self.provider.chat(messages, schema=None, temperature=self.temperature)
        return {"text": text, "usage": usage.as_dict()}


def register(registry: executor.Registry, provider: Provider, cache: PlanCache | None) -> Planner:
    """Add ``plan`` and ``llm.generate`` to a registry; returns the planner."""
    planner = Planner(provider, cache=cache)
    registry.register("plan", PlanExecutor(planner))
    registry.register("llm.generate", GenerateExecutor(provider))
    return planner


def registry_for(config: settings.Settings, db: store.Store | None) -> executor.Registry:
    """The built-in executors, plus ``plan`` and ``llm.generate`` when a provider is configured."""
    registry = executor.builtin(http_allow=config.http_allow)
    provider = provider_from(config)
    if provider is not None:
        register(registry, provider, cache_for(config, db))
    return registry
