"""Times in requests and recurring schedules: German and English expressions, IANA zones, cron.

Reading a time is ``dateparser``'s job and recurrence is ``croniter``'s; this module only
prepares the text for them and makes the results aware and correct in the caller's zone.

- Relative expressions ("in 10 Minuten", "in 2 hours") are durations: they are added to the
  current instant, so "in 2 Stunden" at 01:30 on the night clocks go forward is 2 real hours.
- Absolute expressions ("morgen um 9", "next Monday at 8") are wall-clock times in the zone;
  a time that does not exist (the skipped hour in spring) moves forward by the gap, and a time
  that exists twice (autumn) is the first one.
- Cron expressions are wall-clock too: "0 8 * * *" in Europe/Berlin is 08:00 local on every day,
  summer or winter.

``dateparser`` is imported lazily: it is slow to import and the API's cold start must stay cheap.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cpa_scheduler import errors

LANGUAGES = ["de", "en"]
# dateparser wants a naive base; for times of day and day names any fixed one will do.
_BASE = datetime(2000, 1, 3, tzinfo=UTC).replace(tzinfo=None)
_RELATIVE = re.compile(r"^(?:in|nach|after)\s+(?:\d+|einer?|einem|an?|one)\s", re.IGNORECASE)
# Rewrites that let dateparser read common spoken forms; each maps a phrase onto one it knows.
# Bare hours ("um 9", "at 8", "14 Uhr") would otherwise be read as days of the month.
_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(\d{1,2})\.(\d{1,2})\.(?!\d)"), r"\1.\2.{year}"),
    (re.compile(r"\b(?:um|gegen|at|@)\s+(\d{1,2})[:.](\d{2})(?:\s*uhr)?\b", re.I), r"\1:\2"),
    (re.compile(r"\b(?:um|gegen)\s+(\d{1,2})(?:\s*uhr)?\b", re.I), r"\1:00"),
    (re.compile(r"\b(\d{1,2})[:.](\d{2})\s*uhr\b", re.I), r"\1:\2"),
    (re.compile(r"\b(\d{1,2})\s*uhr\b", re.I), r"\1:00"),
    (re.compile(r"\bat\s+(\d{1,2})(?!\s*[:.]?\d)(?!\s*[ap]\.?m\b)", re.I), r"\1:00"),
    (re.compile(r"\bat\s+(?=\d{1,2}\s*[ap]\.?m\b)", re.I), ""),
    (re.compile(r"\b(heute|morgen|übermorgen)\s+(?:abend|abends)\b", re.I), r"\1 19:00"),
    (re.compile(r"\b(heute|morgen|übermorgen)\s+(?:nachmittag|nachmittags)\b", re.I), r"\1 15:00"),
    (re.compile(r"\b(heute|morgen|übermorgen)\s+(?:mittag|mittags)\b", re.I), r"\1 12:00"),
    (re.compile(r"\b(heute|morgen|übermorgen)\s+(?:früh|vormittag|morgens)\b", re.I), r"\1 08:00"),
    (re.compile(r"\b(?:this\s+evening|tonight)\b", re.I), "today 19:00"),
    (re.compile(r"\bthis\s+afternoon\b", re.I), "today 15:00"),
    (re.compile(r"\bthis\s+morning\b", re.I), "today 08:00"),
    (re.compile(r"\btomorrow\s+evening\b", re.I), "tomorrow 19:00"),
    (re.compile(r"\bam\s+(?=\w)", re.I), ""),
]


# A part of today ("heute Abend", "tonight") names its usual hour (the rewrites above); said
# when that hour has passed but the part of the day has not, it means "later on": one hour
# from now, rounded up to the quarter hour. The value is the hour the part ends.
_TODAY_PART = re.compile(
    r"^(?:heute\s+(?P<de>abends?|nachmittags?|mittags?|früh|vormittags?|morgens)"
    r"|(?:this\s+(?P<en>evening|afternoon|morning))|(?P<tonight>tonight))$",
    re.IGNORECASE,
)
_PART_ENDS = {"abend": 24, "evening": 24, "tonight": 24, "nachmittag": 18, "afternoon": 18,
              "mittag": 14, "früh": 12, "vormittag": 12, "morgens": 12, "morning": 12}  # fmt: skip


def _later_today(raw: str, now: datetime) -> datetime | None:
    """The time "heute Abend" said at 21:30 means, or None (not such a phrase, or
    that part of the day is over)."""
    match = _TODAY_PART.match(raw)
    if match is None:
        return None
    part = (match["de"] or match["en"] or match["tonight"]).lower()
    end = _PART_ENDS.get(part) or _PART_ENDS[part.removesuffix("s")]
    if now.hour >= end:
        return None
    later = now + timedelta(hours=1)
    later = later.replace(second=0, microsecond=0) + timedelta(minutes=-later.minute % 15)
    return later


_CLOCK_TEXT = re.compile(r"\b(\d{1,2}):(\d{2})\b(?!\s*[ap]\.?m)", re.I)


# Files of a zoneinfo tree that load but are not IANA zone names: the host's own zone, the
# POSIX rules template, tzdata's placeholder, and the leap-second ("right/") and "posix/" copies.
_NOT_ZONES = frozenset({"localtime", "posixrules", "factory", "leapseconds", "tzdata.zi"})
_ZONE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(?:/[A-Za-z0-9_+\-]+){0,2}")


def zone(name: str | None) -> ZoneInfo:
    """The IANA zone ``name`` (``UTC`` when empty), or a 422 that names it."""
    key = (name or "UTC").strip()
    try:
        if (
            not _ZONE_NAME.fullmatch(key)
            or key.lower() in _NOT_ZONES
            or key.lower().startswith(("right/", "posix/"))
        ):
            raise ValueError(key)
        return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise errors.InvalidError(
            f"The time zone {name!r} is not an IANA zone name; send one such as "
            "'Europe/Berlin', 'America/New_York' or 'UTC'.",
            errors=[{"loc": ["body", "time_zone"], "msg": "unknown time zone"}],
        ) from None


def localize(naive: datetime, tz: ZoneInfo) -> datetime:
    """A wall-clock time in ``tz``: a skipped time moves forward, a repeated one is the first."""
    aware = naive.replace(tzinfo=tz, fold=0)
    # A round trip through UTC shows whether the wall time exists (spring gap).
    return aware.astimezone(UTC).astimezone(tz)


def _prepare(text: str, year: int) -> str:
    out = " ".join(text.split())
    for rx, repl in _REWRITES:
        out = rx.sub(repl.replace("{year}", str(year)), out)
    return out.strip()


def resolve(text: str, *, tz: ZoneInfo, now: datetime | None = None) -> datetime:
    """The aware instant a German or English time expression names, in ``tz``.

    Raises a 422 that quotes the text when it cannot be read or lies in the past."""
    import dateparser  # lazily: slow to import, not needed for most requests

    now = (now or datetime.now(UTC)).astimezone(tz)
    raw = " ".join(text.split())
    relative = bool(_RELATIVE.match(raw))
    # Durations count from the current instant in UTC, where every hour is an hour; wall-clock
    # expressions are read in the zone and localised afterwards.
    base = now.astimezone(UTC).replace(tzinfo=None) if relative else now.replace(tzinfo=None)
    settings: dict[str, Any] = {
        "RELATIVE_BASE": base,
        "PREFER_DATES_FROM": "future",
        "DATE_ORDER": "DMY",
        "RETURN_AS_TIMEZONE_AWARE": False,
        "STRICT_PARSING": False,
    }
    prepared = _prepare(raw, now.year)
    parsed = dateparser.parse(prepared, languages=LANGUAGES, settings=settings)
    clock_named = _CLOCK_TEXT.search(prepared)
    if parsed is not None and clock_named and not relative:
        # dateparser drops a part it cannot read ("morgen 25:00" is just "morgen"): a named
        # time of day must be the one it returns.
        if (parsed.hour, parsed.minute) != (int(clock_named[1]), int(clock_named[2])):
            parsed = None
    if parsed is None:
        raise errors.InvalidError(
            f"The time {text!r} cannot be read; say it like 'in 10 Minuten', 'morgen um 9', "
            "'am Freitag um 14 Uhr', 'tomorrow at 9am' or 'next Monday at 8'.",
            errors=[{"loc": ["body", "request"], "msg": "unreadable time"}],
        )
    when = parsed.replace(tzinfo=UTC).astimezone(tz) if relative else localize(parsed, tz)
    if when < now - timedelta(seconds=1) and (later := _later_today(raw, now)) is not None:
        when = later
    if when < now - timedelta(seconds=1):
        raise errors.InvalidError(
            f"The time {text!r} is in the past ({when.isoformat(timespec='minutes')} in "
            f"{tz.key}); give a future time.",
            errors=[{"loc": ["body", "request"], "msg": "time in the past"}],
        )
    return when


# Recurrence -------------------------------------------------------------------------------------

_DAYS = (
    r"montag|dienstag|mittwoch|donnerstag|freitag|samstag|sonntag|"
    r"monday|tuesday|wednesday|thursday|friday|saturday|sunday"
)
_CLOCK = r"(?:um|at|gegen)\s+\d{1,2}(?:[:.]\d{2})?(?:\s*(?:uhr|[ap]\.?m\.?))?"
_RECURRING = re.compile(
    r"^(?:(?:jeden|jede|jedes|every|each)\s+(?P<day>tag|day|werktag|weekday|" + _DAYS + r")"
    r"|(?P<daily>täglich|daily|werktags|weekdays|(?:" + _DAYS + r")s))"
    r"(?:\s+(?:morgen|früh|morning|abend|evening))?"
    r"(?:\s+(?P<clock>" + _CLOCK + r"))?[,:]?\s+(?P<rest>.+)$",
    re.IGNORECASE,
)
_EVERY_N = re.compile(
    r"^(?:alle|every)\s+(?P<n>\d{1,2})\s+(?P<unit>minuten|minutes|stunden|hours)[,:]?\s+(?P<rest>.+)$",
    re.IGNORECASE,
)


# Standard cron: numbers (ASCII digits), ranges, lists, steps and '*'; month and weekday may be
# named (JAN, MON). croniter also reads extensions (L, W, #, a sixth field, any Unicode digit).
_CRON_NUMERIC = re.compile(r"[0-9*,/\-]+")
_CRON_NAMED = re.compile(r"(?:[0-9*,/\-]|(?<![A-Za-z])[A-Za-z]{3}(?![A-Za-z]))+")
_CRON_NAMES = {
    3: {"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"},
    4: {"sun", "mon", "tue", "wed", "thu", "fri", "sat"},
}
_CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")


def validate_cron(expr: str) -> str:
    """``expr`` normalised, when it is a standard 5-field cron expression that occurs; else a
    422 that names it and says why."""
    from croniter import CroniterError, croniter

    fields = expr.split()
    clean = " ".join(fields)
    why = None
    if clean.startswith("@"):
        why = (
            f"{clean!r} is a macro, not 5 fields; write '0 0 * * *' for @daily, '0 * * * *' for "
            "@hourly, '0 0 * * 0' for @weekly"
        )
    elif len(fields) != 5:
        why = f"it has {len(fields)} fields, not 5"
    else:
        for i, field in enumerate(fields):
            names = _CRON_NAMES.get(i)
            pattern = _CRON_NAMED if names else _CRON_NUMERIC
            words = {w.lower() for w in re.findall(r"[A-Za-z]+", field)}
            if not pattern.fullmatch(field) or (names and not words <= names):
                why = (
                    f"its {_CRON_FIELDS[i]} field {field!r} is not standard cron (ASCII digits, "
                    "'*', ',', '-', '/'" + (", or 3-letter names" if names else "") + "; no "
                    "L, W, # or ?)"
                )
                break
        if why is None and not croniter.is_valid(clean):
            why = "a field is out of range (minute 0-59, hour 0-23, day 1-31, month 1-12, weekday 0-7) or malformed"
    if why is None:
        try:  # a valid expression may still never occur: the 30th of February
            croniter(clean, _BASE).get_next(datetime)
        except (CroniterError, ValueError):
            why = "no date matches it (the day does not exist in that month)"
    if why is not None:
        raise errors.InvalidError(
            f"The cron expression {expr!r} is not valid: {why}. Give 5 fields (minute hour "
            "day-of-month month day-of-week), for example '0 8 * * 1' for Mondays at 08:00.",
            errors=[{"loc": ["body", "cron"], "msg": f"invalid cron expression: {why}"}],
        )
    return clean


def cron_next(expr: str, tz: ZoneInfo, after: datetime) -> datetime:
    """The first occurrence of ``expr`` (wall-clock in ``tz``) strictly after ``after``."""
    from croniter import CroniterError, croniter

    local = after.astimezone(tz)
    # Iterate in naive wall-clock time, then localise: cron names local times, not offsets.
    try:
        it = croniter(expr, local.replace(tzinfo=None, fold=0))
        for _ in range(1000):
            when = localize(it.get_next(datetime), tz)
            if when > after:
                return when
    except (CroniterError, ValueError):
        pass
    raise errors.InvalidError(f"The cron expression {expr!r} has no future occurrence.")


def cron_latest(expr: str, tz: ZoneInfo, since: datetime, until: datetime) -> datetime | None:
    """The last occurrence in ``[since, until]``: the one a catch-up runs, or None."""
    latest = None
    when = cron_next(expr, tz, since - timedelta(microseconds=1))
    # Bounded: a schedule missed for a long time is caught up once, so stepping through more
    # than a day of minutes is cut short by jumping close to ``until`` first.
    if until - since > timedelta(days=2):
        when = cron_next(expr, tz, until - timedelta(days=1))
        if when > until:
            from croniter import croniter

            it = croniter(expr, until.astimezone(tz).replace(tzinfo=None))
            prev = localize(it.get_prev(datetime), tz)
            return prev if prev >= since else None
    while when <= until:
        latest = when
        when = cron_next(expr, tz, when)
    return latest


def clock(text: str) -> tuple[int, int]:
    """Hour and minute of a time of day such as 'um 8 Uhr', 'at 7am' or 'um 18:30'."""
    import dateparser

    parsed = dateparser.parse(
        _prepare(text, 2000), languages=LANGUAGES, settings={"RELATIVE_BASE": _BASE}
    )
    if parsed is None:
        raise errors.InvalidError(
            f"The time of day {text!r} cannot be read; say 'um 8 Uhr' or 'at 7am'."
        )
    return parsed.hour, parsed.minute


def _weekday(name: str) -> int:
    """Cron's day-of-week number (Sunday 0) for a German or English day name."""
    import dateparser

    parsed = dateparser.parse(name, languages=LANGUAGES, settings={"RELATIVE_BASE": _BASE})
    if parsed is None:
        raise errors.InvalidError(f"The day {name!r} is not a weekday.")
    return (parsed.weekday() + 1) % 7


def recurring(text: str) -> tuple[str, str] | None:
    """``(cron, rest)`` when a request starts with a recurrence ("Jeden Montag um 8 Uhr ...",
    "every day at 7am ...", "alle 15 Minuten ..."), else None."""
    clean = " ".join(text.split())
    every = _EVERY_N.match(clean)
    if every:
        n, unit = int(every["n"]), every["unit"].lower()
        if n < 1 or (unit.startswith("m") and n > 59) or (not unit.startswith("m") and n > 23):
            raise errors.InvalidError(f"The interval {every.group(0)!r} is out of range.")
        cron = f"*/{n} * * * *" if unit.startswith("m") else f"0 */{n} * * *"
        return cron, every["rest"]
    match = _RECURRING.match(clean)
    if match is None:
        return None
    hour, minute = clock(match["clock"]) if match["clock"] else (8, 0)
    day = (match["day"] or match["daily"]).lower()
    if day in ("tag", "day", "täglich", "daily"):
        dow = "*"
    elif day in ("werktag", "weekday", "werktags", "weekdays"):
        dow = "1-5"
    else:
        dow = str(_weekday(day[:-1] if day.endswith("s") and match["daily"] else day))
    return f"{minute} {hour} * * {dow}", match["rest"]
