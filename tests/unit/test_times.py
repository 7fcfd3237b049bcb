"""German and English time expressions and cron, against a fixed "now" in fixed zones."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from cpa_scheduler import errors, intents, times

BERLIN = times.zone("Europe/Berlin")
NY = times.zone("America/New_York")
# Friday, 27 November 2026, 10:15 in Berlin.
NOW = datetime(2026, 11, 27, 10, 15, tzinfo=BERLIN)
# Saturday before the spring change (Sunday 29 March 2026, 02:00 -> 03:00).
SPRING_EVE = datetime(2026, 3, 28, 12, 0, tzinfo=BERLIN)
SPRING_NIGHT = datetime(2026, 3, 29, 1, 30, tzinfo=BERLIN)
# Saturday before the autumn change (Sunday 25 October 2026, 03:00 -> 02:00).
AUTUMN_EVE = datetime(2026, 10, 24, 12, 0, tzinfo=BERLIN)
AUTUMN_NIGHT = datetime(2026, 10, 25, 1, 30, tzinfo=BERLIN)

CASES = [
    # relative, German and English
    ("in 30 Sekunden", NOW, BERLIN, "2026-11-27T10:15:30+01:00"),
    ("in 10 Minuten", NOW, BERLIN, "2026-11-27T10:25:00+01:00"),
    ("in 2 Stunden", NOW, BERLIN, "2026-11-27T12:15:00+01:00"),
    ("in 3 Tagen", NOW, BERLIN, "2026-11-30T10:15:00+01:00"),
    ("in einer Stunde", NOW, BERLIN, "2026-11-27T11:15:00+01:00"),
    ("in 5 minutes", NOW, BERLIN, "2026-11-27T10:20:00+01:00"),
    ("in 2 hours", NOW, NY, "2026-11-27T06:15:00-05:00"),
    # absolute, German
    ("morgen um 9", NOW, BERLIN, "2026-11-28T09:00:00+01:00"),
    ("morgen um 9 Uhr", NOW, BERLIN, "2026-11-28T09:00:00+01:00"),
    ("übermorgen um 18:30", NOW, BERLIN, "2026-11-29T18:30:00+01:00"),
    ("am Freitag um 14 Uhr", NOW, BERLIN, "2026-12-04T14:00:00+01:00"),
    ("am Montag um 8 Uhr", NOW, BERLIN, "2026-11-30T08:00:00+01:00"),
    ("heute Abend", NOW, BERLIN, "2026-11-27T19:00:00+01:00"),
    ("heute um 17:45", NOW, BERLIN, "2026-11-27T17:45:00+01:00"),
    ("um 15 Uhr", NOW, BERLIN, "2026-11-27T15:00:00+01:00"),
    ("um 9.30 Uhr", NOW, BERLIN, "2026-11-28T09:30:00+01:00"),
    ("morgen früh", NOW, BERLIN, "2026-11-28T08:00:00+01:00"),
    ("am 24.12. um 10", NOW, BERLIN, "2026-12-24T10:00:00+01:00"),
    # absolute, English
    ("tomorrow at 9am", NOW, BERLIN, "2026-11-28T09:00:00+01:00"),
    ("next Monday at 8", NOW, BERLIN, "2026-11-30T08:00:00+01:00"),
    ("Friday at 2pm", NOW, BERLIN, "2026-12-04T14:00:00+01:00"),
    ("at 5pm", NOW, BERLIN, "2026-11-27T17:00:00+01:00"),
    ("tomorrow at 9am", NOW, NY, "2026-11-28T09:00:00-05:00"),
    ("this evening", NOW, BERLIN, "2026-11-27T19:00:00+01:00"),
    # spring: wall-clock times keep their hour, durations count real hours, the gap moves on
    ("morgen um 9", SPRING_EVE, BERLIN, "2026-03-29T09:00:00+02:00"),
    ("in 2 Stunden", SPRING_NIGHT, BERLIN, "2026-03-29T04:30:00+02:00"),
    ("um 2:30", SPRING_NIGHT, BERLIN, "2026-03-29T03:30:00+02:00"),
    # autumn: the same, and a repeated wall time is its first occurrence
    ("morgen um 9", AUTUMN_EVE, BERLIN, "2026-10-25T09:00:00+01:00"),
    ("in 2 Stunden", AUTUMN_NIGHT, BERLIN, "2026-10-25T02:30:00+01:00"),
    ("um 2:30", AUTUMN_NIGHT, BERLIN, "2026-10-25T02:30:00+02:00"),
    # a part of today said when its hour has passed: one hour on, rounded up to the quarter
    ("heute Abend", datetime(2026, 12, 7, 21, 30, tzinfo=BERLIN), BERLIN,
     "2026-12-07T22:30:00+01:00"),
    ("heute Abend", datetime(2026, 12, 7, 20, 2, tzinfo=BERLIN), BERLIN,
     "2026-12-07T21:15:00+01:00"),
    ("tonight", datetime(2026, 12, 31, 23, 59, tzinfo=times.zone("UTC")), times.zone("UTC"),
     "2027-01-01T01:00:00+00:00"),
    ("this evening", datetime(2026, 3, 29, 1, 30, tzinfo=BERLIN), BERLIN,
     "2026-03-29T19:00:00+02:00"),
    ("heute Abend", datetime(2026, 10, 25, 22, 50, tzinfo=BERLIN), BERLIN,
     "2026-10-26T00:00:00+01:00"),
    ("heute Nachmittag", datetime(2026, 12, 7, 16, 5, tzinfo=BERLIN), BERLIN,
     "2026-12-07T17:15:00+01:00"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "now", "tz", "expected"), CASES)
def test_expressions(text: str, now: datetime, tz: ZoneInfo, expected: str) -> None:
    assert times.resolve(text, tz=tz, now=now).isoformat() == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [("gestern", "in the past"), ("heute um 9", "in the past"), ("Blabla", "cannot be read"),
     ("um 25 Uhr", "cannot be read")],
)  # fmt: skip
def test_unreadable_or_past_times_quote_the_text(text: str, why: str) -> None:
    with pytest.raises(errors.InvalidError, match=why) as info:
        times.resolve(text, tz=BERLIN, now=NOW)
    assert repr(text) in info.value.message
    assert info.value.status == 422


def test_a_part_of_today_that_is_over_is_in_the_past() -> None:
    with pytest.raises(errors.InvalidError, match="in the past"):
        times.resolve("heute Nachmittag", tz=BERLIN, now=datetime(2026, 12, 7, 19, tzinfo=BERLIN))


@pytest.mark.parametrize("name", ["Mars/Olympus", "", "../etc/passwd", "Europe/"])
def test_unknown_zone_names_the_value(name: str) -> None:
    if name == "":
        assert times.zone(name).key == "UTC"
        return
    with pytest.raises(errors.InvalidError, match="IANA") as info:
        times.zone(name)
    assert repr(name) in info.value.message


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        # 08:00 local on every day, whatever the offset
        (datetime(2026, 3, 28, 9, 0, tzinfo=BERLIN), "2026-03-29T08:00:00+02:00"),
        (datetime(2026, 10, 24, 9, 0, tzinfo=BERLIN), "2026-10-25T08:00:00+01:00"),
    ],
)
def test_cron_is_wall_clock_across_dst(after: datetime, expected: str) -> None:
    assert times.cron_next("0 8 * * *", BERLIN, after).isoformat() == expected


def test_cron_in_the_dst_gap_and_overlap_runs_once() -> None:
    # 02:30 does not exist on 29 March: that day it runs at 03:30 CEST.
    spring = times.cron_next("30 2 * * *", BERLIN, datetime(2026, 3, 28, 9, tzinfo=BERLIN))
    assert spring.isoformat() == "2026-03-29T03:30:00+02:00"
    # 02:30 exists twice on 25 October: it runs once, at the first.
    first = times.cron_next("30 2 * * *", BERLIN, datetime(2026, 10, 24, 9, tzinfo=BERLIN))
    assert first.isoformat() == "2026-10-25T02:30:00+02:00"
    assert times.cron_next("30 2 * * *", BERLIN, first).isoformat() == "2026-10-26T02:30:00+01:00"


def test_cron_latest_is_the_one_catch_up_runs() -> None:
    since = datetime(2026, 11, 27, 10, 0, tzinfo=BERLIN)
    until = datetime(2026, 11, 27, 10, 12, tzinfo=BERLIN)
    latest = times.cron_latest("*/5 * * * *", BERLIN, since, until)
    assert latest is not None and latest.isoformat() == "2026-11-27T10:10:00+01:00"
    long_ago = datetime(2026, 1, 1, tzinfo=BERLIN)
    assert times.cron_latest("*/5 * * * *", BERLIN, long_ago, until) == latest


@pytest.mark.parametrize("cron", ["* * * *", "61 * * * *", "every day", "0 8 * * * *"])
def test_bad_cron_names_it(cron: str) -> None:
    with pytest.raises(errors.InvalidError, match="cron") as info:
        times.validate_cron(cron)
    assert repr(cron) in info.value.message


@pytest.mark.parametrize(
    ("text", "cron", "rest"),
    [
        (
            "Jeden Montag um 8 Uhr erinnere mich an den Müll",
            "0 8 * * 1",
            "erinnere mich an den Müll",
        ),
        ("every day at 7am give me my daily briefing", "0 7 * * *", "give me my daily briefing"),
        ("täglich um 18:30 check my email", "30 18 * * *", "check my email"),
        ("every weekday at 9 check my email", "0 9 * * 1-5", "check my email"),
        ("jeden Sonntag um 20 Uhr Habe ich neue Mails?", "0 20 * * 0", "Habe ich neue Mails?"),
        ("alle 15 Minuten check my email", "*/15 * * * *", "check my email"),
    ],
)
def test_recurring_requests_become_cron(text: str, cron: str, rest: str) -> None:
    assert times.recurring(text) == (cron, rest)


def test_plain_requests_are_not_recurring() -> None:
    assert times.recurring("Erinnere mich morgen um 9 an den Zahnarzt") is None
    assert times.recurring("Check my email") is None


def test_reminder_resolves_in_the_callers_zone() -> None:
    routed = intents.default().route(
        "Erinnere mich morgen um 9 an den Zahnarzt",
        resolve_time=lambda when: times.resolve(when, tz=BERLIN, now=NOW).isoformat(),
    )
    assert routed.graph is not None
    remind = routed.graph.todos[0]
    assert remind.action == "notify" and remind.target is None
    assert remind.run_at is not None and remind.run_at.isoformat() == "2026-11-28T09:00:00+01:00"
    assert routed.if_agent_offers == {"native"}
