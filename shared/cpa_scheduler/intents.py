"""Intent router: map a request text onto a plan template with case-insensitive regexes.

Intents come from ``intents.yaml`` and are tried in file order; the first pattern that matches
the normalised text (trimmed, inner whitespace collapsed) wins. Its named groups fill the plan
template. Nothing matching gives the intent ``unknown`` and no plan: the planner takes over.
:func:`plan` is the whole choice for a job or a schedule: explicit graph, intent, or planner.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cpa_scheduler import catalogue as catalogue_mod
from cpa_scheduler import errors, graph, protocol, times

UNKNOWN = "unknown"
NO_PLANNER = (
    "No intent matches this request and no planner is configured; "
    "set OPENAI_API_KEY or OPENAI_BASE_URL, or submit an explicit graph."
)
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_UNIT_SECONDS = {
    **dict.fromkeys(["s", "sec", "secs", "second", "seconds", "sek", "sekunde", "sekunden"], 1),
    **dict.fromkeys(["m", "min", "mins", "minute", "minutes", "minuten"], 60),
    **dict.fromkeys(["h", "hour", "hours", "std", "stunde", "stunden"], 3600),
}
# Values the router derives from groups, and the groups each one needs: {seconds} from amount
# and unit; {at} from when, the RFC 3339 time the caller's resolver reads it as ("" when the
# request names no time).
_DERIVED = {"seconds": ("amount", "unit"), "at": ("when",), "at_or_now": ("when",)}
TimeResolver = Callable[[str], str]


def _split(item: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """A filled plan item as a ToDo spec, and whether it is kept only where an agent offers it.

    An empty ``run_at`` means immediately."""
    spec = {k: v for k, v in item.items() if k != "if_agent_offers"}
    if spec.get("run_at") in ("", None):
        spec.pop("run_at", None)
    return spec, bool(item.get("if_agent_offers"))


class Routed(BaseModel):
    """The outcome of routing one text."""

    model_config = ConfigDict(frozen=True)

    intent: str
    text: str
    groups: dict[str, str] = Field(default_factory=dict)
    graph: protocol.GraphSpec | None = None
    if_agent_offers: frozenset[str] = Field(
        default_factory=frozenset, description="Desktop ToDos kept only where an agent offers them."
    )


class Intent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    patterns: list[str] = Field(min_length=1)
    plan: list[dict[str, Any]] = Field(min_length=1)
    defaults: dict[str, str] = Field(default_factory=dict)
    examples: dict[str, list[str]] = Field(default_factory=dict)


def _resolve_utc(when: str) -> str:
    return times.resolve(when, tz=times.zone("UTC")).isoformat()


def normalise(text: str) -> str:
    """Trim and collapse whitespace, so routing ignores spacing."""
    return " ".join(text.split())


def _fill(value: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole and whole.group(1) in values:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), m.group(0))), value)
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    return value


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(_PLACEHOLDER.findall(value))
    if isinstance(value, dict):
        return set().union(*(_placeholders(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_placeholders(v) for v in value)) if value else set()
    return set()


class Router:
    """Ordered intents with compiled patterns."""

    def __init__(self, intents: list[Intent], catalogue: catalogue_mod.Catalogue) -> None:
        self.intents = intents
        self.catalogue = catalogue
        self._compiled: list[tuple[Intent, list[re.Pattern[str]]]] = []
        for intent in intents:
            compiled = []
            needed = _placeholders(intent.plan)
            for pattern in intent.patterns:
                try:
                    rx = re.compile(pattern, re.IGNORECASE)
                except re.error as exc:
                    raise errors.ConfigError(
                        f"The intent {intent.name!r} has an invalid pattern {pattern!r}: {exc}."
                    ) from None
                available = set(rx.groupindex) | set(intent.defaults)
                available |= {d for d, src in _DERIVED.items() if set(src) <= available}
                missing = sorted(needed - available)
                if missing:
                    raise errors.ConfigError(
                        f"The intent {intent.name!r} pattern {pattern!r} has no group for "
                        f"{', '.join(missing)}; add named groups or defaults for them."
                    )
                compiled.append(rx)
            self._check_plan(intent)
            self._compiled.append((intent, compiled))

    def _check_plan(self, intent: Intent) -> None:
        try:
            # run_at is a placeholder until a request fills it.
            todos = [
                protocol.TodoSpec.model_validate(_split(item)[0] | {"run_at": None})
                for item in intent.plan
            ]
            spec = protocol.GraphSpec(todos=todos)
            for todo in spec.todos:
                self.catalogue.get(todo.key, todo.action)
            graph.Graph(
                graph.ToDo(
                    key=t.key, action=t.action, params=t.params, depends_on=tuple(t.depends_on)
                )
                for t in spec.todos
            )
        except (ValidationError, errors.InvalidError) as exc:
            raise errors.ConfigError(
                f"The intent {intent.name!r} has an invalid plan template: {exc}"
            ) from None

    def names(self) -> list[str]:
        return [intent.name for intent in self.intents]

    def route(self, text: str, *, resolve_time: TimeResolver | None = None) -> Routed:
        """The first matching intent with its filled plan, or ``unknown``.

        ``resolve_time`` turns a ``when`` group ("morgen um 9") into an RFC 3339 time; the
        default reads it in UTC at the current time."""
        resolve_time = resolve_time or _resolve_utc
        clean = normalise(text)
        for intent, patterns in self._compiled:
            for rx in patterns:
                match = rx.search(clean)
                if match is None:
                    continue
                groups = {k: v.strip() for k, v in match.groupdict().items() if v}
                values: dict[str, Any] = {**intent.defaults, **groups}
                if "amount" in values and "unit" in values:
                    unit = _UNIT_SECONDS.get(values["unit"].lower(), 1)
                    values["seconds"] = int(values["amount"]) * unit
                if "when" in values:
                    when = str(values["when"]).strip()
                    values["at"] = resolve_time(when) if when else ""
                    values["at_or_now"] = values["at"] or datetime.now(UTC).isoformat()
                filled = [_split(item) for item in _fill(intent.plan, values)]
                spec = protocol.GraphSpec.model_validate({"todos": [f[0] for f in filled]})
                optional = frozenset(item["key"] for item, flag in filled if flag)
                return Routed(intent=intent.name, text=clean, groups=groups, graph=spec,
                              if_agent_offers=optional)  # fmt: skip
        return Routed(intent=UNKNOWN, text=clean)


def load_from_dict(
    data: Mapping[str, Any], catalogue: catalogue_mod.Catalogue | None = None
) -> Router:
    """Build a router from the parsed YAML shape ``{"intents": [...]}``."""
    raw = data.get("intents")
    if not isinstance(raw, list) or not raw:
        raise errors.ConfigError("The intents file needs a non-empty 'intents' list.")
    intents = []
    seen: set[str] = set()
    for index, body in enumerate(raw):
        name = body.get("name", f"#{index}") if isinstance(body, Mapping) else f"#{index}"
        if not isinstance(body, Mapping):
            raise errors.ConfigError(f"The intent {name!r} must be a mapping.")
        try:
            intent = Intent.model_validate(body)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise errors.ConfigError(
                f"The intent {name!r} is malformed at {where}: {first['msg']}."
            ) from None
        if intent.name in seen or intent.name == UNKNOWN:
            raise errors.ConfigError(f"The intent name {intent.name!r} is used twice or reserved.")
        seen.add(intent.name)
        intents.append(intent)
    return Router(intents, catalogue or catalogue_mod.default())


@functools.cache
def default() -> Router:
    """The router for the built-in ``cpa_scheduler/intents.yaml``."""
    text = resources.files("cpa_scheduler").joinpath("intents.yaml").read_text("utf-8")
    return load_from_dict(catalogue_mod.load_yaml(text, "The intents file"))


def plan(
    *,
    text: str | None,
    spec: protocol.GraphSpec | None,
    planner_configured: bool,
    force_planner: bool = False,
    resolve_time: TimeResolver | None = None,
) -> tuple[str, graph.Graph, frozenset[str]]:
    """The intent, validated graph, and the keys of ToDos kept only where an agent offers them,
    for a request text or an explicit graph.

    ``force_planner`` skips the intent router: the client asked for LLM planning."""
    cat = catalogue_mod.default()
    if spec is not None:
        return "explicit", cat.build(spec), frozenset()
    if text is None or not text.strip():
        raise errors.InvalidError("The request text is empty; say what should be done.")
    routed = default().route(text, resolve_time=resolve_time)
    if routed.graph is not None and not force_planner:
        return routed.intent, cat.build(routed.graph), routed.if_agent_offers
    if not planner_configured:
        raise errors.PlannerError(NO_PLANNER)
    planning = protocol.GraphSpec(
        todos=[protocol.TodoSpec(key="plan", action="plan", params={"request": routed.text})]
    )
    return ("planned" if force_planner else routed.intent), cat.build(planning), frozenset()


def without(g: graph.Graph, drop: set[str]) -> graph.Graph:
    """The graph minus optional ToDos nothing else depends on."""
    keep = [t for t in g if t.key not in drop or any(t.key in o.depends_on for o in g)]
    return graph.Graph(keep)
