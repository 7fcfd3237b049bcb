"""The intent router: every YAML example, robustness, templates and load errors."""

from __future__ import annotations

from datetime import datetime

import pytest
from cpa_scheduler import catalogue, errors, intents, times

ROUTER = intents.default()
# A fixed clock: the examples name times ("heute Abend") that the real hour could have passed.
CLOCK = datetime(2026, 12, 7, 9, 0, tzinfo=times.zone("Europe/Berlin"))


def at_clock(when: str) -> str:
    return times.resolve(when, tz=CLOCK.tzinfo, now=CLOCK).isoformat()  # type: ignore[arg-type]


POSITIVE = [(i.name, s) for i in ROUTER.intents for s in i.examples.get("positive", [])]
NEGATIVE = [(i.name, s) for i in ROUTER.intents for s in i.examples.get("negative", [])]


def test_at_least_15_intents_with_examples() -> None:
    assert len(ROUTER.intents) >= 15
    for intent in ROUTER.intents:
        assert intent.examples.get("positive"), intent.name
        assert intent.examples.get("negative"), intent.name


@pytest.mark.parametrize(("name", "text"), POSITIVE)
def test_positive_examples_route_to_their_intent(name: str, text: str) -> None:
    routed = ROUTER.route(text, resolve_time=at_clock)
    assert routed.intent == name
    assert routed.graph is not None
    catalogue.default().build(routed.graph)  # the filled template is a valid graph


@pytest.mark.parametrize(("name", "text"), NEGATIVE)
def test_negative_examples_do_not(name: str, text: str) -> None:
    assert ROUTER.route(text, resolve_time=at_clock).intent != name


@pytest.mark.parametrize(
    "variant",
    [
        "Erinnere mich morgen um 9 an den Zahnarzt",
        "ERINNERE MICH MORGEN UM 9 AN DEN ZAHNARZT",
        "  erinnere   mich\tmorgen um 9\n an den Zahnarzt  ",
    ],
)
def test_case_and_whitespace_do_not_matter(variant: str) -> None:
    routed = ROUTER.route(variant, resolve_time=at_clock)
    assert routed.intent == "reminder"
    assert routed.groups["what"].lower() == "den zahnarzt"
    assert routed.groups["when"].lower() == "morgen um 9"


def test_unknown_falls_back_without_a_plan() -> None:
    routed = ROUTER.route("Bestelle mir bitte eine Pizza mit extra Käse")
    assert routed.intent == intents.UNKNOWN
    assert routed.graph is None


def test_timer_derives_typed_seconds() -> None:
    routed = ROUTER.route("Stell einen Timer auf 2 Minuten")
    assert routed.graph is not None
    wait = routed.graph.todos[0]
    assert wait.params == {"seconds": 120}


def test_defaults_fill_missing_optional_groups() -> None:
    routed = ROUTER.route("remind me to water the plants")
    assert routed.graph is not None
    # No time named: the reminder fires at once (no run_at).
    assert routed.graph.todos[0].params == {"title": "Erinnerung", "message": "water the plants"}
    assert routed.graph.todos[0].run_at is None


def test_briefing_fans_out_then_joins() -> None:
    routed = ROUTER.route("daily briefing")
    assert routed.graph is not None
    g = catalogue.default().build(routed.graph)
    assert g.batches()[0] == ["calendar", "mail", "news"]
    assert g["summary"].depends_on == ("calendar", "mail", "news")


def test_load_from_dict() -> None:
    router = intents.load_from_dict(
        {
            "intents": [
                {
                    "name": "hello",
                    "patterns": [r"^hallo (?P<who>\w+)$"],
                    "plan": [
                        {"key": "n", "action": "notify", "params": {"message": "Hallo {who}"}}
                    ],
                }
            ]
        }
    )
    routed = router.route("HALLO Welt")
    assert routed.intent == "hello"
    assert routed.graph is not None
    assert routed.graph.todos[0].params == {"message": "Hallo Welt"}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            {"name": "x", "patterns": ["(unclosed"], "plan": [{"key": "a", "action": "noop"}]},
            r"intent 'x' has an invalid pattern '\(unclosed'",
        ),
        (
            {
                "name": "x",
                "patterns": ["^a$"],
                "plan": [{"key": "a", "action": "notify", "params": {"message": "{who}"}}],
            },
            "intent 'x' pattern '\\^a\\$' has no group for who",
        ),
        (
            {"name": "x", "patterns": ["^a$"], "plan": [{"key": "a", "action": "teleport"}]},
            "intent 'x' has an invalid plan template",
        ),
        (
            {"name": "x", "patterns": [], "plan": [{"key": "a", "action": "noop"}]},
            "intent 'x' is malformed at patterns",
        ),
        (
            {"name": "unknown", "patterns": ["a"], "plan": [{"key": "a", "action": "noop"}]},
            "reserved",
        ),
    ],
)
def test_load_errors_name_intent_and_pattern(body: dict[str, object], match: str) -> None:
    with pytest.raises(errors.ConfigError, match=match):
        intents.load_from_dict({"intents": [body]})


def test_yaml_errors() -> None:
    with pytest.raises(errors.ConfigError, match="The intents file is not valid YAML"):
        catalogue.load_yaml("intents: [", "The intents file")
    with pytest.raises(errors.ConfigError, match="non-empty 'intents'"):
        intents.load_from_dict(catalogue.load_yaml("intents: []", "The intents file"))
