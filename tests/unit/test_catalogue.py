"""The action catalogue: built-ins, params validation and load errors."""

from __future__ import annotations

import pytest
from cpa_scheduler import catalogue, errors, protocol


def spec(*todos: dict[str, object]) -> protocol.GraphSpec:
    return protocol.GraphSpec.model_validate({"todos": list(todos)})


def test_builtin_actions_are_present() -> None:
    cat = catalogue.default()
    for name in ["noop", "wait", "notify", "http.request", "llm.generate", "plan"]:
        assert cat.actions[name].target == "cloud"
    for name in ["desktop.open_app", "file.write", "email.send"]:
        assert cat.actions[name].target == "desktop"
    assert cat.actions["email.send"].requires_confirmation
    assert len(cat.version) == 16


def test_build_fills_target_and_confirmation() -> None:
    g = catalogue.default().build(
        spec(
            {
                "key": "mail",
                "action": "email.send",
                "params": {"to": "a@b.c", "subject": "s", "body": "b"},
            },
            {"key": "t", "action": "wait", "params": {"seconds": 1}, "depends_on": ["mail"]},
        )
    )
    assert g["mail"].target == "desktop"
    assert g["mail"].requires_confirmation is True
    assert g["t"].target == "cloud"


def test_unknown_action_names_key_and_action() -> None:
    with pytest.raises(errors.ActionError) as info:
        catalogue.default().build(spec({"key": "x", "action": "teleport"}))
    assert "'x'" in info.value.message and "'teleport'" in info.value.message
    assert info.value.errors[0]["loc"] == ["todos", "x", "action"]


def test_bad_params_name_key_and_field() -> None:
    with pytest.raises(errors.ActionError) as info:
        catalogue.default().build(
            spec({"key": "w", "action": "wait", "params": {"seconds": "ten"}})
        )
    assert "'w'" in info.value.message and "seconds" in info.value.message
    assert info.value.errors[0]["loc"] == ["todos", "w", "params", "seconds"]


def test_missing_required_param() -> None:
    with pytest.raises(errors.ActionError, match="'app' is a required property"):
        catalogue.default().build(spec({"key": "o", "action": "desktop.open_app"}))


def test_extra_param_is_rejected() -> None:
    with pytest.raises(errors.ActionError, match="Additional properties"):
        catalogue.default().build(
            spec({"key": "w", "action": "wait", "params": {"seconds": 1, "x": 2}})
        )


def test_ref_stands_in_for_any_value() -> None:
    g = catalogue.default().build(
        spec(
            {"key": "a", "action": "noop", "params": {"seconds": 2}},
            {
                "key": "w",
                "action": "wait",
                "params": {"seconds": {"$ref": "a.result.seconds"}},
                "depends_on": ["a"],
            },
        )
    )
    assert g["w"].params["seconds"] == {"$ref": "a.result.seconds"}


def test_target_mismatch_is_rejected() -> None:
    with pytest.raises(errors.ActionError, match="runs on 'desktop'"):
        catalogue.default().build(
            spec(
                {
                    "key": "o",
                    "action": "desktop.open_app",
                    "params": {"app": "x"},
                    "target": "cloud",
                }
            )
        )


def test_graph_rules_apply_after_actions() -> None:
    with pytest.raises(errors.CycleError, match="a -> b -> a"):
        catalogue.default().build(
            spec(
                {"key": "a", "action": "noop", "depends_on": ["b"]},
                {"key": "b", "action": "noop", "depends_on": ["a"]},
            )
        )


def test_too_large_graph() -> None:
    todos = [{"key": f"k{i}", "action": "noop"} for i in range(5)]
    with pytest.raises(errors.GraphTooLargeError, match="5 ToDos but at most 4"):
        catalogue.default().build(spec(*todos), max_todos=4)


def test_size_is_checked_before_any_todo() -> None:
    todos = [{"key": f"k{i}", "action": "fly"} for i in range(catalogue.MAX_TODOS + 1)]
    with pytest.raises(errors.GraphTooLargeError, match=f"at most {catalogue.MAX_TODOS}"):
        catalogue.default().build(spec(*todos))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("actions: {}", "non-empty 'actions'"),
        ("- a\n- b", "must be a YAML mapping"),
        ("actions: [", "not valid YAML"),
        ("actions: {x: {target: moon, description: d}}", "'x' is malformed"),
        (
            "actions: {x: {target: cloud, description: d, params: {type: 12}}}",
            "'x' has an invalid params schema",
        ),
        ("actions: {x: 3}", "'x' must be a mapping"),
    ],
)
def test_load_errors_name_the_problem(text: str, match: str) -> None:
    with pytest.raises(errors.ConfigError, match=match):
        catalogue.load_from_dict(catalogue.load_yaml(text, "The action catalogue"))
