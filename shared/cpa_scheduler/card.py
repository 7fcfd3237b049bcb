"""The A2A edge's Agent Card: a skill per intent group and per action family of the
catalogue, the JSON-RPC interface and the bearer scheme. The types are the ``a2a-sdk``'s; this
module imports no web framework. Jobs as tasks are :mod:`cpa_scheduler.a2a_tasks`'."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from a2a.types import a2a_pb2 as pb
from a2a.utils import constants
from google.protobuf import json_format

from cpa_scheduler import (
    __version__,
    catalogue,
    intents,
)

PROTOCOL_VERSION = constants.PROTOCOL_VERSION_1_0
BINDING = constants.TransportProtocol.JSONRPC.value
SECURITY = "supabase"  # the name of the bearer scheme in the card


# Intent groups of the card: a skill each. An intent of intents.yaml in no group gets a skill
# of its own, so the card always names every intent.
GROUPS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "reminders": ("Reminders and timers", "Reminders at a time (German or English time "
                  "expressions) and timers; they fire as notifications.", ("reminder", "timer")),
    "calendar": ("Calendar and meetings", "Calendar events, meetings with a free slot and "
                 "invitations, the daily briefing.", ("calendar_event", "meeting", "daily_briefing")),
    "mail": ("E-mail", "Write and send mail (asks for approval first), check unread mail.",
             ("email", "check_email")),
    "research": ("Research and text", "Search the web, research, summarise and translate "
                 "with an LLM.", ("web_search", "research", "summarise", "translate")),
    "desktop": ("Desktop", "Open apps and websites, write and organise files, take notes on "
                "the user's desktop.", ("open_app", "open_website", "write_file", "file_organise",
                                        "note")),
}  # fmt: skip
# Action families worth a skill of their own: a graph of these ToDos as a data part.
INTERNAL_ACTIONS = frozenset({"noop", "plan"})


_GERMAN = re.compile(
    r"[äöüß]|\b(?:mich|mir|mein|meine|ein|einen|eine|der|die|das|den|und|bitte|"
    r"um|mit|auf|was|wie|stell|schreibe|öffne|erinnere|plane|suche|fasse|"
    r"übersetze|heute|morgen|notiere|räume)\b",
    re.IGNORECASE,
)


def _skill_examples(router: intents.Router, names: Iterable[str], limit: int = 6) -> list[str]:
    """Positive examples of these intents, German and English alternating."""
    german: list[str] = []
    english: list[str] = []
    for intent in router.intents:
        if intent.name in names:
            for example in intent.examples.get("positive", []):
                text = " ".join(example.split())
                (german if _GERMAN.search(text) else english).append(text)
    mixed = [e for pair in itertools.zip_longest(german, english) for e in pair if e]
    return mixed[:limit]


def skills(router: intents.Router | None = None) -> list[pb.AgentSkill]:
    """One skill per intent group and per action family of the catalogue."""
    router = router or intents.default()
    known = set(router.names()) - {intents.UNKNOWN}
    out = []
    grouped: set[str] = set()
    for skill_id, (name, description, members) in GROUPS.items():
        present = [m for m in members if m in known]
        if not present:
            continue
        grouped |= set(present)
        out.append(_text_skill(skill_id, name, description, present, router))
    for intent in router.intents:
        if intent.name in known - grouped:
            out.append(_text_skill(intent.name, intent.name.replace("_", " ").capitalize(),
                                   intent.description or intent.name, [intent.name], router))  # fmt: skip
    out.extend(_family_skills(router))
    out.append(
        pb.AgentSkill(
            id="plan", name="Anything else (LLM planner)",
            description="A request no intent matches is planned by an LLM into a graph of the "
            "catalogue's ToDos (when the deployment configures an LLM).",
            tags=["planner"], examples=["Fasse die drei Berichte zusammen und schick sie Anna",
                                        "summarise these three files and mail the result to Anna"],
            input_modes=["text/plain"], output_modes=["application/json", "text/plain"],
        )
    )  # fmt: skip
    return out


def _text_skill(
    skill_id: str, name: str, description: str, members: list[str], router: intents.Router
) -> pb.AgentSkill:
    return pb.AgentSkill(
        id=skill_id, name=name, description=description, tags=["intent", *members],
        examples=_skill_examples(router, members), input_modes=["text/plain"],
        output_modes=["application/json", "text/plain"],
    )  # fmt: skip


def _family_skills(router: intents.Router) -> list[pb.AgentSkill]:
    cat = router.catalogue
    families: dict[str, list[catalogue.Action]] = {}
    for action in cat.actions.values():
        if action.name not in INTERNAL_ACTIONS:
            families.setdefault(action.name.split(".")[0], []).append(action)
    out = []
    for family, actions in sorted(families.items()):
        names = [a.name for a in actions]
        users = [i.name for i in router.intents if any(t.get("action") in names for t in i.plan)]
        first = actions[0]
        todo = {"key": "a", "action": first.name, "params": _sample(first.params, "a")}
        graph_example = {"graph": {"todos": [todo]}}
        described = "; ".join(
            f"{a.name} ({a.target}{', asks for approval' if a.requires_confirmation else ''}): "
            f"{a.description}"
            for a in actions
        )
        out.append(
            pb.AgentSkill(
                id=f"actions.{family}", name=f"{family} ToDos",
                description=f"A graph of ToDos as a data part {{'graph': {{'todos': [...]}}}} "
                f"with these actions: {described}",
                tags=["graph", *names],
                examples=[*_skill_examples(router, users, 4),
                          json.dumps(graph_example, ensure_ascii=False)],
                input_modes=["application/json", "text/plain"],
                output_modes=["application/json", "text/plain"],
            )
        )  # fmt: skip
    return out


_FORMATS = {"email": "anna@example.com", "uri": "https://example.com/",
            "date-time": "2026-12-24T09:00:00+01:00"}  # fmt: skip


def _sample(schema: Mapping[str, Any], name: str) -> Any:
    """A value of a params schema: its required properties filled, for an example graph."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: _sample(props.get(k, {}), k) for k in schema.get("required", [])}
    if kind == "string":
        if str(schema.get("pattern", "")).startswith("^http"):
            return _FORMATS["uri"]
        return _FORMATS.get(str(schema.get("format")), name)
    if kind in ("integer", "number"):
        return max(int(schema.get("minimum", 1)), 1)
    if kind == "boolean":
        return False
    if kind == "array":
        return []
    return name


def agent_card(endpoint: str, router: intents.Router | None = None) -> pb.AgentCard:
    """The Agent Card; ``endpoint`` is the absolute URL of the JSON-RPC endpoint."""
    bearer = pb.HTTPAuthSecurityScheme(
        scheme="Bearer", bearer_format="JWT",
        description="The Supabase access token the REST API takes (Authorization: Bearer).",
    )  # fmt: skip
    return pb.AgentCard(
        name="CPA Scheduler",
        description="The scheduler and planner behind CPA Desktop AI: a request in German or "
        "English (or an explicit graph of ToDos) becomes a job whose ToDos run in the cloud "
        "and on the user's desktop; follow it as an A2A task.",
        version=__version__,
        supported_interfaces=[
            pb.AgentInterface(
                url=endpoint, protocol_binding=BINDING, protocol_version=PROTOCOL_VERSION
            )
        ],
        capabilities=pb.AgentCapabilities(streaming=True, push_notifications=False),
        security_schemes={SECURITY: pb.SecurityScheme(http_auth_security_scheme=bearer)},
        security_requirements=[pb.SecurityRequirement(schemes={SECURITY: pb.StringList()})],
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["application/json", "text/plain"],
        skills=skills(router),
    )


def card_json(card: pb.AgentCard) -> dict[str, Any]:
    """The card as JSON (the 1.0 fields only: this endpoint speaks no 0.3)."""
    return dict(json_format.MessageToDict(card))
